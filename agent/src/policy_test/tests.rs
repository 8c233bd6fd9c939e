//! Unit tests: test files checked with errors at their lines, cases passing and failing against
//! real policy files, decidedBy and rule mismatches, coverage, JUnit XML, and the shipped example.

use std::path::{Path, PathBuf};

use super::{Outcome, TestFileError, coverage, discover, junit, report, run_found};

const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: pay-only-frontend
  namespace: prod
spec:
  selector: { matchLabels: { app: payment-service } }
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/frontend"] } }]
    to: [{ operation: { methods: ["POST"], paths: ["/v1/pay"] } }]
  - to: [{ operation: { paths: ["/healthz"] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
  namespace: prod
spec:
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin*"] } }]
"#;

const HEAD: &str = r#"apiVersion: test.latch.dev/v1
kind: PolicyTest
metadata: { name: unit }
spec:
  workloads:
  - { name: payment, namespace: prod, serviceAccount: payment, labels: { app: payment-service }, ips: [10.244.2.2] }
  - { name: frontend, namespace: prod, serviceAccount: frontend, ips: [10.244.1.2] }
  cases:
"#;

/// A fresh directory holding the policy file and `test.yaml` = HEAD + `cases`.
fn dir_with(name: &str, cases: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latch-policy-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("policy.yaml"), POLICY).expect("write policy");
    std::fs::write(dir.join("test.yaml"), format!("{HEAD}{cases}")).expect("write test");
    dir
}

fn run_dir(name: &str, cases: &str) -> Outcome {
    let dir = dir_with(name, cases);
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid test");
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// The errors of a test document given as text (file name `t.yaml`).
fn errors_of(text: &str) -> Vec<String> {
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    discover::in_file(Path::new("t.yaml"), text, &mut found, &mut errors);
    assert!(found.is_empty(), "no suite from an invalid document");
    errors.iter().map(ToString::to_string).collect()
}

fn assert_has(errors: &[String], needle: &str) {
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "{needle:?} not in:\n{}",
        errors.join("\n")
    );
}

#[test]
fn bad_test_files_are_reported_at_their_lines_and_fields() {
    let text = format!(
        "{HEAD}  - name: one\n    from: frontends\n    to: payment:80800\n    expect: ALLOW\n\
         \x20 - name: two\n    from: frontend\n    to: 10.9.9.9:80\n    expect: DENY\n\
         \x20   decidedBy: nobody\n    request: {{ path: \"/%zz\", headers: {{ \"a b\": x }} }}\n"
    );
    let errors = errors_of(&text);
    assert_has(
        &errors,
        "t.yaml:10:5: spec.cases[0].from: \"frontends\" is not a workload",
    );
    assert_has(
        &errors,
        "t.yaml:11:5: spec.cases[0].to: \"80800\" is not a port",
    );
    assert_has(
        &errors,
        "t.yaml:15:5: spec.cases[1].to: no workload of spec.workloads has the address 10.9.9.9",
    );
    assert_has(
        &errors,
        "t.yaml:17:5: spec.cases[1].decidedBy: \"nobody\": expected NAMESPACE/NAME",
    );
    assert_has(&errors, "t.yaml:18:");
    assert_has(
        &errors,
        "spec.cases[1].request.path: \"/%zz\": invalid percent escape",
    );
    assert_has(
        &errors,
        "spec.cases[1].request.headers.a b: \"a b\" is not a valid header name",
    );
    assert_eq!(errors.len(), 6, "{errors:#?}");

    // Type and field errors stop the document, at their position.
    let errors = errors_of(&format!(
        "{HEAD}  - {{ name: x, from: frontend, to: payment:80, expect: allow }}\n"
    ));
    assert_has(&errors, "t.yaml:9:");
    assert_has(
        &errors,
        "spec.cases[0].expect: unknown variant `allow`, expected `ALLOW` or `DENY`",
    );
    let errors = errors_of(
        "apiVersion: test.latch.dev/v1\nkind: PolicyTest\nspec:\n  cases: []\n  colour: red\n",
    );
    assert_has(&errors, "t.yaml:5:3: spec.colour: unknown field `colour`");

    // A document of a multi-document file: lines count from the top of the file.
    let errors = errors_of(&format!("a: 1\n---\n{HEAD}"));
    assert_has(&errors, "t.yaml:10:");
    assert_has(&errors, "spec.cases: no cases");

    let errors = errors_of(
        "apiVersion: test.latch.dev/v2\nkind: PolicyTest\nspec:\n  trustDomain: Bad!\n  \
         workloads: [{ name: plaintext, namespace: prod, ips: [10.0.0.1] }, \
         { name: b, namespace: prod }]\n",
    );
    assert_has(
        &errors,
        "t.yaml:1:1: apiVersion: unsupported apiVersion \"test.latch.dev/v2\"",
    );
    assert_has(
        &errors,
        "t.yaml:4:3: spec.trustDomain: \"Bad!\" is not a trust domain",
    );
    assert_has(
        &errors,
        "spec.workloads[0].name: \"plaintext\" cannot name a workload",
    );
    assert_has(&errors, "spec.workloads[1].ips: at least one address");
    // A bad trust domain is said once, not again for each workload's SPIFFE ID.
    assert_eq!(errors.len(), 5, "{errors:#?}");

    let errors = errors_of("apiVersion: test.latch.dev/v1\nkind: PolicyTest\nspec: [\n");
    assert_has(&errors, "t.yaml:");
    assert_has(&errors, "YAML syntax");
}

#[test]
fn cases_pass_and_fail_with_the_decider_in_the_line() {
    let outcome = run_dir(
        "verdicts",
        r#"  - name: frontend pays
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/x/../pay, host: "payment:8080" }
    expect: ALLOW
    decidedBy: prod/pay-only-frontend
    rule: 0
  - name: frontend reads, wrongly expected
    from: frontend
    to: payment:8080
    request: { method: GET, path: /v1/pay }
    expect: ALLOW
  - name: admin is denied to everyone
    from: spiffe://cluster.local/ns/prod/sa/frontend
    to: 10.244.2.2:8080
    request: { path: /admin/x }
    expect: DENY
    decidedBy: prod/no-admin
    rule: 0
  - name: plain TCP, wrongly expected
    from: frontend
    to: payment:8080
    expect: ALLOW
"#,
    );
    assert_eq!((outcome.passed(), outcome.failed()), (2, 2));
    assert!(!outcome.ok());
    let text = report::render(&outcome);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].ends_with(
            "test.yaml:16: frontend reads, wrongly expected: expected ALLOW, got DENY by default \
             (ALLOW policies apply but none matched) [wrong: decision]"
        ),
        "{text}"
    );
    // Istio's TCP rules: a DENY rule with HTTP fields matches a connection on its other fields.
    assert!(
        lines[1].contains(
            "test.yaml:28: plain TCP, wrongly expected: expected ALLOW, got DENY by \
             AuthorizationPolicy prod/no-admin (DENY), rule 0 [wrong: decision]"
        ),
        "{text}"
    );
    assert!(
        lines[1].contains("decided as a connection without HTTP"),
        "{text}"
    );
    assert_eq!(lines[2], "2 passed, 2 failed");
}

