//! The story both modes tell, and the table it prints: the pods, the embedded policies, the
//! connections and requests made, the path each took (read from the kernel counters), what the
//! client saw, the settings and policy changes and what they revoke. How the cluster, its pods
//! and its policies are made is the [`Mesh`]'s business.

use std::{net::SocketAddr, time::Instant};

use anyhow::Context as _;

use latch::datapath::KernelMaps;
use latch_common::Counter;
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, ProbeResult, jwks, server::EchoServer,
};

/// The embedded policies: ledger admits only frontend (L4, cacheable); only frontend may
/// `POST /v1/pay` on payment (L7, decided per request, never cached), and `POST /v1/refund` only
/// with a JWT of the demo's issuer whose `scope` claim holds `payments:refund`.
pub const POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ledger-allow-frontend, namespace: prod }
spec:
  selector: { matchLabels: { app: ledger } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/frontend"] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payment-api, namespace: prod }
spec:
  selector: { matchLabels: { app: payment } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/frontend"] } }]
    to: [{ operation: { methods: ["POST"], paths: ["/v1/pay"] } }]
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/frontend"], requestPrincipals: ["https://issuer.demo/*"] } }]
    to: [{ operation: { methods: ["POST"], paths: ["/v1/refund"] } }]
    when: [{ key: "request.auth.claims[scope]", values: ["payments:refund"] }]
"#;

/// The demo's issuer.
const ISSUER: &str = "https://issuer.demo";

/// The RequestAuthentication for payment: tokens of [`ISSUER`], checked with `jwks` (inline).
fn request_authentication(jwks: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{ name: payment-jwt, namespace: prod }}
spec:
  selector: {{ matchLabels: {{ app: payment }} }}
  jwtRules:
  - issuer: "{ISSUER}"
    jwks: '{jwks}'
"#
    )
}

/// The policies' tests, run with `latch policy test` before the agents start.
const POLICY_TESTS: &str = r#"apiVersion: test.latch.dev/v1
kind: PolicyTest
metadata: { name: prod }
spec:
  workloads:
  - { name: frontend, namespace: prod, serviceAccount: frontend, labels: { app: frontend }, ips: [10.244.1.2] }
  - { name: analytics, namespace: prod, serviceAccount: analytics, labels: { app: analytics }, ips: [10.244.1.3] }
  - { name: payment, namespace: prod, serviceAccount: payment, labels: { app: payment }, ips: [10.244.2.2] }
  - { name: ledger, namespace: prod, serviceAccount: ledger, labels: { app: ledger }, ips: [10.244.2.3] }
  cases:
  - { name: frontend reaches ledger, from: frontend, to: "ledger:8080", expect: ALLOW, decidedBy: prod/ledger-allow-frontend }
  - { name: analytics does not, from: analytics, to: "ledger:8080", expect: DENY }
  - { name: frontend may pay, from: frontend, to: "payment:8080", request: { method: POST, path: /v1/pay }, expect: ALLOW, rule: 0 }
  - { name: but not read payments, from: frontend, to: "payment:8080", request: { method: GET, path: /v1/pay }, expect: DENY }
  - { name: analytics may not pay, from: analytics, to: "payment:8080", request: { method: POST, path: /v1/pay }, expect: DENY }
  - name: a refund needs the scope
    from: frontend
    to: "payment:8080"
    request: { method: POST, path: /v1/refund, jwt: { iss: "https://issuer.demo", sub: alice, claims: { scope: [payments:read, payments:refund] } } }
    expect: ALLOW
    rule: 1
  - name: a token without it is not enough
    from: frontend
    to: "payment:8080"
    request: { method: POST, path: /v1/refund, jwt: { iss: "https://issuer.demo", sub: alice, claims: { scope: [payments:read] } } }
    expect: DENY
  - { name: nor is no token, from: frontend, to: "payment:8080", request: { method: POST, path: /v1/refund }, expect: DENY }
"#;

/// Put in force during the demo, then taken away: ledger denies everything.
pub const LEDGER_DENY_ALL: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ledger-deny-all, namespace: prod }
spec:
  selector: { matchLabels: { app: ledger } }
  action: DENY
  rules: [{}]
"#;

/// The two nodes every [`Mesh`] has.
pub const N1: NodeId = NodeId(0);
pub const N2: NodeId = NodeId(1);

