//! `latch policy test` and `latch policy check` as a user runs them: the real binary on a
//! directory of policies and test files, its exit codes, output lines, `--junit` file and
//! `--coverage` table, and the shipped example (docs/examples/policy-test) passing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
  - to: [{ operation: { paths: ["/debug"] } }]
"#;

const TEST: &str = r#"apiVersion: test.latch.dev/v1
kind: PolicyTest
metadata: { name: payments }
spec:
  workloads:
  - { name: payment, namespace: prod, serviceAccount: payment, labels: { app: payment-service }, ips: [10.244.2.2] }
  - { name: frontend, namespace: prod, serviceAccount: frontend, ips: [10.244.1.2] }
  - { name: analytics, namespace: prod, serviceAccount: analytics, ips: [10.244.1.3] }
  cases:
  - name: the frontend may pay
    from: frontend
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: ALLOW
    decidedBy: prod/pay-only-frontend
    rule: 0
  - name: analytics may not pay
    from: analytics
    to: payment:8080
    request: { method: POST, path: /v1/pay }
    expect: DENY
"#;

/// A case the policy contradicts (rule 0 does not allow GET).
const WRONG_CASE: &str = r#"  - name: the frontend may read payments
    from: frontend
    to: payment:8080
    request: { method: GET, path: /v1/pay }
    expect: ALLOW
"#;

/// A fresh directory with the policy and `payment-test.yaml` = TEST + `extra`.
fn workspace(name: &str, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "latch-policy-test-cli-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("payment.yaml"), POLICY).expect("write policy");
    std::fs::write(dir.join("payment-test.yaml"), format!("{TEST}{extra}")).expect("write test");
    dir
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn latch(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_latch"))
        .args(args)
        .output()
        .expect("run latch");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn passing_tests_exit_0_with_the_summary_coverage_and_junit() {
    let dir = workspace("pass", "");
    let junit = dir.join("out").join("junit.xml");
    std::fs::create_dir_all(junit.parent().expect("parent")).expect("dir");
    let run = latch(&[
        "policy",
        "test",
        &text(&dir),
        "--coverage",
        "--junit",
        &text(&junit),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "2 passed, 0 failed", "{}", run.stdout);
    assert_eq!(
        lines[1], "coverage: 1 of 2 AuthorizationPolicy rules matched by a case",
        "{}",
        run.stdout
    );
    let policy_site = format!("{}:4", text(&dir.join("payment.yaml")));
    assert!(
        run.stdout.contains(&format!(
            "not exercised by any case:\n  {policy_site}: prod/pay-only-frontend rule 1 (ALLOW)\n"
        )),
        "{}",
        run.stdout
    );
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(
        xml.contains(r#"tests="2""#) && xml.contains(r#"failures="0""#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<testcase name="the frontend may pay""#),
        "{xml}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_case_exits_1_naming_its_line_the_decisions_and_the_decider() {
    let dir = workspace("fail", WRONG_CASE);
    let junit = dir.join("junit.xml");
    let run = latch(&[
        "policy",
        "test",
        &text(&dir.join("payment-test.yaml")),
        "--junit",
        &text(&junit),
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let expected = format!(
        "{}:22: the frontend may read payments: expected ALLOW, got DENY by default (ALLOW \
         policies apply but none matched) [wrong: decision]\n2 passed, 1 failed\n",
        text(&dir.join("payment-test.yaml"))
    );
    assert_eq!(run.stdout, expected);
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains(r#"failures="1""#), "{xml}");
    assert!(
        xml.contains("<failure message=\"expected ALLOW, got DENY"),
        "{xml}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_test_file_exits_1_with_file_line_field_and_why() {
    let dir = workspace(
        "bad",
        "  - { name: nowhere, from: frontend, to: payments:8080, expect: DENY }\n",
    );
    let run = latch(&["policy", "test", &text(&dir)]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "", "nothing is run");
    assert_eq!(
        run.stderr,
        format!(
            "{}:22:38: spec.cases[2].to: \"payments\" is not a workload of spec.workloads\n",
            text(&dir.join("payment-test.yaml"))
        )
    );

    // A path without any test is an error too: a CI step must not pass by testing nothing.
    std::fs::remove_file(dir.join("payment-test.yaml")).expect("remove");
    let run = latch(&["policy", "test", &text(&dir)]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("no PolicyTest document"),
        "{}",
        run.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn policy_check_runs_the_tests_beside_the_policies() {
    let dir = workspace("check", "");
    let run = latch(&["policy", "check", &text(&dir)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "{}: ok: 1 AuthorizationPolicy, 0 PeerAuthentications\n",
            text(&dir.join("payment.yaml"))
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "{}: 1 policy test (run below)\n",
            text(&dir.join("payment-test.yaml"))
        )),
        "a file of tests says so: {}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("policy tests: 2 passed, 0 failed\n"),
        "{}",
        run.stdout
    );

    std::fs::write(dir.join("payment-test.yaml"), format!("{TEST}{WRONG_CASE}")).expect("write");
    let run = latch(&["policy", "check", &text(&dir)]);
    assert_eq!(
        run.code, 1,
        "a failing test fails the check: {}{}",
        run.stdout, run.stderr
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "two files, the failing case, the summary: {}",
        run.stdout
    );
    assert!(
        lines[2].starts_with(&format!(
            "{}:22: the frontend may read payments: expected ALLOW, got DENY",
            text(&dir.join("payment-test.yaml"))
        )),
        "{}",
        run.stdout
    );
    assert_eq!(lines[3], "policy tests: 2 passed, 1 failed");

    // Without tests, check is what it was.
    std::fs::remove_file(dir.join("payment-test.yaml")).expect("remove");
    let run = latch(&["policy", "check", &text(&dir)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("policy tests"), "{}", run.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_shipped_example_passes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/policy-test");
    let run = latch(&["policy", "test", &text(&example), "--coverage"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("12 passed, 0 failed\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("every rule is exercised"),
        "{}",
        run.stdout
    );
    let run = latch(&["policy", "check", &text(&example)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.ends_with("policy tests: 12 passed, 0 failed\n"),
        "{}",
        run.stdout
    );
}
