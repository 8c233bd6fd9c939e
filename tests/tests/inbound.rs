//! The inbound check (`sk_lookup` on an enrolled pod's netns): connections without a fresh
//! inbound verdict are steered to the agent, which applies the mesh-wide mTLS mode; a fresh
//! verdict admits the connection directly; with the agent gone, steered connections are reset.

use std::time::Duration;

use latch::datapath::{KernelMaps, system::boot_ns_after};
use latch_common::{Counter, DECISION_ALLOW, DIRECTION_INBOUND, VerdictKey, VerdictValue};
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes};

const PORT: u16 = 9090;

/// Node 1: agent + enrolled `payment`; node 2: `analytics`, a mesh pod whose node runs no agent,
/// so its connections arrive at node 1 directly (not through a tunnel).
fn setup(options: AgentOptions) -> (Cluster, NodeId, PodId, PodId) {
    // `payment` is on node 1 (with the agent), `analytics` on node 2.
    let TwoNodes {
        mut cluster,
        n1,
        client: server,
        server: client,
        ..
    } = Cluster::two_nodes(
        PodSpec::mesh("payment", "prod", "payment"),
        PodSpec::mesh("analytics", "prod", "analytics"),
    )
    .expect("cluster");
    cluster.start_agent(n1, options).expect("agent");
    (cluster, n1, server, client)
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("maps")
}

#[test]
fn strict_resets_unverified_connections_and_admits_cached_pairs() {
    let (cluster, n1, server, client) = setup(AgentOptions::strict());
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);

    let steered = maps(&cluster, n1)
        .counter(Counter::InboundSteered)
        .expect("counter");
    let r = cluster.probe(client, to, Some("plaintext")).expect("probe");
    assert!(
        r.reset || (!r.ok && r.refused()),
        "STRICT must reset plaintext: {r:?}"
    );
    assert!(r.echo.is_none());
    assert_eq!(echo.accepted(), 0, "the application must never see it");
    assert_eq!(
        maps(&cluster, n1)
            .counter(Counter::InboundSteered)
            .expect("counter"),
        steered + 1
    );
    let r = cluster
        .probe(client, cluster.pod(server).addr6(PORT), Some("v6"))
        .expect("probe");
    assert!(
        r.reset || (!r.ok && r.refused()),
        "STRICT must reset IPv6 plaintext too: {r:?}"
    );
    assert_eq!(echo.accepted(), 0);

    // A fresh inbound verdict for (analytics, payment, port) admits the pair straight through.
    let id =
        |p: PodId| latch::identity::IdentityKey::of(&cluster.pod(p).spiffe_id("cluster.local")).0;
    let key = VerdictKey::new(id(client), id(server), PORT, DIRECTION_INBOUND);
    let allow = VerdictValue {
        expires_at_ns: boot_ns_after(Duration::from_secs(60)),
        decision: DECISION_ALLOW,
        _pad: 0,
    };
    maps(&cluster, n1)
        .insert_verdict(key, allow)
        .expect("insert");
    let admitted = maps(&cluster, n1)
        .counter(Counter::InboundAdmitted)
        .expect("counter");
    let r = cluster.probe(client, to, Some("verified")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("verified"), "{r:?}");
    assert_eq!(
        maps(&cluster, n1)
            .counter(Counter::InboundAdmitted)
            .expect("counter"),
        admitted + 1
    );
    let source = cluster.pod(client).ipv4;
    assert_eq!(
        echo.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![source],
        "delivered with its real source address"
    );

    // The verdict is per identity pair: the same pair over IPv6 is admitted too.
    let r = cluster
        .probe(client, cluster.pod(server).addr6(PORT), Some("verified6"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("verified6"), "{r:?}");
}

#[test]
fn permissive_delivers_plaintext_from_the_clients_address() {
    let (cluster, _n1, server, client) = setup(AgentOptions::default());
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let [v4, v6] = cluster.pod(client).ips();
    let r = cluster
        .probe(client, cluster.pod(server).addr4(PORT), Some("hello"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("hello"), "{r:?}");
    assert_eq!(
        echo.peers().last().map(|p| p.ip()),
        Some(v4),
        "delivered as the client sent it, not from the marker"
    );
    let r = cluster
        .probe(client, cluster.pod(server).addr6(PORT), Some("hello6"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("hello6"), "{r:?}");
    assert_eq!(echo.peers().last().map(|p| p.ip()), Some(v6));
}

#[test]
fn without_the_agent_inbound_connections_are_reset_not_bypassed() {
    let (mut cluster, n1, server, client) = setup(AgentOptions::default());
    let echo = cluster.echo_server(server, PORT).expect("echo");
    cluster.agent(n1).kill9();
    let r = cluster
        .probe(client, cluster.pod(server).addr4(PORT), Some("sneak"))
        .expect("probe");
    assert!(!r.ok && r.refused(), "must be reset at once: {r:?}");
    assert_eq!(echo.accepted(), 0);
    assert!(
        maps(&cluster, n1)
            .counter(Counter::InboundRejected)
            .expect("counter")
            >= 1
    );
}
