//! Config parsing tests: the DESIGN example, defaults, and one test per kind of mistake, each
//! checking the file name, line and field path in the message.

use super::*;

const EXAMPLE: &str = r#"node: { name: node-a, address: 10.244.0.1 }
trustDomain: cluster.local
cgroupRoot: /sys/fs/cgroup/kubepods           # programs attach here
bpfPinDir: /sys/fs/bpf/latch
ports: { capture: 15001, inbound: 15006, tunnel: 15008 }
dataplane: { mode: fastpath, verdictTtl: 5m }
certificates:
  source: dev-ca
  caCert: /etc/latch/ca.pem
  caKey: /etc/latch/ca-key.pem
  ttl: 1h
debugSocket: /run/latch/debug.sock
metrics: 127.0.0.1:15020
policies: [/etc/latch/policies]
workloads:
  - { name: frontend-1, namespace: prod, serviceAccount: frontend, labels: { app: frontend },
      cgroup: /sys/fs/cgroup/kubepods/frontend-1, netns: /run/netns/frontend-1, ips: [10.244.1.2] }
peers:
  - { name: payment-1, namespace: prod, serviceAccount: payment, labels: { app: payment-service },
      ips: [10.244.2.2], node: 10.244.0.2 }
"#;

const MINIMAL: &str = "node: { name: n1, address: 10.244.0.1 }\ntrustDomain: cluster.local\ncgroupRoot: /cg\nbpfPinDir: /sys/fs/bpf/x\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(Path::new("node.yaml"), text)
}

/// The error message for `text`, checked to name the file, `line` and `path`.
fn expect_error(text: &str, line: usize, path: &str) -> String {
    let err = parse(text).expect_err("config should be rejected");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("node.yaml:{line}:")),
        "wrong file/line in: {msg}"
    );
    assert!(msg.contains(path), "no field path {path:?} in: {msg}");
    msg
}

#[test]
fn design_example_parses() {
    let c = parse(EXAMPLE).expect("example is valid");
    assert_eq!(c.node.name, "node-a");
    assert_eq!(c.node.address, "10.244.0.1".parse::<IpAddr>().expect("ip"));
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(
        c.ports,
        Ports {
            capture: 15001,
            inbound: 15006,
            tunnel: 15008
        }
    );
    assert_eq!(c.dataplane.mode, DataplaneMode::Fastpath);
    assert_eq!(c.dataplane.verdict_ttl, Duration::from_secs(300));
    assert_eq!(c.dataplane.worker_threads, 1);
    assert_eq!(c.dataplane.busy_poll, Duration::from_micros(500));
    let certs = c.certificates.expect("certificates");
    assert_eq!(certs.source, CertificateSource::DevCa);
    assert_eq!(certs.ttl, Duration::from_secs(3600));
    assert_eq!(c.workloads.len(), 1);
    assert_eq!(c.workloads[0].service_account, "frontend");
    assert_eq!(
        c.workloads[0].labels.get("app").map(String::as_str),
        Some("frontend")
    );
    assert_eq!(c.peers[0].node, "10.244.0.2".parse::<IpAddr>().expect("ip"));
    assert_eq!(c.metrics, Some("127.0.0.1:15020".parse().expect("addr")));
}

#[test]
fn defaults_apply() {
    let c = parse(MINIMAL).expect("minimal config is valid");
    assert_eq!(c.ports, Ports::default());
    assert_eq!(c.dataplane, Dataplane::default());
    assert_eq!(c.mtls.mode, MtlsMode::Permissive);
    assert_eq!(c.debug_socket, PathBuf::from("/run/latch/debug.sock"));
    assert_eq!(c.root_namespace, "istio-system");
    assert!(c.workloads.is_empty() && c.peers.is_empty() && c.certificates.is_none());
}

#[test]
fn metrics_can_be_disabled() {
    let c = parse(&format!("{MINIMAL}metrics: off\n")).expect("valid");
    assert_eq!(c.metrics, None);
}

