//! The mTLS (HBONE) tunnel between two agents, seen from the wire and from the kernel: a pair's
//! first connection crosses the link as TLS to the tunnel port with its payload never in clear;
//! `mode: tunnel` encrypts every connection and caches nothing; replicas sharing a pooled tunnel
//! are each judged and delivered by their own address; a destination without its agent makes the
//! client's connection fail at once.

use latch::datapath::KernelMaps;
use latch_common::Counter;
use std::{collections::HashSet, time::Duration};

use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes, eventually,
    sniffer::{Sniffer, contains, tcp_segment},
};

const PORT: u16 = 8080;
const TUNNEL_PORT: u16 = 15008;

fn setup(options: AgentOptions) -> (Cluster, NodeId, NodeId, PodId, PodId) {
    let TwoNodes {
        cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment()
        .and_then(|t| t.start_agents(options))
        .expect("cluster with agents");
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

/// Three connections of frontend to payment on `PORT`, captured on node 1's link.
fn three_connections(
    cluster: &Cluster,
    client: PodId,
    server: PodId,
    secret: &str,
) -> Vec<Vec<u8>> {
    let to = cluster.pod(server).addr4(PORT);
    on_the_wire(cluster, || {
        for _ in 0..3 {
            let r = cluster.probe(client, to, Some(secret)).expect("probe");
            assert!(r.ok && r.echo.as_deref() == Some(secret), "{r:?}");
        }
    })
}

#[test]
fn a_strict_pair_is_tunneled_on_every_connection_and_never_cached() {
    let (mut cluster, n1, n2, client, server) = setup(AgentOptions::strict());
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let secret = "strict-secret-payload-5c1e";
    let mark = cluster.agent(n1).mark();
    let frames = three_connections(&cluster, client, server, secret);
    assert!(
        !frames.iter().any(|f| contains(f, secret.as_bytes())),
        "under STRICT the payload never crosses in clear, on any connection"
    );
    assert!(
        frames
            .iter()
            .filter_map(|f| tcp_segment(f))
            .all(|s| s.dst_port == TUNNEL_PORT || s.src_port == TUNNEL_PORT),
        "nothing but the tunnel crosses"
    );
    let source = maps(&cluster, n1);
    assert_eq!(source.counter(Counter::Redirected).expect("c"), 3);
    assert_eq!(source.counter(Counter::FastpathAllowed).expect("c"), 0);
    for node in [n1, n2] {
        assert!(
            maps(&cluster, node)
                .verdicts()
                .expect("verdicts")
                .is_empty(),
            "a STRICT pair is never cached (node {})",
            node.0 + 1
        );
    }
    // The access log says each connection was encrypted.
    let decisions = std::cell::RefCell::new(Vec::new());
    cluster
        .agent(n1)
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            if l.contains("\"event\":\"decision\"") && l.contains("\"direction\":\"outbound\"") {
                decisions.borrow_mut().push(l.to_owned());
            }
            decisions.borrow().len() == 3
        })
        .expect("the source's three decision lines");
    for line in decisions.into_inner() {
        assert!(
            line.contains("\"encrypted\":true") && line.contains("not cacheable"),
            "{line}"
        );
    }
}

#[test]
fn with_strict_fastpath_a_strict_pair_is_proven_once_then_takes_the_fast_path_in_clear() {
    let (cluster, n1, n2, client, server) = setup(AgentOptions::strict_fastpath());
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let secret = "strict-fastpath-payload-0d2b";
    let frames = three_connections(&cluster, client, server, secret);
    // What `strictFastpath` documents: identity proven by mTLS at the first connection, bound
    // to the source address afterwards, not encrypted.
    assert!(
        frames.iter().any(|f| contains(f, secret.as_bytes())),
        "the repeats cross in clear"
    );
    let source = maps(&cluster, n1);
    assert_eq!(source.counter(Counter::Redirected).expect("c"), 1);
    assert_eq!(source.counter(Counter::FastpathAllowed).expect("c"), 2);
    for node in [n1, n2] {
        assert_eq!(maps(&cluster, node).verdicts().expect("verdicts").len(), 1);
    }
}

