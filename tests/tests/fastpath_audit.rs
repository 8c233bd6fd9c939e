//! The fast-path audit against real agents on two netns nodes: after a first, tunneled
//! connection caches the allow, every repeat goes through the kernel alone, and each still shows
//! up, on both nodes (`reporter="source"` and `"destination"`), in Istio's TCP metrics (`path="fastpath"`, the right byte totals and Istio's standard
//! labels) and in the access log (one line when it opens, one when it closes, with bytes), as
//! reported by `sock_ops` through the ring buffer; the kernel's count of events it could not
//! report exists and is 0. And requests judged at L7 are counted in Istio's request metrics
//! (`istio_requests_total`, `istio_request_duration_milliseconds`) by response code. An agent
//! that does not drain the ring (stopped) costs its node's connections no wake-up per event, and
//! loses none of them once it drains again. A connection the destination's inbound check steers
//! to its agent is not taken for one it admitted straight to the application (nor, the other
//! way round, can a server whose listener carries the mark the agent's once did pass its own
//! connections off as the agent's), and a flood of
//! SYNs that never complete, sent from a raw socket while a connection's handshake is held open,
//! cannot make that connection go unreported.

use std::time::{Duration, Instant};

use latch_tests::{
    Agent, AgentOptions, Cluster, NodeId, OpenPipe, PodSpec, TwoNodes, eventually,
    metrics::{self, sample},
    netns, syn_flood,
};
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
/// Fast-path connections the test makes, each sending a payload of a different length.
const N: usize = 5;

/// The node's metric samples.
fn scrape(cluster: &Cluster, node: NodeId) -> Vec<(String, f64)> {
    metrics::samples(&metrics::scrape(cluster, node).expect("scrape"))
}

/// The agent's access-log lines for fast-path connections, parsed.
fn fastpath_access_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.contains("\"target\":\"access\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["path"] == "fastpath" && v["fields"]["event"] != "fastpath summary")
        .collect()
}

/// Wait until `node` exports [`N`] closed connections with `labels`, then check that as many
/// opened, and Istio's byte counters: received, the client's request bytes (`sent`); sent, the
/// answers to it (`received`).
fn check_tcp_metrics(
    cluster: &Cluster,
    node: NodeId,
    labels: &[&str],
    sent: usize,
    received: usize,
) {
    let mut samples = Vec::new();
    let all_closed = eventually(WAIT, || {
        samples = scrape(cluster, node);
        sample(&samples, "istio_tcp_connections_closed_total", labels) == Some(N as f64)
    });
    assert!(all_closed, "{samples:#?}");
    assert_eq!(
        sample(&samples, "istio_tcp_connections_opened_total", labels),
        Some(N as f64)
    );
    assert_eq!(
        sample(&samples, "istio_tcp_received_bytes_total", labels),
        Some(sent as f64),
        "Istio's received bytes are the client's request bytes"
    );
    assert_eq!(
        sample(&samples, "istio_tcp_sent_bytes_total", labels),
        Some(received as f64),
        "Istio's sent bytes are the response bytes to the client"
    );
}

/// Wait until the agent's fast-path access lines satisfy `until`: whether they did, and the
/// lines as last read.
fn wait_for_fastpath_lines(agent: &Agent, until: impl Fn(&[Value]) -> bool) -> (bool, Vec<Value>) {
    let mut lines = Vec::new();
    let held = eventually(WAIT, || {
        lines = fastpath_access_lines(&agent.lines());
        until(&lines)
    });
    (held, lines)
}

#[test]
fn every_fast_path_connection_is_counted_with_istio_labels_and_logged_open_and_closed_ipv4() {
    audited_on_both_sides(false);
}

#[test]
fn every_fast_path_connection_is_counted_with_istio_labels_and_logged_open_and_closed_ipv6() {
    audited_on_both_sides(true);
}

