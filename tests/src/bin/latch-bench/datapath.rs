//! `datapath`: connection rate and latency on one two-node topology in three phases: no agents
//! (baseline, and the measured cluster against the reference with no agents on either: A/A),
//! agents with a cached allow (kernel fast path on both nodes; with the
//! anti-spoofing check's own cost per packet, [`crate::antispoof`]), and every connection carried
//! over the pooled mTLS tunnel (data-plane mode `tunnel`, nothing cached). Each phase is taken in
//! turns with the no-agent [`Reference`]. Then the fast path again with the verdict map filled
//! to [`CACHE_SIZES`] entries on both nodes, with the kernel's own run times of the programs on
//! the way (`BPF_ENABLE_STATS`): the verdict lookup must cost the same with a million entries as
//! with ten.

use std::path::Path;

use latch::datapath::run_stats::{RunStats, Runs};
use latch_common::program_names::{CONNECT4, INBOUND, SOCK_OPS};
use latch_tests::AgentOptions;

use crate::{
    antispoof::{self, PacketCosts},
    pair::{PORT, Pair},
    probe,
    reference::{Reference, TURN, Via, paired},
    report,
    stats::{Tally, median, spread},
    targets,
};

/// The fast path's phase, by name (in the JSON too).
pub const FAST_PATH_PHASE: &str = "agents, cached allow (fast path)";

/// Verdict-map sizes (entries per node) the fast path is measured at.
const CACHE_SIZES: [usize; 2] = [10, 1_000_000];

/// The programs a fast-path connection runs whose cost could depend on the verdict map's size:
/// the client's `connect4` and the server's inbound check look verdicts up; `sock_ops` is the
/// rest of the fast path's per-connection work.
const PROGRAMS: [&str; 3] = [CONNECT4, INBOUND, SOCK_OPS];

/// The fast path with the verdict map filled to `entries` on both nodes.
struct AtScale {
    entries: usize,
    phase: Phase,
    reference_rate: f64,
    /// The programs' runs while it was measured.
    runs: Runs,
}

/// One row of the table.
struct Phase {
    name: &'static str,
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    failures: usize,
    /// Connections measured.
    count: usize,
}

impl Phase {
    fn of(name: &'static str, tally: &Tally) -> Self {
        Self {
            name,
            rate: tally.rate(),
            p50_us: tally.percentile(0.5),
            p99_us: tally.percentile(0.99),
            failures: tally.failures,
            count: tally.count,
        }
    }
}

/// One round of every phase.
struct Round {
    /// Each phase with the no-agent reference's rate over the same turns.
    phases: Vec<(Phase, f64)>,
    antispoof: PacketCosts,
    scale: Vec<AtScale>,
}

pub fn run(count: usize, rounds: usize, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "datapath benchmark: {count} connections per phase (one-byte request + echo each), \
         {rounds} rounds, client on node 1, server on node 2"
    );
    let mut all = Vec::new();
    for n in 1..=rounds.max(1) {
        let round = measure(count)?;
        let (fast, fast_reference) = &round.phases[1];
        println!(
            "  round {n}: fast path {:.3} of no agents, p50 {} µs",
            fast.rate / fast_reference,
            fast.p50_us
        );
        all.push(round);
    }
    print(&all);
    let json = serde_json::json!({
        "benchmark": "datapath",
        "connections_per_phase": count,
        "rounds": all.iter().map(round_json).collect::<Vec<_>>(),
    });
    report::write_json(out_dir, "datapath", &json)
}

