//! Istio authorization policy end to end on two nodes with real agents: the seed example (only
//! `frontend` may `POST /v1/pay` on `payment-service`, enforced per HTTP request at the
//! destination), a namespace deny-all, revocation of cached verdicts and open connections when a
//! policy file changes, malformed policies that keep the running state, and `latch policy
//! check` / `explain` on the same files.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use latch::datapath::KernelMaps;
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, ProbeResult, env, eventually, metrics,
};

const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;
const WAIT: Duration = Duration::from_secs(20);

const PAYMENT_ALLOW: &str = r#"# The seed example: only frontend may POST /v1/pay on payment-service.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payment-allow
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
"#;

const LEDGER_DENY_ALL: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: ledger
spec: {}
"#;

/// Would refuse analytics at ledger; `istio.io/dry-run` keeps it from being enforced.
const LEDGER_DRY_RUN_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-analytics
  namespace: ledger
  annotations: { istio.io/dry-run: "true" }
spec:
  action: DENY
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/analytics"] } }]
"#;

const PAY: &str = "POST /v1/pay HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n";
const GET_PAY: &str = "GET /v1/pay HTTP/1.1\r\nHost: payment\r\n\r\n";

struct Mesh {
    cluster: Cluster,
    n1: NodeId,
    n2: NodeId,
    frontend: PodId,
    analytics: PodId,
    payment: PodId,
    ledger: PodId,
    policies: PathBuf,
}

/// Node 1: prod/frontend, prod/analytics. Node 2: prod/payment (app=payment-service),
/// ledger/ledger. Both agents (STRICT) read the same policy directory.
fn mesh(files: &[(&str, &str)]) -> Mesh {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let frontend = cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("frontend");
    let analytics = cluster
        .add_pod(n1, PodSpec::mesh("analytics", "prod", "analytics"))
        .expect("analytics");
    let mut payment = PodSpec::mesh("payment", "prod", "payment");
    payment.labels = vec![("app".into(), "payment-service".into())];
    let payment = cluster.add_pod(n2, payment).expect("payment");
    let ledger = cluster
        .add_pod(n2, PodSpec::mesh("ledger", "ledger", "ledger"))
        .expect("ledger");
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    for (name, text) in files {
        std::fs::write(policies.join(name), text).expect("policy file");
    }
    let options = AgentOptions {
        extra_yaml: format!("policies: [{}]\n", policies.display()),
        metrics: "127.0.0.1:15020".into(),
        ..AgentOptions::strict_fastpath()
    };
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    Mesh {
        cluster,
        n1,
        n2,
        frontend,
        analytics,
        payment,
        ledger,
        policies,
    }
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("maps")
}

fn cached_ports(cluster: &Cluster, node: NodeId) -> Vec<u16> {
    maps(cluster, node)
        .verdicts()
        .expect("verdicts")
        .iter()
        .map(|v| v.key.port)
        .collect()
}

fn answered(r: &ProbeResult) -> &str {
    r.echo.as_deref().unwrap_or_default()
}

/// Wait for an access-log decision on `node` that contains every one of `needles`.
fn wait_for_decision(cluster: &mut Cluster, node: NodeId, needles: &[&str]) -> String {
    cluster
        .agent(node)
        .wait_for_line_after(0, WAIT, |l| {
            l.contains("\"target\":\"access\"") && needles.iter().all(|n| l.contains(n))
        })
        .unwrap_or_else(|e| {
            let tail = cluster.agent(node).log_tail(20);
            panic!("no access-log line with {needles:?}: {e:#}\n{tail}")
        })
}

#[test]
fn only_frontend_may_post_pay_and_the_pair_is_never_cached() {
    let Mesh {
        mut cluster,
        n1,
        n2,
        frontend,
        analytics,
        payment,
        ..
    } = mesh(&[("payment.yaml", PAYMENT_ALLOW)]);
    let _app = cluster.http_server(payment, HTTP_PORT).expect("http");
    let to = cluster.pod(payment).addr4(HTTP_PORT);

    for attempt in 0..2 {
        let r = cluster.probe(frontend, to, Some(PAY)).expect("probe");
        assert!(
            answered(&r).starts_with("HTTP/1.1 200 OK") && answered(&r).ends_with("POST /v1/pay"),
            "frontend POST /v1/pay (attempt {attempt}) reaches the application: {r:?}"
        );
    }
    let r = cluster.probe(frontend, to, Some(GET_PAY)).expect("probe");
    assert!(
        answered(&r).starts_with("HTTP/1.1 403 Forbidden")
            && answered(&r).ends_with("RBAC: access denied\n"),
        "frontend GET is refused by the destination agent: {r:?}"
    );
    wait_for_decision(
        &mut cluster,
        n2,
        &["\"decision\":\"DENY\"", "\"request\":\"GET /v1/pay\""],
    );

    let r = cluster.probe(analytics, to, Some(PAY)).expect("probe");
    assert!(
        !answered(&r).contains("200 OK") && (r.reset || answered(&r).is_empty()),
        "analytics never reaches payment: {r:?}"
    );
    let refusal = wait_for_decision(
        &mut cluster,
        n1,
        &["\"direction\":\"outbound\"", "/sa/analytics", "403"],
    );
    assert!(refusal.contains("\"decision\":\"DENY\""), "{refusal}");
    wait_for_decision(
        &mut cluster,
        n2,
        &[
            "\"decision\":\"DENY\"",
            "/sa/analytics",
            "ALLOW policies apply but none matched",
        ],
    );

    for node in [n1, n2] {
        assert!(
            !cached_ports(&cluster, node).contains(&HTTP_PORT),
            "a pair decided on HTTP attributes is never cached (node {node:?})"
        );
    }
}

