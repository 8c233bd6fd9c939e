//! The debug socket, `latch debug` and the metrics endpoint against real agents on two nodes:
//! every endpoint and command reports what the test did (a pair it connected shows up in the
//! verdicts with the right identities, flush empties the cache and the next connection goes
//! through the tunnel again), the socket is root-only, malformed requests are answered with
//! errors while the agent keeps serving, and `/metrics` is valid exposition whose counters match
//! the connections made.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream, process::CommandExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use latch_tests::{AgentOptions, Cluster, NodeId, PodId, TwoNodes, env, eventually, metrics};
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";

const ALLOW_PROD: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow-prod, namespace: prod }
spec:
  action: ALLOW
  rules: [{ from: [{ source: { namespaces: ["prod"] } }] }]
"#;

struct Setup {
    cluster: Cluster,
    n1: NodeId,
    n2: NodeId,
    client: PodId,
    server: PodId,
}

fn setup() -> Setup {
    let TwoNodes {
        cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment()
        .and_then(|t| {
            let policies = t.cluster.dir().join("policies");
            std::fs::create_dir_all(&policies)?;
            std::fs::write(policies.join("allow-prod.yaml"), ALLOW_PROD)?;
            t.start_agents(AgentOptions {
                metrics: "127.0.0.1:15020".into(),
                extra_yaml: format!("policies: [{}]\n", policies.display()),
                ..AgentOptions::strict_fastpath()
            })
        })
        .expect("cluster with agents");
    Setup {
        cluster,
        n1,
        n2,
        client,
        server,
    }
}

fn debug(socket: &Path, args: &[&str]) -> (bool, String) {
    latch_tests::agent::debug(socket, args).expect("latch debug")
}

fn debug_json(socket: &Path, args: &[&str]) -> Value {
    latch_tests::agent::debug_json(socket, args).expect("latch debug")
}

fn counter(cluster: &Cluster, node: NodeId, name: &str) -> u64 {
    let stats = debug_json(&cluster.debug_socket(node), &["stats"]);
    stats["counters"][name].as_u64().unwrap_or_default()
}

#[test]
fn every_endpoint_and_command_reports_what_the_test_did() {
    let Setup {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = setup();
    let (s1, s2) = (cluster.debug_socket(n1), cluster.debug_socket(n2));
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let _echo2 = cluster.echo_server(server, PORT + 1).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    for payload in ["first", "second"] {
        let r = cluster.probe(client, to, Some(payload)).expect("probe");
        assert_eq!(r.echo.as_deref(), Some(payload), "{r:?}");
    }

    // verdicts: the pair, both ways, with the right identities; filters; the table.
    for (socket, direction) in [(&s1, "outbound"), (&s2, "inbound")] {
        let page = debug_json(socket, &["verdicts"]);
        assert_eq!(page["total"], 1, "{page}");
        let v = &page["verdicts"][0];
        assert_eq!(v["source"], FRONTEND, "{page}");
        assert_eq!(v["destination"], PAYMENT, "{page}");
        assert_eq!(v["port"], PORT, "{page}");
        assert_eq!(v["direction"], direction, "{page}");
        assert_eq!(v["decision"], "allow", "{page}");
        assert_eq!(
            v["encrypted"], false,
            "a cached pair takes the fast path: {page}"
        );
        let left = v["secondsLeft"].as_f64().unwrap_or_default();
        assert!(left > 0.0 && left <= 300.0, "{page}");
    }
    assert_eq!(debug_json(&s1, &["verdicts", "--port", "9"])["total"], 0);
    assert_eq!(
        debug_json(&s1, &["verdicts", "--identity", FRONTEND])["total"],
        1
    );
    let (ok, table) = debug(&s1, &["verdicts"]);
    assert!(ok, "{table}");
    let header = table.lines().next().unwrap_or_default();
    for column in ["SOURCE", "DESTINATION", "PORT", "DIRECTION", "DECISION"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        table.contains(FRONTEND) && table.contains("outbound"),
        "{table}"
    );

    // status, workloads, policies, certs, stats, explain.
    let status = debug_json(&s1, &["status"]);
    assert_eq!(status["node"], "node1", "{status}");
    assert_eq!(status["dataplaneMode"], "fastpath", "{status}");
    let programs = status["programs"].to_string();
    assert!(programs.contains("latch_connect4") && programs.contains("latch_inbound"));
    assert!(status["certificates"].to_string().contains(FRONTEND));
    let verdict_map = status["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == "LATCH_VERDICTS"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(verdict_map["entries"], 1, "{status}");
    let workloads = debug_json(&s1, &["workloads"]);
    let payment_ip = cluster.pod(server).ipv4.to_string();
    let workloads = workloads.as_array().cloned().unwrap_or_default();
    assert!(
        workloads
            .iter()
            .any(|w| w["identity"] == FRONTEND && w["local"] == true)
    );
    assert!(workloads.iter().any(|w| w["identity"] == PAYMENT
        && w["local"] == false
        && w["ips"].to_string().contains(&payment_ip)));
    let policies = debug_json(&s2, &["policies"]);
    assert_eq!(policies["policies"][0]["name"], "allow-prod", "{policies}");
    assert_eq!(policies["errors"], Value::Array(vec![]), "{policies}");
    let certs = debug_json(&s2, &["certs"]);
    assert_eq!(certs[0]["identity"], PAYMENT, "{certs}");
    assert!(!certs[0]["serial"].as_str().unwrap_or_default().is_empty());
    let (_, certs_table) = debug(&s2, &["certs"]);
    assert!(!certs_table.contains("PRIVATE KEY") && certs_table.contains(PAYMENT));
    assert!(counter(&cluster, n1, "fastpath_allowed") >= 1);
    assert!(counter(&cluster, n2, "inbound_admitted") >= 1);
    let (ok, explained) = debug(
        &s2,
        &["explain", "--from", FRONTEND, "--to", &to.to_string()],
    );
    assert!(ok && explained.starts_with("ALLOW"), "{explained}");
    assert!(explained.contains("prod/allow-prod"), "{explained}");
    assert!(
        explained.contains("encrypted: no (first connection tunneled over mTLS, repeats through the kernel fast path"),
        "with strictFastpath the pair is cached and its repeats are not encrypted: {explained}"
    );

    // connections: an open tunneled connection with both identities and its bytes.
    let other = cluster.pod(server).addr4(PORT + 1);
    let pipe = cluster
        .open_pipe(client, other, b"hello|", n2)
        .expect("open connection");
    let listed = eventually(WAIT, || {
        let connections = debug_json(&s2, &["connections"]);
        connections.as_array().is_some_and(|all| {
            all.iter().any(|c| {
                c["source"] == FRONTEND
                    && c["destination"] == PAYMENT
                    && c["destinationAddress"] == other.to_string()
                    && c["bytesSent"] == 6
            })
        })
    });
    assert!(listed, "{}", debug_json(&s2, &["connections"]));
    let r = pipe.finish(b"").expect("pipe");
    assert_eq!(r.echo.as_deref(), Some("hello|"), "{r:?}");

    // flush: the cache empties and the next connection goes through the tunnel again.
    for socket in [&s1, &s2] {
        let flushed = debug_json(socket, &["flush"]);
        assert!(
            flushed["removed"].as_u64().unwrap_or_default() >= 1,
            "{flushed}"
        );
        assert_eq!(debug_json(socket, &["verdicts"])["total"], 0);
    }
    let redirected = counter(&cluster, n1, "redirected");
    let r = cluster.probe(client, to, Some("third")).expect("probe");
    assert_eq!(r.echo.as_deref(), Some("third"), "{r:?}");
    assert_eq!(counter(&cluster, n1, "redirected"), redirected + 1);
    assert_eq!(debug_json(&s1, &["verdicts"])["total"], 1);

    // reload.
    let reloaded = debug_json(&s1, &["reload"]);
    assert_eq!(reloaded["ok"], true, "{reloaded}");
    let status = debug_json(&s1, &["status"]);
    assert_eq!(status["lastReload"]["trigger"], "debug API", "{status}");
}

#[test]
fn the_socket_is_root_only() {
    let Setup { cluster, n1, .. } = setup();
    let socket = cluster.debug_socket(n1);
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600, "mode of {}", socket.display());
    assert_eq!(meta.uid(), 0, "owned by root");
    // An unprivileged process (uid/gid 65534) cannot connect.
    let out = Command::new(env::latch_bin().expect("latch"))
        .args(["debug", "status", "--socket"])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let text = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "nobody got an answer: {text}");
    assert!(text.contains("permission denied"), "{text}");
}

#[test]
fn a_second_agent_for_the_same_node_refuses_to_start() {
    let Setup {
        mut cluster, n1, ..
    } = setup();
    let config = cluster.agent(n1).config_path().to_owned();
    let (code, out) =
        latch_tests::Agent::run_once(&cluster.node(n1).netns(), &config).expect("run");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("another agent is serving the debug socket"),
        "{out}"
    );
    let (ok, status) = debug(&cluster.debug_socket(n1), &["status"]);
    assert!(ok, "the first agent keeps its socket: {status}");
}

