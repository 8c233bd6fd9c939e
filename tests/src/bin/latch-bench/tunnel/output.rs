//! The `tunnel` suite's tables and JSON.

use std::path::Path;

use super::{THROUGHPUT_ROUNDS, TunnelReport};
use crate::{reference::TURN, report};

pub(super) fn print(r: &TunnelReport, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n| connection (1-byte request + echo) | p50 µs | no agents, same time, p50 µs | added µs |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| first connection (new mTLS + HBONE) | {} | {} | {} |",
        r.first_p50,
        r.baseline_p50,
        r.first_p50 as i64 - r.baseline_p50 as i64
    );
    for (label, p) in [
        ("tunneled on a pooled HTTP/2 connection", &r.pooled),
        (
            "the same, busy polling off (`busyPoll: 0s`)",
            &r.pooled_no_poll,
        ),
        ("kernel fast path", &r.fast),
        ("nginx mTLS stream-proxy pair", &r.nginx),
    ] {
        println!(
            "| {label} | {} | {} | {} |",
            p.p50_us,
            p.reference_p50_us,
            p.added_us()
        );
    }
    println!(
        "\n(each phase taken in turns of {TURN} connections with a second cluster of the same \
         topology and no agents; no agents over the whole run: {} µs)",
        r.baseline_p50
    );
    let mb = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "\n| throughput | no agents MiB/s | tunnel MiB/s | nginx pair MiB/s | tunnel / no agents | tunnel / nginx |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, rounds) in [("1 stream", &r.one), ("8 streams", &r.eight)] {
        let [base, tunnel, nginx] = rounds.medians();
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            mb(base),
            mb(tunnel),
            mb(nginx),
            rounds.over_base(),
            rounds.over_nginx(),
        );
    }
    println!("\n(throughput: medians of {THROUGHPUT_ROUNDS} rounds, and ratios of the medians)");
    println!(
        "\none hand-off between two threads' sockets on this machine: {:.0} µs (p50 of a loopback \
         one-byte ping-pong, halved); a tunneled connection adds four of them (client to agent, \
         agent to agent, and back), about {:.0} µs when the receiving thread sleeps (busy polling \
         keeps the agents' workers from sleeping in between)",
        r.handoff_us,
        4.0 * r.handoff_us
    );
    println!(
        "\ntarget: a pooled tunneled connection adds under 150 µs at p50 ({} µs here)",
        r.pooled.added_us()
    );
    println!(
        "target: tunnel throughput at least 1.2x the nginx pair's ({:.2}x / {:.2}x here)",
        r.one.over_nginx(),
        r.eight.over_nginx()
    );
    let ([base_1, tunnel_1, nginx_1], [base_8, tunnel_8, nginx_8]) =
        (r.one.medians(), r.eight.medians());
    let json = serde_json::json!({
        "benchmark": "tunnel",
        "handoff_us": r.handoff_us,
        "latency_p50_us": {
            "no_agents": r.baseline_p50, "first_connection": r.first_p50,
            "pooled_tunnel": r.pooled.p50_us, "pooled_tunnel_no_busy_poll": r.pooled_no_poll.p50_us,
            "fast_path": r.fast.p50_us, "nginx_pair": r.nginx.p50_us,
        },
        "no_agents_same_time_p50_us": {
            "pooled_tunnel": r.pooled.reference_p50_us,
            "pooled_tunnel_no_busy_poll": r.pooled_no_poll.reference_p50_us,
            "fast_path": r.fast.reference_p50_us, "nginx_pair": r.nginx.reference_p50_us,
        },
        "added_p50_us": {
            "first_connection": r.first_p50 as i64 - r.baseline_p50 as i64,
            "pooled_tunnel": r.pooled.added_us(),
            "pooled_tunnel_no_busy_poll": r.pooled_no_poll.added_us(),
            "fast_path": r.fast.added_us(), "nginx_pair": r.nginx.added_us(),
        },
        "throughput_bytes_per_s": {
            "no_agents_1": base_1, "no_agents_8": base_8,
            "tunnel_1": tunnel_1, "tunnel_8": tunnel_8,
            "nginx_1": nginx_1, "nginx_8": nginx_8,
        },
        "throughput_ratio_of_medians": {
            "tunnel_over_no_agents_1": r.one.over_base(),
            "tunnel_over_no_agents_8": r.eight.over_base(),
            "tunnel_over_nginx_1": r.one.over_nginx(),
            "tunnel_over_nginx_8": r.eight.over_nginx(),
        },
        "throughput_rounds_bytes_per_s": {
            "no_agents_1": r.one.base, "tunnel_1": r.one.tunnel, "nginx_1": r.one.nginx,
            "no_agents_8": r.eight.base, "tunnel_8": r.eight.tunnel, "nginx_8": r.eight.nginx,
        },
    });
    report::write_json(out_dir, "tunnel", &json)
}
