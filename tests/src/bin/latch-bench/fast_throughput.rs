//! The kernel fast path's bulk throughput against no agents, in as many rounds as it takes to
//! resolve issue 21's 1% (`latch-bench fast-throughput --rounds N`; not part of
//! `cargo xtask bench`, whose tunnel suite takes 11 rounds that resolve one stream to about ±5%).
//!
//! Two clusters of the same topology ([`Pair`]): one whose nodes will run agents, and its twin,
//! which never does. First the two with no agents on either (A/A: what the two differ by when
//! nothing of Latch runs), then with the allow cached on the first one's agents (the fast path).
//! Each round moves the same streams through both, in turns whose order alternates from round to
//! round, so neither side always runs first; each phase's figure is the geometric mean of its
//! rounds' ratios with its 95% interval.

use std::path::Path;

use anyhow::bail;
use latch::datapath::KernelMaps;
use latch_common::Counter;
use latch_tests::AgentOptions;

use crate::{
    pair::Pair,
    report::write_json,
    stats::{median, ratio_interval, ratio_text},
};

/// One phase's rounds: bytes per second through the measured cluster and through its twin.
#[derive(Default)]
struct Rounds {
    measured: Vec<f64>,
    twin: Vec<f64>,
}

impl Rounds {
    fn take(
        measured: &Pair,
        twin: &Pair,
        rounds: usize,
        streams: usize,
        mib: usize,
    ) -> anyhow::Result<Self> {
        let through = |pair: &Pair| pair.throughput(streams, mib);
        let mut taken = Self::default();
        for round in 0..rounds {
            if round % 2 == 0 {
                taken.measured.push(through(measured)?);
                taken.twin.push(through(twin)?);
            } else {
                taken.twin.push(through(twin)?);
                taken.measured.push(through(measured)?);
            }
        }
        Ok(taken)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "measured_over_twin_mean_and_95_interval": ratio_interval(&self.measured, &self.twin),
            "median_measured_bytes_per_s": median(self.measured.clone()),
            "median_twin_bytes_per_s": median(self.twin.clone()),
            "rounds_measured_bytes_per_s": self.measured,
            "rounds_twin_bytes_per_s": self.twin,
        })
    }

    /// `mean (low–high)` of the rounds' ratios.
    fn ratio(&self) -> String {
        ratio_text(&self.measured, &self.twin, 4).unwrap_or_else(|| "(too few rounds)".to_owned())
    }
}

pub fn run(rounds: usize, streams: usize, mib: usize, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "fast-path throughput: {rounds} rounds of {streams} stream(s) of {mib} MiB each way, \
         through a cluster and its twin in turns: first with no agents on either (A/A), then with \
         the first one's allow cached on its agents (fast path); client on node 1, server on node 2"
    );
    let mut measured = Pair::new()?;
    let twin = Pair::new()?;
    // Both warmed the same way before anything is timed.
    for pair in [&measured, &twin] {
        pair.warm_up(500)?;
        pair.throughput(streams, mib)?;
    }
    let bare = Rounds::take(&measured, &twin, rounds, streams, mib)?;
    measured.start_agents(&AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    })?;
    // The first connection goes through the tunnel and caches the allow; the rest take the fast
    // path.
    measured.warm_up(500)?;
    let source = KernelMaps::open_pinned(&measured.cluster.node(measured.n1).pin_dir)?;
    let redirected = source.counter(Counter::Redirected)?;
    let fast = Rounds::take(&measured, &twin, rounds, streams, mib)?;
    // Every round's connections went through on the cached allow, none through the agents.
    let through_agents = source.counter(Counter::Redirected)? - redirected;
    drop(source);
    if through_agents > 0 {
        bail!("{through_agents} connections of the fast path's rounds went through the agents");
    }
    measured.stop_agents()?;

    println!(
        "\n| {streams} stream(s), {rounds} rounds | measured cluster MiB/s (median) | twin MiB/s | measured / twin: rounds' ratios, geometric mean (95% interval) |"
    );
    println!("|---|---:|---:|---|");
    for (label, phase) in [("no agents on either (A/A)", &bare), ("fast path", &fast)] {
        println!(
            "| {label} | {:.0} | {:.0} | {} |",
            median(phase.measured.clone()) / (1024.0 * 1024.0),
            median(phase.twin.clone()) / (1024.0 * 1024.0),
            phase.ratio()
        );
    }
    write_json(
        out_dir,
        "fast-throughput",
        &serde_json::json!({
            "rounds": rounds,
            "streams": streams,
            "mib_each_way": mib,
            "no_agents_on_either": bare.json(),
            "fast_path": fast.json(),
        }),
    )
}
