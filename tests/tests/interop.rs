//! HBONE against a peer that is not Latch's code (`tests/python/hbone_peer.py`: Python's `ssl`
//! and PyPI's `h2`), both ways, with certificates of the shapes istiod issues (an RSA root, an
//! intermediate, leaves with an empty subject and a critical URI SAN): Latch's client to the
//! Python server (relay, `baggage` and `traceparent`, one connection per source pod, `401` and
//! `403` as denies, `503`, keepalive PINGs, GOAWAY with a stream open) and the Python client to
//! Latch's server (relay, the status codes, PING, the drain on SIGTERM). See `docs/tunnel.md`
//! (*Interoperating with ztunnel*).

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes,
    python_peer::{PeerCerts, PythonPeer},
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const TUNNEL_PORT: u16 = 15008;
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
/// A bound on waiting for something that is sure to come (a failure only when it does not).
const WAIT: Duration = Duration::from_secs(30);

/// Agent options reading the istiod-shaped SVIDs of `service_accounts` from a `files` directory.
fn files_options(cluster: &Cluster, service_accounts: &[&str]) -> AgentOptions {
    let dir = cluster.dir().join("svids");
    for sa in service_accounts {
        PeerCerts::istio_shaped(sa)
            .install(&dir, sa)
            .expect("SVID files");
    }
    AgentOptions {
        cert_files: Some(dir),
        ..AgentOptions::default()
    }
}

fn ip_of(addr: &str) -> IpAddr {
    addr.parse::<SocketAddr>().expect("ip:port").ip()
}

/// `for="ip:port"` (RFC 7239, as Latch sends it) → the IP.
fn forwarded_ip(connect: &Value) -> IpAddr {
    let value = connect["headers"]["forwarded"]
        .as_str()
        .unwrap_or_else(|| panic!("no Forwarded header: {connect}"));
    let inner = value
        .strip_prefix("for=\"")
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("Forwarded {value}"));
    ip_of(inner)
}

fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// A connection from a pod that stays open (`latch-probe pipe`) until [`Held::finish`].
struct Held {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl Held {
    fn open(cluster: &Cluster, from: PodId, to: SocketAddr, first: &[u8]) -> Held {
        let mut child = cluster
            .probe_command(from, &["pipe", "--to", &to.to_string()])
            .expect("probe command")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("latch-probe pipe");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(first).expect("first bytes");
        stdin.flush().expect("flush");
        Held { child, stdin }
    }

    /// Send `rest`, half-close, and return what came back.
    fn finish(mut self, rest: &[u8]) -> Option<String> {
        let _ = self.stdin.write_all(rest);
        drop(self.stdin);
        let out = self.child.wait_with_output().expect("latch-probe pipe");
        let result: Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
        result["echo"].as_str().map(str::to_owned)
    }
}

#[test]
fn latchs_client_speaks_hbone_to_a_python_server() {
    let TwoNodes {
        mut cluster,
        n1,
        client,
        server,
        ..
    } = Cluster::frontend_payment().expect("cluster");
    let client2 = cluster
        .add_pod(n1, PodSpec::mesh("frontend-2", "prod", "frontend"))
        .expect("second frontend pod");
    // Node 2 runs no agent: the Python server is the payment pod's tunnel endpoint.
    let options = files_options(&cluster, &["frontend"]);
    cluster.start_agent(n1, options).expect("agent 1");
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let payment = cluster.pod(server);
    let mut python = PythonPeer::server(
        &payment.netns(),
        payment.addr4(TUNNEL_PORT),
        &PeerCerts::istio_shaped("payment"),
        &[(8401, 401), (8403, 403)],
    )
    .expect("Python HBONE server");
    let payment_ip = cluster.pod(server).ipv4;
    let to = move |port| SocketAddr::new(payment_ip.into(), port);

    // 200 and relay, from two pods of the same identity.
    for pod in [client, client2] {
        let r = cluster.probe(pod, to(PORT), Some("hello")).expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some("hello"), "{r:?}");
    }
    let connects = python.wait_count("connect", 2, WAIT).expect("two CONNECTs");
    let connections = python
        .wait_count("connection", 2, WAIT)
        .expect("two connections");
    for c in &connections {
        assert_eq!(c["client_id"], "spiffe://cluster.local/ns/prod/sa/frontend");
        assert_eq!(c["alpn"], "h2");
    }
    let pods: Vec<IpAddr> = [client, client2]
        .iter()
        .map(|p| IpAddr::V4(cluster.pod(*p).ipv4))
        .collect();
    for c in &connects {
        assert_eq!(c["method"], "CONNECT");
        assert_eq!(c["authority"], to(PORT).to_string());
        // ztunnel attributes a stream to the TCP peer that dialled: each pod dialled its own.
        assert_eq!(
            ip_of(c["peer"].as_str().expect("peer")),
            forwarded_ip(c),
            "the connection's TCP peer is the pod the stream is from: {c}"
        );
        assert!(pods.contains(&forwarded_ip(c)), "{c}");
        assert_eq!(c["headers"]["baggage"], "k8s.namespace.name=prod", "{c}");
        let traceparent = c["headers"]["traceparent"].as_str().unwrap_or_default();
        assert!(is_traceparent(traceparent), "{c}");
    }
    assert_ne!(forwarded_ip(&connects[0]), forwarded_ip(&connects[1]));

