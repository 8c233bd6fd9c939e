//! Outbound datapath scenarios on two netns nodes with real agents: the first connection of a
//! pair goes through the agent, repeats take the kernel fast path, expired verdicts go back
//! through the agent, cached denies fail with EPERM, everything not in the mesh is untouched, and
//! a connection made by TCP Fast Open is captured like one made by `connect()`.

use std::net::{IpAddr, SocketAddr};

use latch::datapath::{KernelMaps, system::boot_ns_after};
use latch_common::{Counter, DECISION_DENY, DIRECTION_OUTBOUND, VerdictKey, VerdictValue};
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodKind, PodSpec, TwoNodes};

const PORT: u16 = 8080;
/// A port of the server no verdict is cached for.
const OTHER_PORT: u16 = 8081;

struct Setup {
    cluster: Cluster,
    n1: NodeId,
    client: PodId,
    server: PodId,
}

/// Node 1 runs the enrolled client `frontend`, node 2 the server `payment`; both nodes run an
/// agent, so a pair's first connection crosses an mTLS tunnel between them.
fn setup() -> Setup {
    setup_with(AgentOptions::default())
}

/// [`setup`] with agents started with `options`.
fn setup_with(options: AgentOptions) -> Setup {
    let TwoNodes {
        cluster,
        n1,
        client,
        server,
        ..
    } = Cluster::frontend_payment()
        .and_then(|t| t.start_agents(options))
        .expect("cluster with agents");
    Setup {
        cluster,
        n1,
        client,
        server,
    }
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("pinned maps")
}

fn counter(cluster: &Cluster, node: NodeId, c: Counter) -> u64 {
    maps(cluster, node).counter(c).expect("counters")
}

fn pair_key(cluster: &Cluster, client: PodId, server: PodId) -> VerdictKey {
    let id =
        |p: PodId| latch::identity::IdentityKey::of(&cluster.pod(p).spiffe_id("cluster.local")).0;
    VerdictKey::new(id(client), id(server), PORT, DIRECTION_OUTBOUND)
}

fn inbound_key(cluster: &Cluster, client: PodId, server: PodId) -> VerdictKey {
    let mut key = pair_key(cluster, client, server);
    key.direction = latch_common::DIRECTION_INBOUND;
    key
}

fn first_then_fast(dst: impl Fn(&Cluster) -> SocketAddr) {
    let Setup {
        cluster,
        n1,
        client,
        server,
    } = setup();
    let echo = cluster.echo_server(server, PORT).expect("echo server");
    let to = dst(&cluster);

    let redirected = counter(&cluster, n1, Counter::Redirected);
    let first = cluster.probe(client, to, Some("first")).expect("probe");
    assert!(first.ok, "first connection failed: {first:?}");
    assert_eq!(
        first.echo.as_deref(),
        Some("first"),
        "payload did not make the round trip"
    );
    assert_eq!(
        first.peer.as_deref(),
        Some(to.to_string().as_str()),
        "getpeername must show the original destination"
    );
    assert_eq!(
        counter(&cluster, n1, Counter::Redirected),
        redirected + 1,
        "first connection must be redirected"
    );
    let client_ip = cluster.pod(client).ips()[usize::from(to.is_ipv6())];
    assert_eq!(
        echo.peers().last().map(|p| p.ip()),
        Some(client_ip),
        "node 2's agent delivers the tunneled connection from the client's own address"
    );

    let verdict = maps(&cluster, n1)
        .verdict(&pair_key(&cluster, client, server))
        .expect("read verdict");
    assert!(
        verdict.is_some_and(|v| v.is_allow()),
        "the agent must cache an allow for the pair"
    );

    let n2 = NodeId(1);
    let inbound_verdict = maps(&cluster, n2)
        .verdict(&inbound_key(&cluster, client, server))
        .expect("read verdict");
    assert!(
        inbound_verdict.is_some_and(|v| v.is_allow()),
        "node 2 must cache the inbound allow for the pair"
    );

    let fast = counter(&cluster, n1, Counter::FastpathAllowed);
    let redirected = counter(&cluster, n1, Counter::Redirected);
    let admitted = counter(&cluster, n2, Counter::InboundAdmitted);
    let second = cluster.probe(client, to, Some("second")).expect("probe");
    assert!(
        second.ok && second.echo.as_deref() == Some("second"),
        "repeat failed: {second:?}"
    );
    assert_eq!(
        counter(&cluster, n1, Counter::FastpathAllowed),
        fast + 1,
        "repeat must take the fast path"
    );
    assert_eq!(
        counter(&cluster, n1, Counter::Redirected),
        redirected,
        "the agent must see nothing of the repeat"
    );
    assert_eq!(
        counter(&cluster, n2, Counter::InboundAdmitted),
        admitted + 1,
        "node 2's inbound check admits the repeat by its cached verdict"
    );
    assert_eq!(
        echo.peers().last().map(|p| p.ip()),
        Some(client_ip),
        "the direct connection arrives from the pod's own address too"
    );
    assert_eq!(second.peer.as_deref(), Some(to.to_string().as_str()));
    assert_ne!(
        second
            .local
            .as_deref()
            .map(|l| l.starts_with("127.") || l.starts_with("[::1]")),
        Some(true),
        "fast path is not redirected"
    );
}

