//! `cargo xtask demo`: a two-node cluster in network namespaces with real agents, real kernel
//! programs and an embedded set of Istio policies. It makes a handful of connections and HTTP
//! requests and prints, for each, the path it took (read from the kernel counters) and what the
//! client saw; then it changes a policy and shows the cached verdict revoked; then it cleans
//! everything up.

use std::net::SocketAddr;

use latch::datapath::KernelMaps;
use latch_common::Counter;
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, ProbeResult, server::EchoServer};

struct Row {
    from: String,
    to: String,
    path: String,
    result: String,
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
        })
        .collect();
    if words.is_empty() {
        "untouched".to_owned()
    } else {
        words.join(" + ")
    }
}

/// The embedded policies: ledger admits only frontend (L4, cacheable); only frontend may
/// `POST /v1/pay` on payment (L7, decided per request, never cached).
const POLICIES: &str = r#"apiVersion: security.istio.io/v1
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
"#;

/// Written during the demo: ledger denies everything.
const LEDGER_DENY_ALL: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ledger-deny-all, namespace: prod }
spec:
  selector: { matchLabels: { app: ledger } }
  action: DENY
  rules: [{}]
"#;

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

struct Demo {
    cluster: Cluster,
    rows: Vec<Row>,
    /// The applications, by pod and port, to say where they saw each connection come from.
    servers: Vec<(PodId, u16, EchoServer)>,
}

impl Demo {
    fn name(&self, pod: PodId) -> String {
        let p = self.cluster.pod(pod);
        format!(
            "{} ({}/{})",
            p.spec.name, p.spec.namespace, p.spec.service_account
        )
    }

    fn connect(&mut self, from: PodId, to: SocketAddr) -> anyhow::Result<()> {
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
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n");
        self.send(from, to, &request, &format!(" {method} {path}"))
    }

    fn send(&mut self, from: PodId, to: SocketAddr, sent: &str, what: &str) -> anyhow::Result<()> {
        let nodes: Vec<NodeId> = self.cluster.nodes().map(|(id, _)| id).collect();
        let before: Vec<_> = nodes.iter().map(|n| counters(&self.cluster, *n)).collect();
        let target = self
            .cluster
            .nodes()
            .flat_map(|(_, n)| n.pods.clone())
            .find(|p| self.cluster.pod(*p).ips().contains(&to.ip()));
        let server = self
            .servers
            .iter()
            .find(|(pod, port, _)| Some(*pod) == target && *port == to.port());
        let seen = server.map_or(0, |(_, _, s)| s.accepted());
        let r = self.cluster.probe(from, to, Some(sent))?;
        let mut path = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let moved = path_taken(&before[i], &counters(&self.cluster, *node));
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
        self.rows.push(Row {
            from: self.name(from),
            to: format!(
                "{} {to}{what}",
                target.map(|p| self.name(p)).unwrap_or_default()
            ),
            path: path.join("; "),
            result,
        });
        Ok(())
    }