#[test]
fn the_first_connection_crosses_the_link_as_tls_and_both_nodes_cache_the_pair() {
    let (cluster, n1, n2, client, server) = setup(AgentOptions::default());
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
    let source = cluster.node(n1).agent.as_ref().expect("source agent");
    let mark = source.mark();
    let frames = on_the_wire(&cluster, || {
        for _ in 0..5 {
            let r = cluster.probe(client, to, Some(secret)).expect("probe");
            assert!(r.ok && r.echo.as_deref() == Some(secret), "{r:?}");
        }
    });
    // The source's access log says so too, for every connection.
    let outbound_decision =
        |l: &str| l.contains("\"event\":\"decision\"") && l.contains("\"direction\":\"outbound\"");
    let decisions = std::cell::RefCell::new(Vec::new());
    source
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            if outbound_decision(l) {
                decisions.borrow_mut().push(l.to_owned());
            }
            decisions.borrow().len() == 5
        })
        .expect("the source's five decision lines");
    let decisions = decisions.into_inner();
    assert_eq!(decisions.len(), 5, "{decisions:#?}");
    assert!(
        decisions
            .iter()
            .all(|l| l.contains("mode tunnel, not cached")),
        "{decisions:#?}"
    );
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
fn replicas_sharing_a_pooled_tunnel_are_each_judged_and_delivered_by_their_own_address() {
    // Two replicas of prod/frontend on node 1 share the pair's pooled tunnel, which the first
    // one's connection dials from its own netns; the policy admits only the first's address.
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let first = cluster
        .add_pod(n1, PodSpec::mesh("frontend-a", "prod", "frontend"))
        .expect("first replica");
    let second = cluster
        .add_pod(n1, PodSpec::mesh("frontend-b", "prod", "frontend"))
        .expect("second replica");
    let server = cluster
        .add_pod(n2, PodSpec::mesh("payment", "prod", "payment"))
        .expect("payment");
    let [first_v4, first_v6] = cluster.pod(first).ips();
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("first-replica-only.yaml"),
        format!(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: first-replica-only
  namespace: prod
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/prod/sa/frontend"]
        ipBlocks: ["{first_v4}/32", "{first_v6}/128"]
"#
        ),
    )
    .expect("policy");
    let options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        extra_yaml: format!("policies: [{}]\n", policies.display()),
        ..AgentOptions::strict()
    };
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);

    let frames = on_the_wire(&cluster, || {
        let r = cluster.probe(first, to, Some("a")).expect("probe");
        assert!(
            r.ok && r.echo.as_deref() == Some("a"),
            "first replica: {r:?}"
        );
        let r = cluster.probe(second, to, Some("b")).expect("probe");
        assert!(
            r.echo.is_none() && (r.reset || !r.ok),
            "the second replica's address is not allowed, though it rides the first's tunnel: {r:?}"
        );
        let r = cluster.probe(first, to, Some("c")).expect("probe");
        assert!(
            r.ok && r.echo.as_deref() == Some("c"),
            "first replica: {r:?}"
        );
    });
    let tunnels: HashSet<u16> = frames
        .iter()
        .filter_map(|f| tcp_segment(f))
        .filter(|s| s.dst_port == TUNNEL_PORT)
        .map(|s| s.src_port)
        .collect();
    assert_eq!(tunnels.len(), 1, "one pooled tunnel carries all three");
    assert_eq!(
        echo.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![first_v4, first_v4],
        "the application sees the replica's own address"
    );
    let pending = || maps(&cluster, n2).pending_deliveries();
    assert!(
        eventually(Duration::from_secs(10), || pending() == 0),
        "each delivery is withdrawn once its connection ended: {} left",
        pending()
    );

    // While a delivered connection lives, its four-tuple stays announced to the inbound check.
    // The agent logs its decision before it delivers: wait for the application to have the
    // connection, which the agent announced before connecting.
    let pipe = cluster
        .open_pipe(first, to, b"open ", n2)
        .expect("open connection");
    assert!(
        echo.wait_accepted(3, Duration::from_secs(20)),
        "the open connection reaches the application"
    );
    assert_eq!(
        maps(&cluster, n2).pending_deliveries(),
        1,
        "announced while it lives"
    );
    let r = pipe.finish(b"and closed").expect("finish");
    assert_eq!(r.echo.as_deref(), Some("open and closed"), "{r:?}");
    assert!(
        eventually(Duration::from_secs(10), || maps(&cluster, n2)
            .pending_deliveries()
            == 0),
        "withdrawn when it ended"
    );
}

