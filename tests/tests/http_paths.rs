//! Per-request (L7) enforcement against requests written to slip past it, on two nodes with real
//! agents: paths that only become `/admin` once dot segments are removed or escapes decoded,
//! duplicate `Host` headers, an absolute-form target whose authority is not the `Host` header,
//! invalid escapes, a reload that changes the path normalisation, and a client that never
//! finishes its request head; and `latch policy explain` / `latch debug explain` judging the
//! same requests the same way. The application (the test HTTP server) answers with the request
//! target it received and keeps every request head it read, so each test also shows what
//! reached it.

use std::{path::PathBuf, time::Duration};

use latch_tests::{
    AgentOptions, Cluster, EchoServer, NodeId, PodId, PodSpec, ProbeResult, agent::debug, env,
};

const HTTP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

/// DENY `/admin` and below, and every request for the host `internal.example`.
const NO_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
  namespace: prod
spec:
  selector:
    matchLabels:
      app: payment-service
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
  - to:
    - operation:
        hosts: ["internal.example"]
"#;

struct Mesh {
    cluster: Cluster,
    n2: NodeId,
    frontend: PodId,
    payment: PodId,
    app: EchoServer,
    policies: PathBuf,
}

/// frontend on node 1, payment (`app: payment-service`, the HTTP server on 8080) on node 2, both
/// agents reading [`NO_ADMIN`]; `http` is the agents' `http:` config section, if any.
fn mesh(http: Option<&str>) -> Mesh {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node 1");
    let n2 = cluster.add_node().expect("node 2");
    let frontend = cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("frontend");
    let mut payment = PodSpec::mesh("payment", "prod", "payment");
    payment.labels = vec![("app".into(), "payment-service".into())];
    let payment = cluster.add_pod(n2, payment).expect("payment");
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(policies.join("no-admin.yaml"), NO_ADMIN).expect("policy file");
    let options = options(&policies, http);
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    cluster.start_agent(n2, options).expect("agent 2");
    let app = cluster
        .http_server(payment, HTTP_PORT)
        .expect("http server");
    Mesh {
        cluster,
        n2,
        frontend,
        payment,
        app,
        policies,
    }
}

fn options(policies: &std::path::Path, http: Option<&str>) -> AgentOptions {
    let http = http.map(|h| format!("http: {h}\n")).unwrap_or_default();
    AgentOptions {
        extra_yaml: format!("policies: [{}]\n{http}", policies.display()),
        ..AgentOptions::default()
    }
}

impl Mesh {
    /// Send `request` from frontend to payment's application (through both agents) and return
    /// everything that came back.
    fn send(&self, request: &str) -> String {
        let to = self.cluster.pod(self.payment).addr4(HTTP_PORT);
        let r = self
            .cluster
            .probe(self.frontend, to, Some(request))
            .expect("probe");
        assert!(r.ok, "frontend connects to payment: {r:?}");
        r.echo.unwrap_or_default()
    }

    /// The request lines the application has read.
    fn request_lines(&self) -> Vec<String> {
        self.app
            .request_heads()
            .iter()
            .map(|h| h.lines().next().unwrap_or_default().to_owned())
            .collect()
    }
}

fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: payment\r\n\r\n")
}

fn status(answer: &str) -> &str {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .unwrap_or("none")
}

