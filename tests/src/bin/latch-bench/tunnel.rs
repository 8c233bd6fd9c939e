//! `tunnel`: the latency a first, a pooled and a fast-path connection add, and the throughput of
//! the tunnel and of the fast path, against no agents and against an nginx mTLS stream-proxy
//! pair. Each phase is measured in turns
//! with the no-agent [`Reference`] (which also hosts the nginx pair), so that the VM's drift
//! falls on both sides of every comparison alike. The tables and JSON are in [`output`].

use std::{path::Path, time::Duration};

use latch::datapath::run_stats::{RunStats, Runs};
use latch_common::program_names;
use latch_tests::{AgentOptions, PodSpec};

use crate::{
    handoff::handoff_us,
    pair::{PORT, Pair},
    probe::{self, Rate, throughput},
    procstat::cpu_during,
    reference::{PairedRounds, Reference, Via, paired_latency_rounds},
    stats::{Tally, median, percentile},
};

mod output;

/// Rounds of the throughput comparison (no agents, tunnel, nginx pair in turn); medians are
/// reported, and ratios are of medians. (The rounds' own ratios were tried as well: runs seconds
/// apart differ as much as runs a minute apart on this VM, so pairing them within a round only
/// compounded two runs' noise.)
const THROUGHPUT_ROUNDS: usize = 5;

/// Rounds of the fast path's throughput against no agents: its target is a 1% difference, and
/// single runs on this VM spread by about ±10%, so it takes more rounds than the tunnel's.
const FAST_THROUGHPUT_ROUNDS: usize = 11;

/// MiB per throughput run with one stream (each of eight streams moves a quarter of it).
const MIB: usize = 256;

/// First connections measured, each after a restart of the client's agent.
const FIRST_CONNECTIONS: usize = 20;

/// What the two agents' processes used over a phase's connections (busy polling included).
#[derive(Default)]
struct AgentsCpu {
    /// Source agent, destination agent.
    ns: [u64; 2],
    connections: usize,
}

impl AgentsCpu {
    /// `rate`, made while the agents `pids` run, counted.
    fn around(
        &mut self,
        pids: [u32; 2],
        rate: impl FnOnce() -> anyhow::Result<Rate>,
    ) -> anyhow::Result<Rate> {
        let rate = cpu_during(pids, &mut self.ns, rate)?;
        self.connections += rate.count;
        Ok(rate)
    }

    /// Each agent's CPU time per connection, in µs.
    fn per_connection_us(&self) -> [f64; 2] {
        self.ns
            .map(|ns| ns as f64 / 1000.0 / self.connections.max(1) as f64)
    }
}

struct TunnelReport {
    handoff_us: f64,
    nginx: PairedRounds,
    /// The reference over the whole run.
    baseline_p50: u64,
    /// Each first connection's latency, sorted.
    first: Vec<u64>,
    pooled: PairedRounds,
    /// The same with `dataplane.busyPoll: 0s`.
    pooled_no_poll: PairedRounds,
    fast: PairedRounds,
    /// The agents' CPU over the pooled phases, with and without busy polling. (Not the fast
    /// path's: its agents report connections on a clock of their own, the audit's drain, which
    /// falls in a phase's turns or between them by chance; the load suite takes it over whole
    /// runs.)
    pooled_cpu: AgentsCpu,
    pooled_no_poll_cpu: AgentsCpu,
    /// Throughput with one stream, and with eight.
    one: Rounds,
    eight: Rounds,
    /// Throughput on the kernel fast path with one stream, and with eight (no nginx rounds).
    fast_one: Rounds,
    fast_eight: Rounds,
    /// The same rounds with no agents on the measured cluster either (A/A): how far the two
    /// clusters' throughput differs by itself.
    bare_one: Rounds,
    bare_eight: Rounds,
    /// The agents' kernel programs over one fast-path transfer with one stream and one with
    /// eight.
    fast_programs: [ProgramTime; 2],
}

/// The agents' kernel programs' runs over one fast-path transfer (the kernel's own accounting,
/// `BPF_ENABLE_STATS`), and how long the transfer took: what the fast path adds to a stream's
/// packets, measured without the rounds' noise.
pub struct ProgramTime {
    streams: usize,
    runs: Runs,
    transfer: Duration,
}

impl ProgramTime {
    /// Every program's run time together.
    fn total(&self) -> Duration {
        self.runs.0.values().map(|run| run.time).sum()
    }