/// A first, tunneled connection, then [`N`] fast-path ones with known byte counts (to the
/// server's IPv6 address if `ipv6`): each is counted and logged by both nodes.
fn audited_on_both_sides(ipv6: bool) {
    // Pod names differ from their `app` labels: the workload labels must come from the label.
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::two_nodes(
        PodSpec::mesh("frontend-7d9f", "prod", "frontend"),
        PodSpec::mesh("payment-5c4b", "prod", "payment"),
    )
    .and_then(|t| {
        t.start_agents(AgentOptions {
            metrics: "127.0.0.1:15020".into(),
            ..AgentOptions::default()
        })
    })
    .expect("cluster with agents");
    // The server runs in the pod's cgroup, as an application does: the kernel sees its side.
    let _server = cluster
        .pod_server(server, PORT, 2)
        .expect("doubling server");
    let to = if ipv6 {
        cluster.pod(server).addr6(PORT)
    } else {
        cluster.pod(server).addr4(PORT)
    };
    let stats = |cluster: &Cluster| {
        latch_tests::agent::debug_json(&cluster.debug_socket(n1), &["stats"]).expect("stats")
    };
    let fast_before = stats(&cluster)["counters"]["fastpath_allowed"]
        .as_u64()
        .expect("fastpath_allowed counter");

    let first = cluster.probe(client, to, Some("tunneled")).expect("probe");
    assert_eq!(first.echo.as_deref(), Some("tunneledtunneled"), "{first:?}");

    let payloads: Vec<String> = (1..=N).map(|k| "x".repeat(k * 10)).collect();
    for payload in &payloads {
        let r = cluster.probe(client, to, Some(payload)).expect("probe");
        assert_eq!(r.echo, Some(payload.repeat(2)), "{r:?}");
    }
    let sent: usize = payloads.iter().map(String::len).sum();
    let received = 2 * sent;
    assert_eq!(
        stats(&cluster)["counters"]["fastpath_allowed"].as_u64(),
        Some(fast_before + N as u64),
        "every repeat took the kernel fast path"
    );

    let fastpath = [
        "reporter=\"source\"",
        "source_workload=\"frontend\"",
        "source_workload_namespace=\"prod\"",
        &format!("source_principal=\"{FRONTEND}\"") as &str,
        "destination_workload=\"payment\"",
        "destination_workload_namespace=\"prod\"",
        &format!("destination_principal=\"{PAYMENT}\""),
        "destination_service=\"unknown\"",
        "destination_port=\"8080\"",
        "connection_security_policy=\"none\"",
        "path=\"fastpath\"",
    ];
    check_tcp_metrics(&cluster, n1, &fastpath, sent, received);
    let mut samples = Vec::new();
    let tunneled = [
        "reporter=\"source\"",
        "source_workload=\"frontend\"",
        "destination_workload=\"payment\"",
        "connection_security_policy=\"mutual_tls\"",
        "path=\"tunnel\"",
    ];
    let tunnel_closed = eventually(WAIT, || {
        samples = scrape(&cluster, n1);
        sample(&samples, "istio_tcp_connections_closed_total", &tunneled) == Some(1.0)
    });
    assert!(
        tunnel_closed,
        "the tunneled connection, with its labels: {samples:#?}"
    );
    assert_eq!(
        sample(&samples, "latch_fastpath_audit_events_dropped_total", &[]),
        Some(0.0),
        "the drop counter is exported, and nothing was dropped"
    );
    assert_eq!(
        stats(&cluster)["counters"]["fastpath_audit_dropped"].as_u64(),
        Some(0),
        "latch debug stats shows the drop counter"
    );

    let agent = cluster.agent(n1);
    let (logged, lines) = wait_for_fastpath_lines(agent, |lines| {
        lines
            .iter()
            .filter(|l| l["fields"]["event"] == "connection closed")
            .count()
            == N
    });
    assert!(logged, "{lines:#?}");
    let of = |event: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["fields"]["event"] == event)
            .collect()
    };
    let opened = of("connection opened");
    let closed = of("connection closed");
    assert_eq!(
        opened.len(),
        N,
        "one line per connection when it opens: {lines:#?}"
    );
    for line in opened.iter().chain(&closed) {
        let f = &line["fields"];
        assert_eq!(f["source_principal"], FRONTEND, "{line}");
        assert_eq!(f["destination_principal"], PAYMENT, "{line}");
        assert_eq!(f["destination_address"], to.to_string(), "{line}");
        assert_eq!(f["direction"], "outbound", "{line}");
        assert_eq!(f["decision"], "ALLOW", "{line}");
        assert_eq!(f["encrypted"], false, "{line}");
    }
    let mut sizes: Vec<(u64, u64)> = closed
        .iter()
        .map(|l| {
            let f = &l["fields"];
            (
                f["bytes_sent"].as_u64().expect("bytes_sent"),
                f["bytes_received"].as_u64().expect("bytes_received"),
            )
        })
        .collect();
    sizes.sort_unstable();
    let expected: Vec<(u64, u64)> = payloads
        .iter()
        .map(|p| (p.len() as u64, 2 * p.len() as u64))
        .collect();
    assert_eq!(
        sizes, expected,
        "each close line carries its connection's bytes"
    );
    assert!(
        closed
            .iter()
            .all(|l| l["fields"]["duration_ms"].as_f64().is_some_and(|d| d > 0.0)),
        "each close line carries a duration: {closed:#?}"
    );

    // The destination node reports the same connections, admitted by its inbound check.
    let destination: Vec<String> = fastpath
        .iter()
        .map(|l| l.replace("reporter=\"source\"", "reporter=\"destination\""))
        .collect();
    let destination: Vec<&str> = destination.iter().map(String::as_str).collect();
    check_tcp_metrics(&cluster, n2, &destination, sent, received);
    let client_ip = cluster.pod(client).ips()[usize::from(ipv6)];
    let agent = cluster.agent(n2);
    let (logged, lines) = wait_for_fastpath_lines(agent, |lines| {
        lines
            .iter()
            .filter(|l| l["fields"]["event"] == "connection closed")
            .count()
            == N
    });
    assert!(logged, "{lines:#?}");
    for line in &lines {
        let f = &line["fields"];
        assert_eq!(f["direction"], "inbound", "{line}");
        assert_eq!(f["source_principal"], FRONTEND, "{line}");
        assert_eq!(f["destination_address"], to.to_string(), "{line}");
        let source = f["source_address"].as_str().unwrap_or_default();
        let source: std::net::SocketAddr = source.parse().expect("source_address");
        assert!(
            source.ip() == client_ip && source.port() != 0,
            "the client's own address and port: {line}"
        );
    }
    let mut sizes: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l["fields"]["event"] == "connection closed")
        .map(|l| {
            let f = &l["fields"];
            (
                f["bytes_sent"].as_u64().expect("bytes_sent"),
                f["bytes_received"].as_u64().expect("bytes_received"),
            )
        })
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, expected, "bytes from the client, and back to it");
}

