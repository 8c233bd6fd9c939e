//! The `tunnel` suite's tables and JSON.

use std::path::Path;

use super::{AgentsCpu, FAST_THROUGHPUT_ROUNDS, Rounds, THROUGHPUT_ROUNDS, TunnelReport};
use crate::{
    reference::{LATENCY_ROUNDS, PairedRounds, TURN},
    report,
    stats::{median, percentile, ratio_interval, ratio_text, spread},
    targets::{FAST_PATH_THROUGHPUT, POOLED_ADDED_US, TUNNEL_OVER_NGINX, TUNNEL_OVER_NO_AGENTS},
};

/// The paired phases' rows: label, rounds, the agents' CPU where agents ran.
fn rows(r: &TunnelReport) -> [(&'static str, &PairedRounds, Option<&AgentsCpu>); 4] {
    [
        (
            "tunneled on a pooled HTTP/2 connection",
            &r.pooled,
            Some(&r.pooled_cpu),
        ),
        (
            "the same, busy polling off (`busyPoll: 0s`)",
            &r.pooled_no_poll,
            Some(&r.pooled_no_poll_cpu),
        ),
        ("kernel fast path", &r.fast, None),
        ("nginx mTLS stream-proxy pair", &r.nginx, None),
    ]
}

pub(super) fn print(r: &TunnelReport, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n| connection (1-byte request + echo) | p50 µs | no agents, same time, p50 µs | added µs | \
         agents' CPU per connection µs, source / destination |"
    );
    println!("|---|---:|---:|---:|---:|");
    let first: Vec<f64> = r.first.iter().map(|&us| us as f64).collect();
    let first_added: Vec<f64> = first.iter().map(|us| us - r.baseline_p50 as f64).collect();
    println!(
        "| first connection (new mTLS + HBONE) | {} | {} | {} | |",
        spread(first, 0),
        r.baseline_p50,
        spread(first_added, 0)
    );
    for (label, p, cpu) in rows(r) {
        let cpu = cpu.map_or(String::new(), |cpu| {
            let [source, destination] = cpu.per_connection_us();
            format!("{source:.1} / {destination:.1}")
        });
        println!(
            "| {label} | {} | {} | {} | {cpu} |",
            spread(p.p50_us(), 0),
            spread(p.reference_p50_us(), 0),
            spread(p.added_us(), 0)
        );
    }
    println!(
        "\n(first connection: the median of {} (lowest–highest), each after a restart of the \
         client's agent; every other phase: the median of {LATENCY_ROUNDS} rounds' p50 \
         (lowest–highest), each round taken in turns of {TURN} connections with a second \
         cluster of the same topology and no agents; no agents over the whole run: {} µs; the \
         agents' CPU: all of each agent's threads over the phase's connections, from \
         /proc/PID/task/*/schedstat, busy polling included, which is the cost of the latency it \
         buys; the fast path's agents work on the audit's own clock, and the load suite measures \
         them over whole runs)",
        r.first.len(),
        r.baseline_p50
    );
    let mb = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "\n| throughput | no agents MiB/s | tunnel MiB/s | nginx pair MiB/s | tunnel / no agents | \
         tunnel / nginx | agents' CPU s per GiB, source / destination |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, rounds) in [("1 stream", &r.one), ("8 streams", &r.eight)] {
        let [base, tunnel, nginx] = rounds.medians();
        let [source, destination] = rounds.agents_cpu_s_per_gib();
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {source:.2} / {destination:.2} |",
            mb(base),
            mb(tunnel),
            mb(nginx),
            rounds.over_base(),
            rounds.over_nginx(),
        );
    }
    println!(
        "\n| throughput, kernel fast path | no agents MiB/s | measured cluster MiB/s | measured / no agents | rounds' ratios: mean (95% interval) |"
    );
    println!("|---|---:|---:|---:|---|");
    for (label, rounds) in [
        ("1 stream, fast path", &r.fast_one),
        ("8 streams, fast path", &r.fast_eight),
        ("1 stream, no agents on either cluster (A/A)", &r.bare_one),
        (
            "8 streams, no agents on either cluster (A/A)",
            &r.bare_eight,
        ),
    ] {
        let [base, measured, _] = rounds.medians();
        let interval =
            ratio_text(&rounds.agents, &rounds.base, 3).unwrap_or_else(|| "-".to_owned());
        println!(
            "| {label} | {:.0} | {:.0} | {:.3} | {interval} |",
            mb(base),
            mb(measured),
            rounds.over_base(),
        );
    }
    println!(
        "\n(throughput: medians of {THROUGHPUT_ROUNDS} rounds, and ratios of the medians; the \
         fast path's {FAST_THROUGHPUT_ROUNDS} rounds in turns with no agents of their own, while \
         the fast-path agents run, and as many before any agent runs, the measured cluster \
         against the reference; the interval says what the rounds can resolve: a difference \
         inside it is not one this run can see)"
    );
    println!(
        "\n| fast-path transfer (one, with the programs' accounting on) | took ms | program runs (by program) | programs' time, µs | share of the transfer's time |"
    );
    println!("|---|---:|---|---:|---:|");
    for p in &r.fast_programs {
        let by_program: Vec<String> = p
            .runs
            .0
            .iter()
            .filter(|(_, run)| run.count > 0)
            .map(|(name, run)| format!("{name} {}", run.count))
            .collect();
        println!(
            "| {} stream{} | {:.0} | {} | {:.0} | {:.2}% |",
            p.streams,
            if p.streams == 1 { "" } else { "s" },
            p.transfer.as_secs_f64() * 1e3,
            by_program.join(", "),
            p.total().as_secs_f64() * 1e6,
            p.share() * 100.0
        );
    }
    println!(
        "\n(the kernel's own accounting, BPF_ENABLE_STATS, both nodes: what the fast path runs on \
         a stream's packets once it is connected, and at most what it can take from the \
         stream's throughput)"
    );
    println!(
        "\none hand-off between two threads' sockets on this machine: {:.0} µs (p50 of a loopback \
         one-byte ping-pong, halved); a tunneled connection adds four of them (client to agent, \
         agent to agent, and back), about {:.0} µs when the receiving thread sleeps (busy polling \
         keeps the agents' workers from sleeping in between)",
        r.handoff_us,
        4.0 * r.handoff_us
    );
    let pooled_added = median(r.pooled.added_us());
    println!(
        "\ntarget: a pooled tunneled connection adds under {POOLED_ADDED_US} µs at p50 \
         ({pooled_added:.0} µs here, the median of {LATENCY_ROUNDS} rounds)"
    );
    println!(
        "target: tunnel throughput at least {TUNNEL_OVER_NO_AGENTS}x no agents with one stream \
         ({:.2}x here) and at least {TUNNEL_OVER_NGINX}x the nginx pair's ({:.2}x / {:.2}x here, \
         one / eight streams)",
        r.one.over_base(),
        r.one.over_nginx(),
        r.eight.over_nginx()
    );
    println!(
        "target: fast-path throughput at least {FAST_PATH_THROUGHPUT}x no agents' ({:.3}x / \
         {:.3}x here, one / eight streams; the two clusters with no agents: {:.3}x / {:.3}x)",
        r.fast_one.over_base(),
        r.fast_eight.over_base(),
        r.bare_one.over_base(),
        r.bare_eight.over_base()
    );
    let ([base_1, tunnel_1, nginx_1], [base_8, tunnel_8, nginx_8]) =
        (r.one.medians(), r.eight.medians());
    let first_p50 = percentile(&r.first, 0.5);
    let [pooled, no_poll, fast, nginx] = rows(r).map(|(_, p, _)| p);
    let mid = |values: Vec<f64>| median(values);
    let json = serde_json::json!({
        "benchmark": "tunnel",
        "handoff_us": r.handoff_us,
        "latency_rounds": LATENCY_ROUNDS,
        "latency_p50_us": {
            "no_agents": r.baseline_p50, "first_connection": first_p50,
            "pooled_tunnel": mid(pooled.p50_us()), "pooled_tunnel_no_busy_poll": mid(no_poll.p50_us()),
            "fast_path": mid(fast.p50_us()), "nginx_pair": mid(nginx.p50_us()),
        },
        "no_agents_same_time_p50_us": {
            "pooled_tunnel": mid(pooled.reference_p50_us()),
            "pooled_tunnel_no_busy_poll": mid(no_poll.reference_p50_us()),
            "fast_path": mid(fast.reference_p50_us()), "nginx_pair": mid(nginx.reference_p50_us()),
        },
        "added_p50_us": {
            "first_connection": first_p50 as i64 - r.baseline_p50 as i64,
            "pooled_tunnel": pooled_added,
            "pooled_tunnel_no_busy_poll": mid(no_poll.added_us()),
            "fast_path": mid(fast.added_us()), "nginx_pair": mid(nginx.added_us()),
        },
        "agents_cpu_us_per_connection": {
            "pooled_tunnel": r.pooled_cpu.per_connection_us(),
            "pooled_tunnel_no_busy_poll": r.pooled_no_poll_cpu.per_connection_us(),
        },
        "added_p50_us_rounds": {
            "pooled_tunnel": pooled.added_us(), "pooled_tunnel_no_busy_poll": no_poll.added_us(),
            "fast_path": fast.added_us(), "nginx_pair": nginx.added_us(),
        },
        "first_connection_us": r.first,
        "throughput_bytes_per_s": {
            "no_agents_1": base_1, "no_agents_8": base_8,
            "tunnel_1": tunnel_1, "tunnel_8": tunnel_8,
            "nginx_1": nginx_1, "nginx_8": nginx_8,
        },
        "tunnel_agents_cpu_s_per_gib": {
            "streams_1": r.one.agents_cpu_s_per_gib(),
            "streams_8": r.eight.agents_cpu_s_per_gib(),
        },
        "throughput_ratio_of_medians": {
            "tunnel_over_no_agents_1": r.one.over_base(),
            "tunnel_over_no_agents_8": r.eight.over_base(),
            "tunnel_over_nginx_1": r.one.over_nginx(),
            "tunnel_over_nginx_8": r.eight.over_nginx(),
        },
        "throughput_rounds_bytes_per_s": {
            "no_agents_1": r.one.base, "tunnel_1": r.one.agents, "nginx_1": r.one.nginx,
            "no_agents_8": r.eight.base, "tunnel_8": r.eight.agents, "nginx_8": r.eight.nginx,
        },
        "fast_path_throughput": paired_throughput_json(&r.fast_one, &r.fast_eight),
        "fast_path_programs": r.fast_programs.iter().map(|p| serde_json::json!({
            "streams": p.streams,
            "transfer_s": p.transfer.as_secs_f64(),
            "programs_time_s": p.total().as_secs_f64(),
            "share_of_transfer": p.share(),
            "runs": p.runs.0.iter().map(|(name, run)| serde_json::json!({
                "program": name, "runs": run.count, "ns_per_run": run.ns_per_run(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "no_agents_on_either_cluster_throughput":
            paired_throughput_json(&r.bare_one, &r.bare_eight),
    });
    report::write_json(out_dir, "tunnel", &json)
}

/// A measured cluster's throughput rounds against the reference's, one stream and eight, as
/// JSON: the medians, their ratio, the rounds' ratios with their interval, and every round.
fn paired_throughput_json(one: &Rounds, eight: &Rounds) -> serde_json::Value {
    let side = |rounds: &Rounds| {
        let [reference, measured, _] = rounds.medians();
        serde_json::json!({
            "reference_bytes_per_s_median": reference,
            "measured_bytes_per_s_median": measured,
            "measured_over_reference": rounds.over_base(),
            "rounds_ratio_mean_and_95_interval": ratio_interval(&rounds.agents, &rounds.base),
            "rounds_reference_bytes_per_s": rounds.base,
            "rounds_measured_bytes_per_s": rounds.agents,
        })
    };
    serde_json::json!({ "streams_1": side(one), "streams_8": side(eight) })
}
