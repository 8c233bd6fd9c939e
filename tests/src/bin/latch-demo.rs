//! `cargo xtask demo`: a two-node cluster in network namespaces with real agents and real kernel
//! programs. It makes a handful of connections and prints, for each, the path it took (read from
//! the kernel counters) and what the client saw; then it cleans everything up.

use std::net::SocketAddr;

use latch::datapath::KernelMaps;
use latch_common::Counter;
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, ProbeResult};

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
        })
        .collect();
    if words.is_empty() {
        "untouched".to_owned()
    } else {
        words.join(" + ")
    }
}

fn outcome(r: &ProbeResult, sent: &str) -> String {
    if r.ok && r.echo.as_deref() == Some(sent) {
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
        let nodes: Vec<NodeId> = self.cluster.nodes().map(|(id, _)| id).collect();
        let before: Vec<_> = nodes.iter().map(|n| counters(&self.cluster, *n)).collect();
        let sent = "hello";
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
        let target = self
            .cluster
            .nodes()
            .flat_map(|(_, n)| n.pods.clone())
            .find(|p| self.cluster.pod(*p).ips().contains(&to.ip()))
            .map(|p| self.name(p))
            .unwrap_or_default();
        self.rows.push(Row {
            from: self.name(from),
            to: format!("{target} {to}"),
            path: path.join("; "),
            result: outcome(&r, sent),
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

fn main() -> anyhow::Result<()> {
    println!("Latch demo: two nodes in network namespaces, real agents, real eBPF programs.");
    let mut cluster = Cluster::new()?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let frontend = cluster.add_pod(n1, PodSpec::mesh("frontend-1", "prod", "frontend"))?;
    let payment = cluster.add_pod(n2, PodSpec::mesh("payment-1", "prod", "payment"))?;
    let ledger = cluster.add_pod(n2, PodSpec::mesh("ledger-1", "prod", "ledger"))?;
    let outsider = cluster.add_pod(n2, PodSpec::external("outsider"))?;
    println!(
        "node 1 (10.244.0.1): frontend-1 {}",
        cluster.pod(frontend).ipv4
    );
    println!(
        "node 2 (10.244.0.2): payment-1 {}, ledger-1 {}, outsider {} (not in the mesh)",
        cluster.pod(payment).ipv4,
        cluster.pod(ledger).ipv4,
        cluster.pod(outsider).ipv4
    );
    for pod in [frontend, payment, ledger] {
        let p = cluster.pod(pod);
        println!(
            "  {:<11} {}",
            p.spec.name,
            p.spiffe_id(&cluster.trust_domain)
        );
    }
    println!("both agents: mTLS STRICT, SVIDs minted from a development CA");
    cluster.start_agent(n1, AgentOptions::strict())?;
    cluster.start_agent(n2, AgentOptions::strict())?;
    let _servers = [
        cluster.echo_server(payment, 8080)?,
        cluster.echo_server(ledger, 8080)?,
        cluster.echo_server(outsider, 8080)?,
        cluster.echo_server(frontend, 9090)?,
    ];
    let mut demo = Demo {
        cluster,
        rows: Vec::new(),
    };
    let pay4 = demo.cluster.pod(payment).addr4(8080);
    let pay6 = demo.cluster.pod(payment).addr6(8080);
    let ledger4 = demo.cluster.pod(ledger).addr4(8080);

    demo.note(
        "a pair's first connection crosses an mTLS tunnel between the agents; both cache the pair",
    );
    demo.connect(frontend, pay4)?;
    demo.note("repeats go straight through the kernel on both nodes (same identities, any address family)");
    demo.connect(frontend, pay4)?;
    demo.connect(frontend, pay6)?;
    demo.note("not in the mesh: untouched");
    demo.connect(frontend, demo.cluster.pod(outsider).addr4(8080))?;
    demo.note("plaintext from outside the mesh to STRICT pods: reset by the inbound check");
    demo.connect(outsider, demo.cluster.pod(frontend).addr4(9090))?;
    demo.connect(outsider, pay4)?;
    demo.note(
        "node 1's agent is killed (kill -9): cached pairs keep working, new ones fail closed",
    );
    demo.cluster.agent(n1).kill9();
    demo.connect(frontend, pay4)?;
    demo.connect(frontend, ledger4)?;
    demo.note("the agent restarts and adopts its pinned programs and cache");
    demo.cluster.agent(n1).restart()?;
    demo.connect(frontend, ledger4)?;
    demo.connect(frontend, ledger4)?;

    print_table(&demo.rows);
    println!("\nCleaning up the namespaces, cgroups and pins.");
    Ok(())
}
