//! `compare`: agent builds or settings side by side, for differences a single run cannot
//! resolve: as many clusters as variants, all set up at once, agents in data-plane mode `tunnel`,
//! and in every turn each cluster measured in turn (with the no-agent reference in the same
//! rotation): the pooled connection's latency, or with `--throughput` bulk streams, with the
//! agents' CPU time (`docs/benchmarks.md`). Clusters of one topology differ a little among
//! themselves, steadily, so no variant keeps a cluster: the turns come in as many stretches as
//! there are variants, and each stretch moves every variant on to the next cluster.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};
use latch_tests::AgentOptions;

use crate::{
    pair::Pair,
    procstat::cpu_during,
    reference::{Reference, Via},
    report,
    stats::{Tally, median, ratio_interval, ratio_text},
};

/// One agent build or setting under comparison.
#[derive(Clone)]
pub struct Variant {
    label: String,
    options: AgentOptions,
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;

    /// `LABEL=AGENT_BINARY[,busyPoll=DURATION][,busyPollAdaptive=BOOL][,workerThreads=N]`.
    fn from_str(spec: &str) -> anyhow::Result<Self> {
        let (label, rest) = spec
            .split_once('=')
            .with_context(|| format!("variant {spec:?}: expected LABEL=AGENT_BINARY"))?;
        let mut parts = rest.split(',');
        let bin = PathBuf::from(parts.next().unwrap_or_default());
        if !bin.is_file() {
            bail!("variant {label}: no agent binary at {}", bin.display());
        }
        let mut options = AgentOptions {
            dataplane_mode: "tunnel".into(),
            bin: Some(bin),
            ..AgentOptions::default()
        };
        for setting in parts {
            match setting.split_once('=') {
                Some(("busyPoll", value)) => options.busy_poll = Some(value.to_owned()),
                Some(("workerThreads", value)) => {
                    options.worker_threads = Some(value.parse().with_context(|| {
                        format!("variant {label}: workerThreads must be a number")
                    })?)
                }
                Some(("busyPollAdaptive", value)) => {
                    options.busy_poll_adaptive = Some(value.parse().with_context(|| {
                        format!("variant {label}: busyPollAdaptive must be true or false")
                    })?)
                }
                _ => {
                    bail!(
                        "variant {label}: unknown setting {setting:?} (known: busyPoll=DURATION, \
                         busyPollAdaptive=BOOL, workerThreads=N)"
                    )
                }
            }
        }
        Ok(Self {
            label: label.to_owned(),
            options,
        })
    }
}

/// What a variant's turns measured.
#[derive(Default)]
struct Measured {
    /// Pooled connections (latency mode).
    tally: Tally,
    /// Bytes per second of each turn (throughput mode), in the reference's order.
    rounds: Vec<f64>,
    /// CPU time the source and destination agents used during the variant's turns.
    cpu_ns: [u64; 2],
    /// Whole verdict-map reads made through the debug socket during its turns.
    debug_reads: usize,
}

/// `turns` rounded up to a whole number of stretches of `variants` variants: the turns each
/// variant is measured in.
fn in_whole_stretches(turns: usize, variants: usize) -> usize {
    turns.div_ceil(variants) * variants
}

