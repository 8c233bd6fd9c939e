//! One workload's trouble stays its own, and a reload always leaves the kernel in line with the
//! state in force: a pod whose application holds one of the agent's ports fails closed alone
//! (reported in status, metrics and the log) while policy changes still reach every other pod,
//! and a workload moved to a new network namespace is checked there and released from the old.

use std::time::Duration;

use latch::datapath::KernelMaps;
use latch_tests::{AgentOptions, Cluster, NodeId, PodSpec, env, eventually, metrics};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

const DENY_PAYMENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payment-deny-all, namespace: prod }
spec:
  selector: { matchLabels: { app: payment } }
  action: DENY
  rules: [{}]
"#;

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("maps")
}

fn metric(cluster: &Cluster, node: NodeId, name: &str) -> Option<f64> {
    let samples = metrics::samples(&metrics::scrape(cluster, node).expect("scrape"));
    samples
        .iter()
        .find_map(|(series, value)| (series == name).then_some(*value))
}

#[test]
fn a_pod_whose_app_holds_the_tunnel_port_fails_closed_alone_and_policy_still_reaches_the_others() {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let frontend = cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("frontend");
    let outsider = cluster
        .add_pod(n1, PodSpec::external("outsider"))
        .expect("outsider");
    let payment = cluster
        .add_pod(n2, PodSpec::mesh("payment", "prod", "payment"))
        .expect("payment");
    let squatter = cluster
        .add_pod(n2, PodSpec::mesh("squatter", "prod", "squatter"))
        .expect("squatter");
    // The squatter's application takes the agent's tunnel port before the agent starts.
    let _squat = cluster.echo_server(squatter, 15008).expect("squat 15008");
    let squatter_app = cluster.echo_server(squatter, PORT).expect("squatter app");
    let _payment_app = cluster.echo_server(payment, PORT).expect("payment app");
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    let options = AgentOptions {
        metrics: "127.0.0.1:15020".into(),
        extra_yaml: format!("policies: [{}]\n", policies.display()),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    let mark = 0;
    cluster
        .start_agent(n2, options)
        .expect("agent 2 starts despite the squatter");

    // Reported: log, status, metrics.
    cluster
        .agent(n2)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("workload not served") && l.contains("prod/squatter")
        })
        .expect("the failure is logged");
    let status =
        latch_tests::agent::debug_json(&cluster.debug_socket(n2), &["status"]).expect("status");
    let failed = status["failedWorkloads"]
        .as_array()
        .expect("failedWorkloads");
    assert_eq!(failed.len(), 1, "{status}");
    assert_eq!(failed[0]["workload"], "prod/squatter", "{status}");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("opening listeners")),
        "{status}"
    );
    assert_eq!(metric(&cluster, n2, "latch_workloads_failed"), Some(1.0));

    // The squatter fails closed: plaintext to it is reset by its inbound check, and a mesh
    // client's tunnel cannot be answered by the application on 15008.
    let r = cluster
        .probe(outsider, cluster.pod(squatter).addr4(PORT), Some("sneak"))
        .expect("probe");
    assert!(r.reset || r.refused(), "plaintext to the failed pod: {r:?}");
    let r = cluster
        .probe(frontend, cluster.pod(squatter).addr4(PORT), Some("mesh"))
        .expect("probe");
    assert!(
        r.echo.is_none() && !r.ok || r.reset,
        "tunnel to the failed pod: {r:?}"
    );
    assert_eq!(
        squatter_app.accepted(),
        0,
        "its application is never reached"
    );

    // The others are served: frontend reaches payment and the pair is cached.
    let to = cluster.pod(payment).addr4(PORT);
    for text in ["one", "two"] {
        let r = cluster.probe(frontend, to, Some(text)).expect("probe");
        assert_eq!(r.echo.as_deref(), Some(text), "{r:?}");
    }
    assert!(
        maps(&cluster, n2)
            .verdicts()
            .expect("verdicts")
            .iter()
            .any(|v| v.is_allow()),
        "frontend -> payment is cached"
    );

    // A policy change reaches payment although the squatter still fails on every reload: its
    // cached allow is revoked and the next connection is refused.
    let marks = cluster.marks(&[n1, n2]);
    env::write_atomically(&policies.join("deny.yaml"), DENY_PAYMENT).expect("write");
    cluster.wait_reloaded(&[n1, n2], &marks).expect("reloaded");
    for node in [n1, n2] {
        assert!(
            !maps(&cluster, node)
                .verdicts()
                .expect("verdicts")
                .iter()
                .any(|v| v.is_allow()),
            "node {}: the allow is revoked",
            node.0 + 1
        );
    }
    let r = cluster.probe(frontend, to, Some("three")).expect("probe");
    assert_ne!(r.echo.as_deref(), Some("three"), "{r:?}");
}

#[test]
fn a_workload_moved_to_a_new_netns_is_checked_there_and_released_from_the_old() {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let old = cluster
        .add_pod(n1, PodSpec::mesh("payment", "prod", "payment"))
        .expect("payment");
    // The pod's next incarnation: not in the config yet.
    let new = cluster
        .add_pod(n1, PodSpec::external("payment-next"))
        .expect("next");
    let client = cluster
        .add_pod(n2, PodSpec::external("client"))
        .expect("client");
    let old_app = cluster.echo_server(old, PORT).expect("old app");
    let new_app = cluster.echo_server(new, PORT).expect("new app");
    cluster
        .start_agent(n1, AgentOptions::strict())
        .expect("agent");
    let r = cluster
        .probe(client, cluster.pod(old).addr4(PORT), Some("x"))
        .expect("probe");
    assert!(r.reset || r.refused(), "STRICT resets plaintext: {r:?}");

    // The same workload (prod/payment) now lives in the new netns, with its addresses.
    let yaml = cluster.config_yaml(n1, &AgentOptions::strict());
    let (o, n) = (cluster.pod(old), cluster.pod(new));
    let moved = yaml
        .replace(
            &o.netns().display().to_string(),
            &n.netns().display().to_string(),
        )
        .replace(&o.ipv4.to_string(), &n.ipv4.to_string())
        .replace(&o.ipv6.to_string(), &n.ipv6.to_string());
    assert_ne!(moved, yaml);
    let marks = cluster.marks(&[n1]);
    cluster.agent(n1).write_config(&moved).expect("write");
    cluster.wait_reloaded(&[n1], &marks).expect("reloaded");

    let r = cluster
        .probe(client, cluster.pod(new).addr4(PORT), Some("y"))
        .expect("probe");
    assert!(r.reset || r.refused(), "the new netns is checked: {r:?}");
    assert_eq!(new_app.accepted(), 0);
    // The old netns is no longer a workload's: nothing of the agent's is left on it.
    let released = eventually(WAIT, || {
        cluster
            .probe(client, cluster.pod(old).addr4(PORT), Some("z"))
            .is_ok_and(|r| r.echo.as_deref() == Some("z"))
    });
    assert!(released, "the old netns still has the inbound check");
    assert_eq!(old_app.accepted(), 1);
}