#[test]
fn first_connection_through_agent_then_fast_path_ipv4() {
    first_then_fast(|c| c.pod(PodId(1)).addr4(PORT));
}

#[test]
fn first_connection_through_agent_then_fast_path_ipv6() {
    first_then_fast(|c| c.pod(PodId(1)).addr6(PORT));
}

#[test]
fn expired_verdict_goes_back_through_agent_and_cached_deny_is_eperm() {
    let Setup {
        cluster,
        n1,
        client,
        server,
    } = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo server");
    let to = cluster.pod(server).addr4(PORT);
    assert!(cluster.probe(client, to, Some("a")).expect("probe").ok);

    // Expire the cached allow: the kernel must ignore it and redirect again.
    let key = pair_key(&cluster, client, server);
    let mut m = maps(&cluster, n1);
    let mut value = m.verdict(&key).expect("read").expect("cached").value;
    value.expires_at_ns = boot_ns_after(std::time::Duration::ZERO).saturating_sub(1);
    m.insert_verdict(key, value).expect("expire");
    let redirected = counter(&cluster, n1, Counter::Redirected);
    let again = cluster.probe(client, to, Some("b")).expect("probe");
    assert!(again.ok && again.echo.as_deref() == Some("b"), "{again:?}");
    assert_eq!(
        counter(&cluster, n1, Counter::Redirected),
        redirected + 1,
        "expired verdict must not be served"
    );

    // A cached deny fails connect() with EPERM at once, without reaching the server.
    let deny = VerdictValue {
        expires_at_ns: boot_ns_after(std::time::Duration::from_secs(60)),
        decision: DECISION_DENY,
        _pad: 0,
    };
    m.insert_verdict(key, deny).expect("deny");
    let denies = counter(&cluster, n1, Counter::CachedDeny);
    let refused = cluster.probe(client, to, Some("c")).expect("probe");
    assert!(
        !refused.ok && refused.eperm(),
        "cached deny must be EPERM: {refused:?}"
    );
    assert_eq!(counter(&cluster, n1, Counter::CachedDeny), denies + 1);
}