/// Turns over clusters, one per variant: `turns` rounded up to a whole number of stretches, one
/// stretch per variant; in stretch `s` cluster `c` runs variant `(c + s) % k`, its agents
/// started afresh and `prepare`d. Each turn calls `reference` once, then `measure` for every
/// cluster, in an order that rotates from turn to turn, with the variant it runs and the
/// variant's tally so far, which gets the agents' CPU time of the call added. Returns each
/// variant's measurements.
fn in_rotation(
    specs: &[Variant],
    turns: usize,
    mut prepare: impl FnMut(&Pair) -> anyhow::Result<()>,
    mut reference: impl FnMut() -> anyhow::Result<()>,
    mut measure: impl FnMut(&Pair, &mut Measured) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Measured>> {
    let k = specs.len();
    let mut clusters = (0..k)
        .map(|_| Pair::new())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut measured: Vec<Measured> = (0..k).map(|_| Measured::default()).collect();
    let variant_on = |cluster: usize, stretch: usize| (cluster + stretch) % k;
    for stretch in 0..k {
        for (c, pair) in clusters.iter_mut().enumerate() {
            if stretch > 0 {
                pair.stop_agents()?;
            }
            pair.start_agents(&specs[variant_on(c, stretch)].options)?;
            prepare(pair)?;
        }
        for turn in 0..in_whole_stretches(turns, k) / k {
            reference()?;
            for i in 0..k {
                let c = (turn + i) % k;
                let pair = &clusters[c];
                let variant = &mut measured[variant_on(c, stretch)];
                let mut used = [0; 2];
                cpu_during(pair.agent_pids(), &mut used, || measure(pair, variant))?;
                for (sum, ns) in variant.cpu_ns.iter_mut().zip(used) {
                    *sum += ns;
                }
            }
        }
    }
    for pair in &mut clusters {
        pair.stop_agents()?;
    }
    Ok(measured)
}

/// Read the whole verdict map through the debug socket of `pair`'s source agent, over and over,
/// until `stop`; how many reads it made.
fn debug_reader(pair: &Pair, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    let socket = pair.cluster.debug_socket(pair.n1);
    std::thread::spawn(move || {
        let mut reads = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok((true, _)) = latch_tests::agent::debug(&socket, &["verdicts", "--json"]) {
                reads += 1;
            }
        }
        reads
    })
}

pub fn run(
    turns: usize,
    per_turn: usize,
    debug_reads: Option<usize>,
    specs: &[Variant],
    out_dir: &Path,
) -> anyhow::Result<()> {
    let k = specs.len();
    println!(
        "compare: pooled tunneled connections (1-byte request + echo), {} turns of {per_turn} \
         per variant, in {k} stretches in which each of {k} clusters runs each variant in turn, \
         with the no-agent reference in the rotation",
        in_whole_stretches(turns, k)
    );
    if let Some(n) = debug_reads {
        println!(
            "  while the source agent's {n}-verdict map is read whole through its debug socket, \
             over and over"
        );
    }
    let reference = Reference::new()?;
    reference.rate(Via::Direct, per_turn)?;
    let mut reference_tally = Tally::default();
    let measured = in_rotation(
        specs,
        turns,
        |pair| {
            pair.warm_up(per_turn)?;
            if let Some(n) = debug_reads {
                pair.fill_verdicts(pair.n1, 0, n)?;
            }
            Ok(())
        },
        || {
            reference_tally.add(reference.rate(Via::Direct, per_turn)?);
            Ok(())
        },
        |pair, variant| {
            let stop = Arc::new(AtomicBool::new(false));
            let reader = debug_reads.map(|_| debug_reader(pair, stop.clone()));
            let rate = pair.rate(per_turn);
            stop.store(true, Ordering::Relaxed);
            if let Some(reader) = reader {
                variant.debug_reads += reader.join().unwrap_or_default();
            }
            variant.tally.add(rate?);
            Ok(())
        },
    )?;
    let reference_p50 = reference_tally.percentile(0.5);
    println!(
        "\n| variant | p50 µs | p99 µs | added to no agents µs | source agent CPU µs | \
         destination agent CPU µs | debug reads | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| no agents (reference) | {reference_p50} | {} | 0 | | | | {} |",
        reference_tally.percentile(0.99),
        reference_tally.failures
    );
    let mut rows = Vec::new();
    for (variant, m) in specs.iter().zip(&measured) {
        let tally = &m.tally;
        let p50 = tally.percentile(0.5);
        let added = p50 as i64 - reference_p50 as i64;
        let [source_cpu, destination_cpu] = m
            .cpu_ns
            .map(|ns| ns as f64 / 1000.0 / tally.count.max(1) as f64);
        println!(
            "| {} | {p50} | {} | {added} | {source_cpu:.1} | {destination_cpu:.1} | {} | {} |",
            variant.label,
            tally.percentile(0.99),
            m.debug_reads,
            tally.failures
        );
        rows.push(serde_json::json!({
            "label": variant.label, "p50_us": p50, "added_p50_us": added,
            "p99_us": tally.percentile(0.99), "failures": tally.failures,
            "source_agent_cpu_us": source_cpu, "destination_agent_cpu_us": destination_cpu,
            "debug_reads": m.debug_reads,
        }));
    }
    println!(
        "\n(agent CPU: per connection, all of the agent's threads, from /proc/PID/task/*/schedstat; \
         with busy polling on it includes the polling)"
    );
    let json = serde_json::json!({
        "benchmark": "compare", "turns": in_whole_stretches(turns, k), "per_turn": per_turn,
        "debug_read_verdicts": debug_reads,
        "no_agents_p50_us": reference_p50, "variants": rows,
    });
    report::write_json(out_dir, "compare", &json)
}

