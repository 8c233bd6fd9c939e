//! Attacks on the agent's own listeners in a pod: a connection to one of its ports is refused
//! once, never delivered back into the agent (plaintext to `pod:15006` used to loop through the
//! inbound listener thousands of times a second, one decision and two descriptors each time);
//! a `CONNECT` to one of them through the tunnel is refused; and idle connections to the
//! tunnel port cannot hold the agent's descriptors, nor keep another pod's tunnel out.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes, eventually,
    hbone::{TUNNEL_PORT, connect_status},
    netns,
};

const PORT: u16 = 8080;
const CAPTURE_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
/// Sockets each pod's netns keeps made ahead for deliveries (`capture::delivery::SPARES`): how
/// many are ready at a given moment depends on the order in which connections ended.
const SPARE_SOCKETS: usize = 4;

/// `frontend` (mesh) and `outsider` (not in the mesh) on node 1, `payment` (mesh) on node 2;
/// both agents PERMISSIVE with no policy, so plaintext is allowed wherever it may go.
fn setup() -> (Cluster, NodeId, PodId, PodId, PodId) {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let outsider = cluster
        .add_pod(n1, PodSpec::external("outsider"))
        .expect("outsider");
    for node in [n1, n2] {
        cluster
            .start_agent(node, AgentOptions::default())
            .expect("agent");
    }
    (cluster, n2, client, outsider, server)
}

/// An access-log decision line for `destination`.
fn decision_for(line: &str, destination: SocketAddr) -> bool {
    line.contains("\"event\":\"decision\"")
        && line.contains(&format!("\"destination_address\":\"{destination}\""))
}

#[test]
fn a_plaintext_connection_to_a_pods_inbound_port_is_refused_once_and_never_loops() {
    let (mut cluster, n2, _frontend, outsider, payment) = setup();
    let _echo = cluster.echo_server(payment, PORT).expect("echo");
    let target = cluster.pod(payment).addr4(INBOUND_PORT);
    let fds_before = cluster.agent(n2).open_fds();
    let mark = cluster.agent(n2).mark();

    let r = cluster
        .probe(outsider, target, Some("round and round"))
        .expect("probe");
    assert!(r.echo.is_none() && (r.reset || !r.ok), "refused: {r:?}");
    let refusal = cluster
        .agent(n2)
        .wait_for_line_after(mark, Duration::from_secs(20), |l| decision_for(l, target))
        .expect("the refusal is logged");
    assert!(refusal.contains("\"decision\":\"DENY\""), "{refusal}");
    assert!(
        refusal.contains("port 15006 is the agent's own (inbound listener)"),
        "{refusal}"
    );

    // A later connection's decision marks a point after everything the attack could still
    // have set off: had the agent delivered to itself, more decisions for the inbound port
    // would come before it.
    let later = cluster.pod(payment).addr4(PORT);
    let r = cluster
        .probe(outsider, later, Some("later"))
        .expect("probe");
    assert_eq!(r.echo.as_deref(), Some("later"), "{r:?}");
    cluster
        .agent(n2)
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            decision_for(l, later) && l.contains("\"decision\":\"ALLOW\"")
        })
        .expect("the later connection's decision");
    let lines = cluster.agent(n2).lines();
    let decisions: Vec<&String> = lines
        .iter()
        .skip(mark)
        .filter(|l| decision_for(l, target))
        .collect();
    assert_eq!(decisions.len(), 1, "one decision: {decisions:#?}");

    let agent = cluster.agent(n2);
    assert!(
        eventually(Duration::from_secs(20), || agent.open_fds()
            <= fds_before + SPARE_SOCKETS),
        "the agent holds {} descriptors, {fds_before} before the attack",
        agent.open_fds()
    );
}

#[test]
fn a_connect_through_the_tunnel_to_the_agents_own_ports_is_refused() {
    let (mut cluster, n2, frontend, _outsider, payment) = setup();
    let _echo = cluster.echo_server(payment, PORT).expect("echo");
    let pod = cluster.pod(payment).ipv4;

    // As the source agent carries it: frontend's connect() is captured and tunneled.
    for port in [INBOUND_PORT, TUNNEL_PORT] {
        let target = SocketAddr::new(pod.into(), port);
        let mark = cluster.agent(n2).mark();
        let r = cluster
            .probe(frontend, target, Some("inside out"))
            .expect("probe");
        assert!(r.echo.is_none() && (r.reset || !r.ok), "{target}: {r:?}");
        let refusal = cluster
            .agent(n2)
            .wait_for_line_after(mark, Duration::from_secs(20), |l| decision_for(l, target))
            .expect("the refusal is logged");
        assert!(
            refusal.contains("\"decision\":\"DENY\"")
                && refusal.contains("\"path\":\"tunnel\"")
                && refusal.contains(&format!("port {port} is the agent's own")),
            "{refusal}"
        );
    }

    // CONNECTs no source agent would send, straight to the tunnel port with frontend's SVID.
    let loopback_capture = SocketAddr::from(([127, 0, 0, 1], CAPTURE_PORT));
    for authority in [
        SocketAddr::new(pod.into(), INBOUND_PORT),
        SocketAddr::new(pod.into(), TUNNEL_PORT),
        SocketAddr::new(pod.into(), CAPTURE_PORT),
        loopback_capture,
    ] {
        let status = connect_status(&cluster, frontend, payment, authority).expect("CONNECT");
        assert_eq!(status, 403, "CONNECT {authority}");
    }
    // The tunnel itself works: the refusals are about the targets.
    let status = connect_status(
        &cluster,
        frontend,
        payment,
        cluster.pod(payment).addr4(PORT),
    )
    .expect("CONNECT");
    assert_eq!(status, 200);
}

