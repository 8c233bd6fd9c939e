//! RequestAuthentication end to end, on real agents in network namespaces: payment's agent
//! fetches its issuer's keys over HTTPS from a JWKS server in a third namespace (its own CA,
//! given as `jwt.jwksCaFile`), checks the tokens of frontend's requests, and an
//! AuthorizationPolicy lets frontend `POST /v1/pay` only with a token whose `scope` claim holds
//! `payments:write`. Without a token: 403; a bad token: 401; the right token: 200; a token
//! without the scope: 403. Then the issuer rotates its key (picked up without a restart), and
//! goes down (the last keys are kept). And a RequestAuthentication with no AuthorizationPolicy
//! at all still refuses bad tokens, on every connection: none is let through by a cached allow.

use std::net::SocketAddr;

use latch_tests::{
    AgentOptions, Cluster, EchoServer, NodeId, PodId, PodSpec,
    jwks::{self, JwksServer, SigningKey},
};
use serde_json::json;

const HTTP_PORT: u16 = 8080;
const ISSUER: &str = "https://issuer.example";

/// payment's RequestAuthentication, and with `authz` the AuthorizationPolicy that asks for a
/// scope.
fn policies(jwks_uri: &str, authz: bool) -> String {
    let text = format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: payment-jwt
  namespace: prod
spec:
  selector:
    matchLabels:
      app: payment-service
  jwtRules:
  - issuer: {ISSUER}
    audiences: [payments]
    jwksUri: {jwks_uri}
"#
    );
    if !authz {
        return text;
    }
    text + r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: pay-with-scope
  namespace: prod
spec:
  selector:
    matchLabels:
      app: payment-service
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/prod/sa/frontend"]
    to:
    - operation:
        methods: ["POST"]
        paths: ["/v1/pay"]
    when:
    - key: request.auth.claims[scope]
      values: ["payments:write"]
"#
}

struct Mesh {
    cluster: Cluster,
    frontend: PodId,
    payment: PodId,
    app: EchoServer,
    jwks: JwksServer,
    n1: NodeId,
    n2: NodeId,
}

/// frontend on node 1, payment on node 2, the JWKS server on a third namespace of the fabric
/// (a node without an agent) serving `first`'s key; the AuthorizationPolicy with `authz`.
fn mesh(first: &SigningKey, authz: bool) -> Mesh {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let issuer_node = cluster.add_node().expect("issuer's namespace");
    let frontend = cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("frontend");
    let mut payment = PodSpec::mesh("payment", "prod", "payment");
    payment.labels = vec![("app".into(), "payment-service".into())];
    let payment = cluster.add_pod(n2, payment).expect("payment");
    let issuer_addr = SocketAddr::new(cluster.node(issuer_node).ipv4().into(), 8443);
    let jwks = JwksServer::start(
        &cluster.node(issuer_node).netns(),
        issuer_addr,
        cluster.dir(),
        jwks::document(&[first]),
    )
    .expect("JWKS server");
    let dir = cluster.dir().join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("jwt.yaml"), policies(&jwks.uri, authz)).expect("policy file");
    let options = AgentOptions {
        extra_yaml: format!(
            "policies: [{}]\njwt: {{ jwksCaFile: {}, jwksRefetchMinInterval: 1ms }}\n",
            dir.display(),
            jwks.ca_file.display()
        ),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    let app = cluster
        .http_server(payment, HTTP_PORT)
        .expect("http server");
    Mesh {
        cluster,
        frontend,
        payment,
        app,
        jwks,
        n1,
        n2,
    }
}

impl Mesh {
    /// `POST target` from frontend to payment with `token` as a bearer token, if any; the answer.
    fn post(&self, target: &str, token: Option<&str>) -> String {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: payment\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let to = self.cluster.pod(self.payment).addr4(HTTP_PORT);
        let r = self
            .cluster
            .probe(self.frontend, to, Some(&request))
            .expect("probe");
        assert!(r.ok, "frontend connects to payment: {r:?}");
        r.echo.unwrap_or_default()
    }
}

fn status(answer: &str) -> &str {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .unwrap_or("none")
}

fn claims(scope: serde_json::Value) -> serde_json::Value {
    json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": "payments",
        "exp": jwks::now() + 600,
        "scope": scope,
    })
}

