//! `latch-probe` run inside a pod for numbers: sequential connections ([`rate`]) and bulk
//! transfers ([`throughput`]).

use std::process::Command;

use anyhow::{Context as _, bail};
use latch_tests::{Cluster, PodId, env, netns};
use serde::Deserialize;

/// What `latch-probe rate` measured.
#[derive(Deserialize)]
pub struct Rate {
    pub count: usize,
    pub failures: usize,
    pub total_s: f64,
    pub latencies_us: Vec<u64>,
}

/// Run `latch-probe ARGS` in pod `client` and parse the JSON it prints.
fn probe_json(
    cluster: &Cluster,
    client: PodId,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let what = args.first().copied().unwrap_or_default();
    let pod = cluster.pod(client);
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.args(args);
    netns::enter(&mut cmd, &pod.netns(), Some(&pod.cgroup))?;
    let out = cmd
        .output()
        .with_context(|| format!("running latch-probe {what}"))?;
    if !out.status.success() {
        bail!(
            "latch-probe {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing latch-probe {what} output"))
}

/// `count` sequential connections from `client` to `to`, each a one-byte request and its echo.
pub fn rate(cluster: &Cluster, client: PodId, to: &str, count: usize) -> anyhow::Result<Rate> {
    let v = probe_json(
        cluster,
        client,
        &["rate", "--to", to, "--count", &count.to_string()],
    )?;
    serde_json::from_value(v).context("parsing latch-probe rate output")
}

/// Bytes per second moved by `streams` connections of `mib` MiB each to `to` (both directions).
pub fn throughput(
    cluster: &Cluster,
    client: PodId,
    to: &str,
    streams: usize,
    mib: usize,
) -> anyhow::Result<f64> {
    let v = probe_json(
        cluster,
        client,
        &[
            "throughput",
            "--to",
            to,
            "--streams",
            &streams.to_string(),
            "--mb",
            &mib.to_string(),
        ],
    )?;
    if v["failures"].as_u64() != Some(0) {
        bail!("throughput run to {to} had failures: {v}");
    }
    Ok(v["bytes"].as_f64().unwrap_or(0.0) / v["total_s"].as_f64().unwrap_or(1.0))
}

/// What `latch-probe load` measured (latencies in microseconds, from when each request was due).
#[derive(Deserialize, serde::Serialize, Clone)]
pub struct Load {
    pub due: usize,
    pub completed: usize,
    pub failures: usize,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// An open-loop load from `client` to `to`: `rate` requests of `bytes` bytes per second for
/// `secs` seconds, over `conns` persistent connections, or a fresh connection each if `conns` is
/// `None`.
pub fn load(
    cluster: &Cluster,
    client: PodId,
    to: &str,
    rate: u32,
    conns: Option<usize>,
    secs: f64,
    bytes: usize,
) -> anyhow::Result<Load> {
    let (rate, secs, bytes) = (rate.to_string(), secs.to_string(), bytes.to_string());
    let conns = conns.map(|c| c.to_string());
    let mut args = vec![
        "load", "--to", to, "--rate", &rate, "--secs", &secs, "--bytes", &bytes,
    ];
    match &conns {
        Some(conns) => args.extend(["--conns", conns]),
        None => args.push("--fresh"),
    }
    let v = probe_json(cluster, client, &args)?;
    serde_json::from_value(v).context("parsing latch-probe load output")
}
