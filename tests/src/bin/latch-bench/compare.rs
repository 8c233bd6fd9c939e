//! `compare`: agent builds or settings side by side, for differences a single run cannot
//! resolve: each variant's agents run a cluster of their own in data-plane mode `tunnel`, all set
//! up at once, and the pooled connection's latency is taken from each in turn (with the no-agent
//! reference in the same rotation), with the agents' CPU time (`docs/benchmarks.md`).

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
    procstat::cpu_ns,
    reference::{Reference, Via},
    report,
    stats::Tally,
};

/// One agent build or setting under comparison.
#[derive(Clone)]
pub struct Variant {
    label: String,
    options: AgentOptions,
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;

    /// `LABEL=AGENT_BINARY[,busyPoll=DURATION][,busyPollAdaptive=BOOL]`.
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
                Some(("busyPollAdaptive", value)) => {
                    options.busy_poll_adaptive = Some(value.parse().with_context(|| {
                        format!("variant {label}: busyPollAdaptive must be true or false")
                    })?)
                }
                _ => {
                    bail!(
                        "variant {label}: unknown setting {setting:?} (known: busyPoll=DURATION, \
                         busyPollAdaptive=BOOL)"
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

/// A variant's cluster in a comparison, with what its turns measured.
struct Compared {
    pair: Pair,
    /// The source and destination agents' process IDs.
    agents: [u32; 2],
    tally: Tally,
    /// CPU time the source and destination agents used during the variant's turns.
    cpu_ns: [u64; 2],
    /// Whole verdict-map reads made through the debug socket during its turns.
    debug_reads: usize,
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
    println!(
        "compare: pooled tunneled connections (1-byte request + echo), {turns} turns of \
         {per_turn} per variant, each variant in a cluster of its own, with the no-agent \
         reference in the rotation"
    );
    if let Some(n) = debug_reads {
        println!(
            "  while the source agent's {n}-verdict map is read whole through its debug socket, \
             over and over"
        );
    }
    let reference = Reference::new()?;
    let mut clusters = Vec::new();
    for variant in specs {
        let mut pair = Pair::new()?;
        pair.start_agents(&variant.options)?;
        pair.warm_up(per_turn)?;
        if let Some(n) = debug_reads {
            pair.fill_verdicts(pair.n1, 0, n)?;
        }
        clusters.push(Compared {
            agents: pair.agent_pids(),
            pair,
            tally: Tally::default(),
            cpu_ns: [0; 2],
            debug_reads: 0,
        });
    }
    reference.rate(Via::Direct, per_turn)?;
    let mut reference_tally = Tally::default();
    for turn in 0..turns {
        reference_tally.add(reference.rate(Via::Direct, per_turn)?);
        let k = clusters.len();
        for i in 0..k {
            let c = &mut clusters[(turn + i) % k];
            let before = c.agents.map(cpu_ns);
            let stop = Arc::new(AtomicBool::new(false));
            let reader = debug_reads.map(|_| debug_reader(&c.pair, stop.clone()));
            let rate = c.pair.rate(per_turn);
            stop.store(true, Ordering::Relaxed);
            if let Some(reader) = reader {
                c.debug_reads += reader.join().unwrap_or_default();
            }
            c.tally.add(rate?);
            for (sum, (pid, before)) in c.cpu_ns.iter_mut().zip(c.agents.iter().zip(before)) {
                *sum += cpu_ns(*pid).saturating_sub(before);
            }
        }
    }
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
    for (variant, c) in specs.iter().zip(&clusters) {
        let tally = &c.tally;
        let p50 = tally.percentile(0.5);
        let added = p50 as i64 - reference_p50 as i64;
        let [source_cpu, destination_cpu] = c
            .cpu_ns
            .map(|ns| ns as f64 / 1000.0 / tally.count.max(1) as f64);
        println!(
            "| {} | {p50} | {} | {added} | {source_cpu:.1} | {destination_cpu:.1} | {} | {} |",
            variant.label,
            tally.percentile(0.99),
            c.debug_reads,
            tally.failures
        );
        rows.push(serde_json::json!({
            "label": variant.label, "p50_us": p50, "added_p50_us": added,
            "p99_us": tally.percentile(0.99), "failures": tally.failures,
            "source_agent_cpu_us": source_cpu, "destination_agent_cpu_us": destination_cpu,
            "debug_reads": c.debug_reads,
        }));
    }
    println!(
        "\n(agent CPU: per connection, all of the agent's threads, from /proc/PID/task/*/schedstat; \
         with busy polling on it includes the polling)"
    );
    let json = serde_json::json!({
        "benchmark": "compare", "turns": turns, "per_turn": per_turn,
        "debug_read_verdicts": debug_reads,
        "no_agents_p50_us": reference_p50, "variants": rows,
    });
    report::write_json(out_dir, "compare", &json)
}