#[test]
fn a_payment_needs_a_token_with_the_payments_write_scope() {
    let key = SigningKey::generate("k1").expect("key");
    let mesh = mesh(&key, true);

    let answer = mesh.post("/v1/pay", None);
    assert_eq!(status(&answer), "403", "no token, no principal: {answer:?}");
    assert!(answer.contains("RBAC: access denied"), "{answer:?}");

    let forged = SigningKey::generate("k1").expect("another key");
    let bad = forged
        .sign(&claims(json!(["payments:write"])))
        .expect("sign");
    let answer = mesh.post("/v1/pay", Some(&bad));
    assert_eq!(status(&answer), "401", "signed by another key: {answer:?}");
    assert!(answer.contains("Jwt verification fails"), "{answer:?}");
    let expired = key
        .sign(&json!({
            "iss": ISSUER,
            "sub": "alice",
            "aud": "payments",
            "exp": jwks::now() - 3600,
            "scope": ["payments:write"],
        }))
        .expect("sign");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&expired))), "401");

    let good = key
        .sign(&claims(json!(["payments:write", "payments:read"])))
        .expect("sign");
    let answer = mesh.post("/v1/pay", Some(&good));
    assert_eq!(status(&answer), "200", "the right token: {answer:?}");
    assert!(answer.ends_with("POST /v1/pay"), "{answer:?}");

    let read_only = key.sign(&claims(json!(["payments:read"]))).expect("sign");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&read_only))), "403");
    // Istio does not split a space-separated string claim: one value, not a list.
    let spaced = key
        .sign(&claims(json!("payments:read payments:write")))
        .expect("sign");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&spaced))), "403");
    // The right token does not open another path.
    assert_eq!(status(&mesh.post("/admin", Some(&good))), "403");

    // Only the allowed request reached the application, without its token.
    let heads = mesh.app.request_heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("authorization"),
        "the token is not forwarded: {:?}",
        heads[0]
    );

    // `latch debug policies` lists the RequestAuthentication beside the AuthorizationPolicy.
    let listed = latch_tests::agent::debug_json(&mesh.cluster.debug_socket(mesh.n2), &["policies"])
        .expect("debug policies");
    let kinds: Vec<_> = listed["policies"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| (p["kind"].clone(), p["name"].clone()))
        .collect();
    assert!(
        kinds.contains(&(json!("RequestAuthentication"), json!("payment-jwt"))),
        "{listed}"
    );
    // ... and the issuer's key set as the node holds it.
    assert_eq!(listed["jwks"][0]["uri"], json!(mesh.jwks.uri), "{listed}");
    assert_eq!(listed["jwks"][0]["keys"], 1, "{listed}");
    assert_eq!(listed["jwks"][0]["failures"], 0, "{listed}");

    let log = mesh
        .cluster
        .node(mesh.n2)
        .agent
        .as_ref()
        .expect("agent")
        .log();
    assert!(
        log.contains("request refused: its JWT does not verify"),
        "refusals logged"
    );
    assert!(!log.contains(&bad), "the token itself is never logged");
}

#[test]
fn keys_rotate_without_a_restart_and_an_outage_keeps_the_last_ones() {
    let first = SigningKey::generate("first").expect("key");
    let mesh = mesh(&first, true);
    let token = |key: &SigningKey| key.sign(&claims(json!(["payments:write"]))).expect("sign");

    assert_eq!(status(&mesh.post("/v1/pay", Some(&token(&first)))), "200");
    assert_eq!(mesh.jwks.fetches(), 1);

    // The issuer rotates: the new kid makes the agent fetch again.
    let second = SigningKey::generate("second").expect("key");
    mesh.jwks.set_document(Some(jwks::document(&[&second])));
    assert_eq!(status(&mesh.post("/v1/pay", Some(&token(&second)))), "200");
    assert_eq!(mesh.jwks.fetches(), 2);
    // The retired key no longer verifies.
    assert_eq!(status(&mesh.post("/v1/pay", Some(&token(&first)))), "401");

    // Outage: the fetch an unknown kid starts fails (logged), the last keys stay in use.
    mesh.jwks.set_document(None);
    let third = SigningKey::generate("third").expect("key");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&token(&third)))), "401");
    let agent = mesh.cluster.node(mesh.n2).agent.as_ref().expect("agent");
    agent
        .wait_for_message(
            "JWKS fetch failed; the last keys fetched, if any, are used until jwt.jwksMaxStale",
            std::time::Duration::from_secs(20),
        )
        .expect("the failure is logged");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&token(&second)))), "200");
    // `latch debug policies` shows the failure beside the keys kept.
    let listed = latch_tests::agent::debug_json(&mesh.cluster.debug_socket(mesh.n2), &["policies"])
        .expect("debug policies");
    let jwks = &listed["jwks"][0];
    assert_eq!(jwks["keys"], 1, "{listed}");
    assert!(jwks["failures"].as_u64() >= Some(1), "{listed}");
    assert!(jwks["lastError"].is_string(), "{listed}");
}