/// DENY `/admin` on payment: a rule with paths, so payment's connections are judged per
/// request (L7) and never cached.
const NO_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: prod }
spec:
  selector: { matchLabels: { app: payment-service } }
  action: DENY
  rules: [{ to: [{ operation: { paths: ["/admin"] } }] }]
"#;

#[test]
fn requests_judged_at_l7_are_counted_in_istio_request_metrics() {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let frontend = cluster
        .add_pod(n1, PodSpec::mesh("frontend-7d9f", "prod", "frontend"))
        .expect("frontend");
    let mut payment = PodSpec::mesh("payment-5c4b", "prod", "payment");
    payment.labels = vec![("app".into(), "payment-service".into())];
    let payment = cluster.add_pod(n2, payment).expect("payment");
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(policies.join("no-admin.yaml"), NO_ADMIN).expect("policy file");
    let options = AgentOptions {
        metrics: "127.0.0.1:15020".into(),
        extra_yaml: format!("policies: [{}]\n", policies.display()),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    let _app = cluster.http_server(payment, PORT).expect("http server");
    let to = cluster.pod(payment).addr4(PORT);
    for (target, status) in [("/ok", "200"), ("/admin", "403")] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: payment\r\n\r\n");
        let r = cluster.probe(frontend, to, Some(&request)).expect("probe");
        let answer = r.echo.unwrap_or_default();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {answer:?}"
        );
    }

    let labels = |code: &'static str| {
        [
            "reporter=\"destination\"",
            "source_workload=\"frontend\"",
            "source_workload_namespace=\"prod\"",
            "destination_workload=\"payment-service\"",
            "destination_workload_namespace=\"prod\"",
            "connection_security_policy=\"mutual_tls\"",
            "request_protocol=\"http\"",
            code,
        ]
    };
    let (ok, denied) = (
        labels("response_code=\"200\""),
        labels("response_code=\"403\""),
    );
    let mut samples = Vec::new();
    let counted = eventually(WAIT, || {
        samples = scrape(&cluster, n2);
        sample(&samples, "istio_requests_total", &ok) == Some(1.0)
            && sample(&samples, "istio_requests_total", &denied) == Some(1.0)
    });
    assert!(counted, "{samples:#?}");
    assert_eq!(
        sample(&samples, "istio_request_duration_milliseconds_count", &ok),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            "istio_request_duration_milliseconds_count",
            &denied
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            "istio_request_duration_milliseconds_bucket",
            &[ok.as_slice(), &["le=\"+Inf\""]].concat()
        ),
        Some(1.0)
    );
}