#[test]
fn a_wrong_decider_or_rule_fails_the_case_even_with_the_right_verdict() {
    let outcome = run_dir(
        "decider",
        r#"  - name: wrong policy
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
    decidedBy: prod/no-admin
  - name: wrong rule
    from: frontend
    to: payment:8080
    request: { path: /healthz }
    expect: ALLOW
    decidedBy: prod/pay-only-frontend
    rule: 0
  - name: not the default
    from: frontend
    to: payment:8080
    request: { path: /healthz }
    expect: ALLOW
    decidedBy: default
  - name: plaintext allowed by the rule without a source
    from: plaintext
    to: payment:8080
    request: { path: /healthz }
    expect: ALLOW
    rule: 1
"#,
    );
    assert_eq!((outcome.passed(), outcome.failed()), (1, 3));
    let text = report::render(&outcome);
    assert!(
        text.contains(
            "wrong policy: expected ALLOW by prod/no-admin, got ALLOW by AuthorizationPolicy \
             prod/pay-only-frontend (ALLOW), rule 0 [wrong: decidedBy]"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "wrong rule: expected ALLOW by prod/pay-only-frontend, rule 0, got ALLOW by \
             AuthorizationPolicy prod/pay-only-frontend (ALLOW), rule 1 [wrong: rule]"
        ),
        "{text}"
    );
    assert!(text.contains("not the default: expected ALLOW by default, got ALLOW by AuthorizationPolicy prod/pay-only-frontend (ALLOW), rule 1 [wrong: decidedBy]"), "{text}");
}