#[test]
fn a_dry_run_deny_is_recorded_in_the_access_log_and_metrics_but_never_enforced() {
    let Mesh {
        mut cluster,
        n2,
        frontend,
        analytics,
        ledger,
        ..
    } = mesh(&[("ledger-dry-run.yaml", LEDGER_DRY_RUN_DENY)]);
    let _echo = cluster.echo_server(ledger, TCP_PORT).expect("echo");
    let to = cluster.pod(ledger).addr4(TCP_PORT);

    // The DENY matches analytics, but only as a shadow: the connection goes through.
    let r = cluster.probe(analytics, to, Some("dry")).expect("probe");
    assert_eq!(r.echo.as_deref(), Some("dry"), "{r:?}");
    let line = wait_for_decision(&mut cluster, n2, &["\"dry_run\":\"deny\"", "sa/analytics"]);
    assert!(line.contains("\"decision\":\"ALLOW\""), "{line}");
    assert!(
        line.contains("dry run: DENY by ledger/deny-analytics rule 0 (not enforced)"),
        "{line}"
    );
    // frontend is not matched: the shadow decision allows it too.
    let r = cluster.probe(frontend, to, Some("front")).expect("probe");
    assert_eq!(r.echo.as_deref(), Some("front"), "{r:?}");
    wait_for_decision(&mut cluster, n2, &["\"dry_run\":\"allow\"", "sa/frontend"]);

    let shadows = |cluster: &Cluster| {
        let samples = metrics::samples(&metrics::scrape(cluster, n2).unwrap_or_default());
        ["deny", "allow"].map(|shadow| {
            metrics::sample(
                &samples,
                "latch_policy_dry_run_decisions_total",
                &[&format!("shadow=\"{shadow}\"")],
            )
        })
    };
    assert!(
        eventually(WAIT, || shadows(&cluster)
            .iter()
            .all(|n| n.is_some_and(|n| n >= 1.0))),
        "both shadow decisions counted: {:?}",
        shadows(&cluster)
    );
}

#[test]
fn a_namespace_deny_all_revokes_cached_verdicts_and_closes_open_connections() {
    let Mesh {
        mut cluster,
        n1,
        n2,
        frontend,
        ledger,
        policies,
        ..
    } = mesh(&[("payment.yaml", PAYMENT_ALLOW)]);
    let _echo = cluster.echo_server(ledger, TCP_PORT).expect("echo");
    let _echo2 = cluster.echo_server(ledger, TCP_PORT + 1).expect("echo");
    let to = cluster.pod(ledger).addr4(TCP_PORT);

    // No policy selects ledger: allowed, and cached on both nodes.
    for payload in ["first", "second"] {
        let r = cluster.probe(frontend, to, Some(payload)).expect("probe");
        assert_eq!(r.echo.as_deref(), Some(payload), "{r:?}");
    }
    for node in [n1, n2] {
        assert!(cached_ports(&cluster, node).contains(&TCP_PORT));
    }

    // A tunneled connection that stays open across the change (first of its port).
    let other = cluster.pod(ledger).addr4(TCP_PORT + 1);
    let pipe = cluster
        .open_pipe(frontend, other, b"before|", n2)
        .expect("open connection");

    let marks = cluster.marks(&[n1, n2]);
    let written = Instant::now();
    latch_tests::env::write_atomically(&policies.join("ledger-deny-all.yaml"), LEDGER_DENY_ALL)
        .expect("write");
    cluster
        .wait_reloaded(&[n1, n2], &marks)
        .expect("the change is applied");
    let applied = written.elapsed();
    let refused = eventually(WAIT, || {
        cluster
            .probe(frontend, to, Some("third"))
            .is_ok_and(|r| r.echo.as_deref() != Some("third"))
    });
    let enforced = written.elapsed();
    assert!(refused, "after the deny-all, connect() does not succeed");
    println!(
        "revocation: policy file written -> applied on both nodes {applied:?}; -> first refused connection {enforced:?}"
    );
    for node in [n1, n2] {
        let maps = maps(&cluster, node);
        assert!(
            !maps
                .verdicts()
                .expect("verdicts")
                .iter()
                .any(|v| v.key.port == TCP_PORT && v.is_allow()),
            "no cached allow survives the deny-all (node {node:?})"
        );
    }

    // The connection that was open is closed by the agents.
    let r = pipe.finish(b"after").expect("probe");
    assert_ne!(
        r.echo.as_deref(),
        Some("before|after"),
        "the open tunneled connection is closed: {r:?}"
    );

    // Removing the deny-all allows the pair again at once (a cached deny is revoked too).
    let marks = cluster.marks(&[n1, n2]);
    std::fs::remove_file(policies.join("ledger-deny-all.yaml")).expect("remove");
    cluster.wait_reloaded(&[n1, n2], &marks).expect("reloaded");
    let allowed = eventually(WAIT, || {
        cluster
            .probe(frontend, to, Some("fourth"))
            .is_ok_and(|r| r.echo.as_deref() == Some("fourth"))
    });
    assert!(allowed, "allowed again once the deny-all is gone");
}

