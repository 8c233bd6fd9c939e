//! `cargo xtask bench datapath`: connection rate and latency on one two-node topology, in one
//! run, in three phases: no agents (baseline), agents with a cached allow (kernel fast path on
//! both nodes), and through the agents (every connection redirected and carried over the pooled
//! mTLS tunnel: data-plane mode `tunnel`, nothing cached).
//! Prints a markdown table with ratios to the baseline and writes JSON under
//! `$LATCH_BENCH_OUT` (default `target/bench/`). Numbers, never pass/fail: thresholds live here,
//! not in tests.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use latch_tests::{AgentOptions, Cluster, PodId, PodSpec, env, netns};
use serde::Deserialize;

const PORT: u16 = 8080;

#[derive(Deserialize)]
struct Rate {
    count: usize,
    failures: usize,
    total_s: f64,
    latencies_us: Vec<u64>,
}

struct Phase {
    name: &'static str,
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    failures: usize,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run_rate(
    cluster: &Cluster,
    client: PodId,
    server: PodId,
    count: usize,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let pod = cluster.pod(client);
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.args([
        "rate",
        "--to",
        &cluster.pod(server).addr4(PORT).to_string(),
        "--count",
        &count.to_string(),
    ]);
    netns::enter(&mut cmd, &pod.netns(), Some(&pod.cgroup))?;
    let out = cmd.output().context("running latch-probe rate")?;
    if !out.status.success() {
        bail!(
            "latch-probe rate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r: Rate =
        serde_json::from_slice(&out.stdout).context("parsing latch-probe rate output")?;
    r.latencies_us.sort_unstable();
    Ok(Phase {
        name,
        rate: (r.count - r.failures) as f64 / r.total_s,
        p50_us: percentile(&r.latencies_us, 0.50),
        p99_us: percentile(&r.latencies_us, 0.99),
        failures: r.failures,
    })
}

fn datapath(count: usize) -> anyhow::Result<Vec<Phase>> {
    let mut cluster = Cluster::new()?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodSpec::mesh("client", "bench", "client"))?;
    let server = cluster.add_pod(n2, PodSpec::mesh("server", "bench", "server"))?;
    let _echo = cluster.echo_server(server, PORT)?;
    let warmup = count / 10;

    run_rate(&cluster, client, server, warmup, "warm-up")?;
    let baseline = run_rate(&cluster, client, server, count, "no agent (baseline)")?;

    // Fast path: agents on both nodes; the first connection crosses the tunnel, the rest go
    // straight through the kernel on both sides.
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, fast_options.clone())?;
    cluster.start_agent(n2, fast_options)?;
    run_rate(&cluster, client, server, warmup, "warm-up")?;
    let fast = run_rate(
        &cluster,
        client,
        server,
        count,
        "agents, cached allow (fast path)",
    )?;
    for node in [n1, n2] {
        cluster.agent(node).terminate()?;
        cluster.agent(node).uninstall()?;
    }

    // Through the agents: data-plane mode `tunnel` caches nothing, so every connection is
    // redirected and carried over the (pooled) mTLS tunnel.
    let tunnel_options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, tunnel_options.clone())?;
    cluster.start_agent(n2, tunnel_options)?;
    run_rate(&cluster, client, server, warmup, "warm-up")?;
    let redirected = run_rate(
        &cluster,
        client,
        server,
        count,
        "through the agents (mTLS tunnel)",
    )?;
    Ok(vec![baseline, fast, redirected])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("");
    let count = args
        .iter()
        .position(|a| a == "--count")
        .and_then(|i| args.get(i + 1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(5000);
    if what != "datapath" {
        bail!("unknown benchmark {what:?}; available: datapath [--count N]");
    }
    println!(
        "datapath benchmark: {count} connections per phase (one-byte request + echo each), client on node 1, server on node 2"
    );
    let phases = datapath(count)?;
    let base = &phases[0];
    println!("\n| phase | conn/s | ratio to baseline | p50 µs | p99 µs | failures |");
    println!("|---|---:|---:|---:|---:|---:|");
    for p in &phases {
        println!(
            "| {} | {:.0} | {:.3} | {} | {} | {} |",
            p.name,
            p.rate,
            p.rate / base.rate,
            p.p50_us,
            p.p99_us,
            p.failures
        );
    }
    let fast_ratio = phases[1].rate / base.rate;
    println!(
        "\nfast path keeps {:.1}% of the baseline connection rate (target: at least 97%)",
        fast_ratio * 100.0
    );
    let out_dir = std::env::var_os("LATCH_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json = serde_json::json!({
        "benchmark": "datapath",
        "connections_per_phase": count,
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name, "conn_per_s": p.rate, "ratio_to_baseline": p.rate / base.rate,
            "p50_us": p.p50_us, "p99_us": p.p99_us, "failures": p.failures,
        })).collect::<Vec<_>>(),
    });
    let path = out_dir.join("datapath.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