#[test]
fn strict_mtls_and_a_peer_authentication_are_named_as_deciders() {
    let dir = dir_with(
        "strict",
        r#"  - name: plaintext refused by the STRICT default
    from: plaintext
    to: payment:8080
    request: { path: /healthz }
    expect: DENY
    decidedBy: default
"#,
    );
    let test = std::fs::read_to_string(dir.join("test.yaml")).expect("read");
    std::fs::write(
        dir.join("test.yaml"),
        test.replace("spec:\n", "spec:\n  mtlsMode: STRICT\n"),
    )
    .expect("write");
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid");
    assert!(outcome.ok(), "{}", report::render(&outcome));

    // A PeerAuthentication of the workload's namespace overrides the default: PERMISSIVE lets
    // the plaintext request through to authorization, whose rule 1 allows it.
    let peer = |mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{ name: ns-mtls, namespace: prod }}\nspec: {{ mtls: {{ mode: {mode} }} }}\n"
        )
    };
    std::fs::write(dir.join("peer.yaml"), peer("PERMISSIVE")).expect("write");
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid");
    let text = report::render(&outcome);
    assert!(
        text.contains(
            "plaintext refused by the STRICT default: expected DENY by default, got ALLOW by \
             AuthorizationPolicy prod/pay-only-frontend (ALLOW), rule 1 [wrong: decision, \
             decidedBy]"
        ),
        "{text}"
    );

    // A STRICT one refuses plaintext and is named as the decider.
    std::fs::write(dir.join("peer.yaml"), peer("STRICT")).expect("write");
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid");
    let text = report::render(&outcome);
    assert!(
        text.contains(
            "expected DENY by default, got DENY by PeerAuthentication prod/ns-mtls (plaintext \
             connection refused: mTLS is STRICT (PeerAuthentication prod/ns-mtls)) [wrong: \
             decidedBy]"
        ),
        "{text}"
    );
    let test = std::fs::read_to_string(dir.join("test.yaml")).expect("read");
    std::fs::write(
        dir.join("test.yaml"),
        test.replace("decidedBy: default", "decidedBy: prod/ns-mtls"),
    )
    .expect("write");
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid");
    assert!(outcome.ok(), "{}", report::render(&outcome));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn coverage_counts_the_cases_of_each_rule_and_names_the_rules_none_exercises() {
    let outcome = run_dir(
        "coverage",
        r#"  - name: frontend pays
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
  - name: frontend pays again
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
  - name: admin of health, both rules match, the DENY wins
    from: frontend
    to: payment:8080
    request: { method: GET, path: /admin }
    expect: DENY
"#,
    );
    assert!(outcome.ok(), "{}", report::render(&outcome));
    let rules = coverage::coverage(&outcome.suites);
    let counts: Vec<(String, usize, usize)> = rules
        .iter()
        .map(|r| (r.site.policy.name.clone(), r.site.rule, r.cases))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("no-admin".to_owned(), 0, 1),
            ("pay-only-frontend".to_owned(), 0, 2),
            ("pay-only-frontend".to_owned(), 1, 0),
        ]
    );
    assert!(rules[0].site.file.ends_with("policy.yaml") && rules[0].site.line == 16);
    let text = coverage::render(&rules);
    assert!(
        text.starts_with("coverage: 2 of 3 AuthorizationPolicy rules matched by a case\n"),
        "{text}"
    );
    assert!(text.contains("not exercised by any case:\n"), "{text}");
    let uncovered = text
        .split("not exercised by any case:\n")
        .nth(1)
        .expect("list");
    assert_eq!(uncovered.lines().count(), 1, "{text}");
    assert!(
        uncovered.contains("policy.yaml:4: prod/pay-only-frontend rule 1 (ALLOW)"),
        "{text}"
    );
}