fn print(rounds: &[Round]) {
    let n = rounds.len();
    // Figure `f` of phase `i` over the rounds, as `median (min–max)`.
    let phase = |i: usize, digits: usize, f: &dyn Fn(&(Phase, f64)) -> f64| {
        spread(rounds.iter().map(|r| f(&r.phases[i])).collect(), digits)
    };
    println!(
        "\n| phase | conn/s | ratio to no agents over the same turns | p50 µs | p99 µs | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (p, _)) in rounds[0].phases.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            p.name,
            phase(i, 0, &|(p, _)| p.rate),
            phase(i, 3, &|(p, reference)| p.rate / reference),
            phase(i, 0, &|(p, _)| p.p50_us as f64),
            phase(i, 0, &|(p, _)| p.p99_us as f64),
            rounds.iter().map(|r| r.phases[i].0.failures).sum::<usize>(),
        );
    }
    println!(
        "\n(median of {n} rounds, lowest and highest in brackets; each phase taken in turns of \
         {TURN} connections with a second cluster of the same topology and no agents)"
    );
    let fast = median(
        rounds
            .iter()
            .map(|r| r.phases[1].0.rate / r.phases[1].1)
            .collect(),
    );
    println!(
        "\nfast path keeps {:.1}% of the connection rate with no agents (median; target: at least {:.0}%)",
        fast * 100.0,
        targets::FAST_PATH_RATE * 100.0
    );

    println!(
        "\n| fast path, cached verdicts per node | ratio to no agents, same turns | p50 µs | {CONNECT4} ns per run | {INBOUND} ns per run | {SOCK_OPS} ns per run | {SOCK_OPS} runs per connection |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (i, at) in rounds[0].scale.iter().enumerate() {
        let scale = |digits: usize, f: &dyn Fn(&AtScale) -> f64| {
            spread(rounds.iter().map(|r| f(&r.scale[i])).collect(), digits)
        };
        let ns = |name: &'static str| {
            scale(0, &move |s: &AtScale| {
                s.runs.get(name).ns_per_run().unwrap_or(f64::NAN)
            })
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            at.entries,
            scale(3, &|s| s.phase.rate / s.reference_rate),
            scale(0, &|s| s.phase.p50_us as f64),
            ns(CONNECT4),
            ns(INBOUND),
            ns(SOCK_OPS),
            scale(1, &|s| s.runs.get(SOCK_OPS).count as f64
                / s.phase.count.max(1) as f64),
        );
    }
    println!(
        "\n(program run times from the kernel's own accounting, BPF_ENABLE_STATS, summed over both \
         nodes; it adds two clock reads to every run and counts the interrupts a run is preempted by)"
    );
    if !rounds[0].antispoof.is_empty()
        && rounds
            .iter()
            .all(|r| r.antispoof.len() == rounds[0].antispoof.len())
    {
        println!("\n| anti-spoofing check, per packet (BPF_PROG_TEST_RUN, 1,000,000 runs) | ns |");
        println!("|---|---:|");
        for (i, (label, _)) in rounds[0].antispoof.iter().enumerate() {
            let ns = spread(
                rounds.iter().map(|r| f64::from(r.antispoof[i].1)).collect(),
                0,
            );
            println!("| {label} | {ns} |");
        }
    }
}