/// Fast-path connections made while both agents are stopped: their events (an opened and a
/// closed one per connection on each node, 112 bytes each in the ring) fill more than a quarter
/// of each node's 1 MiB ring, where `sock_ops` starts waking the agent, and less than all of it.
const BURST: usize = 3_000;

/// The irq_work interrupts taken so far, all CPUs together (`IWI` in `/proc/interrupts`). A
/// ring-buffer submission that forces a wake-up raises one.
fn irq_work_interrupts() -> u64 {
    let table = std::fs::read_to_string("/proc/interrupts").expect("reading /proc/interrupts");
    let line = table
        .lines()
        .find(|l| l.trim_start().starts_with("IWI:"))
        .expect("/proc/interrupts has an IWI (irq_work) line");
    line.trim_start()["IWI:".len()..]
        .split_whitespace()
        .map_while(|field| field.parse::<u64>().ok())
        .sum()
}

/// The nodes' agents paused while this lives; resumed when it is dropped, also when the test
/// fails, so that the cluster's teardown can end them.
struct Paused<'a> {
    cluster: &'a Cluster,
    nodes: [NodeId; 2],
}

impl<'a> Paused<'a> {
    fn new(cluster: &'a Cluster, nodes: [NodeId; 2]) -> Self {
        for node in nodes {
            cluster.node(node).agent.as_ref().expect("agent").pause();
        }
        Self { cluster, nodes }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        for node in self.nodes {
            if let Some(agent) = &self.cluster.node(node).agent {
                agent.resume();
            }
        }
    }
}

