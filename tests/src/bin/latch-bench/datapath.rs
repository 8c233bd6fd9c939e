//! `datapath`: connection rate and latency on one two-node topology in three phases: no agents
//! (baseline), agents with a cached allow (kernel fast path on both nodes; with the
//! anti-spoofing check's own cost per packet, [`crate::antispoof`]), and every connection carried
//! over the pooled mTLS tunnel (data-plane mode `tunnel`, nothing cached). Each phase is taken in
//! turns with the no-agent [`Reference`].

use std::path::Path;

use latch_tests::AgentOptions;

use crate::{
    antispoof::{self, PacketCosts},
    pair::Pair,
    reference::{Reference, TURN, Via, paired},
    report,
    stats::Tally,
};

/// One row of the table.
struct Phase {
    name: &'static str,
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    failures: usize,
}

impl Phase {
    fn of(name: &'static str, tally: &Tally) -> Self {
        Self {
            name,
            rate: tally.rate(),
            p50_us: tally.percentile(0.5),
            p99_us: tally.percentile(0.99),
            failures: tally.failures,
        }
    }
}

pub fn run(count: usize, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "datapath benchmark: {count} connections per phase (one-byte request + echo each), client on node 1, server on node 2"
    );
    let (phases, antispoof) = measure(count)?;
    println!(
        "\n| phase | conn/s | no agents, same turns, conn/s | ratio | p50 µs | p99 µs | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (p, reference_rate) in &phases {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {} | {} | {} |",
            p.name,
            p.rate,
            reference_rate,
            p.rate / reference_rate,
            p.p50_us,
            p.p99_us,
            p.failures
        );
    }
    println!(
        "\n(each phase taken in turns of {TURN} connections with a second cluster of the same \
         topology and no agents)"
    );
    let (fast, fast_reference) = &phases[1];
    println!(
        "\nfast path keeps {:.1}% of the connection rate with no agents (target: at least 97%)",
        fast.rate / fast_reference * 100.0
    );
    if !antispoof.is_empty() {
        println!("\n| anti-spoofing check, per packet (BPF_PROG_TEST_RUN, 1,000,000 runs) | ns |");
        println!("|---|---:|");
        for (label, ns) in &antispoof {
            println!("| {label} | {ns} |");
        }
    }
    let json = serde_json::json!({
        "benchmark": "datapath",
        "connections_per_phase": count,
        "antispoof_ns_per_packet": antispoof.iter().map(|(label, ns)| serde_json::json!({
            "packet": label, "ns": ns,
        })).collect::<Vec<_>>(),
        "phases": phases.iter().map(|(p, reference_rate)| serde_json::json!({
            "name": p.name, "conn_per_s": p.rate,
            "no_agents_same_turns_conn_per_s": reference_rate,
            "ratio_to_no_agents": p.rate / reference_rate,
            "p50_us": p.p50_us, "p99_us": p.p99_us, "failures": p.failures,
        })).collect::<Vec<_>>(),
    });
    report::write_json(out_dir, "datapath", &json)
}

/// The datapath phases, each with the no-agent reference's connection rate over the same turns;
/// the first is the reference itself over all of them.
fn measure(count: usize) -> anyhow::Result<(Vec<(Phase, f64)>, PacketCosts)> {
    let reference = Reference::new()?;
    let mut pair = Pair::new()?;
    let warmup = count / 10;
    let mut all_reference = Tally::default();

    pair.warm_up(warmup)?;
    reference.rate(Via::Direct, warmup)?;

    // Fast path: agents on both nodes; the first connection crosses the tunnel, the rest go
    // straight through the kernel on both sides.
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    let (fast, fast_reference, antispoof) = pair.phase(&fast_options, warmup, |pair| {
        let (fast, fast_reference) = paired(&reference, count, |n| pair.rate(n))?;
        // An agent without the check (an older build, through LATCH_BIN) has no per-packet cost.
        let antispoof = antispoof::cost(pair).unwrap_or_else(|e| {
            println!("no anti-spoofing cost measured: {e:#}");
            Vec::new()
        });
        Ok((fast, fast_reference, antispoof))
    })?;

    // Through the agents: data-plane mode `tunnel` caches nothing, so every connection is
    // redirected and carried over the (pooled) mTLS tunnel.
    let tunnel_options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    let (redirected, redirected_reference) = pair.phase(&tunnel_options, warmup, |pair| {
        paired(&reference, count, |n| pair.rate(n))
    })?;
    for tally in [&fast_reference, &redirected_reference] {
        all_reference.merge(tally);
    }
    let phases = vec![
        (
            Phase::of("no agents (all turns)", &all_reference),
            all_reference.rate(),
        ),
        (
            Phase::of("agents, cached allow (fast path)", &fast),
            fast_reference.rate(),
        ),
        (
            Phase::of("through the agents (mTLS tunnel)", &redirected),
            redirected_reference.rate(),
        ),
    ];
    Ok((phases, antispoof))
}
