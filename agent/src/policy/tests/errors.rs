//! Every loading error names the file, the line (in the whole file) and the field path.

use std::path::{Path, PathBuf};

use crate::policy::{PolicySet, cli};

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: pay\n  namespace: prod\nspec:\n";

fn errors(text: &str) -> Vec<String> {
    match PolicySet::from_yaml(&[(Path::new("policies/pay.yaml"), text)], "istio-system") {
        Ok(_) => panic!("loaded:\n{text}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts an error at `line` about `path` whose message contains `needle`.
fn expect(text: &str, line: usize, path: &str, needle: &str) {
    let errors = errors(text);
    let prefix = format!("policies/pay.yaml:{line}:");
    let found = errors.iter().any(|e| {
        e.starts_with(&prefix)
            && (path.is_empty() || e.contains(&format!(": {path}: ")))
            && e.contains(needle)
    });
    assert!(
        found,
        "want {prefix} {path}: ...{needle}...; got {errors:#?}"
    );
}

fn spec(body: &str) -> String {
    format!("{HEAD}{body}")
}

#[test]
fn bad_port_string_in_a_list() {
    let text = spec(
        "  rules:\n  - to:\n    - operation:\n        ports:\n        - 80\n        - \"80x\"\n",
    );
    let errors = errors(&text);
    assert_eq!(
        errors,
        vec![
            r#"policies/pay.yaml:12:11: spec.rules[0].to[0].operation.ports[1]: "80x" is not a port"#
        ]
    );
}

#[test]
fn port_out_of_range() {
    expect(
        &spec("  rules: [{to: [{operation: {notPorts: [70000]}}]}]\n"),
        7,
        "spec.rules[0].to[0].operation.notPorts[0]",
        "1..65535",
    );
}

#[test]
fn yaml_syntax_error() {
    expect(
        &spec("  action: a: b\n"),
        7,
        "",
        "mapping values are not allowed",
    );
}

#[test]
fn unknown_field() {
    expect(
        &spec("  rules:\n  - from:\n    - source:\n        principal: [a]\n"),
        10,
        "spec.rules[0].from[0].source.principal",
        "unknown field `principal`",
    );
}

#[test]
fn wrong_type() {
    expect(
        &spec("  rules:\n  - from:\n    - source:\n        principals: cluster.local/ns/a/sa/b\n"),
        10,
        "spec.rules[0].from[0].source.principals",
        "invalid type",
    );
}

#[test]
fn custom_action() {
    expect(
        &spec("  action: CUSTOM\n  provider: {name: ext}\n"),
        7,
        "spec.action",
        "CUSTOM is not supported by Latch (no external authorizer)",
    );
}

#[test]
fn unknown_action() {
    expect(
        &spec("  action: REJECT\n"),
        7,
        "spec.action",
        "unknown action \"REJECT\"",
    );
}

#[test]
fn bad_cidrs() {
    let text = spec(
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n        notIpBlocks: [nope]\n    when:\n    - key: destination.ip\n      values: [\"1.2.3\"]\n",
    );
    expect(
        &text,
        10,
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "prefix length",
    );
    expect(
        &text,
        11,
        "spec.rules[0].from[0].source.notIpBlocks[0]",
        "not an IP address or CIDR",
    );
    expect(
        &text,
        14,
        "spec.rules[0].when[0].values[0]",
        "\"1.2.3\" is not an IP",
    );
    assert_eq!(errors(&text).len(), 3, "all errors are reported");
}

#[test]
fn unsupported_when_key() {
    expect(
        &spec("  rules:\n  - when:\n    - key: connection.sni\n      values: [a]\n"),
        9,
        "spec.rules[0].when[0].key",
        "supported keys: source.ip, source.namespace",
    );
    for (key, why) in [
        ("request.headers", "expected request.headers[NAME]"),
        ("request.headers[]", "expected request.headers[NAME]"),
        ("request.headers[a][b]", "expected request.headers[NAME]"),
        ("'request.headers[a b]'", "is not a header name"),
        ("request.auth.claims", "expected request.auth.claims[NAME]"),
        (
            "request.auth.claims[a][]",
            "expected request.auth.claims[NAME]",
        ),
    ] {
        expect(
            &spec(&format!(
                "  rules:\n  - when:\n    - key: {key}\n      values: [a]\n"
            )),
            9,
            "spec.rules[0].when[0].key",
            why,
        );
    }
}

#[test]
fn when_without_values() {
    expect(
        &spec("  rules:\n  - when:\n    - key: source.ip\n"),
        9,
        "spec.rules[0].when[0]",
        "needs `values` or `notValues`",
    );
}

#[test]
fn star_in_the_middle() {
    expect(
        &spec(
            "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/*/sa/x\"]\n",
        ),
        10,
        "spec.rules[0].from[0].source.principals[0]",
        "`*` may only be",
    );
}

#[test]
fn remote_ip_blocks_and_bad_service_accounts() {
    let text = spec(
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [a/b/c, /x]\n        remoteIpBlocks: [1.2.3.4]\n",
    );
    expect(
        &text,
        10,
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "is not a service account",
    );
    expect(
        &text,
        10,
        "spec.rules[0].from[0].source.serviceAccounts[1]",
        "is not a service account",
    );
    expect(
        &text,
        11,
        "spec.rules[0].from[0].source.remoteIpBlocks",
        "not supported",
    );
}

#[test]
fn empty_source_and_operation() {
    let text = spec("  rules:\n  - from:\n    - source: {}\n    to:\n    - {}\n");
    expect(
        &text,
        9,
        "spec.rules[0].from[0]",
        "`source` must not be empty",
    );
    expect(
        &text,
        11,
        "spec.rules[0].to[0]",
        "`operation` must not be empty",
    );
}

#[test]
fn target_refs_accepted_with_a_warning_but_not_beside_a_selector() {
    expect(
        &spec("  selector: {matchLabels: {app: a}}\n  targetRef: {kind: Gateway, name: gw}\n"),
        8,
        "spec.targetRef",
        "mutually exclusive",
    );
    let dir = temp_dir("target-refs");
    let file = dir.join("gw.yaml");
    std::fs::write(&file, spec("  targetRefs: [{kind: Service, name: s}]\n")).expect("write");
    let (out, ok) = cli::check(&[file]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{out}");
    assert!(
        out.contains("gw.yaml:4: AuthorizationPolicy prod/pay: spec.targetRefs: applies to gateways or waypoints, which Latch does not run; not enforced at workloads"),
        "{out}"
    );
}

#[test]
fn dry_run_annotation_is_true_or_false() {
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: pay\n  namespace: prod\n  annotations: {istio.io/dry-run: \"yes\"}\nspec: {}\n";
    expect(
        text,
        6,
        "metadata.annotations.istio.io/dry-run",
        "neither \"true\" nor \"false\"",
    );
}

#[test]
fn unsupported_kind_and_api_version() {
    expect(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        1,
        "apiVersion",
        "unsupported apiVersion \"v1\"",
    );
    expect(
        "apiVersion: security.istio.io/v1\nkind: Sidecar\nmetadata: {name: x}\n",
        2,
        "kind",
        "unsupported kind \"Sidecar\"",
    );
}

#[test]
fn duplicates_across_files() {
    let a = format!("{HEAD}  action: DENY\n");
    let b = format!("# again\n{HEAD}  action: ALLOW\n");
    let errors = match PolicySet::from_yaml(
        &[(Path::new("a.yaml"), &a), (Path::new("b.yaml"), &b)],
        "istio-system",
    ) {
        Ok(_) => panic!("duplicate loaded"),
        Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "b.yaml:5:3: metadata.name: AuthorizationPolicy prod/pay is already defined at a.yaml:4"
        ),
        "{errors:?}"
    );
}

#[test]
fn same_name_different_kind_or_namespace_is_fine() {
    let a = format!("{HEAD}  action: DENY\n---\n{}", HEAD.replace("prod", "dev"));
    let pa = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: pay, namespace: prod}\n";
    let set = PolicySet::from_yaml(
        &[(Path::new("a.yaml"), &a), (Path::new("p.yaml"), pa)],
        "istio-system",
    )
    .unwrap();
    assert_eq!(set.len(), 3);
}

#[test]
fn peer_authentication_errors() {
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: prod}\nspec:\n  mtls: {mode: STRICTER}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    http: {mode: STRICT}\n";
    let errors = errors(pa);
    assert!(
        errors.iter().any(|e| e.starts_with("policies/pay.yaml:5:")
            && e.contains("spec.mtls.mode: unknown mTLS mode \"STRICTER\"")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("policies/pay.yaml:6:")
            && e.contains("spec.portLevelMtls: portLevelMtls requires a selector")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("policies/pay.yaml:8:")
            && e.contains("spec.portLevelMtls.http: \"http\" is not a port")),
        "{errors:#?}"
    );
}

#[test]
fn multi_document_lines_are_file_lines() {
    let good = format!("{HEAD}  action: DENY\n");
    let text = format!(
        "# policies\n---\n{good}---\n\n---\n{}  rules: [{{to: [{{operation: {{ports: [\"x\"]}}}}]}}]\n",
        HEAD.replace("pay", "other")
    );
    // Header comment 1, separator 2, good doc 3..9, separator 10, blank doc 11, separator 12,
    // second doc 13..18 with the rule on line 19.
    expect(
        &text,
        19,
        "spec.rules[0].to[0].operation.ports[0]",
        "\"x\" is not a port",
    );
}

#[test]
fn metadata_fields_status_and_default_namespace() {
    let text = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  labels: {a: b}\n  annotations: {c: d}\n  uid: 1234\n  resourceVersion: \"5\"\n  generation: 2\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec: {}\nstatus: {anything: [1, 2]}\n";
    let set = PolicySet::from_yaml(&[(Path::new("x.yaml"), text)], "istio-system").unwrap();
    assert_eq!(set.summaries()[0].namespace, "default");
}

#[test]
fn not_a_mapping() {
    expect("- a\n- b\n", 1, "", "expected a Kubernetes object");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latch-policy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn directory_with_one_bad_file_loads_nothing() {
    let dir = temp_dir("bad");
    std::fs::write(dir.join("a.yaml"), format!("{HEAD}  action: DENY\n")).unwrap();
    std::fs::write(
        dir.join("b.yml"),
        format!("{HEAD}  action: NOPE\n").replace("pay", "b"),
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let errors =
        PolicySet::load(std::slice::from_ref(&dir), "istio-system").expect_err("a bad file");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].file(), dir.join("b.yml"));
    assert_eq!(errors[0].line(), Some(7));
    let (out, ok) = cli::check(std::slice::from_ref(&dir));
    assert!(!ok);
    assert!(
        out.contains("b.yml:7:3: spec.action: unknown action \"NOPE\""),
        "{out}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_lists_files() {
    let dir = temp_dir("good");
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n";
    std::fs::write(
        dir.join("a.yaml"),
        format!("{HEAD}  action: DENY\n---\n{pa}"),
    )
    .unwrap();
    std::fs::write(dir.join("empty.yaml"), "# nothing\n---\n").unwrap();
    let (out, ok) = cli::check(std::slice::from_ref(&dir));
    assert!(ok, "{out}");
    assert!(
        out.contains("a.yaml: ok: 1 AuthorizationPolicy, 1 PeerAuthentication\n"),
        "{out}"
    );
    assert!(
        out.contains("empty.yaml: ok: 0 AuthorizationPolicies, 0 PeerAuthentications\n"),
        "{out}"
    );
    let missing = dir.join("missing.yaml");
    let (out, ok) = cli::check(&[missing]);
    assert!(!ok && out.contains("missing.yaml: cannot read"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}