/// One raw request on the socket; returns the status line (empty if the server just closed).
fn raw(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_requests_get_errors_and_the_agent_keeps_serving() {
    let Setup {
        mut cluster, n1, ..
    } = setup();
    let socket = cluster.debug_socket(n1);
    let garbage = raw(&socket, b"\x16\x03\x01\x00garbage\r\n\r\n");
    assert!(!garbage.contains("200 OK"), "{garbage}");
    let unknown = raw(&socket, b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    assert!(unknown.contains("\"error\""), "{unknown}");
    let method = raw(&socket, b"DELETE /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(method.starts_with("HTTP/1.1 405"), "{method}");
    let bad_query = raw(
        &socket,
        b"GET /v1/verdicts?port=http HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(bad_query.starts_with("HTTP/1.1 400"), "{bad_query}");

    let big = 10 * 1024 * 1024;
    let mut request =
        format!("POST /v1/verdicts/flush HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n")
            .into_bytes();
    request.resize(request.len() + big, b'x');
    let oversized = raw(&socket, &request);
    assert!(oversized.starts_with("HTTP/1.1 413"), "{oversized}");

    let status = raw(&socket, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "the agent still serves: {status}"
    );
    assert!(cluster.agent(n1).is_running(), "the agent is alive");
}

/// `GET /metrics` from inside the node's netns.
fn scrape(cluster: &Cluster, node: NodeId) -> String {
    metrics::scrape(cluster, node).expect("scrape")
}

/// Check the OpenMetrics text line by line; returns (series with labels, value).
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some("# EOF"),
        "exposition ends with # EOF"
    );
    let mut samples = Vec::new();
    for line in lines {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                ["TYPE ", "HELP ", "UNIT ", "EOF"]
                    .iter()
                    .any(|p| comment.starts_with(p)),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
        samples.push((series.to_owned(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name) && labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn metrics_are_valid_exposition_and_match_the_connections() {
    let Setup {
        cluster,
        n1,
        n2,
        client,
        server,
    } = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    for payload in ["tunneled", "fast"] {
        let r = cluster.probe(client, to, Some(payload)).expect("probe");
        assert_eq!(r.echo.as_deref(), Some(payload), "{r:?}");
    }
    // The tunneled connection's series; the fast-path one's (path="fastpath") are
    // tests/tests/fastpath_audit.rs's.
    let pair = [
        &format!("source_principal=\"{FRONTEND}\"") as &str,
        &format!("destination_principal=\"{PAYMENT}\""),
        "destination_port=\"8080\"",
        "path=\"tunnel\"",
    ];
    let mut dst = Vec::new();
    // The tunneled connection is counted closed once both agents have relayed its end.
    let closed = eventually(WAIT, || {
        dst = parse_exposition(&scrape(&cluster, n2));
        sample(&dst, "istio_tcp_connections_closed_total", &pair) == 1.0
    });
    assert!(closed, "{dst:?}");
    let with = |r: &'static str| [pair[0], pair[1], pair[2], pair[3], r];
    let destination = with("reporter=\"destination\"");
    assert_eq!(
        sample(&dst, "istio_tcp_connections_opened_total", &destination),
        1.0
    );
    assert_eq!(
        sample(&dst, "istio_tcp_received_bytes_total", &destination),
        "tunneled".len() as f64,
        "bytes from the client to the server"
    );
    assert_eq!(
        sample(&dst, "istio_tcp_sent_bytes_total", &destination),
        "tunneled".len() as f64
    );
    assert_eq!(
        sample(
            &dst,
            "latch_policy_decisions_total",
            &["decision=\"allow\""]
        ),
        1.0
    );
    assert!(sample(&dst, "latch_inbound_admitted_total", &[]) >= 1.0);
    assert!(sample(&dst, "latch_certificate_expiry_seconds", &[PAYMENT]) > 0.0);

    let src = parse_exposition(&scrape(&cluster, n1));
    assert_eq!(
        sample(
            &src,
            "istio_tcp_connections_opened_total",
            &with("reporter=\"source\"")
        ),
        1.0,
        "only the first connection went through the agent"
    );
    assert_eq!(sample(&src, "latch_fastpath_connections_total", &[]), 1.0);
    assert_eq!(sample(&src, "latch_redirected_connections_total", &[]), 1.0);
    assert_eq!(
        sample(&src, "latch_tunnel_handshake_seconds_count", &[]),
        1.0
    );
    assert_eq!(sample(&src, "latch_verdict_cache_entries", &[]), 1.0);
}

/// The kernel keeps all 128 bits of an identity key: two verdicts whose source keys agree on
/// their first 8 bytes (one 64-bit key, in earlier builds) are two entries, and `latch debug
/// verdicts` names a key the agent does not know by all 32 hex digits, and finds each by them.
#[test]
fn verdicts_keep_and_show_all_128_bits_of_an_identity_key() {
    let Setup { cluster, n1, .. } = setup();
    let socket = cluster.debug_socket(n1);
    let mut maps =
        latch::datapath::KernelMaps::open_pinned(&cluster.node(n1).pin_dir).expect("pinned maps");
    let payment = latch::identity::IdentityKey::of(PAYMENT).0;
    let unknown = |last: u8| {
        let mut bytes = [0x5a; 16];
        bytes[15] = last;
        latch_common::Identity::new(bytes)
    };
    let value = latch_common::VerdictValue {
        expires_at_ns: latch::datapath::system::now_boot_ns() + 600_000_000_000,
        decision: latch_common::DECISION_DENY,
        _pad: 0,
    };
    for last in [1, 2] {
        let key = latch_common::VerdictKey::new(
            unknown(last),
            payment,
            PORT,
            latch_common::DIRECTION_OUTBOUND,
        );
        maps.insert_verdict(key, value).expect("insert");
    }
    assert_eq!(maps.verdicts().expect("verdicts").len(), 2);

    for last in [1u8, 2] {
        let name = format!("key:{}{last:02x}", "5a".repeat(15));
        let page = debug_json(&socket, &["verdicts", "--identity", &name]);
        assert_eq!(page["total"], 1, "{page}");
        assert_eq!(page["verdicts"][0]["source"], name.as_str(), "{page}");
        assert_eq!(page["verdicts"][0]["destination"], PAYMENT, "{page}");
    }
}
