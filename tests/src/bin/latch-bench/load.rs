//! `load`: what the agents cost at a steady load. An open-loop generator (`latch-probe load`)
//! offers requests on a schedule, 1 KiB each with its echo, at 1,000/s over one persistent
//! connection, 10,000/s over four, and 1,000/s with a fresh connection each; every setup (no
//! agents, the kernel fast path, the tunnel with busy polling as configured by default, after
//! every activity, and turned off) runs a cluster of its own, all set up at once, and the setups take their turns within
//! each round, so that the VM's drift falls on all of them alike. Reported: latency percentiles
//! from when each request was due, and each agent's CPU time per 1,000 requests per second (its
//! share of a vCPU) from `/proc/PID/task/*/schedstat`, with its resident memory.

use std::path::Path;

use anyhow::bail;
use latch_tests::AgentOptions;

use crate::{
    pair::Pair,
    probe,
    procstat::{cpu_ns, rss_kib, timeslices},
    report,
    stats::spread,
};

/// The setups the targets are judged on, by label (in the JSON too).
pub const FAST_PATH_SETUP: &str = "fast path (cached allow)";
pub const TUNNEL_DEFAULTS_SETUP: &str = "tunnel, defaults";

/// Bytes per request (and per echo).
const BYTES: usize = 1024;

/// The streaming echo server's port, beside the pair's own echo server.
const STREAM_PORT: u16 = 8081;

/// One way of running the cluster.
struct Setup {
    label: &'static str,
    /// The agents' options; `None` runs no agents.
    agents: Option<AgentOptions>,
}

fn setups() -> Vec<Setup> {
    let tunnel = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    vec![
        Setup {
            label: "no agents",
            agents: None,
        },
        Setup {
            label: FAST_PATH_SETUP,
            agents: Some(AgentOptions {
                verdict_ttl: "1h".into(),
                ..AgentOptions::default()
            }),
        },
        Setup {
            label: TUNNEL_DEFAULTS_SETUP,
            agents: Some(tunnel.clone()),
        },
        Setup {
            label: "tunnel, busyPollAdaptive: false",
            agents: Some(AgentOptions {
                busy_poll_adaptive: Some(false),
                ..tunnel.clone()
            }),
        },
        Setup {
            label: "tunnel, busyPoll: 0s",
            agents: Some(AgentOptions {
                busy_poll: Some("0s".into()),
                ..tunnel
            }),
        },
    ]
}

/// One shape of load.
struct Shape {
    label: &'static str,
    rate: u32,
    /// Persistent connections sharing the rate; `None`: a fresh connection per request.
    conns: Option<usize>,
    /// Seconds, as a share of the run's `--secs` (fresh connections run half as long, so that a
    /// round's closed connections never crowd the client's free ports).
    share: f64,
}

const SHAPES: [Shape; 3] = [
    Shape {
        label: "1,000/s over one connection",
        rate: 1000,
        conns: Some(1),
        share: 1.0,
    },
    Shape {
        label: "10,000/s over four connections",
        rate: 10_000,
        conns: Some(4),
        share: 1.0,
    },
    Shape {
        label: "1,000/s, a fresh connection each",
        rate: 1000,
        conns: None,
        share: 0.5,
    },
];

/// One run of one shape in one setup.
#[derive(serde::Serialize, Clone)]
struct Run {
    load: probe::Load,
    /// CPU seconds per second per 1,000 requests per second: source agent, destination agent.
    vcpu_per_krps: [f64; 2],
    /// How many times the agent's threads were put on a CPU, per request: each wake-up, and each
    /// return after being preempted (source agent, destination agent).
    timeslices_per_request: [f64; 2],
    /// Resident memory after the run, in MiB: source agent, destination agent.
    rss_mib: [f64; 2],
}