#[test]
fn unknown_top_level_field() {
    let msg = expect_error(&format!("{MINIMAL}trustDomian: x\n"), 5, "trustDomian");
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn unknown_nested_field() {
    let msg = expect_error(
        &format!("{MINIMAL}dataplane:\n  mode: fastpath\n  ttl: 5m\n"),
        7,
        "dataplane.ttl",
    );
    assert!(msg.contains("unknown field `ttl`"), "{msg}");
}

#[test]
fn bad_ip() {
    let text = format!(
        "{MINIMAL}peers:\n  - {{ name: p, namespace: prod, serviceAccount: sa, ips: [10.244.1.999], node: 10.244.0.2 }}\n"
    );
    expect_error(&text, 6, "peers[0].ips[0]");
}

#[test]
fn bad_duration() {
    let msg = expect_error(
        &format!("{MINIMAL}dataplane: {{ verdictTtl: 5 parsecs }}\n"),
        5,
        "dataplane.verdictTtl",
    );
    assert!(msg.contains("invalid duration"), "{msg}");
}

#[test]
fn verdict_ttl_is_at_most_a_day() {
    let msg = expect_error(
        &format!("{MINIMAL}dataplane: {{ verdictTtl: 25h }}\n"),
        5,
        "dataplane.verdictTtl",
    );
    assert!(msg.contains("longer than the 1day maximum"), "{msg}");
    let c = parse(&format!("{MINIMAL}dataplane: {{ verdictTtl: 24h }}\n")).expect("a day is fine");
    assert_eq!(c.dataplane.verdict_ttl, Duration::from_secs(24 * 3600));
}

#[test]
fn zero_ttl() {
    let msg = expect_error(
        &format!("{MINIMAL}dataplane: {{ verdictTtl: 0s }}\n"),
        5,
        "dataplane.verdictTtl",
    );
    assert!(msg.contains("greater than zero"), "{msg}");
}

#[test]
fn busy_poll_and_workers() {
    let c = parse(&format!(
        "{MINIMAL}dataplane: {{ busyPoll: 0s, workerThreads: 4 }}\n"
    ))
    .expect("valid");
    assert_eq!(c.dataplane.busy_poll, Duration::ZERO, "zero turns it off");
    assert_eq!(c.dataplane.worker_threads, 4);
    assert!(c.dataplane.busy_poll_adaptive, "adaptive by default");
    let c = parse(&format!(
        "{MINIMAL}dataplane: {{ busyPollAdaptive: false }}\n"
    ))
    .expect("valid");
    assert!(!c.dataplane.busy_poll_adaptive);
    expect_error(
        &format!("{MINIMAL}dataplane: {{ busyPollAdaptive: sometimes }}\n"),
        5,
        "dataplane.busyPollAdaptive",
    );
    let msg = expect_error(
        &format!("{MINIMAL}dataplane: {{ busyPoll: 50ms }}\n"),
        5,
        "dataplane.busyPoll",
    );
    assert!(msg.contains("longer than the 10ms maximum"), "{msg}");
    let msg = expect_error(
        &format!("{MINIMAL}dataplane: {{ workerThreads: 0 }}\n"),
        5,
        "dataplane.workerThreads",
    );
    assert!(msg.contains("between 1 and 256"), "{msg}");
}

#[test]
fn bad_enum_value() {
    let msg = expect_error(
        &format!("{MINIMAL}mtls: {{ mode: STRICTEST }}\n"),
        5,
        "mtls.mode",
    );
    assert!(msg.contains("STRICT"), "{msg}");
}

#[test]
fn duplicate_ports() {
    expect_error(
        &format!("{MINIMAL}ports: {{ capture: 15001, inbound: 15001 }}\n"),
        5,
        "ports.capture",
    );
}

#[test]
fn zero_port() {
    expect_error(
        &format!("{MINIMAL}ports:\n  tunnel: 0\n"),
        6,
        "ports.tunnel",
    );
}

#[test]
fn duplicate_ip_across_workload_and_peer() {
    let text = format!(
        "{MINIMAL}workloads:\n  - {{ name: a, namespace: prod, serviceAccount: sa, cgroup: /cg/a, netns: /run/netns/a, ips: [10.244.1.2] }}\npeers:\n  - name: b\n    namespace: prod\n    serviceAccount: sb\n    node: 10.244.0.2\n    ips:\n      - 10.244.1.2\n"
    );
    let msg = expect_error(&text, 13, "peers[0].ips[0]");
    assert!(msg.contains("already used by workloads[0] (a)"), "{msg}");
}

#[test]
fn duplicate_workload() {
    let w = "  - { name: a, namespace: prod, serviceAccount: sa, cgroup: /cg/a, netns: /run/netns/a, ips: [10.244.1.2] }\n";
    let w2 = "  - { name: a, namespace: prod, serviceAccount: sa, cgroup: /cg/b, netns: /run/netns/b, ips: [10.244.1.3] }\n";
    let msg = expect_error(
        &format!("{MINIMAL}workloads:\n{w}{w2}"),
        7,
        "workloads[1].name",
    );
    assert!(msg.contains("listed twice"), "{msg}");
}

#[test]
fn cgroup_outside_root() {
    let text = format!(
        "{MINIMAL}workloads:\n  - name: a\n    namespace: prod\n    serviceAccount: sa\n    cgroup: /elsewhere/a\n    netns: /run/netns/a\n    ips: [10.244.1.2]\n"
    );
    let msg = expect_error(&text, 9, "workloads[0].cgroup");
    assert!(msg.contains("not below cgroupRoot"), "{msg}");
}

#[test]
fn dev_ca_without_key() {
    let text = format!("{MINIMAL}certificates:\n  source: dev-ca\n  caCert: /etc/ca.pem\n");
    let msg = expect_error(&text, 5, "certificates");
    assert!(msg.contains("caKey"), "{msg}");
}

#[test]
fn relative_path() {
    let msg = expect_error(
        &MINIMAL.replace("bpfPinDir: /sys/fs/bpf/x", "bpfPinDir: sys/fs/bpf/x"),
        4,
        "bpfPinDir",
    );
    assert!(msg.contains("absolute"), "{msg}");
}

#[test]
fn bad_trust_domain() {
    let msg = expect_error(
        &MINIMAL.replace("cluster.local", "Cluster.Local"),
        2,
        "trustDomain",
    );
    assert!(msg.contains("'C'"), "{msg}");
}

#[test]
fn empty_ips() {
    let text = format!(
        "{MINIMAL}peers:\n  - {{ name: p, namespace: prod, serviceAccount: sa, ips: [], node: 10.244.0.2 }}\n"
    );
    let msg = expect_error(&text, 6, "peers[0].ips");
    assert!(msg.contains("at least one"), "{msg}");
}

#[test]
fn invalid_namespace() {
    let text = format!(
        "{MINIMAL}peers:\n  - {{ name: p, namespace: Prod_NS, serviceAccount: sa, ips: [10.244.1.2], node: 10.244.0.2 }}\n"
    );
    expect_error(&text, 6, "peers[0].namespace");
}

#[test]
fn missing_field_names_parent() {
    let err =
        parse("node: { name: n1 }\ntrustDomain: cluster.local\ncgroupRoot: /cg\nbpfPinDir: /b\n")
            .expect_err("invalid");
    let msg = err.to_string();
    assert!(msg.starts_with("node.yaml:1:"), "{msg}");
    assert!(
        msg.contains("node") && msg.contains("missing field `address`"),
        "{msg}"
    );
}

#[test]
fn empty_file() {
    let msg = parse("# nothing\n\n").expect_err("empty").to_string();
    assert_eq!(msg, "node.yaml: the config file is empty");
}

#[test]
fn not_a_mapping() {
    let msg = parse("- a\n- b\n").expect_err("sequence").to_string();
    assert!(
        msg.starts_with("node.yaml:1:1:") && msg.contains("invalid type"),
        "{msg}"
    );
}

#[test]
fn unreadable_file() {
    let msg = Config::load(Path::new("/nonexistent/latch.yaml"))
        .expect_err("missing")
        .to_string();
    assert!(
        msg.starts_with("/nonexistent/latch.yaml: cannot read:"),
        "{msg}"
    );
}

#[test]
fn syntax_error_has_a_line() {
    let err = parse(&format!("{MINIMAL}workloads: [\n  {{ name: a\n")).expect_err("broken");
    assert!(err.line().is_some(), "{err}");
}

#[test]
fn tunnel_handshake_limits() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(
        c.tunnel.handshake_timeout,
        Duration::from_secs(10),
        "default"
    );
    assert_eq!(c.tunnel.max_handshakes_per_source, 64, "default");
    let c = parse(&format!(
        "{MINIMAL}tunnel: {{ handshakeTimeout: 2s, maxHandshakesPerSource: 8 }}\n"
    ))
    .expect("valid");
    assert_eq!(c.tunnel.handshake_timeout, Duration::from_secs(2));
    assert_eq!(c.tunnel.max_handshakes_per_source, 8);
    for (value, field, why) in [
        (
            "handshakeTimeout: 0s",
            "tunnel.handshakeTimeout",
            "at most 1m",
        ),
        (
            "handshakeTimeout: 2m",
            "tunnel.handshakeTimeout",
            "at most 1m",
        ),
        (
            "maxHandshakesPerSource: 0",
            "tunnel.maxHandshakesPerSource",
            "between 1 and 4096",
        ),
    ] {
        let msg = expect_error(&format!("{MINIMAL}tunnel: {{ {value} }}\n"), 5, field);
        assert!(msg.contains(why), "{msg}");
    }
}

