//! The mTLS (HBONE) tunnel between two agents, seen from the wire and from the kernel: a pair's
//! first connection crosses the link as TLS to the tunnel port with its payload never in clear;
//! `mode: tunnel` encrypts every connection and caches nothing; a destination without its agent
//! makes the client's connection fail at once.

use latch::datapath::KernelMaps;
use latch_common::Counter;
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec,
    sniffer::{Sniffer, contains, tcp_segment},
};

const PORT: u16 = 8080;
const TUNNEL_PORT: u16 = 15008;

fn setup(options: AgentOptions) -> (Cluster, NodeId, NodeId, PodId, PodId) {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let client = cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("pod");
    let server = cluster
        .add_pod(n2, PodSpec::mesh("payment", "prod", "payment"))
        .expect("pod");
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    (cluster, n1, n2, client, server)
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("maps")
}

/// Capture node 1's link to the other nodes while `f` runs.
fn on_the_wire(cluster: &Cluster, f: impl FnOnce()) -> Vec<Vec<u8>> {
    let sniffer = Sniffer::start(&cluster.node(NodeId(0)).netns(), "fab0").expect("capture");
    f();
    sniffer.frames()
}

#[test]
fn the_first_connection_crosses_the_link_as_tls_and_both_nodes_cache_the_pair() {
    let (cluster, n1, n2, client, server) = setup(AgentOptions::strict());
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let secret = "top-secret-payload-7f3a";
    let to = cluster.pod(server).addr4(PORT);
    let frames = on_the_wire(&cluster, || {
        let r = cluster.probe(client, to, Some(secret)).expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some(secret), "{r:?}");
    });
    let segments: Vec<_> = frames.iter().filter_map(|f| tcp_segment(f)).collect();
    assert!(
        segments
            .iter()
            .any(|s| s.dst_port == TUNNEL_PORT && s.payload_len > 0),
        "the connection must cross as data to the tunnel port: {segments:?}"
    );
    assert!(
        segments
            .iter()
            .all(|s| s.dst_port == TUNNEL_PORT || s.src_port == TUNNEL_PORT),
        "nothing but the tunnel may cross: {segments:?}"
    );
    assert!(
        !frames.iter().any(|f| contains(f, secret.as_bytes())),
        "the payload must never cross in clear"
    );
    for node in [n1, n2] {
        let verdicts = maps(&cluster, node).verdicts().expect("verdicts");
        assert_eq!(
            verdicts.len(),
            1,
            "node {} caches the pair once",
            node.0 + 1
        );
        assert!(verdicts[0].is_allow());
    }
}

#[test]
fn tunnel_mode_encrypts_every_connection_and_caches_nothing() {
    let options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::strict()
    };
    let (cluster, n1, n2, client, server) = setup(options);
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    let secret = "tunnel-mode-secret-91bc";
    let frames = on_the_wire(&cluster, || {
        for _ in 0..5 {
            let r = cluster.probe(client, to, Some(secret)).expect("probe");
            assert!(r.ok && r.echo.as_deref() == Some(secret), "{r:?}");
        }
    });
    assert!(!frames.iter().any(|f| contains(f, secret.as_bytes())));
    assert_eq!(
        maps(&cluster, n1).counter(Counter::Redirected).expect("c"),
        5
    );
    assert_eq!(
        maps(&cluster, n1)
            .counter(Counter::FastpathAllowed)
            .expect("c"),
        0
    );
    for node in [n1, n2] {
        assert!(
            maps(&cluster, node)
                .verdicts()
                .expect("verdicts")
                .is_empty(),
            "nothing may be cached in tunnel mode"
        );
    }
}

#[test]
fn without_the_destination_agent_the_client_connection_fails_at_once() {
    let (mut cluster, _n1, n2, client, server) = setup(AgentOptions::default());
    let echo = cluster.echo_server(server, PORT).expect("echo");
    cluster.agent(n2).kill9();
    let r = cluster
        .probe(client, cluster.pod(server).addr4(PORT), Some("x"))
        .expect("probe");
    // The probe's connect succeeds against the local capture listener; the agent then finds
    // the tunnel port closed and resets the client (a hang would end in the probe's timeout).
    assert!(r.reset || r.refused(), "{r:?}");
    assert!(r.echo.is_none());
    assert_eq!(echo.accepted(), 0);
}