#[test]
fn junit_xml_is_well_formed_and_carries_the_failures() {
    let outcome = run_dir(
        "junit",
        r#"  - name: frontend pays <ok> & "quoted"
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
  - name: wrongly expected
    from: frontend
    to: payment:8080
    request: { method: DELETE, path: /v1/pay }
    expect: ALLOW
"#,
    );
    let xml = junit::xml(&outcome).expect("serialised");
    let parsed = quick_junit::Report::deserialize_from_str(&xml).expect("well-formed JUnit XML");
    assert_eq!((parsed.tests, parsed.failures), (2, 1));
    let suite = &parsed.test_suites[0];
    assert!(
        suite.name.as_str().starts_with("unit ("),
        "{:?}",
        suite.name
    );
    let names: Vec<&str> = suite.test_cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["frontend pays <ok> & \"quoted\"", "wrongly expected"]
    );
    match &suite.test_cases[1].status {
        quick_junit::TestCaseStatus::NonSuccess { message, kind, .. } => {
            assert_eq!(*kind, quick_junit::NonSuccessKind::Failure);
            let message = message.as_ref().expect("message");
            assert!(
                message
                    .as_str()
                    .starts_with("expected ALLOW, got DENY by default"),
                "{message:?}"
            );
        }
        other => panic!("not a failure: {other:?}"),
    }
    assert!(matches!(
        suite.test_cases[0].status,
        quick_junit::TestCaseStatus::Success { .. }
    ));
}

