//! RequestAuthentication: what loads, every error at its line and field, the `targetRef`
//! warning, and which workloads a policy's rules apply to.

use std::{collections::BTreeMap, path::Path};

use crate::policy::{
    Connection, ConnectionDecision, KeySource, PolicyError, PolicyObject, PolicySet, Target,
    TokenLocation, cli,
};

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn doc(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

fn load(text: &str) -> Result<PolicySet, Vec<PolicyError>> {
    PolicySet::from_yaml(&[(Path::new("ra.yaml"), text)], "istio-system")
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("loaded:\n{text}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_full_rule_loads() {
    let spec = r#"  selector: {matchLabels: {app: payment}}
  jwtRules:
  - issuer: https://issuer.example
    audiences: [payments]
    jwksUri: https://issuer.example/jwks.json
    fromHeaders: [{name: x-jwt, prefix: "Token "}]
    fromParams: [jwt]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    timeout: 3s
  - issuer: inline
    jwks: 'JWKS'
"#;
    let text = doc("prod", "jwt", &spec.replace("JWKS", JWKS));
    let set = load(&text).expect("valid");
    let rules = set.jwt_rules_for(&Target {
        namespace: "prod",
        labels: &labels(&[("app", "payment")]),
    });
    assert_eq!(rules.len(), 2);
    let r = &rules[0];
    assert_eq!(r.issuer, "https://issuer.example");
    assert!(matches!(&r.keys, KeySource::Uri(u) if u == "https://issuer.example/jwks.json"));
    assert_eq!(r.locations.len(), 2);
    assert_eq!(r.locations[1], TokenLocation::Param("jwt".into()));
    assert!(r.forward_original_token);
    assert_eq!(r.fetch_timeout, Some(std::time::Duration::from_secs(3)));
    assert!(matches!(&rules[1].keys, KeySource::Inline(k) if k.has_kid("k1")));
    assert_eq!(rules[1].locations, TokenLocation::defaults());
    let (out, ok) = {
        let dir = std::env::temp_dir().join(format!("latch-ra-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("ra.yaml");
        std::fs::write(&file, &text).expect("write");
        let r = cli::check(&[file]);
        let _ = std::fs::remove_dir_all(&dir);
        r
    };
    assert!(ok, "{out}");
    assert!(out.contains("1 RequestAuthentication"), "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[test]
fn selection_as_istio() {
    let rules = |issuer: &str| format!("  jwtRules: [{{issuer: {issuer}, jwks: '{JWKS}'}}]\n");
    let text = [
        doc(
            "prod",
            "by-label",
            &format!(
                "  selector: {{matchLabels: {{app: payment}}}}\n{}",
                rules("a")
            ),
        ),
        doc("prod", "namespace-wide", &rules("b")),
        doc("istio-system", "mesh", &rules("c")),
        doc("other", "elsewhere", &rules("d")),
    ]
    .join("---\n");
    let set = load(&text).expect("valid");
    let issuers = |ns: &str, l: &[(&str, &str)]| {
        let labels = labels(l);
        let mut v: Vec<String> = set
            .jwt_rules_for(&Target {
                namespace: ns,
                labels: &labels,
            })
            .iter()
            .map(|r| r.issuer.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(issuers("prod", &[("app", "payment")]), ["a", "b", "c"]);
    assert_eq!(issuers("prod", &[("app", "frontend")]), ["b", "c"]);
    assert_eq!(issuers("staging", &[("app", "payment")]), ["c"]);
    assert_eq!(issuers("other", &[]), ["c", "d"]);
}

/// A RequestAuthentication's tokens are checked on parsed requests only, so an allowed
/// connection to a workload it applies to is never decided (nor cached) before its requests are
/// seen; a denied one stays denied, and other workloads are untouched.
#[test]
fn an_allowed_connection_to_a_workload_with_jwt_rules_needs_http() {
    let text = [
        doc(
            "prod",
            "payment-jwt",
            &format!(
                "  selector: {{matchLabels: {{app: payment}}}}\n  jwtRules: [{{issuer: a, jwks: '{JWKS}'}}]\n"
            ),
        ),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-batch, namespace: prod}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/batch]}}]}]\n".to_owned(),
    ]
    .join("---\n");
    let set = load(&text).expect("valid");
    let payment = labels(&[("app", "payment")]);
    let frontend = labels(&[("app", "frontend")]);
    let decide = |labels: &BTreeMap<String, String>, source: &str| {
        set.evaluate_connection(
            &Target {
                namespace: "prod",
                labels,
            },
            &Connection {
                source_principal: Some(source),
                source_ip: None,
                destination_ip: "10.244.1.5".parse().expect("an address"),
                destination_port: 8080,
            },
        )
    };
    let from = |sa: &str| format!("spiffe://cluster.local/ns/prod/sa/{sa}");
    match decide(&payment, &from("frontend")) {
        ConnectionDecision::NeedsHttp { reason } => assert!(
            reason.contains("RequestAuthentication prod/payment-jwt applies"),
            "{reason}"
        ),
        other => panic!("decided before the requests: {other:?}"),
    }
    match decide(&payment, &from("batch")) {
        ConnectionDecision::Decided(d) => assert!(!d.allowed, "{d:?}"),
        other => panic!("a denied connection needs no request: {other:?}"),
    }
    match decide(&frontend, &from("frontend")) {
        ConnectionDecision::Decided(d) => assert!(d.allowed && d.cacheable, "{d:?}"),
        other => panic!("no RequestAuthentication applies to frontend: {other:?}"),
    }
}

#[test]
fn errors_name_line_and_field() {
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "  jwtRules:\n  - jwksUri: https://x.example/k\n",
            8,
            "spec.jwtRules[0].issuer",
            "required",
        ),
        (
            "  jwtRules:\n  - issuer: a\n",
            8,
            "spec.jwtRules[0].jwksUri",
            "required",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x.example/k\n    jwks: '{}'\n",
            10,
            "spec.jwtRules[0].jwks",
            "not both",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: http://x.example/k\n",
            9,
            "spec.jwtRules[0].jwksUri",
            "only over https",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: not a uri\n",
            9,
            "spec.jwtRules[0].jwksUri",
            "not a URI",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwks: '{\"keys\": 3}'\n",
            9,
            "spec.jwtRules[0].jwks",
            "not a JSON Web Key Set",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'\n",
            9,
            "spec.jwtRules[0].jwks",
            "no usable public key",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x.example/k\n    fromHeaders:\n    - name: \"bad header\"\n",
            11,
            "spec.jwtRules[0].fromHeaders[0].name",
            "not a header name",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x.example/k\n    outputClaimToHeaders:\n    - {header: x-a, claim: \"\"}\n",
            11,
            "spec.jwtRules[0].outputClaimToHeaders[0].claim",
            "must not be empty",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x.example/k\n    timeout: soon\n",
            10,
            "spec.jwtRules[0].timeout",
            "invalid duration",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x.example/k\n    unknown: 1\n",
            10,
            "spec.jwtRules[0]",
            "unknown field",
        ),
    ];
    for (spec, line, path, needle) in cases {
        let errors = errors(&doc("prod", "jwt", spec));
        let prefix = format!("ra.yaml:{line}:");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&prefix) && e.contains(path) && e.contains(needle)),
            "want {prefix} {path}: ...{needle}...; got {errors:#?}"
        );
    }
}