    /// The programs' run time as a share of the transfer's: at most what they can have taken
    /// from its throughput.
    fn share(&self) -> f64 {
        self.total().as_secs_f64() / self.transfer.as_secs_f64()
    }
}

/// One fast-path transfer of `mib` MiB with one stream and one of eight streams of a quarter
/// each, with the programs' run statistics on (they add two clock reads to every run, so the
/// throughput rounds are taken without them).
fn fast_program_time(pair: &Pair, mib: usize) -> anyhow::Result<[ProgramTime; 2]> {
    let stats = RunStats::enable()?;
    let transfer = |streams: usize, mib: usize| -> anyhow::Result<ProgramTime> {
        let before = stats.read(&program_names::ALL)?;
        let rate = throughput(&pair.cluster, pair.client, &pair.to, streams, mib)?;
        let runs = stats.read(&program_names::ALL)?.since(&before);
        // Both ways: the stream and its answer.
        let bytes = (2 * streams * mib * 1024 * 1024) as f64;
        Ok(ProgramTime {
            streams,
            runs,
            transfer: Duration::from_secs_f64(bytes / rate),
        })
    };
    Ok([transfer(1, mib)?, transfer(8, mib / 4)?])
}

/// Every throughput round's bytes per second, by setup.
#[derive(Default)]
struct Rounds {
    base: Vec<f64>,
    /// Through the agents (the tunnel, or the fast path).
    agents: Vec<f64>,
    nginx: Vec<f64>,
    /// The agents' CPU over the rounds through them (source, destination; none where no
    /// agents run), and the GiB those rounds moved, both ways.
    agents_cpu_ns: [u64; 2],
    agents_gib: f64,
}

impl Rounds {
    /// The medians: no agents, through the agents, nginx pair (0 without nginx rounds).
    fn medians(&self) -> [f64; 3] {
        [&self.base, &self.agents, &self.nginx].map(|runs| median(runs.clone()))
    }

    /// Through the agents / no agents, of the medians.
    fn over_base(&self) -> f64 {
        let [base, agents, _] = self.medians();
        agents / base
    }

    /// Each agent's CPU seconds per GiB moved through them (source, destination).
    fn agents_cpu_s_per_gib(&self) -> [f64; 2] {
        self.agents_cpu_ns
            .map(|ns| ns as f64 / 1e9 / self.agents_gib.max(f64::MIN_POSITIVE))
    }

    /// Through the agents / nginx pair, of the medians.
    fn over_nginx(&self) -> f64 {
        let [_, agents, nginx] = self.medians();
        agents / nginx
    }
}

/// `count` rounds of one stream of `mib` MiB and of eight streams of a quarter each, each round
/// with no agents, through `pair`'s agents as they run and, with `nginx`, through the nginx
/// pair, in turns: (one stream, eight streams).
fn throughput_rounds(
    pair: &Pair,
    reference: &Reference,
    count: usize,
    mib: usize,
    nginx: bool,
) -> anyhow::Result<(Rounds, Rounds)> {
    let (mut one, mut eight) = (Rounds::default(), Rounds::default());
    for _ in 0..count {
        for (rounds, streams, mib) in [(&mut one, 1, mib), (&mut eight, 8, mib / 4)] {
            rounds
                .base
                .push(reference.throughput(Via::Direct, streams, mib)?);
            let rate = cpu_during(pair.agent_pids(), &mut rounds.agents_cpu_ns, || {
                pair.throughput(streams, mib)
            })?;
            rounds.agents.push(rate);
            rounds.agents_gib += (streams * mib * 2) as f64 / 1024.0;
            if nginx {
                rounds
                    .nginx
                    .push(reference.throughput(Via::Nginx, streams, mib)?);
            }
        }
    }
    Ok((one, eight))
}

pub fn run(count: usize, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "tunnel benchmark: {count} connections per latency phase; throughput: one stream \
         of {MIB} MiB, eight of {} MiB (each answered with as many bytes), median of {THROUGHPUT_ROUNDS} rounds \
         of no agents, tunnel and nginx pair in turn (and of {FAST_THROUGHPUT_ROUNDS} of no \
         agents and the fast path in turn); client on node 1, server on node 2",
        MIB / 4
    );
    let report = measure(count, FIRST_CONNECTIONS, MIB)?;
    output::print(&report, out_dir)
}