/// `turns` turns of `streams` bulk streams of `mib` MiB each way through every variant and
/// through the no-agent reference, in rotation ([`in_rotation`]): each variant's median, its
/// turns' ratios to the reference's and to the first variant's (geometric mean, 95% interval),
/// and its agents' CPU per GiB moved.
pub fn run_throughput(
    turns: usize,
    streams: usize,
    mib: usize,
    specs: &[Variant],
    out_dir: &Path,
) -> anyhow::Result<()> {
    let k = specs.len();
    println!(
        "compare throughput: {} turns of {streams} stream(s) of {mib} MiB each way per variant, \
         in {k} stretches in which each of {k} clusters runs each variant in turn, with the \
         no-agent reference in the rotation",
        in_whole_stretches(turns, k)
    );
    let reference = Reference::new()?;
    reference.throughput(Via::Direct, streams, mib)?;
    let mut reference_rounds = Vec::new();
    let measured = in_rotation(
        specs,
        turns,
        |pair| pair.warm_up(100),
        || {
            reference_rounds.push(reference.throughput(Via::Direct, streams, mib)?);
            Ok(())
        },
        |pair, variant| {
            variant.rounds.push(pair.throughput(streams, mib)?);
            Ok(())
        },
    )?;
    let interval = |measured: &[f64], baseline: &[f64]| {
        ratio_text(measured, baseline, 3).unwrap_or_else(|| "(too few turns)".to_owned())
    };
    let mib_s = |rounds: &[f64]| median(rounds.to_vec()) / (1024.0 * 1024.0);
    println!(
        "\n| variant | MiB/s (median) | / no agents: turns' ratios (95% interval) | / {}: the same | \
         source agent CPU s per GiB | destination agent |",
        specs[0].label
    );
    println!("|---|---:|---|---|---:|---:|");
    println!(
        "| no agents (reference) | {:.0} | | | | |",
        mib_s(&reference_rounds)
    );
    let first = &measured[0].rounds;
    let gib_moved = (reference_rounds.len() * streams * mib * 2) as f64 / 1024.0;
    let mut rows = Vec::new();
    for (variant, m) in specs.iter().zip(&measured) {
        let [source_cpu, destination_cpu] = m.cpu_ns.map(|ns| ns as f64 / 1e9 / gib_moved);
        println!(
            "| {} | {:.0} | {} | {} | {source_cpu:.3} | {destination_cpu:.3} |",
            variant.label,
            mib_s(&m.rounds),
            interval(&m.rounds, &reference_rounds),
            interval(&m.rounds, first),
        );
        rows.push(serde_json::json!({
            "label": variant.label,
            "rounds_bytes_per_s": m.rounds,
            "over_no_agents_mean_and_95_interval": ratio_interval(&m.rounds, &reference_rounds),
            "over_first_mean_and_95_interval": ratio_interval(&m.rounds, first),
            "source_agent_cpu_s_per_gib": source_cpu,
            "destination_agent_cpu_s_per_gib": destination_cpu,
        }));
    }
    println!(
        "\n(agent CPU: all of the agent's threads, from /proc/PID/task/*/schedstat, per GiB \
         moved, both directions counted)"
    );
    let json = serde_json::json!({
        "benchmark": "compare-throughput", "turns": reference_rounds.len(), "streams": streams,
        "mib_each_way": mib, "no_agents_rounds_bytes_per_s": reference_rounds,
        "variants": rows,
    });
    report::write_json(out_dir, "compare-throughput", &json)
}