/// An application may put a socket mark of its own on its listener (`SO_MARK`, which container
/// runtimes let it set). The sockets it accepts then keep that mark instead of taking the
/// delivery's, so a delivery from the client's address would have the answers routed out of the
/// pod, never back to the agent; the destination delivers to such a listener from the loopback
/// marker instead (`sock_ops` records marked listeners as they start).
#[test]
fn a_listener_with_a_socket_mark_of_its_own_still_receives_tunneled_connections() {
    let (cluster, _, _, client, server) = setup(AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    });
    let _server = cluster
        .pod_marking_server(server, PORT, 0x2a)
        .expect("server");
    let to = cluster.pod(server).addr4(PORT);
    for text in ["first", "second"] {
        let r = cluster.probe(client, to, Some(text)).expect("probe");
        assert_eq!(r.echo.as_deref(), Some(text), "{r:?}");
    }
}

#[test]
fn a_tunneled_connection_to_a_closed_port_is_answered_503_and_reset_at_once() {
    let (mut cluster, n1, n2, client, server) = setup(AgentOptions::default());
    let closed = PORT + 1;
    let (source_mark, destination_mark) = (cluster.agent(n1).mark(), cluster.agent(n2).mark());
    let r = cluster
        .probe(client, cluster.pod(server).addr4(closed), Some("x"))
        .expect("probe");
    assert!(r.echo.is_none() && (r.reset || r.refused()), "{r:?}");
    // The destination delivers from the client's own address: the kernel's reset for that SYN
    // must come back to it (not leave towards the client) for it to know at once.
    let unreachable = cluster
        .agent(n2)
        .wait_for_line_after(destination_mark, Duration::from_secs(30), |l| {
            l.contains("application unreachable")
        })
        .expect("the destination found the port closed");
    assert!(unreachable.contains("refused"), "{unreachable}");
    let refused = cluster
        .agent(n1)
        .wait_for_line_after(source_mark, Duration::from_secs(30), |l| {
            l.contains("\"decision\":\"REFUSED\"")
        })
        .expect("the source's access log");
    assert!(
        refused.contains("answered 503"),
        "a 503 from the destination, not the source's open timeout: {refused}"
    );
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

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_thousand_concurrent_tunneled_connections_complete_intact() {
    let options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::strict()
    };
    let (mut cluster, n1, n2, client, server) = setup(options);
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT).to_string();
    // Warm up: the pooled mTLS connection exists; fds are counted from here.
    let r = cluster
        .probe(client, cluster.pod(server).addr4(PORT), Some("warm"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("warm"), "{r:?}");
    let pids: Vec<u32> = [n1, n2]
        .iter()
        .map(|n| cluster.agent(*n).pid().expect("running"))
        .collect();
    let before: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();

    let out = cluster
        .probe_command(
            client,
            &[
                "concurrent",
                "--to",
                &to,
                "--count",
                "1000",
                "--bytes",
                "16384",
            ],
        )
        .expect("command")
        .output()
        .expect("run");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["intact"], 1000, "{report}");

    // Each pod's netns keeps a few sockets made ahead for deliveries (the agent's
    // `capture::delivery::SPARES`); how many are ready at a given moment depends on the order in
    // which connections ended. Anything beyond them is a leak.
    const SPARE_SOCKETS: usize = 4;
    for (pid, start) in pids.iter().zip(&before) {
        assert!(
            latch_tests::eventually(std::time::Duration::from_secs(20), || open_fds(*pid)
                <= *start + SPARE_SOCKETS),
            "agent {pid} holds {} fds, started with {start}",
            open_fds(*pid)
        );
    }
}

