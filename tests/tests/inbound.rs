//! The inbound check (`sk_lookup` on an enrolled pod's netns): connections without a fresh
//! inbound verdict are steered to the agent, which applies the mesh-wide mTLS mode; a fresh
//! verdict admits the connection directly; with the agent gone, steered connections are reset.

use std::time::Duration;

use latch::datapath::{KernelMaps, system::boot_ns_after};
use latch_common::{Counter, DECISION_ALLOW, DIRECTION_INBOUND, VerdictKey, VerdictValue};
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes, netns};

const PORT: u16 = 9090;

/// Node 1: agent + enrolled `payment`; node 2: `analytics`, a mesh pod whose node runs no agent,
/// so its connections arrive at node 1 directly (not through a tunnel).
fn setup(options: AgentOptions) -> (Cluster, NodeId, PodId, PodId) {
    setup_with_policies(options, &[])
}

/// [`setup`], the agent enforcing the policy files `policies` (name, text).
fn setup_with_policies(
    mut options: AgentOptions,
    policies: &[(&str, &str)],
) -> (Cluster, NodeId, PodId, PodId) {
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
    if !policies.is_empty() {
        let dir = cluster.dir().join("policies");
        std::fs::create_dir_all(&dir).expect("policy dir");
        for (name, text) in policies {
            std::fs::write(dir.join(name), text).expect("policy file");
        }
        options.extra_yaml += &format!("policies: [{}]\n", dir.display());
    }
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

/// An L7 policy on `payment`: anyone may `GET /public`, only analytics' proven identity may
/// `POST /v1/pay`.
const HTTP_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payment-http, namespace: prod }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { methods: ["GET"], paths: ["/public"] } }]
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/analytics"] } }]
    to: [{ operation: { methods: ["POST"], paths: ["/v1/pay"] } }]
"#;