/// Raise this process's soft descriptor limit to at least `needed` (within its hard limit).
fn raise_nofile(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= needed,
        "RLIMIT_NOFILE's hard limit {hard} is below {needed}"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
}

/// Wait until at least `count` of `sockets` have been closed by their peer (the agent never
/// writes to a connection that has not started TLS, so any readiness is its end: a FIN or a
/// reset), or `limit` passes. Returns how many are closed.
fn await_closes(sockets: &[std::net::TcpStream], count: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // nix has no name for POLLRDHUP.
    let ended = PollFlags::POLLIN | PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut open: Vec<PollFd> = sockets
        .iter()
        .map(|s| PollFd::new(s.as_fd(), ended))
        .collect();
    let mut closed = 0;
    while closed < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        poll(&mut open, timeout).expect("poll");
        let before = open.len();
        // Any event at all (`any()` is `None` for bits nix has no name for) is the end.
        open.retain(|p| p.any() == Some(false));
        closed += before - open.len();
    }
    closed
}

#[test]
fn idle_connections_to_a_pods_tunnel_port_are_shed_and_another_pods_tunnel_gets_through() {
    const FLOOD: usize = 2000;
    let cap = latch::config::Tunnel::default().max_handshakes_per_source;
    let (mut cluster, n2, frontend, outsider, payment) = setup();
    let _echo = cluster.echo_server(payment, PORT).expect("echo");
    let fds_before = cluster.agent(n2).open_fds();
    let mark = cluster.agent(n2).mark();

    // One pod opens FLOOD connections to the tunnel port and never says a word.
    raise_nofile(FLOOD as u64 + 1024);
    let endpoint = SocketAddr::new(cluster.pod(payment).ipv4.into(), TUNNEL_PORT);
    let flood = netns::in_netns(&cluster.pod(outsider).netns(), move || {
        (0..FLOOD)
            .map(|_| std::net::TcpStream::connect(endpoint).map_err(Into::into))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .expect("the flood's connections");

    // Beyond the source's handshakes in progress, the agent closes them at once.
    let closed = await_closes(&flood, FLOOD - cap, Duration::from_secs(60));
    assert!(
        closed >= FLOOD - cap,
        "the agent closed {closed} of {FLOOD} idle connections; more than {cap} are held"
    );
    let held = cluster.agent(n2).open_fds();
    assert!(
        held <= fds_before + cap + SPARE_SOCKETS,
        "under the flood the agent holds {held} descriptors, {fds_before} before it"
    );
    let attacker = format!("\"source\":\"{}\"", cluster.pod(outsider).ipv4);
    cluster
        .agent(n2)
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            l.contains("too many TLS handshakes in progress from one source")
                && l.contains(&attacker)
        })
        .expect("the refusals are reported");

    // Meanwhile another pod's connection crosses its own tunnel to the same pod.
    let to = cluster.pod(payment).addr4(PORT);
    let r = cluster
        .probe(frontend, to, Some("still through"))
        .expect("probe");
    assert_eq!(r.echo.as_deref(), Some("still through"), "{r:?}");
    let admitted = cluster
        .agent(n2)
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            decision_for(l, to) && l.contains("\"decision\":\"ALLOW\"")
        })
        .expect("the destination admitted it");
    assert!(admitted.contains("\"path\":\"tunnel\""), "{admitted}");

    // The rest are closed when their handshake's time is up. What stays is frontend's tunnel
    // connection, which its agent keeps pooled, and the pod's spare sockets.
    let closed = await_closes(&flood, FLOOD, Duration::from_secs(60));
    assert_eq!(
        closed, FLOOD,
        "every idle connection is closed by the agent"
    );
    drop(flood);
    let agent = cluster.agent(n2);
    assert!(
        eventually(Duration::from_secs(20), || agent.open_fds()
            <= fds_before + 1 + SPARE_SOCKETS),
        "the agent holds {} descriptors, {fds_before} before the flood",
        agent.open_fds()
    );
}
