//! `cargo xtask bench`: numbers, never pass/fail (thresholds live here, not in tests). Prints
//! markdown tables and writes JSON under `$LATCH_BENCH_OUT` (default `target/bench/`); how a
//! phase is compared with no agents, and the figures, are in `docs/benchmarks.md`.
//!
//! One module per suite ([`datapath`], [`tunnel`], [`fast_throughput`], [`load`], [`policy`],
//! [`memory`], [`compare`]) and the targets judged from their JSON ([`targets`]), over shared
//! parts: [`pair`] (the measured topology and its phases with agents), [`reference`] (the
//! no-agent cluster and measuring in turns with it), [`probe`], [`procstat`], [`stats`] and
//! [`report`].

use clap::{Parser, Subcommand};

mod antispoof;
mod compare;
mod cpus;
mod datapath;
mod fast_throughput;
mod handoff;
mod load;
mod memory;
mod pair;
mod policy;
mod probe;
mod procstat;
mod reference;
mod report;
mod stats;
mod targets;
mod tunnel;

#[derive(Parser)]
#[command(
    name = "latch-bench",
    about = "Latch's benchmarks (run by `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Connection rate and latency: no agents, agents with a cached allow, every connection
    /// over the pooled mTLS tunnel.
    Datapath {
        /// Connections per phase.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Rounds of every phase; figures are the median over them.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The latency a first, a pooled and a fast-path connection add, and throughput, against no
    /// agents and against an nginx mTLS stream-proxy pair.
    Tunnel {
        /// Connections per latency phase.
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// What the agents cost at a steady open-loop load: latency percentiles and each agent's CPU
    /// per 1,000 requests per second, with no agents, the fast path and the tunnel.
    Load {
        /// Rounds of every setup in turn.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per persistent-connection run (fresh-connection runs take half).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// The kernel fast path's bulk throughput against a twin cluster with no agents, in as many
    /// rounds as it takes to resolve a 1% difference (not part of `cargo xtask bench`).
    FastThroughput {
        /// Rounds of each phase (no agents on either cluster, then the fast path).
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Streams at once.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// MiB each stream moves each way.
        #[arg(long, default_value_t = 256)]
        mib: usize,
    },
    /// The policy engine's decision cost and the revocation sweep, in-process.
    Policy,
    /// The agent's resident memory: idle with N local workloads, and with N tunneled
    /// connections held open at once.
    Memory {
        /// Local workloads of the idle agent, one measurement each.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        workloads: Vec<usize>,
        /// Tunneled connections held open at once.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// Agent builds or settings side by side: the pooled connection's latency (or, with
    /// `--throughput`, bulk throughput) and the agents' CPU time, each variant in a cluster of
    /// its own.
    Compare {
        /// Turns per variant.
        #[arg(long, default_value_t = 30)]
        turns: usize,
        /// Connections per turn.
        #[arg(long, default_value_t = reference::TURN)]
        per_turn: usize,
        /// Put this many synthetic verdicts in each source node's verdict map and read the
        /// whole map through the source agent's debug socket (`latch debug verdicts`) over and
        /// over while the variant is measured: whether a debug read stalls connections.
        #[arg(long, value_name = "VERDICTS")]
        debug_reads: Option<usize>,
        /// Compare bulk throughput instead of latency: each turn moves `--mib` MiB each way over
        /// this many streams through every variant and through no agents.
        #[arg(long, value_name = "STREAMS", conflicts_with = "debug_reads")]
        throughput: Option<usize>,
        /// MiB each stream moves each way in a throughput turn.
        #[arg(long, default_value_t = 256, requires = "throughput")]
        mib: usize,
        /// An agent binary to compare, under a label, with optional settings; one or more.
        #[arg(
            required = true,
            value_name = "LABEL=AGENT_BINARY[,busyPoll=DURATION][,busyPollAdaptive=BOOL][,workerThreads=N]"
        )]
        variants: Vec<compare::Variant>,
    },
    /// Issue 21's targets judged from the JSON the suites wrote (run by `cargo xtask bench`
    /// after every suite): each target, its figure, met or missed.
    Targets {
        /// Judge only JSON written at or after this time (seconds since the Unix epoch): a
        /// suite's older file is from another run.
        #[arg(long, value_name = "UNIX_SECONDS")]
        since: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    // A run killed midway must not leave its clusters behind (`latch_tests::guardian`).
    latch_tests::guardian::run_guarded("latch-bench");
    let cli = Cli::parse();
    cpus::use_every_cpu()?;
    let out_dir = report::out_dir()?;
    match cli.suite {
        Suite::Datapath { count, rounds } => datapath::run(count, rounds, &out_dir),
        Suite::Tunnel { count } => tunnel::run(count, &out_dir),
        Suite::Load { rounds, secs } => load::run(rounds, secs, &out_dir),
        Suite::FastThroughput {
            rounds,
            streams,
            mib,
        } => fast_throughput::run(rounds, streams, mib, &out_dir),
        Suite::Policy => policy::run(&out_dir),
        Suite::Targets { since } => targets::run(&out_dir, since),
        Suite::Memory {
            workloads,
            connections,
        } => memory::run(&workloads, connections, &out_dir),
        Suite::Compare {
            turns,
            throughput: Some(streams),
            mib,
            variants,
            ..
        } => compare::run_throughput(turns, streams, mib, &variants, &out_dir),
        Suite::Compare {
            turns,
            per_turn,
            debug_reads,
            throughput: None,
            variants,
            ..
        } => compare::run(turns, per_turn, debug_reads, &variants, &out_dir),
    }
}