fn measure(count: usize, samples: usize, mib: usize) -> anyhow::Result<TunnelReport> {
    let mut reference = Reference::new()?;
    reference.start_nginx()?;
    // Every reference latency measured, for the no-agent row.
    let mut all_reference = Vec::new();
    let mut pair = Pair::new()?;
    // Another identity on the server's node: a restarted agent's first connection goes there, so
    // the measured first connection of the pair finds a warm agent, as it would in a cluster.
    let other = pair
        .cluster
        .add_pod(pair.n2, PodSpec::mesh("other", "bench", "other"))?;
    let _other_echo = pair.cluster.echo_server(other, PORT)?;
    let to_other = pair.cluster.pod(other).addr4(PORT).to_string();

    pair.warm_up(count / 10)?;
    reference.rate(Via::Direct, count / 10)?;
    reference.rate(Via::Nginx, count / 10)?;
    // The fast path's throughput rounds with no agents on either cluster, for the 1% target:
    // what the two clusters differ by when nothing of Latch runs.
    let (bare_one, bare_eight) =
        throughput_rounds(&pair, &reference, FAST_THROUGHPUT_ROUNDS, mib, false)?;

    // First connections: every sample starts with an empty pool and an empty cache (the client's
    // agent restarted, then warmed up on another pair). They come before the phase's warm-up, so
    // this phase is the one not run by `Pair::phase`.
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    pair.start_agents(&fast_options)?;
    let mut first = Vec::with_capacity(samples);
    for _ in 0..samples {
        for node in [pair.n1, pair.n2] {
            latch::datapath::KernelMaps::open_pinned(&pair.cluster.node(node).pin_dir)?
                .remove_verdicts_where(|_, _| true)?;
        }
        pair.cluster.agent(pair.n1).restart()?;
        probe::rate(&pair.cluster, pair.client, &to_other, 1)?;
        let mut one = Tally::default();
        one.add(pair.rate(1)?);
        first.push(one.percentile(0.5));
    }
    first.sort_unstable();
    pair.warm_up(count / 10)?;
    let fast = paired_latency_rounds(&reference, &mut all_reference, count, |n| pair.rate(n))?;
    // Throughput on the fast path (the pair's allow is cached on both nodes by now).
    let (fast_one, fast_eight) =
        throughput_rounds(&pair, &reference, FAST_THROUGHPUT_ROUNDS, mib, false)?;
    let fast_programs = fast_program_time(&pair, mib)?;
    pair.stop_agents()?;

    let tunnel_options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    let mut pooled_cpu = AgentsCpu::default();
    let (pooled, one, eight) = pair.phase(&tunnel_options, count / 10, |pair| {
        let pids = pair.agent_pids();
        let pooled = paired_latency_rounds(&reference, &mut all_reference, count, |n| {
            pooled_cpu.around(pids, || pair.rate(n))
        })?;
        // Throughput: no agents, the tunnel and the nginx pair in turns.
        let (one, eight) = throughput_rounds(pair, &reference, THROUGHPUT_ROUNDS, mib, true)?;
        Ok((pooled, one, eight))
    })?;
    // What busy polling is worth: the same pooled connections with it turned off.
    let no_poll_options = AgentOptions {
        busy_poll: Some("0s".into()),
        ..tunnel_options
    };
    let mut pooled_no_poll_cpu = AgentsCpu::default();
    let pooled_no_poll = pair.phase(&no_poll_options, count / 10, |pair| {
        let pids = pair.agent_pids();
        paired_latency_rounds(&reference, &mut all_reference, count, |n| {
            pooled_no_poll_cpu.around(pids, || pair.rate(n))
        })
    })?;

    // The same through the nginx mTLS stream-proxy pair (sidecar style), no agents.
    let nginx_latency = paired_latency_rounds(&reference, &mut all_reference, count, |n| {
        reference.rate(Via::Nginx, n)
    })?;
    all_reference.sort_unstable();
    Ok(TunnelReport {
        handoff_us: handoff_us()?,
        nginx: nginx_latency,
        baseline_p50: percentile(&all_reference, 0.5),
        first,
        pooled,
        pooled_no_poll,
        fast,
        pooled_cpu,
        pooled_no_poll_cpu,
        one,
        eight,
        fast_one,
        fast_eight,
        bare_one,
        bare_eight,
        fast_programs,
    })
}