#[test]
fn permissive_plaintext_http_is_judged_per_request_and_never_gets_the_senders_principal() {
    // analytics' node runs no agent: its connections reach payment as plaintext from the address
    // of a mesh pod whose identity the registry knows. The attack: claim that identity by address.
    let (cluster, _n1, server, client) =
        setup_with_policies(AgentOptions::default(), &[("payment.yaml", HTTP_POLICY)]);
    let app = cluster.http_server(server, PORT).expect("http server");
    let to = cluster.pod(server).addr4(PORT);
    let send = |request: &str| {
        let r = cluster.probe(client, to, Some(request)).expect("probe");
        r.echo.unwrap_or_default()
    };

    let public = send("GET /public HTTP/1.1\r\nHost: payment\r\n\r\n");
    assert!(
        public.starts_with("HTTP/1.1 200") && public.ends_with("GET /public"),
        "a rule with no source admits plaintext: {public:?}"
    );
    let pay = send("POST /v1/pay HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n");
    assert!(
        pay.starts_with("HTTP/1.1 403") && pay.contains("RBAC: access denied"),
        "plaintext has no principal, whatever its address: {pay:?}"
    );
    let heads = app.request_heads();
    assert!(
        heads.iter().any(|h| h.starts_with("GET /public"))
            && !heads.iter().any(|h| h.starts_with("POST")),
        "the application saw the allowed request only: {heads:?}"
    );
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

/// `ip -j link show dev DEV` inside namespace `ns`.
fn link(ns: &str, dev: &str) -> serde_json::Value {
    let out = netns::sh(
        std::process::Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", dev]),
    )
    .expect("ip link show");
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    links[0].clone()
}

/// The interface index of `dev` inside namespace `ns`.
fn ifindex(ns: &str, dev: &str) -> u32 {
    link(ns, dev)["ifindex"].as_u64().expect("ifindex") as u32
}

#[test]
fn every_address_of_an_enrolled_pod_is_checked_link_local_and_secondary_ones_too() {
    let (mut cluster, n1, server, _client) = setup(AgentOptions::strict());
    let neighbour = cluster
        .add_pod(n1, PodSpec::external("neighbour"))
        .expect("a pod on the same bridge, not in the mesh");
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let server_ns = cluster.pod(server).netns_name.clone();
    // Addresses the config does not list: a link-local one and a secondary IPv4 one.
    netns::ip(&server_ns, &["addr", "add", "fe80::beef/64", "dev", "eth0"]).expect("link-local");
    netns::ip(
        &server_ns,
        &["addr", "add", "10.244.1.200/32", "dev", "eth0"],
    )
    .expect("secondary");
    let link_local = |ns: &str, dev: &str| {
        std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::beef".parse().expect("address"),
            PORT,
            0,
            ifindex(ns, dev),
        ))
    };
    let rejected = || {
        maps(&cluster, n1)
            .counter(Counter::InboundRejected)
            .expect("counter")
    };
    let before = rejected();

    // From a pod on the same bridge, to the link-local address.
    let neighbour_ns = cluster.pod(neighbour).netns_name.clone();
    let to = link_local(&neighbour_ns, "eth0");
    let r = cluster
        .probe(neighbour, to, Some("link-local"))
        .expect("probe");
    assert!(
        r.reset || r.refused(),
        "link-local from a neighbour {to}: {r:?}"
    );
    // From the node itself (any process on the host network), to the same address.
    let node_ns = cluster.node(n1).netns_name.clone();
    let to = link_local(&node_ns, "br0");
    let r = latch_tests::probe::connect(&cluster.node(n1).netns(), None, to, Some("node"))
        .expect("probe");
    assert!(
        r.reset || r.refused(),
        "link-local from the node {to}: {r:?}"
    );
    assert_eq!(echo.accepted(), 0, "the application never sees them");
    assert_eq!(
        rejected(),
        before + 2,
        "each was reset by the inbound check"
    );

    // The secondary address. The pod cannot announce it (anti-spoofing drops its ARP answers
    // and anything it sends from it), so the neighbour sends straight to the pod's MAC: the
    // SYN reaches the pod's netns, where the inbound check must refuse it too.
    let mac = link(&server_ns, "eth0")["address"]
        .as_str()
        .expect("mac")
        .to_owned();
    netns::ip(
        &neighbour_ns,
        &[
            "neigh",
            "replace",
            "10.244.1.200",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .expect("static neighbour");
    let to: std::net::SocketAddr = format!("10.244.1.200:{PORT}").parse().expect("address");
    let r = latch_tests::probe::connect_from(
        &cluster.pod(neighbour).netns(),
        None,
        cluster.pod(neighbour).ipv4.into(),
        to,
        Duration::from_secs(2),
    )
    .expect("probe");
    assert!(!r.ok && r.echo.is_none(), "secondary address {to}: {r:?}");
    assert_eq!(echo.accepted(), 0, "the application never sees it");
    assert!(
        rejected() > before + 2,
        "the inbound check reset the SYN to the secondary address"
    );
}

#[test]
fn deliveries_a_crashed_agent_announced_are_forgotten_when_it_starts_again() {
    let (mut cluster, n1, server, client) = setup(AgentOptions::strict());
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let from = std::net::SocketAddr::new(cluster.pod(client).ipv4.into(), 41000);
    let to = cluster.pod(server).addr4(PORT);
    // What a crashed agent leaves behind: an announcement it never withdrew, which lets that
    // exact four-tuple past the inbound check.
    latch::datapath::DeliveryMap::open_pinned(&cluster.node(n1).pin_dir)
        .expect("deliveries")
        .announce(from, to)
        .expect("announce");
    cluster.agent(n1).kill9();
    cluster.agent(n1).restart().expect("restart");
    let r = latch_tests::probe::connect_from_port(
        &cluster.pod(client).netns(),
        None,
        from,
        to,
        Duration::from_secs(5),
    )
    .expect("probe");
    assert!(
        r.reset || r.refused(),
        "plaintext on a stale delivery's four-tuple must be reset under STRICT: {r:?}"
    );
    assert_eq!(echo.accepted(), 0, "the application never sees it");
}