#[test]
fn a_stopped_agent_costs_its_nodes_connections_no_wake_up_per_event_and_loses_none() {
    let TwoNodes {
        cluster,
        n1,
        n2,
        client,
        server,
    } = frontend_and_payment();
    // Every connection of the burst must find the allow cached (for an hour): with the agents
    // stopped, one sent to the tunnel would wait forever.
    // Answers each connection's byte with one byte, as `latch-probe rate` expects.
    let _server = cluster.pod_sink_server(server, PORT).expect("server");
    let to = cluster.pod(server).addr4(PORT);
    let fast_allowed = |cluster: &Cluster| {
        latch_tests::agent::debug_json(&cluster.debug_socket(n1), &["stats"]).expect("stats")
            ["counters"]["fastpath_allowed"]
            .as_u64()
            .expect("fastpath_allowed counter")
    };
    // The first connection crosses the tunnel and caches the allow; the second is the fast
    // path's, reported before the agents stop.
    for _ in 0..2 {
        let r = cluster.probe(client, to, Some("x")).expect("probe");
        assert!(r.echo.is_some(), "{r:?}");
    }
    let fastpath_closed = |node: NodeId, reporter: &str| {
        sample(
            &scrape(&cluster, node),
            "istio_tcp_connections_closed_total",
            &[&format!("reporter=\"{reporter}\""), "path=\"fastpath\""],
        )
    };
    let reported = eventually(WAIT, || {
        fastpath_closed(n1, "source") == Some(1.0)
            && fastpath_closed(n2, "destination") == Some(1.0)
    });
    assert!(
        reported,
        "the fast-path connection before the stop was reported"
    );
    let allowed_before = fast_allowed(&cluster);

    let paused = Paused::new(&cluster, [n1, n2]);
    let interrupts_before = irq_work_interrupts();
    let mut rate = cluster
        .probe_command(
            client,
            &[
                "rate",
                "--to",
                &to.to_string(),
                "--count",
                &BURST.to_string(),
            ],
        )
        .expect("probe command")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting latch-probe rate");
    // A connection that reached a stopped agent would wait forever: give up after a while.
    let deadline = Instant::now() + Duration::from_secs(120);
    while rate.try_wait().expect("waiting for latch-probe").is_none() {
        if Instant::now() > deadline {
            let _ = rate.kill();
            panic!("latch-probe rate did not finish while the agents were stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let raised = irq_work_interrupts() - interrupts_before;
    drop(paused);
    let out = rate.wait_with_output().expect("latch-probe output");
    let v: Value = serde_json::from_slice(&out.stdout).expect("latch-probe rate JSON");
    assert_eq!(v["failures"].as_u64(), Some(0), "{v}");

    // About 6,000 events per node, over 3,600 of them past a quarter of the ring: one wake-up
    // for each of those would be thousands; once at the quarter and at each sixteenth after it
    // is 7 per node.
    assert!(
        raised < (BURST / 4) as u64,
        "{raised} irq_work interrupts while {BURST} fast-path connections' events waited"
    );
    assert_eq!(
        fast_allowed(&cluster),
        allowed_before + BURST as u64,
        "every connection of the burst took the kernel fast path"
    );
    let all = Some((BURST + 1) as f64);
    let mut samples = Vec::new();
    let drained = eventually(WAIT, || {
        samples = scrape(&cluster, n1);
        let source = sample(
            &samples,
            "istio_tcp_connections_closed_total",
            &["reporter=\"source\"", "path=\"fastpath\""],
        );
        source == all && fastpath_closed(n2, "destination") == all
    });
    assert!(
        drained,
        "every connection reported once the agents ran again: {samples:#?}"
    );
    for (node, reporter) in [(n1, "source"), (n2, "destination")] {
        let samples = scrape(&cluster, node);
        assert_eq!(
            sample(
                &samples,
                "istio_tcp_connections_opened_total",
                &[&format!("reporter=\"{reporter}\""), "path=\"fastpath\""],
            ),
            all,
            "{reporter}"
        );
        assert_eq!(
            sample(&samples, "latch_fastpath_audit_events_dropped_total", &[]),
            Some(0.0),
            "{reporter}: nothing dropped"
        );
    }
}

/// A kernel counter of the node's agent (`latch debug stats`).
fn kernel_counter(cluster: &Cluster, node: NodeId, name: &str) -> u64 {
    latch_tests::agent::debug_json(&cluster.debug_socket(node), &["stats"]).expect("stats")
        ["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name}"))
}

/// Two nodes with agents, frontend on the first and payment on the second; verdicts cached for
/// an hour, so that none expires while a test waits.
fn frontend_and_payment() -> TwoNodes {
    Cluster::two_nodes(
        PodSpec::mesh("frontend", "prod", "frontend"),
        PodSpec::mesh("payment", "prod", "payment"),
    )
    .and_then(|t| {
        t.start_agents(AgentOptions {
            metrics: "127.0.0.1:15020".into(),
            verdict_ttl: "1h".into(),
            ..AgentOptions::default()
        })
    })
    .expect("cluster with agents")
}

/// Wait until the node's agent has logged the fast-path connection from `source` (the client's
/// address and port) closed; returns every fast-path access line the agent wrote until then.
/// The agent logs the ring's events in order, so any event sent before that connection's is
/// among them.
fn fastpath_lines_until_closed(cluster: &mut Cluster, node: NodeId, source: &str) -> Vec<Value> {
    let (closed, lines) = wait_for_fastpath_lines(cluster.agent(node), |lines| {
        lines.iter().any(|l| {
            l["fields"]["event"] == "connection closed" && l["fields"]["source_address"] == source
        })
    });
    assert!(closed, "no closed line from {source}: {lines:#?}");
    lines
}

/// The events of `lines`, each with its source address.
fn events(lines: &[Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let f = &l["fields"];
            (
                f["event"].as_str().unwrap_or_default().to_owned(),
                f["source_address"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_connection_the_inbound_check_steers_to_the_agent_is_not_reported_as_a_fast_path_one() {
    let TwoNodes {
        mut cluster,
        n2,
        client,
        server,
        ..
    } = frontend_and_payment();
    let _server = cluster.pod_server(server, PORT, 2).expect("server");
    let to = cluster.pod(server).addr4(PORT);
    // From the client's address, outside its cgroup: the connect programs leave it alone, and
    // with nothing cached the destination's inbound check steers it to the agent's inbound
    // listener; the agent delivers it (plaintext is permitted by default). The socket the
    // agent accepts is established where `sock_ops` looks for admitted ones.
    let steered = cluster
        .probe_unenrolled(client, to, Some("steered"))
        .expect("probe");
    assert_eq!(
        steered.echo.as_deref(),
        Some("steeredsteered"),
        "{steered:?}"
    );
    let tunneled = cluster.probe(client, to, Some("tunneled")).expect("probe");
    assert_eq!(
        tunneled.echo.as_deref(),
        Some("tunneledtunneled"),
        "{tunneled:?}"
    );
    let fast = cluster.probe(client, to, Some("fast")).expect("probe");
    assert_eq!(fast.echo.as_deref(), Some("fastfast"), "{fast:?}");
    let source = fast.local.expect("the fast-path client's address");

    let lines = fastpath_lines_until_closed(&mut cluster, n2, &source);
    assert_eq!(
        events(&lines),
        [
            ("connection opened".to_owned(), source.clone()),
            ("connection closed".to_owned(), source.clone())
        ],
        "the fast-path connection alone, opened and closed: {lines:#?}"
    );
    assert_eq!(kernel_counter(&cluster, n2, "fastpath_audit_dropped"), 0);
}

/// The mark the agent's inbound listener carried until 2026-12-05 (`SO_MARK`), by which
/// `sock_ops` told the sockets it accepted from those the inbound check admitted straight to an
/// application.
const FORMER_AGENT_INBOUND_MARK: u32 = 0x4c55;

#[test]
fn a_server_that_marks_its_listener_as_the_agents_cannot_hide_its_fast_path_connections() {
    let TwoNodes {
        mut cluster,
        n2,
        client,
        server,
        ..
    } = frontend_and_payment();
    let to = cluster.pod(server).addr4(PORT);
    // The pair's first connection crosses the tunnel and caches the allow (delivered to an
    // unmarked listener from the client's address; a marked one is delivered to from the loopback
    // marker, `tests/tunnel.rs`).
    let unmarked = cluster.pod_server(server, PORT, 1).expect("server");
    let tunneled = cluster.probe(client, to, Some("tunneled")).expect("probe");
    assert_eq!(tunneled.echo.as_deref(), Some("tunneled"), "{tunneled:?}");
    drop(unmarked);
    // `SO_MARK` needs only `CAP_NET_RAW` in the pod's network namespace, which container runtimes
    // grant by default; every socket the listener accepts takes its mark.
    let _server = cluster
        .pod_marking_server(server, PORT, FORMER_AGENT_INBOUND_MARK)
        .expect("server");
    let fast = cluster.probe(client, to, Some("fast")).expect("probe");
    assert_eq!(fast.echo.as_deref(), Some("fast"), "{fast:?}");
    let source = fast.local.expect("the fast-path client's address");
    check_reported(
        &mut cluster,
        n2,
        &source,
        "fast-path connection to the marked listener",
    );
}

/// Send `text` on `pipe` (a fast-path connection) and half-close; its echo comes back, and
/// `node`'s agent logs the connection opened and then closed, with no audit event dropped.
fn finish_and_check_reported(cluster: &mut Cluster, node: NodeId, pipe: OpenPipe, text: &str) {
    let r = pipe.finish(text.as_bytes()).expect("latch-probe pipe");
    assert_eq!(r.echo.as_deref(), Some(text), "{r:?}");
    let source = r.local.expect("the client's address");
    check_reported(cluster, node, &source, &format!("{text} connection"));
}

/// `node`'s agent logs the fast-path connection from `source` (the client's address and port)
/// opened and then closed, and drops no audit event; `what` names it in a failure.
fn check_reported(cluster: &mut Cluster, node: NodeId, source: &str, what: &str) {
    let lines = fastpath_lines_until_closed(cluster, node, source);
    let reported: Vec<String> = events(&lines)
        .into_iter()
        .filter(|(_, from)| from == source)
        .map(|(event, _)| event)
        .collect();
    assert_eq!(
        reported,
        ["connection opened", "connection closed"],
        "the {what}, opened and closed: {lines:#?}"
    );
    assert_eq!(kernel_counter(cluster, node, "fastpath_audit_dropped"), 0);
}

/// Destination ports with an allow cached, beside [`PORT`], for the flood: one source address
/// has 64,512 ports to send from, so eight ports give 516,096 four-tuples, about twice the
/// 262,144 handshakes the kernel once kept for the audit in an LRU map, which such a flood
/// emptied of older entries (twice, so that SYNs a loaded machine drops on the way do not leave
/// the flood short of it).
const FLOOD_PORTS: [u16; 8] = [8081, 8082, 8083, 8084, 8085, 8086, 8087, 8088];
const FLOOD_SOURCE_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;
/// The entries of that map, the most the flood must exceed.
const FORMER_ADMITS_ENTRIES: u64 = 1 << 18;

/// The server's handshakes on `port` waiting for the client's last ACK.
fn held_handshakes(netns: &str, port: u16) -> usize {
    let sport = format!("sport = :{port}");
    netns::sh(std::process::Command::new("ip").args([
        "netns", "exec", netns, "ss", "-Htn", "state", "syn-recv", &sport,
    ]))
    .expect("ss")
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count()
}

#[test]
fn a_flood_of_syns_that_never_complete_cannot_hide_a_held_connection_from_the_audit() {
    let TwoNodes {
        mut cluster,
        n2,
        client,
        server,
        ..
    } = frontend_and_payment();
    let ports: Vec<u16> = std::iter::once(PORT).chain(FLOOD_PORTS).collect();
    let mut servers: Vec<_> = ports
        .iter()
        .map(|&port| cluster.pod_server(server, port, 1).expect("server"))
        .collect();
    // A first, tunneled connection to each port caches the pair's allow for it on both nodes.
    for &port in &ports {
        let r = cluster
            .probe(client, cluster.pod(server).addr4(port), Some("warm"))
            .expect("probe");
        assert_eq!(r.echo.as_deref(), Some("warm"), "port {port}: {r:?}");
    }
    // PORT's server defers its handshakes until data arrives; a held client connects (the fast
    // path: the allow is cached) and sends nothing until told, so the server keeps the
    // connection in SYN-RECV for as long as the test likes.
    drop(servers.remove(0));
    let _deferring = cluster
        .pod_deferring_server(server, PORT, 600)
        .expect("deferring server");
    let server_ns = cluster.pod(server).netns_name.clone();
    let held = cluster
        .start_pipe(client, cluster.pod(server).addr4(PORT), b"")
        .expect("latch-probe pipe");
    assert!(
        eventually(WAIT, || held_handshakes(&server_ns, PORT) == 1),
        "the server holds the handshake"
    );

    // The flood: SYNs from the client's own address (the anti-spoofing check lets them out) to
    // ports with a cached allow, each admitted by the destination's inbound check, none ever
    // completed.
    let admitted_before = kernel_counter(&cluster, n2, "inbound_admitted");
    let sent = syn_flood::send_syns(
        &cluster.pod(client).netns(),
        cluster.pod(client).ipv4,
        cluster.pod(server).ipv4,
        FLOOD_SOURCE_PORTS,
        FLOOD_PORTS.to_vec(),
    )
    .expect("flood");
    let admitted = kernel_counter(&cluster, n2, "inbound_admitted") - admitted_before;
    assert!(
        admitted > FORMER_ADMITS_ENTRIES,
        "{sent} SYNs sent, {admitted} admitted: the flood must admit more than {FORMER_ADMITS_ENTRIES}"
    );
    assert_eq!(
        held_handshakes(&server_ns, PORT),
        1,
        "the handshake was still held when the flood ended"
    );

    // The client's first data completes the handshake.
    finish_and_check_reported(&mut cluster, n2, held, "held");
}

/// Fast-path connections the flood holds open at once, over [`HELD_PORTS`]: well over the
/// 262,144 records the kernel once kept by socket cookie in an LRU map, where the newest pushed
/// out older ones, an open connection's among them, whose close then went unreported (300,000
/// were not enough to reach it there: the LRU spares an entry used since its last pass).
const HELD_CONNECTIONS: usize = 620_000;
/// Ports with an allow cached: with the client's whole port range (1024–65535), ten of them
/// give the flood enough four-tuples.
const HELD_PORTS: [u16; 10] = [8080, 8081, 8082, 8083, 8084, 8085, 8086, 8087, 8088, 8089];

#[test]
fn a_pod_holding_620_000_connections_cannot_hide_another_connections_close() {
    let TwoNodes {
        mut cluster,
        n1,
        client,
        server,
        ..
    } = frontend_and_payment();
    let _servers: Vec<_> = HELD_PORTS
        .iter()
        .map(|&port| cluster.pod_server(server, port, 1).expect("server"))
        .collect();
    for port in HELD_PORTS {
        let r = cluster
            .probe(client, cluster.pod(server).addr4(port), Some("warm"))
            .expect("probe");
        assert_eq!(r.echo.as_deref(), Some("warm"), "port {port}: {r:?}");
    }

    // The victim: a fast-path connection kept open (`latch-probe pipe` sends only what it is
    // given), reported opened on the client's node.
    let victim = cluster
        .start_pipe(client, cluster.pod(server).addr4(PORT), b"")
        .expect("latch-probe pipe");
    let (opened, lines) = wait_for_fastpath_lines(cluster.agent(n1), |lines| {
        lines
            .iter()
            .any(|l| l["fields"]["event"] == "connection opened")
    });
    assert!(opened, "the victim reported opened: {lines:#?}");

    // The flood, from the same pod: connections through the fast path whose SYNs are dropped on
    // their way out (a queue of length 0 on the pod's interface), so that they stay open without
    // a server having to hold them, and are never opened, so that they send no events.
    let client_path = cluster.pod(client).netns();
    let client_ns = cluster.pod(client).netns_name.clone();
    netns::sysctl(&client_path, "net/ipv4/ip_local_port_range", "1024 65535").expect("port range");
    tc(
        &client_ns,
        &[
            "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "0",
        ],
    );
    let allowed_before = kernel_counter(&cluster, n1, "fastpath_allowed");
    let ports: Vec<String> = HELD_PORTS.iter().map(u16::to_string).collect();
    let ports = ports.join(",");
    let server_ip = cluster.pod(server).ipv4.to_string();
    // One process holds what its descriptor limit allows: as many as it takes.
    let mut floods = Vec::new();
    let mut held = 0;
    while held < HELD_CONNECTIONS {
        assert!(
            floods.len() < 1000,
            "{held} held by {} processes",
            floods.len()
        );
        let count = (HELD_CONNECTIONS - held).to_string();
        let mut flood = cluster
            .probe_command(
                client,
                &[
                    "hold-connects",
                    "--to",
                    &server_ip,
                    "--ports",
                    &ports,
                    "--count",
                    &count,
                ],
            )
            .expect("probe command")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting latch-probe hold-connects");
        let mut made = String::new();
        {
            use std::io::BufRead as _;
            let stdout = flood.stdout.take().expect("probe stdout");
            std::io::BufReader::new(stdout)
                .read_line(&mut made)
                .expect("reading latch-probe hold-connects");
        }
        let made: Value = serde_json::from_str(&made).expect("latch-probe JSON");
        let n = made["held"].as_u64().expect("held") as usize;
        assert!(n > 0 && made["error"].is_null(), "{made}");
        held += n;
        floods.push(flood);
    }
    assert!(
        kernel_counter(&cluster, n1, "fastpath_allowed") - allowed_before >= held as u64,
        "every one took the fast path"
    );
    for mut flood in floods {
        drop(flood.stdin.take());
        flood.wait().expect("latch-probe hold-connects ends");
    }
    tc(&client_ns, &["qdisc", "del", "dev", "eth0", "root"]);

    // The victim ends: its close is reported.
    finish_and_check_reported(&mut cluster, n1, victim, "victim");
}

fn tc(netns: &str, args: &[&str]) {
    netns::sh(
        std::process::Command::new("tc")
            .arg("-n")
            .arg(netns)
            .args(args),
    )
    .unwrap_or_else(|e| panic!("tc {}: {e:#}", args.join(" ")));
}