#[test]
fn unenrolled_cgroups_and_non_mesh_destinations_are_untouched() {
    let Setup {
        mut cluster,
        n1,
        client,
        server,
    } = setup();
    let n2 = NodeId(1);
    let outside = cluster
        .add_pod(n2, PodSpec::external("plain"))
        .expect("non-mesh pod");
    assert_eq!(cluster.pod(outside).spec.kind, PodKind::External);
    let _plain = cluster.echo_server(outside, PORT).expect("plain server");
    let _echo = cluster.echo_server(server, PORT).expect("mesh server");
    let before = maps(&cluster, n1).counters().expect("counters");

    // Enrolled client to a non-mesh destination.
    let r = cluster
        .probe(client, cluster.pod(outside).addr4(PORT), Some("x"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("x"), "{r:?}");
    // A process of the pod's netns that is not in the pod's cgroup, to a mesh destination.
    let r = cluster
        .probe_unenrolled(client, cluster.pod(server).addr4(PORT), Some("y"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("y"), "{r:?}");
    // Loopback inside the pod.
    let _local = cluster.echo_server(client, 9000).expect("local server");
    let r = cluster
        .probe(client, "127.0.0.1:9000".parse().expect("addr"), Some("z"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("z"), "{r:?}");

    assert_eq!(
        maps(&cluster, n1).counters().expect("counters"),
        before,
        "no kernel decision may have been taken"
    );
    assert!(
        maps(&cluster, n1).verdicts().expect("verdicts").is_empty(),
        "nothing may be cached"
    );
}

/// A socket whose `connect()` on the fast path fails before its SYN (an IPv6-only socket asking
/// for an IPv4-mapped destination: the connect program lets it through by the pair's cached
/// allow, then the kernel refuses the address) and that then connects to a destination the agent
/// must judge is redirected and served: what the first `connect()` left for the fast-path audit
/// must not make `sock_ops` take the socket for a fast-path one and leave its original
/// destination unpublished.
/// TCP Fast Open connects from `sendto()` with no `connect()` call; the connect programs still
/// see it, so it cannot leave the pod past the agent. Under STRICT, a connection that got past
/// the source's agent would reach the destination in plaintext and be reset there.
#[test]
fn a_tcp_fast_open_connection_is_captured_like_any_other() {
    let Setup {
        cluster,
        n1,
        client,
        server,
    } = setup_with(AgentOptions::strict());
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    let redirected = counter(&cluster, n1, Counter::Redirected);
    let r = cluster
        .probe_fast_open(client, to, "fast open")
        .expect("probe");
    assert_eq!(r.echo.as_deref(), Some("fast open"), "{r:?}");
    assert_eq!(
        counter(&cluster, n1, Counter::Redirected),
        redirected + 1,
        "the source's connect program redirected it to its agent"
    );
}

#[test]
fn a_socket_whose_fast_path_connect_failed_is_served_when_it_connects_again() {
    let Setup {
        cluster,
        n1,
        client,
        server,
    } = setup();
    let _cached = cluster.echo_server(server, PORT).expect("echo server");
    let _judged = cluster
        .echo_server(server, OTHER_PORT)
        .expect("echo server");
    let v4 = cluster.pod(server).addr4(PORT);
    let warm = cluster.probe(client, v4, Some("warm")).expect("probe");
    assert_eq!(warm.echo.as_deref(), Some("warm"), "{warm:?}");
    let IpAddr::V4(ip) = v4.ip() else {
        panic!("addr4 gave {v4}")
    };
    let mapped = SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), PORT);
    let to = cluster.pod(server).addr6(OTHER_PORT);

    let fast = counter(&cluster, n1, Counter::FastpathAllowed);
    let redirected = counter(&cluster, n1, Counter::Redirected);
    let r = cluster
        .probe_after_failure(client, mapped, to, "again")
        .expect("probe");
    assert_eq!(
        r.first_errno,
        Some(nix::errno::Errno::ENETUNREACH as i32),
        "the first connect() fails before its SYN: {r:?}"
    );
    assert_eq!(
        counter(&cluster, n1, Counter::FastpathAllowed),
        fast + 1,
        "the first connect() was let through by the cached allow"
    );
    assert_eq!(
        counter(&cluster, n1, Counter::Redirected),
        redirected + 1,
        "the second connect() is redirected to the agent"
    );
    assert!(
        r.ok && r.echo.as_deref() == Some("again"),
        "the redirected connection is served: {r:?}"
    );
}