/// How a mode tells of its changes, in the story's notes.
pub struct Words {
    /// What the agents read their pods and policies from (the opening lines).
    pub source: &'static str,
    /// Where the policies live, after "policies (Istio AuthorizationPolicy, read unchanged) ".
    pub policies: &'static str,
    /// How a policy is added: "a DENY policy for ledger is ...".
    pub added: &'static str,
    /// How it is taken away: "and ... again".
    pub removed: &'static str,
    /// What the agents' apply time is counted from: "... ms after ...".
    pub written: &'static str,
}

/// A way of making the demo's cluster: two nodes ([`N1`], [`N2`]), then its pods, policies
/// and agents as the story asks. Every change returns once made; the story waits for both
/// agents to apply it.
pub trait Mesh: Sized {
    const WORDS: Words;

    fn cluster(&self) -> &Cluster;

    fn cluster_mut(&mut self) -> &mut Cluster;

    fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId>;

    /// The policies of `yaml` (YAML documents), in force from the agents' start.
    fn install_policies(&mut self, yaml: &str) -> anyhow::Result<()>;

    /// Start both nodes' agents with `options`; returns once both are ready.
    fn start_agents(&mut self, options: &AgentOptions) -> anyhow::Result<()>;

    /// Rewrite both nodes' settings for `options`.
    fn write_settings(&mut self, options: &AgentOptions) -> anyhow::Result<()>;

    /// Add the policies of `yaml`.
    fn add_policy(&mut self, yaml: &str) -> anyhow::Result<()>;

    /// Take away the policies of `yaml` (added by [`Mesh::add_policy`]).
    fn remove_policy(&mut self, yaml: &str) -> anyhow::Result<()>;