#[test]
fn http_section_defaults_and_values() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.http.path_normalization, PathNormalization::Base);
    assert_eq!(c.http.header_read_timeout, Duration::from_secs(60));
    let c = parse(&format!(
        "{MINIMAL}http: {{ pathNormalization: DECODE_AND_MERGE_SLASHES, headerReadTimeout: 10s }}\n"
    ))
    .expect("valid");
    assert_eq!(
        c.http.path_normalization,
        PathNormalization::DecodeAndMergeSlashes
    );
    assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
    let c = parse(&format!("{MINIMAL}http: {{ pathNormalization: NONE }}\n")).expect("valid");
    assert_eq!(c.http.path_normalization, PathNormalization::None);
}

#[test]
fn bad_path_normalization() {
    let msg = expect_error(
        &format!("{MINIMAL}http:\n  headerReadTimeout: 5s\n  pathNormalization: MERGE\n"),
        7,
        "http.pathNormalization",
    );
    assert!(
        msg.starts_with("node.yaml:7:3: http.pathNormalization: unknown variant `MERGE`"),
        "{msg}"
    );
    for mode in ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"] {
        assert!(msg.contains(mode), "{mode} missing from {msg}");
    }
    let msg = expect_error(
        &format!("{MINIMAL}http: {{ headerReadTimeout: 0s }}\n"),
        5,
        "http.headerReadTimeout",
    );
    assert!(msg.contains("greater than zero"), "{msg}");
}