fn latch(args: &[&str]) -> (i32, String) {
    env::run_latch(args).expect("run latch")
}

#[test]
fn malformed_policies_are_reported_and_the_running_state_is_kept() {
    let Mesh {
        mut cluster,
        n1,
        n2,
        frontend,
        analytics,
        payment,
        policies,
        ..
    } = mesh(&[("payment.yaml", PAYMENT_ALLOW)]);
    let _app = cluster.http_server(payment, HTTP_PORT).expect("http");
    let to = cluster.pod(payment).addr4(HTTP_PORT);

    let bad = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: prod
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["80x"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: external
  namespace: prod
spec:
  action: CUSTOM
  provider: { name: ext-authz }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: typo
  namespace: prod
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/33"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: misspelt
  namespace: prod
spec:
  rules:
  - from:
    - source:
        principal: ["x"]
"#;
    // `latch policy check` lists every problem with its file, line and field.
    let bad_dir = cluster.dir().join("bad-policies");
    std::fs::create_dir_all(&bad_dir).expect("dir");
    std::fs::write(bad_dir.join("bad.yaml"), bad).expect("write");
    let (code, out) = latch(&["policy", "check", &bad_dir.display().to_string()]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "bad.yaml:11:",
        "spec.rules[0].to[0].operation.ports[0]",
        "bad.yaml:19:",
        "CUSTOM",
        "ipBlocks[0]",
        "principal",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    let (code, out) = latch(&["policy", "check", &policies.display().to_string()]);
    assert_eq!(code, 0, "{out}");

    // The same file dropped into the running agents' directory: the reload fails, says why,
    // and the last good policy keeps being enforced.
    let marks = cluster.marks(&[n1, n2]);
    latch_tests::env::write_atomically(&policies.join("zz-bad.yaml"), bad).expect("write");
    for (node, mark) in [n1, n2].iter().zip(&marks) {
        let line = cluster
            .agent(*node)
            .wait_for_line_after(*mark, WAIT, |l| l.contains("config reload failed"))
            .expect("the failed reload is reported");
        assert!(
            line.contains("zz-bad.yaml:11:") && line.contains("keeping the last good"),
            "{line}"
        );
    }
    let r = cluster.probe(frontend, to, Some(PAY)).expect("probe");
    assert!(answered(&r).ends_with("POST /v1/pay"), "{r:?}");
    let r = cluster.probe(analytics, to, Some(PAY)).expect("probe");
    assert!(!answered(&r).contains("200 OK"), "{r:?}");
}

#[test]
fn policy_explain_answers_from_the_config_and_policies() {
    let Mesh {
        mut cluster,
        n2,
        payment,
        ..
    } = mesh(&[("payment.yaml", PAYMENT_ALLOW)]);
    let config = cluster.agent(n2).config_path().display().to_string();
    let to = cluster.pod(payment).addr4(HTTP_PORT).to_string();
    let frontend = "spiffe://cluster.local/ns/prod/sa/frontend";
    let analytics = "spiffe://cluster.local/ns/prod/sa/analytics";
    let explain = |from: &str, extra: &[&str]| {
        let mut args = vec!["policy", "explain", "--config", &config, "--from", from];
        args.extend_from_slice(&["--to", &to]);
        args.extend_from_slice(extra);
        latch(&args)
    };

    let (code, out) = explain(frontend, &["--method", "POST", "--path", "/v1/pay"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW"), "{out}");
    assert!(out.contains("prod/payment-allow"), "{out}");
    assert!(out.contains("cacheable: no"), "{out}");

    let (code, out) = explain(frontend, &["--method", "GET", "--path", "/v1/pay"]);
    assert_eq!(code, 3, "{out}");
    let (code, out) = explain(analytics, &["--method", "POST", "--path", "/v1/pay"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.starts_with("DENY"), "{out}");
    let (code, out) = explain("plaintext", &[]);
    assert_eq!(code, 3, "STRICT refuses plaintext: {out}");
    let (code, out) = explain("not-a-spiffe-id", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--from"), "{out}");
}