    // 401 and 403 are policy denies; 503 (nothing listens) a refusal, answered by the server.
    for (port, decision, answered) in [
        (8401, "DENY", "answered 401"),
        (8403, "DENY", "answered 403"),
        (9, "REFUSED", "answered 503"),
    ] {
        let mark = cluster.agent(n1).mark();
        let r = cluster.probe(client, to(port), Some("x")).expect("probe");
        assert!(
            r.echo.is_none() && (r.reset || r.refused()),
            "{port}: {r:?}"
        );
        let destination = format!("\"destination_address\":\"{}\"", to(port));
        let line = cluster
            .agent(n1)
            .wait_for_line_after(mark, WAIT, |l| {
                l.contains("\"event\":\"decision\"") && l.contains(&destination)
            })
            .expect("the source's access log");
        assert!(
            line.contains(&format!("\"decision\":\"{decision}\"")) && line.contains(answered),
            "{port}: {line}"
        );
    }

    // Latch's keepalive: a PING on the pooled connection (10 s after it was made).
    python
        .wait_for(0, Duration::from_secs(60), |e| {
            e["event"] == "ping-received"
        })
        .expect("Latch's client PINGs its server");

    // GOAWAY with a stream open: the stream goes on, the next connection dials anew. Five
    // CONNECTs were answered so far (two relays, 401, 403, 503), on the two pods' connections.
    let held = Held::open(&cluster, client, to(PORT), b"first-");
    python
        .wait_count("answered", 6, WAIT)
        .expect("the held connection's CONNECT was answered");
    let mark = python.mark();
    python.send(json!({ "cmd": "goaway" })).expect("goaway");
    python
        .wait_for(mark, WAIT, |e| e["event"] == "pong")
        .expect("the client read the GOAWAY (and answered the PING behind it)");
    let r = cluster
        .probe(client, to(PORT), Some("after"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("after"), "{r:?}");
    let connections = python
        .wait_count("connection", 3, WAIT)
        .expect("a new connection for the next stream");
    assert_eq!(
        ip_of(connections[2]["peer"].as_str().expect("peer")),
        pods[0],
        "dialled from the pod whose stream it is"
    );
    assert_eq!(
        held.finish(b"second").as_deref(),
        Some("first-second"),
        "the stream open at the GOAWAY went on"
    );
}

/// Node 2's agent only (reading `policies`, if any), and a Python client in the frontend pod's
/// netns connected to the payment pod's tunnel port.
fn python_client(policies: Option<&str>) -> (Cluster, NodeId, PodId, PythonPeer) {
    let TwoNodes {
        mut cluster,
        n2,
        client,
        server,
        ..
    } = Cluster::frontend_payment().expect("cluster");
    let mut options = files_options(&cluster, &["payment"]);
    if let Some(text) = policies {
        let dir: PathBuf = cluster.dir().join("policies");
        std::fs::create_dir_all(&dir).expect("policy dir");
        std::fs::write(dir.join("policy.yaml"), text).expect("policy");
        options.extra_yaml = format!("policies: [{}]\n", dir.display());
    }
    cluster.start_agent(n2, options).expect("agent 2");
    let python = PythonPeer::client(
        &cluster.pod(client).netns(),
        cluster.pod(server).addr4(TUNNEL_PORT),
        &PeerCerts::istio_shaped("frontend"),
        PAYMENT,
    )
    .expect("Python HBONE client");
    (cluster, n2, server, python)
}

/// `open` `id` to `authority` and wait for the answer.
fn open(python: &mut PythonPeer, id: &str, authority: &str) -> Value {
    python
        .send(json!({ "cmd": "open", "id": id, "authority": authority }))
        .expect("open");
    python
        .wait_for(0, WAIT, |e| e["event"] == "response" && e["id"] == id)
        .unwrap_or_else(|e| panic!("no answer to CONNECT {authority}: {e}"))
}

/// Send `data` on `id`, half-close, and return everything the stream brought back.
fn exchange(python: &mut PythonPeer, id: &str, data: &str) -> String {
    python
        .send(json!({ "cmd": "send", "id": id, "data": data }))
        .expect("send");
    python.send(json!({ "cmd": "end", "id": id })).expect("end");
    python
        .wait_for(0, WAIT, |e| e["event"] == "ended" && e["id"] == id)
        .expect("the stream's end");
    python
        .events()
        .iter()
        .filter(|e| e["event"] == "data" && e["id"] == id)
        .filter_map(|e| e["data"].as_str())
        .collect()
}

const DENY_8081: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-8081, namespace: prod }
spec:
  action: DENY
  rules:
    - to: [{ operation: { ports: [\"8081\"] } }]
";

#[test]
fn a_python_client_speaks_hbone_to_latchs_server() {
    let (cluster, _n2, server, mut python) = python_client(Some(DENY_8081));
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = |port| cluster.pod(server).addr4(port).to_string();

    let ok = open(&mut python, "relay", &to(PORT));
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["headers"]["x-latch-cacheable"], "1", "{ok}");
    assert_eq!(exchange(&mut python, "relay", "hello"), "hello");

    for (id, authority, status) in [
        ("policy", to(8081), 403),
        ("not-the-pod", "10.244.254.254:8080".to_owned(), 403),
        ("closed-port", to(9), 503),
        ("not-an-address", "payment.prod:8080".to_owned(), 400),
    ] {
        let answer = open(&mut python, id, &authority);
        assert_eq!(answer["status"], status, "{id}: {answer}");
    }

    let mark = python.mark();
    python.send(json!({ "cmd": "ping" })).expect("ping");
    python
        .wait_for(mark, WAIT, |e| e["event"] == "pong")
        .expect("Latch's server answers a PING");
}

#[test]
fn latchs_server_drains_on_sigterm_and_lets_a_python_clients_stream_finish() {
    let (mut cluster, n2, server, mut python) = python_client(None);
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let authority = cluster.pod(server).addr4(PORT).to_string();
    let answer = open(&mut python, "held", &authority);
    assert_eq!(answer["status"], 200, "{answer}");
    python
        .send(json!({ "cmd": "send", "id": "held", "data": "before-" }))
        .expect("send");

    let mark = python.mark();
    let pid = cluster.agent(n2).pid().expect("agent pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    python
        .wait_for(mark, WAIT, |e| e["event"] == "goaway")
        .expect("GOAWAY from the stopping agent");
    assert_eq!(exchange(&mut python, "held", "after"), "before-after");
    let status = cluster.agent(n2).terminate().expect("the agent exits");
    assert!(status.success(), "{status}");
    cluster
        .agent(n2)
        .wait_for_message("tunnels drained", WAIT)
        .expect("every stream finished within the drain");
}