#[test]
fn jwt_section_defaults_values_and_errors() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.jwt.jwks_ca_file, None);
    assert_eq!(c.jwt.jwks_refresh_interval, Duration::from_secs(20 * 60));
    assert_eq!(c.jwt.jwks_fetch_timeout, Duration::from_secs(5));
    assert_eq!(c.jwt.jwks_max_stale, Duration::from_secs(24 * 3600));
    assert_eq!(c.jwt.jwks_refetch_min_interval, Duration::from_secs(10));
    let c = parse(&format!(
        "{MINIMAL}jwt:\n  jwksCaFile: /etc/latch/jwks-ca.pem\n  jwksRefreshInterval: 5m\n  \
         jwksFetchTimeout: 2s\n  jwksMaxStale: 1h\n  jwksRefetchMinInterval: 1s\n"
    ))
    .expect("valid");
    assert_eq!(
        c.jwt.jwks_ca_file.as_deref(),
        Some(Path::new("/etc/latch/jwks-ca.pem"))
    );
    assert_eq!(c.jwt.jwks_refresh_interval, Duration::from_secs(300));
    assert_eq!(c.jwt.jwks_fetch_timeout, Duration::from_secs(2));
    assert_eq!(c.jwt.jwks_max_stale, Duration::from_secs(3600));
    assert_eq!(c.jwt.jwks_refetch_min_interval, Duration::from_secs(1));
    let msg = expect_error(
        &format!("{MINIMAL}jwt:\n  jwksFetchTimeout: 0s\n"),
        6,
        "jwt.jwksFetchTimeout",
    );
    assert!(msg.contains("greater than zero"), "{msg}");
    expect_error(
        &format!("{MINIMAL}jwt:\n  jwksCaFile: relative.pem\n"),
        6,
        "jwt.jwksCaFile",
    );
    let msg = expect_error(
        &format!("{MINIMAL}jwt:\n  jwksRefreshInterval: 1h\n  jwksMaxStale: 10m\n"),
        7,
        "jwt.jwksMaxStale",
    );
    assert!(
        msg.contains("shorter than jwt.jwksRefreshInterval"),
        "{msg}"
    );
    let msg = expect_error(&format!("{MINIMAL}jwt:\n  jwksUri: x\n"), 6, "jwt");
    assert!(msg.contains("unknown field"), "{msg}");
}