#[test]
fn requests_carry_headers_host_and_the_jwt_claims() {
    let text = format!(
        "{HEAD}  - name: jwt\n    from: frontend\n    to: payment:8080\n    expect: ALLOW\n    \
         request:\n      host: payment.prod:8080\n      headers: {{ x-env: prod, x-tag: [a, b], x-n: 3 }}\n      \
         jwt: {{ iss: https://issuer.example, sub: alice, aud: [payments, web], azp: cli, \
         claims: {{ scope: [payments:write], n: {{ a: 1 }} }} }}\n"
    );
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    discover::in_file(Path::new("t.yaml"), &text, &mut found, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let request = found[0].cases[0].request.clone().expect("request");
    assert_eq!(request.host, "payment.prod");
    assert_eq!(
        request.headers.get("host").expect("host"),
        "payment.prod:8080"
    );
    assert_eq!(request.headers.get("x-env").expect("x-env"), "prod");
    assert_eq!(request.headers.get_all("x-tag").iter().count(), 2);
    assert_eq!(request.headers.get("x-n").expect("x-n"), "3");
    let auth = request.auth.expect("auth");
    assert_eq!(auth.principal, "https://issuer.example/alice");
    assert_eq!(auth.audiences, ["payments", "web"]);
    assert_eq!(auth.presenter.as_deref(), Some("cli"));
    assert_eq!(auth.claims["iss"], "https://issuer.example");
    assert_eq!(auth.claims["sub"], "alice");
    assert_eq!(auth.claims["aud"], serde_json::json!(["payments", "web"]));
    assert_eq!(auth.claims["scope"], serde_json::json!(["payments:write"]));
    assert_eq!(auth.claims["n"]["a"], 1);

    let errors = errors_of(&format!(
        "{HEAD}  - {{ name: x, from: frontend, to: payment:80, expect: ALLOW, request: \
         {{ jwt: {{ iss: i, sub: s, claims: {{ sub: t }} }} }} }}\n"
    ));
    assert_has(
        &errors,
        "spec.cases[0].request.jwt.claims: \"sub\" is given as jwt.sub",
    );
}

#[test]
fn policies_that_do_not_load_and_paths_without_tests_are_errors() {
    let dir = dir_with(
        "no-policies",
        "  - { name: x, from: frontend, to: payment:80, expect: DENY }\n",
    );
    std::fs::write(
        dir.join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: Nope\n",
    )
    .expect("write");
    let errors = super::run(std::slice::from_ref(&dir)).expect_err("policies invalid");
    let text = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains("test.yaml:1: spec.policies: the policies do not load (1 error):\n"),
        "{text}"
    );
    assert!(
        text.contains("policy.yaml:2:1: kind: unsupported kind \"Nope\""),
        "{text}"
    );

    std::fs::remove_file(dir.join("test.yaml")).expect("remove");
    std::fs::write(dir.join("policy.yaml"), POLICY).expect("write");
    assert!(matches!(run_found(std::slice::from_ref(&dir)), Ok(None)));
    let errors = super::run(std::slice::from_ref(&dir)).expect_err("nothing to run");
    assert!(
        matches!(errors[0], TestFileError::NoTests { .. }),
        "{errors:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_shipped_example_passes_and_exercises_every_rule() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/policy-test");
    let outcome = super::run(&[example]).expect("the example is valid");
    assert!(outcome.ok(), "{}", report::render(&outcome));
    assert!(outcome.passed() >= 6, "{}", report::render(&outcome));
    let rules = coverage::coverage(&outcome.suites);
    assert!(
        rules.iter().all(|r| r.cases > 0),
        "{}",
        coverage::render(&rules)
    );
}

#[test]
fn the_dry_run_shadow_decision_can_be_expected() {
    let dir = dir_with(
        "dry-run",
        r#"  - name: the dry-run deny would refuse the payment, which is still allowed
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
    expectDryRun: DENY
  - name: wrongly expected to be allowed in the dry run
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
    expectDryRun: ALLOW
  - name: no dry-run policy applies to the frontend
    from: payment
    to: frontend:80
    request: { path: / }
    expect: ALLOW
    expectDryRun: ALLOW
"#,
    );
    std::fs::write(
        dir.join("dry.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: freeze-payments\n  namespace: prod\n  annotations: { istio.io/dry-run: \"true\" }\n\
         spec:\n  selector: { matchLabels: { app: payment-service } }\n  action: DENY\n  \
         rules:\n  - to: [{ operation: { paths: [\"/v1/pay\"] } }]\n",
    )
    .expect("write");
    let outcome = super::run(std::slice::from_ref(&dir)).expect("valid");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((outcome.passed(), outcome.failed()), (1, 2));
    let text = report::render(&outcome);
    assert!(
        text.contains(
            "wrongly expected to be allowed in the dry run: expected ALLOW (dry run: ALLOW), got \
             ALLOW by AuthorizationPolicy prod/pay-only-frontend (ALLOW), rule 0 (dry run: DENY \
             by AuthorizationPolicy prod/freeze-payments (DENY), rule 0) [wrong: expectDryRun]"
        ),
        "{text}"
    );
    assert!(
        text.contains("(dry run: none, no dry-run policy applies) [wrong: expectDryRun]"),
        "{text}"
    );
    // The dry-run policy's rule is covered by the cases it matches.
    let rules = coverage::coverage(&outcome.suites);
    let freeze = rules
        .iter()
        .find(|r| r.site.policy.name == "freeze-payments")
        .expect("listed");
    assert_eq!(freeze.cases, 2, "{}", coverage::render(&rules));
}