    fn note(&mut self, text: &str) {
        self.rows.push(Row {
            from: format!("-- {text}"),
            to: String::new(),
            path: String::new(),
            result: String::new(),
        });
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

/// Rewrite every agent's config for `options` and wait until each has applied it.
fn reconfigure(demo: &mut Demo, options: &AgentOptions) -> anyhow::Result<()> {
    let nodes: Vec<NodeId> = demo.cluster.nodes().map(|(id, _)| id).collect();
    let marks = demo.cluster.marks(&nodes);
    for node in &nodes {
        let yaml = demo.cluster.config_yaml(*node, options);
        demo.cluster.agent(*node).write_config(&yaml)?;
    }
    demo.cluster.wait_reloaded(&nodes, &marks)
}

/// Write `file` into the shared policy directory and wait until both agents applied it.
fn change_policy(
    demo: &mut Demo,
    write: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let nodes: Vec<NodeId> = demo.cluster.nodes().map(|(id, _)| id).collect();
    let marks = demo.cluster.marks(&nodes);
    let started = std::time::Instant::now();
    write()?;
    demo.cluster.wait_reloaded(&nodes, &marks)?;
    demo.note(&format!(
        "   (both agents applied it {:.0} ms after the file was written)",
        started.elapsed().as_secs_f64() * 1e3
    ));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("Latch demo: two nodes in network namespaces, real agents, real eBPF programs.");
    let mut cluster = Cluster::new()?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let frontend = cluster.add_pod(n1, PodSpec::mesh("frontend-1", "prod", "frontend"))?;
    let analytics = cluster.add_pod(n1, PodSpec::mesh("analytics-1", "prod", "analytics"))?;
    let payment = cluster.add_pod(n2, PodSpec::mesh("payment-1", "prod", "payment"))?;
    let ledger = cluster.add_pod(n2, PodSpec::mesh("ledger-1", "prod", "ledger"))?;
    let outsider = cluster.add_pod(n2, PodSpec::external("outsider"))?;
    println!(
        "node 1 (10.244.0.1): frontend-1 {}, analytics-1 {}",
        cluster.pod(frontend).ipv4,
        cluster.pod(analytics).ipv4
    );
    println!(
        "node 2 (10.244.0.2): payment-1 {} (HTTP API), ledger-1 {}, outsider {} (not in the mesh)",
        cluster.pod(payment).ipv4,
        cluster.pod(ledger).ipv4,
        cluster.pod(outsider).ipv4
    );
    for pod in [frontend, analytics, payment, ledger] {
        let p = cluster.pod(pod);
        println!(
            "  {:<11} {}",
            p.spec.name,
            p.spiffe_id(&cluster.trust_domain)
        );
    }
    let policies = cluster.dir().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("prod.yaml"), POLICIES)?;
    println!("policies (Istio AuthorizationPolicy, read unchanged):");
    println!("  prod/ledger-allow-frontend: ledger admits only frontend");
    println!("  prod/payment-api:           only frontend may POST /v1/pay on payment");
    println!("both agents: mTLS STRICT, SVIDs minted from a development CA");
    let options = AgentOptions {
        extra_yaml: format!("policies: [{}]\n", policies.display()),
        ..AgentOptions::strict()
    };
    cluster.start_agent(n1, options.clone())?;
    cluster.start_agent(n2, options.clone())?;
    let servers = vec![
        (payment, 8080, cluster.http_server(payment, 8080)?),
        (ledger, 8080, cluster.echo_server(ledger, 8080)?),
        (outsider, 8080, cluster.echo_server(outsider, 8080)?),
        (frontend, 9090, cluster.echo_server(frontend, 9090)?),
    ];
    let mut demo = Demo {
        cluster,
        rows: Vec::new(),
        servers,
    };
    let pay = demo.cluster.pod(payment).addr4(8080);
    let ledger4 = demo.cluster.pod(ledger).addr4(8080);
    let ledger6 = demo.cluster.pod(ledger).addr6(8080);

    demo.note("mTLS STRICT, as in Istio: every connection crosses an mTLS tunnel between the agents, nothing is cached");
    demo.connect(frontend, ledger4)?;
    demo.connect(frontend, ledger4)?;
    demo.note("the operator sets mtls.strictFastpath: true on both nodes (identity proven by mTLS once, bound to the source address after, not encrypted)");
    reconfigure(
        &mut demo,
        &AgentOptions {
            strict_fastpath: true,
            ..options
        },
    )?;
    demo.note(
        "a pair's first connection still crosses the mTLS tunnel; now both agents cache the pair",
    );
    demo.connect(frontend, ledger4)?;
    demo.note("repeats go straight through the kernel on both nodes (same identities, any address family), in clear; the application sees the same client address either way");
    demo.connect(frontend, ledger4)?;
    demo.connect(frontend, ledger6)?;
    demo.note("ledger admits only frontend: analytics is refused by the destination, then by its own kernel");
    demo.connect(analytics, ledger4)?;
    demo.connect(analytics, ledger4)?;
    demo.note("L7 policy on payment: every request decided at the destination, nothing cached");
    demo.http(frontend, pay, "POST", "/v1/pay")?;
    demo.http(frontend, pay, "GET", "/v1/pay")?;
    demo.http(analytics, pay, "POST", "/v1/pay")?;
    demo.note("not in the mesh: untouched");
    demo.connect(frontend, demo.cluster.pod(outsider).addr4(8080))?;
    demo.note("plaintext from outside the mesh to STRICT pods: reset by the inbound check");
    demo.connect(outsider, demo.cluster.pod(frontend).addr4(9090))?;
    demo.connect(outsider, ledger4)?;
    demo.note(
        "node 1's agent is killed (kill -9): cached pairs keep working, the rest fails closed",
    );
    demo.cluster.agent(n1).kill9();
    demo.connect(frontend, ledger4)?;
    demo.http(frontend, pay, "POST", "/v1/pay")?;
    demo.note("the agent restarts and adopts its pinned programs and cache");
    demo.cluster.agent(n1).restart()?;
    demo.http(frontend, pay, "POST", "/v1/pay")?;
    demo.connect(frontend, ledger4)?;
    demo.note("a DENY policy for ledger is dropped into the policy directory: the cached allow is revoked");
    change_policy(&mut demo, || {
        latch_tests::env::write_atomically(&policies.join("ledger-deny.yaml"), LEDGER_DENY_ALL)
            .map_err(std::io::Error::other)
    })?;
    demo.connect(frontend, ledger4)?;
    demo.note("and removed again: frontend may reach ledger again");
    change_policy(&mut demo, || {
        std::fs::remove_file(policies.join("ledger-deny.yaml"))
    })?;
    demo.connect(frontend, ledger4)?;
    demo.connect(frontend, ledger4)?;

    print_table(&demo.rows);
    println!("\nCleaning up the namespaces, cgroups and pins.");
    Ok(())
}