/// The attack: a client that sends a forged token to a workload only a RequestAuthentication
/// guards (no AuthorizationPolicy asks for a principal). Istio answers `401`; so must Latch, on
/// the first connection and on every repeat, which a cached allow would otherwise carry through
/// the kernel without a look at the request.
#[test]
fn a_request_authentication_alone_refuses_a_forged_token_on_every_connection() {
    let key = SigningKey::generate("k1").expect("key");
    let mesh = mesh(&key, false);
    let forged = SigningKey::generate("k1")
        .expect("another key")
        .sign(&claims(json!(["payments:write"])))
        .expect("sign");

    // No token: nothing to verify, the request goes on (Istio's semantics).
    assert_eq!(status(&mesh.post("/v1/pay", None)), "200");
    for attempt in 0..3 {
        let answer = mesh.post("/v1/pay", Some(&forged));
        assert_eq!(status(&answer), "401", "attempt {attempt}: {answer:?}");
    }
    let good = key.sign(&claims(json!([]))).expect("sign");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&good))), "200");
    assert_eq!(status(&mesh.post("/v1/pay", Some(&forged))), "401");

    // Only the requests without a forged token reached the application, and no verdict was
    // cached for the pair on either node.
    assert_eq!(mesh.app.request_heads().len(), 2);
    for node in [mesh.n1, mesh.n2] {
        let cached =
            latch_tests::agent::debug_json(&mesh.cluster.debug_socket(node), &["verdicts"])
                .expect("debug verdicts");
        assert_eq!(cached["total"], 0, "{cached}");
    }
}

/// The pair already has a cached allow when a RequestAuthentication for payment appears: the
/// reload revokes it on both nodes, so the next forged token is checked, and refused.
#[test]
fn a_request_authentication_added_on_reload_revokes_the_pairs_cached_allow() {
    let key = SigningKey::generate("k1").expect("key");
    let mut mesh = mesh(&key, false);
    let nodes = [mesh.n1, mesh.n2];
    let file = mesh.cluster.dir().join("policies").join("jwt.yaml");
    let guard = std::fs::read_to_string(&file).expect("policy file");
    let cached = |mesh: &Mesh| {
        nodes.map(|node| {
            latch_tests::agent::debug_json(&mesh.cluster.debug_socket(node), &["verdicts"])
                .expect("debug verdicts")["total"]
                .as_u64()
                .unwrap_or(0)
        })
    };

    // Without it, payment's requests are not parsed and the pair's allow is cached.
    let marks = mesh.cluster.marks(&nodes);
    std::fs::remove_file(&file).expect("remove the policy");
    mesh.cluster
        .wait_reloaded(&nodes, &marks)
        .expect("reloaded");
    assert_eq!(status(&mesh.post("/v1/pay", None)), "200");
    assert!(
        latch_tests::eventually(std::time::Duration::from_secs(10), || cached(&mesh)
            .iter()
            .all(|&n| n > 0)),
        "the allow is cached on both nodes: {:?}",
        cached(&mesh)
    );

    let marks = mesh.cluster.marks(&nodes);
    latch_tests::env::write_atomically(&file, guard).expect("write the policy");
    mesh.cluster
        .wait_reloaded(&nodes, &marks)
        .expect("reloaded");
    assert_eq!(cached(&mesh), [0, 0], "the cached allows are revoked");
    let forged = SigningKey::generate("k1")
        .expect("another key")
        .sign(&claims(json!([])))
        .expect("sign");
    for attempt in 0..2 {
        let answer = mesh.post("/v1/pay", Some(&forged));
        assert_eq!(status(&answer), "401", "attempt {attempt}: {answer:?}");
    }
    assert_eq!(mesh.app.request_heads().len(), 1, "only the first request");
}