    /// What only this mode shows, after the shared story.
    fn more(_demo: &mut Demo<Self>, _cast: &Cast) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The demo's pods.
#[derive(Clone, Copy)]
pub struct Cast {
    pub frontend: PodId,
    pub analytics: PodId,
    pub payment: PodId,
    pub ledger: PodId,
    pub outsider: PodId,
}

/// One line of the table: a connection or request, or a note (`to` empty).
struct Row {
    from: String,
    to: String,
    path: String,
    result: String,
}

/// The mesh being shown and what was seen so far.
pub struct Demo<M> {
    pub mesh: M,
    rows: Vec<Row>,
    /// The applications, by pod and port, to say where they saw each connection come from.
    servers: Vec<(PodId, u16, EchoServer)>,
    /// The key of the demo's JWT issuer.
    issuer: jwks::SigningKey,
}

/// Tell the story on `mesh` (two nodes, nothing else yet) and print its table.
pub fn tell<M: Mesh>(mut mesh: M) -> anyhow::Result<()> {
    println!("Latch demo: two nodes in network namespaces, real agents, real eBPF programs.");
    println!("{}", M::WORDS.source);
    let cast = Cast {
        frontend: mesh.add_pod(N1, PodSpec::mesh("frontend-1", "prod", "frontend"))?,
        analytics: mesh.add_pod(N1, PodSpec::mesh("analytics-1", "prod", "analytics"))?,
        payment: mesh.add_pod(N2, PodSpec::mesh("payment-1", "prod", "payment"))?,
        ledger: mesh.add_pod(N2, PodSpec::mesh("ledger-1", "prod", "ledger"))?,
        outsider: mesh.add_pod(N2, PodSpec::external("outsider"))?,
    };
    introduce(mesh.cluster(), &cast);
    let issuer = jwks::SigningKey::generate("demo-1")?;
    let policies = format!(
        "{POLICIES}---\n{}",
        request_authentication(&jwks::document(&[&issuer]))
    );
    mesh.install_policies(&policies)?;
    println!(
        "policies (Istio AuthorizationPolicy and RequestAuthentication, read unchanged) {}:",
        M::WORDS.policies
    );
    println!("  prod/ledger-allow-frontend: ledger admits only frontend");
    println!(
        "  prod/payment-api:           only frontend may POST /v1/pay on payment, and POST /v1/refund"
    );
    println!("                              only with a JWT whose scope holds payments:refund");
    println!(
        "  prod/payment-jwt:           payment's requests may carry JWTs of {ISSUER} (ES256, keys inline)"
    );
    policy_test(mesh.cluster(), &policies)?;
    println!("both agents: mTLS STRICT, SVIDs minted from a development CA");
    let options = AgentOptions::strict();
    mesh.start_agents(&options)?;
    let cluster = mesh.cluster();
    let servers = vec![
        (cast.payment, 8080, cluster.http_server(cast.payment, 8080)?),
        (cast.ledger, 8080, cluster.echo_server(cast.ledger, 8080)?),
        (
            cast.outsider,
            8080,
            cluster.echo_server(cast.outsider, 8080)?,
        ),
        (
            cast.frontend,
            9090,
            cluster.echo_server(cast.frontend, 9090)?,
        ),
    ];
    let mut demo = Demo {
        mesh,
        rows: Vec::new(),
        servers,
        issuer,
    };
    demo.shared_story(&cast, options)?;
    M::more(&mut demo, &cast)?;
    print_table(&demo.rows);
    println!("\nCleaning up the namespaces, cgroups and pins.");
    Ok(())
}

/// `latch policy test` on the policies and [`POLICY_TESTS`], its output shown; a failing test
/// stops the demo.
fn policy_test(cluster: &Cluster, policies: &str) -> anyhow::Result<()> {
    let dir = cluster.dir().join("policy-tests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("prod.yaml"), policies)?;
    std::fs::write(dir.join("prod-test.yaml"), POLICY_TESTS)?;
    let out = std::process::Command::new(latch_tests::env::latch_bin()?)
        .args(["policy", "test", "--coverage"])
        .arg(&dir)
        .output()
        .context("running latch policy test")?;
    println!("their tests, before anything runs: latch policy test --coverage");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("  {line}");
    }
    anyhow::ensure!(out.status.success(), "the policies' tests failed");
    Ok(())
}

fn introduce(cluster: &Cluster, cast: &Cast) {
    let pod = |id: PodId| cluster.pod(id);
    println!(
        "node 1 (10.244.0.1): frontend-1 {}, analytics-1 {}",
        pod(cast.frontend).ipv4,
        pod(cast.analytics).ipv4
    );
    println!(
        "node 2 (10.244.0.2): payment-1 {} (HTTP API), ledger-1 {}, outsider {} (not in the mesh)",
        pod(cast.payment).ipv4,
        pod(cast.ledger).ipv4,
        pod(cast.outsider).ipv4
    );
    for id in [cast.frontend, cast.analytics, cast.payment, cast.ledger] {
        let p = pod(id);
        println!(
            "  {:<11} {}",
            p.spec.name,
            p.spiffe_id(&cluster.trust_domain)
        );
    }
}

impl<M: Mesh> Demo<M> {
    /// Everything both modes show, from STRICT mTLS to a policy change and back.
    fn shared_story(&mut self, cast: &Cast, options: AgentOptions) -> anyhow::Result<()> {
        let Cast {
            frontend,
            analytics,
            payment,
            ledger,
            outsider,
        } = *cast;
        let cluster = self.mesh.cluster();
        let pay = cluster.pod(payment).addr4(8080);
        let ledger4 = cluster.pod(ledger).addr4(8080);
        let ledger6 = cluster.pod(ledger).addr6(8080);
        let outsider4 = cluster.pod(outsider).addr4(8080);
        let frontend9090 = cluster.pod(frontend).addr4(9090);

        self.note("mTLS STRICT, as in Istio: every connection crosses an mTLS tunnel between the agents, nothing is cached");
        self.connect(frontend, ledger4)?;
        self.connect(frontend, ledger4)?;
        self.note("the operator sets mtls.strictFastpath: true on both nodes (identity proven by mTLS once, bound to the source address after, not encrypted)");
        let fastpath = AgentOptions {
            strict_fastpath: true,
            ..options
        };
        self.apply(|mesh| mesh.write_settings(&fastpath))?;
        self.note(
            "a pair's first connection still crosses the mTLS tunnel; now both agents cache the pair",
        );
        self.connect(frontend, ledger4)?;
        self.note("repeats go straight through the kernel on both nodes (same identities, any address family), in clear; the application sees the same client address either way");
        self.connect(frontend, ledger4)?;
        self.connect(frontend, ledger6)?;
        self.note("ledger admits only frontend: analytics is refused by the destination, then by its own kernel");
        self.connect(analytics, ledger4)?;
        self.connect(analytics, ledger4)?;
        self.note("L7 policy on payment: every request decided at the destination, nothing cached");
        self.http(frontend, pay, "POST", "/v1/pay")?;
        self.http(frontend, pay, "GET", "/v1/pay")?;
        self.http(analytics, pay, "POST", "/v1/pay")?;
        self.note("JWT: a refund needs a token of the issuer with scope payments:refund (401: a token that does not verify)");
        let token = |scope: &[&str]| {
            self.issuer.sign(&serde_json::json!({
                "iss": ISSUER, "sub": "alice", "scope": scope,
                "exp": jwks::now() + 600,
            }))
        };
        let refund = token(&["payments:read", "payments:refund"])?;
        let read_only = token(&["payments:read"])?;
        let forged = jwks::SigningKey::generate("demo-1")?.sign(&serde_json::json!({
            "iss": ISSUER, "sub": "mallory", "scope": ["payments:refund"], "exp": jwks::now() + 600,
        }))?;
        for (token, what) in [
            (None, ""),
            (Some(&refund), ", token with payments:refund"),
            (Some(&read_only), ", token with payments:read only"),
            (Some(&forged), ", forged token (another key)"),
        ] {
            self.http_as(
                frontend,
                pay,
                "POST",
                "/v1/refund",
                token.map(String::as_str),
                what,
            )?;
        }
        self.note("not in the mesh: untouched");
        self.connect(frontend, outsider4)?;
        self.note("plaintext from outside the mesh to STRICT pods: reset by the inbound check");
        self.connect(outsider, frontend9090)?;
        self.connect(outsider, ledger4)?;
        self.note(
            "node 1's agent is killed (kill -9): cached pairs keep working, the rest fails closed",
        );
        self.mesh.cluster_mut().agent(N1).kill9();
        self.connect(frontend, ledger4)?;
        self.http(frontend, pay, "POST", "/v1/pay")?;
        self.note("the agent restarts and adopts its pinned programs and cache");
        self.mesh.cluster_mut().agent(N1).restart()?;
        self.http(frontend, pay, "POST", "/v1/pay")?;
        self.connect(frontend, ledger4)?;
        self.note(&format!(
            "a DENY policy for ledger is {}: the cached allow is revoked",
            M::WORDS.added
        ));
        self.timed(|mesh| mesh.add_policy(LEDGER_DENY_ALL))?;
        self.connect(frontend, ledger4)?;
        self.note(&format!(
            "and {} again: frontend may reach ledger again",
            M::WORDS.removed
        ));
        self.timed(|mesh| mesh.remove_policy(LEDGER_DENY_ALL))?;
        self.connect(frontend, ledger4)?;
        self.connect(frontend, ledger4)?;
        Ok(())
    }