#[test]
fn paths_that_normalise_to_a_denied_path_are_refused_and_never_reach_the_application() {
    let mesh = mesh(None);

    for target in [
        "/admin",
        "/x/../admin",
        "/./admin",
        "/%61dmin",
        "/admin/../admin",
        "/admin/%2e%2E/admin/users",
        "/a/b/../../admin/",
    ] {
        let answer = mesh.send(&get(target));
        assert_eq!(
            status(&answer),
            "403",
            "GET {target} is refused by the destination agent: {answer:?}"
        );
        assert!(answer.ends_with("RBAC: access denied\n"), "{answer:?}");
    }

    // An allowed request reaches the application with its path normalised, and its query
    // string exactly as sent (never normalised).
    let answer = mesh.send(&get("/a/./b/../c"));
    assert_eq!(status(&answer), "200", "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nGET /a/c"), "{answer:?}");
    let answer = mesh.send(&get("/%7Epay/%41/./x?next=/../admin&q=%61%2F"));
    assert_eq!(status(&answer), "200", "{answer:?}");
    assert!(
        answer.ends_with("\r\n\r\nGET /~pay/A/x?next=/../admin&q=%61%2F"),
        "{answer:?}"
    );

    // An invalid escape is a bad request, answered by the agent.
    for target in ["/%zz", "/admin%", "/%00"] {
        let answer = mesh.send(&get(target));
        assert_eq!(status(&answer), "400", "GET {target}: {answer:?}");
    }

    let lines = mesh.request_lines();
    assert_eq!(
        lines,
        [
            "GET /a/c HTTP/1.1",
            "GET /~pay/A/x?next=/../admin&q=%61%2F HTTP/1.1"
        ],
        "only the allowed requests reached the application, normalised"
    );
}

#[test]
fn the_host_is_one_host_header_or_the_authority_of_an_absolute_form_target() {
    let mesh = mesh(None);

    // Two Host headers: which one would the application use? Neither: 400.
    let answer = mesh.send("GET /ok HTTP/1.1\r\nHost: payment\r\nHost: internal.example\r\n\r\n");
    assert_eq!(status(&answer), "400", "duplicate Host: {answer:?}");

    // An absolute-form target names the host (RFC 9112 §3.2.2); its Host header is ignored.
    let answer = mesh.send("GET http://internal.example/ok HTTP/1.1\r\nHost: payment\r\n\r\n");
    assert_eq!(
        status(&answer),
        "403",
        "the authority is the host policy judges: {answer:?}"
    );
    // Allowed: the application receives the origin form, with the authority as its Host.
    let answer =
        mesh.send("GET http://payment:8080/a/../ok?x=1 HTTP/1.1\r\nHost: internal.example\r\n\r\n");
    assert_eq!(status(&answer), "200", "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nGET /ok?x=1"), "{answer:?}");

    let heads = mesh.app.request_heads();
    assert_eq!(
        heads.len(),
        1,
        "only the allowed request arrived: {heads:?}"
    );
    let head = heads[0].to_ascii_lowercase();
    assert!(head.contains("\r\nhost: payment:8080\r\n"), "{head:?}");
    assert!(!head.contains("internal.example"), "{head:?}");
}

#[test]
fn a_reload_changes_the_path_normalization_of_new_requests() {
    let mut mesh = mesh(None);

    // BASE (the default) keeps `//`, so `//admin` is not `/admin` (Istio's BASE does the same;
    // MERGE_SLASHES is the mitigation it documents for CVE-2021-31920).
    let answer = mesh.send(&get("//admin"));
    assert_eq!(status(&answer), "200", "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nGET //admin"), "{answer:?}");

    let n2 = mesh.n2;
    let yaml = mesh.cluster.config_yaml(
        n2,
        &options(&mesh.policies, Some("{ pathNormalization: MERGE_SLASHES }")),
    );
    let marks = mesh.cluster.marks(&[n2]);
    mesh.cluster
        .agent(n2)
        .write_config(&yaml)
        .expect("write config");
    mesh.cluster.wait_reloaded(&[n2], &marks).expect("reloaded");

    let answer = mesh.send(&get("//admin"));
    assert_eq!(status(&answer), "403", "{answer:?}");
    let answer = mesh.send(&get("//a//b"));
    assert_eq!(status(&answer), "200", "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nGET /a/b"), "{answer:?}");

    // A mode Istio does not have: the reload is refused, naming the field, and the last good
    // mode stays in force.
    let mark = mesh.cluster.agent(n2).mark();
    mesh.cluster
        .agent(n2)
        .write_config(&yaml.replace("MERGE_SLASHES", "MERGE"))
        .expect("write config");
    let line = mesh
        .cluster
        .agent(n2)
        // (The agent may also have read the file half-written, which fails for its own reason.)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("config reload failed") && l.contains("http.pathNormalization")
        })
        .expect("the failed reload is reported");
    assert!(
        line.contains("config.yaml:")
            && line.contains(": http.pathNormalization: unknown variant `MERGE`"),
        "{line}"
    );
    let answer = mesh.send(&get("//admin"));
    assert_eq!(status(&answer), "403", "{answer:?}");
}