pub fn run(rounds: usize, secs: f64, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "load benchmark: open loop, {BYTES}-byte requests and their echo; {rounds} rounds, each \
         setup in a cluster of its own taking turns; client on node 1, server on node 2"
    );
    let setups = setups();
    let mut clusters = Vec::new();
    for setup in &setups {
        let mut pair = Pair::new()?;
        if let Some(options) = &setup.agents {
            pair.start_agents(options)?;
        }
        // The load's server answers each request as it comes (the pair's own echo server
        // answers once the client half-closes), from inside the pod (its cgroup too), so that
        // the fast path's audit runs at the destination as it would for an application.
        let server = pair.cluster.pod_stream_server(pair.server, STREAM_PORT)?;
        let to = pair.cluster.pod(pair.server).addr4(STREAM_PORT).to_string();
        // Verdicts are per destination port: the warm-up goes to the load's server, so that
        // the fast path's first connection (through the tunnel) is behind it.
        probe::rate(&pair.cluster, pair.client, &to, 200)?;
        clusters.push((pair, server, to));
    }
    // runs[shape][setup]
    let mut runs: Vec<Vec<Vec<Run>>> = SHAPES
        .iter()
        .map(|_| vec![Vec::new(); setups.len()])
        .collect();
    for round in 0..rounds {
        for (s, shape) in SHAPES.iter().enumerate() {
            for i in 0..setups.len() {
                let k = (round + i) % setups.len();
                let (pair, _, to) = &clusters[k];
                let agents = pair.agent_pids();
                let before = agents.map(cpu_ns);
                let slices_before = agents.map(timeslices);
                let seconds = secs * shape.share;
                let load = probe::load(
                    &pair.cluster,
                    pair.client,
                    to,
                    shape.rate,
                    shape.conns,
                    seconds,
                    BYTES,
                )?;
                let used = agents.map(cpu_ns);
                let slices = agents.map(timeslices);
                let krps = f64::from(shape.rate) / 1000.0;
                let requests = f64::from(shape.rate) * seconds;
                let timeslices_per_request = [0, 1].map(|a| {
                    if agents[a] == 0 {
                        return 0.0;
                    }
                    slices[a].saturating_sub(slices_before[a]) as f64 / requests
                });
                let vcpu_per_krps = [0, 1].map(|a| {
                    if agents[a] == 0 {
                        return 0.0;
                    }
                    used[a].saturating_sub(before[a]) as f64 / 1e9 / seconds / krps
                });
                let rss_mib = agents.map(|pid| {
                    if pid == 0 {
                        0.0
                    } else {
                        rss_kib(pid) as f64 / 1024.0
                    }
                });
                println!(
                    "  round {}: {} / {}: p50 {:.0} µs, p99 {:.0} µs, agents {:.3} and {:.3} vCPU per 1,000/s, {:.2} and {:.2} times on a CPU per request, {} failed",
                    round + 1,
                    shape.label,
                    setups[k].label,
                    load.p50_us,
                    load.p99_us,
                    vcpu_per_krps[0],
                    vcpu_per_krps[1],
                    timeslices_per_request[0],
                    timeslices_per_request[1],
                    load.failures
                );
                runs[s][k].push(Run {
                    load,
                    vcpu_per_krps,
                    timeslices_per_request,
                    rss_mib,
                });
            }
        }
    }
    let failed: usize = runs
        .iter()
        .flatten()
        .flatten()
        .map(|r| r.load.failures)
        .sum();
    print(&setups, &runs);
    let json = serde_json::json!({
        "benchmark": "load",
        "bytes": BYTES,
        "rounds": rounds,
        "secs": secs,
        "shapes": SHAPES.iter().zip(&runs).map(|(shape, by_setup)| serde_json::json!({
            "shape": shape.label,
            "rate": shape.rate,
            "conns": shape.conns,
            "setups": setups.iter().zip(by_setup).map(|(setup, runs)| serde_json::json!({
                "setup": setup.label,
                "ran_agents": setup.agents.is_some(),
                "runs": runs,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    report::write_json(out_dir, "load", &json)?;
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

fn print(setups: &[Setup], runs: &[Vec<Vec<Run>>]) {
    for (shape, by_setup) in SHAPES.iter().zip(runs) {
        println!("\n### {}\n", shape.label);
        println!(
            "| setup | p50 µs | p99 µs | p99.9 µs | source agent vCPU per 1,000/s | \
             destination agent vCPU per 1,000/s | agents on a CPU per request | \
             agents' RSS MiB | failed |"
        );
        println!("|---|---:|---:|---:|---:|---:|---|---:|---:|");
        for (setup, runs) in setups.iter().zip(by_setup) {
            let of = |f: &dyn Fn(&Run) -> f64, digits| spread(runs.iter().map(f).collect(), digits);
            let (cpu, slices, rss) = if setup.agents.is_some() {
                let slices = [0, 1].map(|a| of(&|r: &Run| r.timeslices_per_request[a], 2));
                (
                    [0, 1].map(|a| of(&|r: &Run| r.vcpu_per_krps[a], 3)),
                    format!("{} / {}", slices[0], slices[1]),
                    of(&|r: &Run| r.rss_mib[0].max(r.rss_mib[1]), 1),
                )
            } else {
                (
                    ["–".to_owned(), "–".to_owned()],
                    "–".to_owned(),
                    "–".to_owned(),
                )
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                setup.label,
                of(&|r: &Run| r.load.p50_us, 0),
                of(&|r: &Run| r.load.p99_us, 0),
                of(&|r: &Run| r.load.p999_us, 0),
                cpu[0],
                cpu[1],
                slices,
                rss,
                runs.iter().map(|r| r.load.failures).sum::<usize>(),
            );
        }
    }
    println!(
        "\n(median over the rounds, with the lowest and highest; latency from when each request \
         was due; agent CPU, and how many times its threads were put on a CPU (source / \
         destination), from /proc/PID/task/*/schedstat over the run, all threads)"
    );
}