    /// Make a change with `change` and wait until both agents applied it (logged a reload).
    pub fn apply(
        &mut self,
        change: impl FnOnce(&mut M) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let nodes = [N1, N2];
        let marks = self.mesh.cluster_mut().marks(&nodes);
        change(&mut self.mesh)?;
        self.mesh.cluster_mut().wait_reloaded(&nodes, &marks)
    }

    /// [`Demo::apply`], and a note of how long the agents took.
    pub fn timed(
        &mut self,
        change: impl FnOnce(&mut M) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut started = Instant::now();
        self.apply(|mesh| {
            let made = change(mesh);
            started = Instant::now();
            made
        })?;
        self.note(&format!(
            "   (both agents applied it {:.0} ms after {})",
            started.elapsed().as_secs_f64() * 1e3,
            M::WORDS.written
        ));
        Ok(())
    }

    fn name(&self, pod: PodId) -> String {
        let p = self.mesh.cluster().pod(pod);
        format!(
            "{} ({}/{})",
            p.spec.name, p.spec.namespace, p.spec.service_account
        )
    }

    pub fn connect(&mut self, from: PodId, to: SocketAddr) -> anyhow::Result<()> {
        self.send(from, to, "hello", "")
    }

    /// One HTTP/1.1 request.
    fn http(
        &mut self,
        from: PodId,
        to: SocketAddr,
        method: &str,
        path: &str,
    ) -> anyhow::Result<()> {
        self.http_as(from, to, method, path, None, "")
    }

    /// One HTTP/1.1 request, with `token` as its bearer token; `what` says which token.
    fn http_as(
        &mut self,
        from: PodId,
        to: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        what: &str,
    ) -> anyhow::Result<()> {
        let authorization = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: payment\r\n{authorization}Content-Length: 0\r\n\r\n"
        );
        self.send(from, to, &request, &format!(" {method} {path}{what}"))
    }