/// The node-level settings of Kubernetes mode, without `node`.
const KUBERNETES: &str = "trustDomain: cluster.local\ncgroupRoot: /sys/fs/cgroup\nbpfPinDir: /sys/fs/bpf/latch\ndataplane: { mode: tunnel }\n";

fn node_b() -> Node {
    Node {
        name: "node-b".into(),
        address: "10.244.0.2".parse().expect("ip"),
    }
}

#[test]
fn kubernetes_mode_takes_the_node_from_the_environment_unless_the_file_names_it() {
    let c = Config::kubernetes_from_yaml(Path::new("k.yaml"), KUBERNETES, Some(node_b()))
        .expect("valid");
    assert_eq!(c.node, node_b());
    assert_eq!(c.dataplane.mode, DataplaneMode::Tunnel);
    assert!(c.workloads.is_empty() && c.peers.is_empty() && c.policies.is_empty());

    let text = format!("node: {{ name: n1, address: 10.244.0.1 }}\n{KUBERNETES}");
    let c =
        Config::kubernetes_from_yaml(Path::new("k.yaml"), &text, Some(node_b())).expect("valid");
    assert_eq!(c.node.name, "n1");

    let err = Config::kubernetes_from_yaml(Path::new("k.yaml"), KUBERNETES, None)
        .expect_err("no node anywhere");
    let msg = err.to_string();
    assert!(msg.starts_with("k.yaml: node: not set"), "{msg}");
    assert!(msg.contains("NODE_NAME and HOST_IP"), "{msg}");
}

#[test]
fn kubernetes_mode_refuses_what_the_api_server_provides() {
    for (key, line) in [
        ("workloads: []", 5),
        ("peers: []", 5),
        ("policies: [/etc/latch/policies]", 5),
    ] {
        let text = format!("{KUBERNETES}{key}\n");
        let err = Config::kubernetes_from_yaml(Path::new("k.yaml"), &text, Some(node_b()))
            .expect_err(key);
        let msg = err.to_string();
        let field = key.split(':').next().unwrap_or_default();
        assert!(
            msg.starts_with(&format!("k.yaml:{line}:1: {field}: in Kubernetes mode")),
            "{msg}"
        );
    }
}

#[test]
fn kubernetes_mode_reports_field_errors_at_their_line() {
    let text = format!("{KUBERNETES}ports: {{ capture: 15001, inbound: 15001 }}\n");
    let err = Config::kubernetes_from_yaml(Path::new("k.yaml"), &text, Some(node_b()))
        .expect_err("a port used twice");
    assert!(err.to_string().starts_with("k.yaml:5:"), "{err}");
    let text = format!("{KUBERNETES}dataplane2: {{}}\n");
    let err = Config::kubernetes_from_yaml(Path::new("k.yaml"), &text, Some(node_b()))
        .expect_err("an unknown field");
    assert!(err.to_string().contains("dataplane2"), "{err}");
}

#[test]
fn the_node_from_the_downward_api_must_be_whole() {
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(Node::from_environment(None, None), Ok(None));
    assert_eq!(
        Node::from_environment(some("node-b"), some("10.244.0.2")),
        Ok(Some(node_b()))
    );
    for (name, address, says) in [
        (some("node-b"), None, "HOST_IP is not"),
        (None, some("10.244.0.2"), "NODE_NAME is not"),
        (
            some("node-b"),
            some("node-b"),
            "HOST_IP \"node-b\" is not an IP",
        ),
        (some(""), some("10.244.0.2"), "NODE_NAME is empty"),
    ] {
        let err = Node::from_environment(name, address).expect_err(says);
        assert!(err.contains(says), "{err}");
    }
}