#[test]
fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let mut mesh = mesh(Some("{ headerReadTimeout: 1s }"));
    let to = mesh.cluster.pod(mesh.payment).addr4(HTTP_PORT).to_string();
    let mark = mesh.cluster.agent(mesh.n2).mark();

    // Half a request head, and the connection left open: only the agent can end it. The
    // probe's own limit only bounds how long a failure takes to show.
    let out = mesh
        .cluster
        .probe_command(
            mesh.frontend,
            &[
                "connect",
                "--to",
                &to,
                "--send",
                "GET /slow HTTP/1.1\r\nHost: pay",
                "--keep-open",
                "--timeout-ms",
                "120000",
            ],
        )
        .expect("probe command")
        .output()
        .expect("run probe");
    let r: ProbeResult = serde_json::from_slice(&out.stdout).expect("probe output");
    assert!(r.ok, "{r:?}");
    assert!(
        r.error.is_none() || r.reset,
        "the agent closed the connection (not the probe's own limit): {r:?}"
    );
    assert!(
        !r.echo.as_deref().unwrap_or_default().contains("HTTP/1.1"),
        "nothing was answered: {r:?}"
    );

    let line = mesh
        .cluster
        .agent(mesh.n2)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("\"event\":\"connection closed\"") && l.contains("\"path\":\"http\"")
        })
        .expect("the destination agent logs the connection's end");
    assert!(
        line.contains("no complete request head within 1s"),
        "closed by the header read timeout: {line}"
    );
    assert!(mesh.app.request_heads().is_empty());
}

fn latch(args: &[&str]) -> (i32, String) {
    env::run_latch(args).expect("run latch")
}

#[test]
fn explain_judges_requests_as_the_enforcement_does() {
    let mut mesh = mesh(None);
    let config = mesh
        .cluster
        .agent(mesh.n2)
        .config_path()
        .display()
        .to_string();
    let socket = mesh.cluster.debug_socket(mesh.n2);
    let to = mesh.cluster.pod(mesh.payment).addr4(HTTP_PORT).to_string();
    let frontend = "spiffe://cluster.local/ns/prod/sa/frontend";

    for (path, host, allowed) in [
        ("/x/../admin", "payment", false),
        ("/./admin", "payment", false),
        ("/%61dmin", "payment", false),
        ("/admin/../admin", "payment", false),
        ("/a/./b/../c", "payment", true),
        ("//admin", "payment", true),
        ("/ok", "internal.example:8080", false),
    ] {
        let question = [
            "--from", frontend, "--to", &to, "--method", "GET", "--path", path, "--host", host,
        ];
        let mut offline = vec!["policy", "explain", "--config", &config];
        offline.extend_from_slice(&question);
        let (code, out) = latch(&offline);
        assert_eq!(code, if allowed { 0 } else { 3 }, "{path} {host}: {out}");
        let mut live = vec!["explain"];
        live.extend_from_slice(&question);
        let (ok, answer) = debug(&socket, &live).expect("latch debug explain");
        assert!(ok, "{answer}");
        assert_eq!(
            answer.lines().next(),
            out.lines().next(),
            "the running agent explains {path} as the offline explain does: {answer}"
        );
        let sent = mesh.send(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert_eq!(
            status(&sent),
            if allowed { "200" } else { "403" },
            "enforcement agrees with explain on {path} {host}: {sent:?}"
        );
    }
    let (_, out) = latch(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--from",
        frontend,
        "--to",
        &to,
        "--path",
        "/x/../admin",
    ]);
    assert!(
        out.contains("path: /admin (BASE normalisation of \"/x/../admin\")"),
        "{out}"
    );
    let (code, out) = latch(&[
        "policy", "explain", "--config", &config, "--from", frontend, "--to", &to, "--path", "/%zz",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("400 Bad Request"), "{out}");
}