#[test]
fn certificates_rotate_under_an_open_connection_and_bound_the_cache() {
    use std::io::Write as _;
    let options = AgentOptions {
        cert_ttl: "6s".into(),
        ..AgentOptions::strict_fastpath()
    };
    let (mut cluster, n1, n2, client, server) = setup(options);
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let marks: Vec<usize> = [n1, n2].iter().map(|n| cluster.agent(*n).mark()).collect();
    let to = cluster.pod(server).addr4(PORT).to_string();
    let mut pipe = cluster
        .probe_command(client, &["pipe", "--to", &to])
        .expect("command")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = pipe.stdin.take().expect("stdin");
    stdin.write_all(b"before-rotation|").expect("write");
    stdin.flush().expect("flush");

    // Both agents mint new SVIDs (at half of the 6 s lifetime) while the connection is open.
    for (node, mark) in [n1, n2].iter().zip(&marks) {
        cluster
            .agent(*node)
            .wait_for_line_after(*mark, std::time::Duration::from_secs(30), |l| {
                l.contains("\"message\":\"certificate in place\"")
            })
            .expect("rotation");
    }
    stdin
        .write_all(b"after-rotation")
        .expect("write after rotation");
    drop(stdin);
    let out = pipe.wait_with_output().expect("probe");
    let r: latch_tests::ProbeResult = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        r.echo.as_deref(),
        Some("before-rotation|after-rotation"),
        "the open connection survives rotation: {r:?}"
    );

    // Cached verdicts are bounded by the certificates (6 s), not by verdictTtl (5 min).
    let now = latch::datapath::system::now_boot_ns();
    for node in [n1, n2] {
        let verdicts = maps(&cluster, node).verdicts().expect("verdicts");
        assert!(!verdicts.is_empty());
        for v in verdicts {
            assert!(
                v.remaining_ns(now) <= 6_000_000_000,
                "a verdict outlives its certificate: {v:?}"
            );
        }
    }
}

#[test]
fn agents_that_do_not_share_a_trust_anchor_cannot_tunnel_and_cache_nothing() {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let rogue = cluster.other_ca("rogue-ca").expect("second CA");
    cluster
        .start_agent(n1, AgentOptions::strict())
        .expect("agent 1");
    let rogue_options = AgentOptions {
        ca_dir: Some(rogue),
        ..AgentOptions::strict()
    };
    cluster.start_agent(n2, rogue_options).expect("agent 2");
    let echo = cluster.echo_server(server, PORT).expect("echo");

    let r = cluster
        .probe(client, cluster.pod(server).addr4(PORT), Some("x"))
        .expect("probe");
    assert!(r.echo.is_none() && (r.reset || r.refused()), "{r:?}");
    assert_eq!(echo.accepted(), 0, "the application is never reached");
    for node in [n1, n2] {
        assert!(
            maps(&cluster, node)
                .verdicts()
                .expect("verdicts")
                .is_empty(),
            "a failed handshake caches nothing"
        );
    }
    // The agent logs the refusal before resetting the client; its output is read
    // asynchronously, so wait for the line.
    let line = cluster
        .agent(n1)
        .wait_for_line_after(0, std::time::Duration::from_secs(10), |l| {
            l.contains("\"direction\":\"outbound\"") && l.contains("TLS with")
        });
    assert!(line.is_ok(), "the refusal names the TLS failure: {line:?}");
}