fn round_json(r: &Round) -> serde_json::Value {
    serde_json::json!({
        "antispoof_ns_per_packet": r.antispoof.iter().map(|(label, ns)| serde_json::json!({
            "packet": label, "ns": ns,
        })).collect::<Vec<_>>(),
        "fast_path_at_scale": r.scale.iter().map(|s| serde_json::json!({
            "cached_verdicts_per_node": s.entries,
            "conn_per_s": s.phase.rate,
            "ratio_to_no_agents": s.phase.rate / s.reference_rate,
            "p50_us": s.phase.p50_us,
            "programs": PROGRAMS.iter().map(|name| serde_json::json!({
                "program": name,
                "runs": s.runs.get(name).count,
                "ns_per_run": s.runs.get(name).ns_per_run(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "phases": r.phases.iter().map(|(p, reference_rate)| serde_json::json!({
            "name": p.name, "conn_per_s": p.rate,
            "no_agents_same_turns_conn_per_s": reference_rate,
            "ratio_to_no_agents": p.rate / reference_rate,
            "p50_us": p.p50_us, "p99_us": p.p99_us, "failures": p.failures,
        })).collect::<Vec<_>>(),
    })
}

/// The datapath phases, each with the no-agent reference's connection rate over the same turns;
/// the first is the reference itself over all of them.
fn measure(count: usize) -> anyhow::Result<Round> {
    let reference = Reference::new()?;
    let mut pair = Pair::new()?;
    let warmup = count / 10;
    let mut all_reference = Tally::default();

    pair.warm_up(warmup)?;
    reference.rate(Via::Direct, warmup)?;

    // The measured cluster with no agents, in turns with the reference (A/A): what the two
    // clusters differ by themselves, to read the phases' ratios against. To a server port of its
    // own, so that these connections, waiting in TIME_WAIT, leave the client's search for a free
    // local port to the fast path's port as it was.
    let (bare, bare_reference) = {
        let port = PORT + 1 + CACHE_SIZES.len() as u16;
        let _echo = pair.cluster.pod_sink_server(pair.server, port)?;
        let to = pair.cluster.pod(pair.server).addr4(port).to_string();
        paired(&reference, count, |n| {
            probe::rate(&pair.cluster, pair.client, &to, n)
        })?
    };

    // Fast path: agents on both nodes; the first connection crosses the tunnel, the rest go
    // straight through the kernel on both sides.
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    let (fast, fast_reference, antispoof, scale) = pair.phase(&fast_options, warmup, |pair| {
        let (fast, fast_reference) = paired(&reference, count, |n| pair.rate(n))?;
        // An agent without the check (an older build, through LATCH_BIN) has no per-packet cost.
        let antispoof = antispoof::cost(pair).unwrap_or_else(|e| {
            println!("no anti-spoofing cost measured: {e:#}");
            Vec::new()
        });
        let scale = at_scale(pair, &reference, count)?;
        Ok((fast, fast_reference, antispoof, scale))
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
    for tally in [&bare_reference, &fast_reference, &redirected_reference] {
        all_reference.merge(tally);
    }
    let phases = vec![
        (
            Phase::of("no agents (all turns)", &all_reference),
            all_reference.rate(),
        ),
        (Phase::of(FAST_PATH_PHASE, &fast), fast_reference.rate()),
        (
            Phase::of("through the agents (mTLS tunnel)", &redirected),
            redirected_reference.rate(),
        ),
        (
            Phase::of("no agents on either cluster (A/A)", &bare),
            bare_reference.rate(),
        ),
    ];
    Ok(Round {
        phases,
        antispoof,
        scale,
    })
}

/// The fast path with both nodes' verdict maps filled to each of [`CACHE_SIZES`] in turn (the
/// pair's own verdicts besides), each taken in turns with the reference, with the programs' run
/// times.
fn at_scale(pair: &Pair, reference: &Reference, count: usize) -> anyhow::Result<Vec<AtScale>> {
    let stats = RunStats::enable()?;
    let mut filled = 0;
    let mut out = Vec::new();
    for (i, entries) in CACHE_SIZES.into_iter().enumerate() {
        for node in [pair.n1, pair.n2] {
            pair.fill_verdicts(node, filled, entries - filled)?;
        }
        filled = entries;
        // A server port of its own for each size: the client's earlier connections to the
        // pair's port wait in TIME_WAIT, and finding a free local port among thousands of them
        // would be what this measures.
        let port = PORT + 1 + i as u16;
        let _echo = pair.cluster.pod_sink_server(pair.server, port)?;
        let to = pair.cluster.pod(pair.server).addr4(port).to_string();
        let rate = |n| probe::rate(&pair.cluster, pair.client, &to, n);
        rate(count / 10)?;
        let before = stats.read(&PROGRAMS)?;
        let (fast, fast_reference) = paired(reference, count, rate)?;
        let runs = stats.read(&PROGRAMS)?.since(&before);
        out.push(AtScale {
            entries,
            phase: Phase::of("fast path", &fast),
            reference_rate: fast_reference.rate(),
            runs,
        });
    }
    Ok(out)
}