#[test]
fn target_ref_is_accepted_with_a_warning() {
    let text = doc(
        "prod",
        "gw",
        &format!(
            "  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: gw}}\n  jwtRules: [{{issuer: a, jwks: '{JWKS}'}}]\n"
        ),
    );
    let set = load(&text).expect("valid");
    let warnings = set.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("ra.yaml:7: RequestAuthentication prod/gw: ")
            && warnings[0].contains("spec.targetRef: accepted but not enforced"),
        "{warnings:?}"
    );
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "prod",
        labels: &labels,
    };
    assert!(
        set.jwt_rules_for(&target).is_empty(),
        "a policy for gateways never applies to a workload"
    );
}

#[test]
fn a_kubernetes_object_parses() {
    let text = doc(
        "prod",
        "jwt",
        &format!("  jwtRules: [{{issuer: a, jwks: '{JWKS}'}}]\n"),
    );
    let object =
        PolicyObject::parse(Path::new("RequestAuthentication prod/jwt"), &text).expect("valid");
    assert_eq!(
        object.kind(),
        crate::policy::PolicyKind::RequestAuthentication
    );
    let set = PolicySet::from_objects([&object], "istio-system");
    assert_eq!(set.request_authentications().len(), 1);
    assert_eq!(
        set.jwt_rules_for(&Target {
            namespace: "prod",
            labels: &BTreeMap::new()
        })
        .len(),
        1
    );
}