    fn send(&mut self, from: PodId, to: SocketAddr, sent: &str, what: &str) -> anyhow::Result<()> {
        let cluster = self.mesh.cluster();
        let nodes: Vec<NodeId> = cluster.nodes().map(|(id, _)| id).collect();
        let before: Vec<_> = nodes.iter().map(|n| counters(cluster, *n)).collect();
        let target = cluster
            .nodes()
            .flat_map(|(_, n)| n.pods.clone())
            .find(|p| cluster.pod(*p).ips().contains(&to.ip()));
        let server = self
            .servers
            .iter()
            .find(|(pod, port, _)| Some(*pod) == target && *port == to.port());
        let seen = server.map_or(0, |(_, _, s)| s.accepted());
        let r = cluster.probe(from, to, Some(sent))?;
        let mut path = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let moved = path_taken(&before[i], &counters(cluster, *node));
            if moved != "untouched" {
                path.push(format!("node {}: {moved}", node.0 + 1));
            }
        }
        if path.is_empty() {
            path.push("untouched".to_owned());
        }
        let mut result = outcome(&r, sent);
        if let Some((_, _, server)) = server
            && server.accepted() > seen
            && let Some(source) = server.peers().last()
        {
            result.push_str(&format!(", app saw {}", source.ip()));
        }
        let row = Row {
            from: self.name(from),
            to: format!(
                "{} {to}{what}",
                target.map(|p| self.name(p)).unwrap_or_default()
            ),
            path: path.join("; "),
            result,
        };
        self.rows.push(row);
        Ok(())
    }

    pub fn note(&mut self, text: &str) {
        self.rows.push(Row {
            from: format!("-- {text}"),
            to: String::new(),
            path: String::new(),
            result: String::new(),
        });
    }
}

fn counters(cluster: &Cluster, node: NodeId) -> Vec<(Counter, u64)> {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir)
        .and_then(|m| m.counters())
        .unwrap_or_default()
}

/// Which counters moved on `node` between two readings, in words.
fn path_taken(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> String {
    let moved: Vec<Counter> = after
        .iter()
        .filter(|(c, v)| before.iter().find(|(b, _)| b == c).map(|(_, bv)| bv) != Some(v))
        .map(|(c, _)| *c)
        .collect();
    let words: Vec<&str> = moved
        .iter()
        .map(|c| match c {
            Counter::FastpathAllowed => "kernel fast path (cached allow)",
            Counter::Redirected => "redirected -> mTLS (HBONE) tunnel",
            Counter::CachedDeny => "cached deny",
            Counter::InboundAdmitted => "admitted by cached inbound verdict",
            Counter::InboundSteered => "steered to the agent",
            Counter::InboundRejected => "reset (no agent)",
            Counter::SpoofDropped => "dropped by anti-spoofing",
            Counter::FastpathAuditDropped => "fast-path audit event dropped (ring buffer full)",
        })
        .collect();
    if words.is_empty() {
        "untouched".to_owned()
    } else {
        words.join(" + ")
    }
}

fn outcome(r: &ProbeResult, sent: &str) -> String {
    let answer = r.echo.as_deref().unwrap_or_default();
    if let Some(status) = answer.strip_prefix("HTTP/1.1 ") {
        let status = status.lines().next().unwrap_or_default();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        return format!("HTTP {status}: {body:?} ({:.1} ms)", r.elapsed_ms);
    }
    if r.eperm() {
        "REFUSED at connect(): EPERM".to_owned()
    } else if r.ok && r.echo.as_deref() == Some(sent) {
        format!(
            "OK ({:.1} ms), peer {}",
            r.elapsed_ms,
            r.peer.as_deref().unwrap_or("?")
        )
    } else if r.reset {
        "REFUSED: connection reset".to_owned()
    } else {
        format!("REFUSED: {}", r.error.as_deref().unwrap_or("no answer"))
    }
}

fn print_table(rows: &[Row]) {
    let w = |f: fn(&Row) -> &str| {
        rows.iter()
            .filter(|r| !r.to.is_empty())
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
    };
    let (wf, wt, wp) = (
        w(|r| &r.from).max(4),
        w(|r| &r.to).max(2),
        w(|r| &r.path).max(4),
    );
    println!("\n{:<wf$}  {:<wt$}  {:<wp$}  result", "from", "to", "path");
    println!("{}", "-".repeat(wf + wt + wp + 44));
    for r in rows {
        if r.to.is_empty() {
            println!("{}", r.from);
        } else {
            println!(
                "{:<wf$}  {:<wt$}  {:<wp$}  {}",
                r.from, r.to, r.path, r.result
            );
        }
    }
}

/// The YAML documents of `yaml` as JSON values (Kubernetes objects).
pub fn documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).context("reading a YAML document"))
        .collect()
}

/// An object's `metadata.namespace` and `metadata.name`.
pub fn namespace_and_name(object: &serde_json::Value) -> anyhow::Result<(&str, &str)> {
    let field = |f: &str| {
        object["metadata"][f]
            .as_str()
            .with_context(|| format!("an object without metadata.{f}"))
    };
    Ok((field("namespace")?, field("name")?))
}
