//! `memory`: the agent's resident memory (issue 21). This module owns the suite's two phases,
//! how a process's memory is read from `/proc`, and the suite's table and JSON:
//! - idle: one node whose agent has N local workloads (pods built by the harness: a netns with a
//!   veth, addresses and a cgroup each, every pod its own service account, so its own SVID), read
//!   once the agent serves all of them;
//! - connections: the benchmarks' pair (client pod on node 1, echo server on node 2), agents in
//!   data-plane mode `tunnel`, and `latch-probe hold` keeping N connections open through the
//!   tunnel at once; both agents read before, while they are held, and after they are closed.
//!
//! Agents run with the harness's defaults otherwise (busy polling at the agent's default, metrics
//! off). All figures are MB (10^6 bytes) of VmRSS and VmHWM from `/proc/PID/status`, with
//! `/proc/PID/smaps_rollup`'s split into anonymous and file-backed memory.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use latch_tests::{AgentOptions, Cluster, EchoServer, NodeId, PodSpec, agent::debug_json};
use serde::Serialize;

use crate::{pair::PORT, probe, report};

/// How long after the event that says the agent is settled its memory is read. The events
/// (readiness, every workload served, every connection echoed) say the work is done; the memory
/// it freed goes back to the allocator, and the agent's periodic work (the config file's check,
/// four times a second) runs a few times, in this period. VmHWM has the peak either way.
const SETTLE: Duration = Duration::from_secs(2);

/// How long the agent may take to serve every workload after it said it was ready.
const SERVE_TIMEOUT: Duration = Duration::from_secs(180);

/// Issue 21's targets, MB.
pub const IDLE_TARGET_MB: f64 = 16.0;
pub const IDLE_TARGET_WORKLOADS: usize = 100;
pub const CONNECTIONS_TARGET_MB: f64 = 64.0;

/// One reading of a process's memory.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    pub rss_mb: f64,
    pub hwm_mb: f64,
    /// Anonymous memory (heap, stacks) of the RSS (`smaps_rollup`'s `Anonymous`).
    pub anon_mb: f64,
    /// File-backed memory of the RSS (the binary's pages, mostly): `Rss - Anonymous`.
    pub file_mb: f64,
    /// Of the anonymous memory: the main thread's heap (`[heap]`, glibc's main arena).
    pub heap_mb: f64,
    /// Of the anonymous memory: thread stacks (the 2 MiB read-write mappings Rust's threads get).
    pub stacks_mb: f64,
    /// Of the anonymous memory: the rest (the other threads' malloc arenas, tokio's workers'
    /// among them, and large allocations, which glibc maps on their own).
    pub other_anon_mb: f64,
    pub threads: u64,
    pub fds: usize,
}

/// The resident anonymous kB of `smaps` by kind: `[heap]`, thread stacks, the rest.
fn anon_by_kind(smaps: &str) -> [u64; 3] {
    const STACK_KB: u64 = 2048;
    let mut kinds = [0u64; 3];
    // Which kind the mapping whose fields follow is, if anonymous.
    let mut current: Option<usize> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, permissions, offset, device, inode, [path].
            let perms = words.next().unwrap_or_default();
            let path = words.nth(3).unwrap_or_default();
            current = match path {
                "[heap]" => Some(0),
                "" if perms.starts_with("rw") => Some(2),
                _ => None,
            };
        } else if first == "Size:" {
            let size: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if current == Some(2) && size == STACK_KB {
                current = Some(1);
            }
        } else if first == "Anonymous:"
            && let Some(kind) = current
        {
            kinds[kind] += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    kinds
}

/// `kB` figures of `/proc/PID/{status,smaps_rollup}` lines named `key`.
fn kb(text: &str, key: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} figure"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// Read process `pid`'s memory now.
pub fn read(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let rss = kb(&status, "VmRSS")?;
    let anon = kb(&rollup, "Anonymous")?;
    let [heap, stacks, other] = anon_by_kind(&smaps);
    Ok(Memory {
        rss_mb: mb(rss),
        hwm_mb: mb(kb(&status, "VmHWM")?),
        anon_mb: mb(anon),
        file_mb: mb(rss.saturating_sub(anon)),
        heap_mb: mb(heap),
        stacks_mb: mb(stacks),
        other_anon_mb: mb(other),
        threads: kb(&status, "Threads")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("reading /proc/{pid}/fd"))?
            .count(),
    })
}

/// The node's agent's memory after [`SETTLE`].
fn settled(cluster: &Cluster, node: NodeId) -> anyhow::Result<Memory> {
    std::thread::sleep(SETTLE);
    read_agent(cluster, node)
}

#[derive(Serialize)]
struct Idle {
    workloads: usize,
    /// Seconds to build the pods (netns, veth, addresses, cgroup each).
    setup_s: f64,
    /// Seconds from starting the agent until it served every workload.
    serve_s: f64,
    agent: Memory,
}

#[derive(Serialize)]
struct Connections {
    count: usize,
    open: usize,
    failures: usize,
    errors: Vec<String>,
    /// Seconds `latch-probe hold` took to open and echo them all.
    open_s: f64,
    /// Still open when the client let go (not closed or reset by the other side meanwhile).
    still_open: usize,
    /// Source and destination agents: after a warm-up, before the connections.
    before: [Memory; 2],
    /// While all of them are held.
    held: [Memory; 2],
    /// Once they are closed and each agent's descriptors are back to what they were before.
    after: [Memory; 2],
}

impl Connections {
    /// Bytes of RSS per held connection, per agent: (held - before) / count.
    fn per_connection_bytes(&self) -> [f64; 2] {
        [0, 1]
            .map(|i| (self.held[i].rss_mb - self.before[i].rss_mb) * 1e6 / self.open.max(1) as f64)
    }
}

pub fn run(workloads: &[usize], connections: usize, out_dir: &Path) -> anyhow::Result<()> {
    println!(
        "memory benchmark: agent RSS idle with {workloads:?} local workloads (one node), and \
         with {connections} tunneled connections held open (client on node 1, echo server on \
         node 2); read {}s after the agent is settled",
        SETTLE.as_secs()
    );
    raise_nofile(connections as u64 + 4096, connections as u64 + 512)?;
    let idle = workloads
        .iter()
        .map(|&n| {
            let row = idle(n)?;
            println!(
                "  {n} workloads: pods built in {:.1}s, served {:.1}s after start, RSS {:.1} MB",
                row.setup_s, row.serve_s, row.agent.rss_mb
            );
            Ok(row)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let held = held(connections)?;
    print(&idle, &held);
    let json = serde_json::json!({
        "benchmark": "memory",
        "settle_s": SETTLE.as_secs_f64(),
        "idle": idle,
        "connections": held,
        "per_connection_bytes": { "source": held.per_connection_bytes()[0],
                                  "destination": held.per_connection_bytes()[1] },
        "targets": {
            "idle_mb": IDLE_TARGET_MB, "idle_workloads": IDLE_TARGET_WORKLOADS,
            "connections_mb": CONNECTIONS_TARGET_MB,
        },
    });
    report::write_json(out_dir, "memory", &json)
}

/// Let this process (the echo server holds every connection's far end) and the agents it starts
/// (they inherit it; each holds one descriptor per connection, the destination's to the echo
/// server and the source's from the client) have `need` descriptors: the soft limit is raised to
/// it, and the hard one too where that is permitted (`CAP_SYS_RESOURCE`); short of it, to the
/// hard limit if that still leaves `least`.
fn raise_nofile(need: u64, least: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft >= need {
        return Ok(());
    }
    let to = if setrlimit(Resource::RLIMIT_NOFILE, need, hard.max(need)).is_ok() {
        need
    } else if hard >= least {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("raising RLIMIT_NOFILE from {soft} to {hard}"))?;
        hard
    } else {
        bail!(
            "RLIMIT_NOFILE is {soft} (hard {hard}) and may not be raised: {least} descriptors \
             are needed per process (echo server, agents, client)"
        );
    };
    if to != soft {
        println!("RLIMIT_NOFILE raised from {soft} to {to} (the agents inherit it)");
    }
    Ok(())
}

/// One node, `n` mesh pods, its agent started and serving all of them.
fn idle(n: usize) -> anyhow::Result<Idle> {
    let start = Instant::now();
    let mut cluster = Cluster::new()?;
    let node = cluster.add_node()?;
    for i in 0..n {
        cluster.add_pod(
            node,
            PodSpec::mesh(&format!("w{i}"), "bench", &format!("sa{i}")),
        )?;
    }
    let setup_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    cluster.start_agent(node, AgentOptions::default())?;
    wait_serving(&cluster, node, n)?;
    let serve_s = start.elapsed().as_secs_f64();
    let agent = settled(&cluster, node)?;
    Ok(Idle {
        workloads: n,
        setup_s,
        serve_s,
        agent,
    })
}

/// Wait until the agent's debug status says it serves all `n` workloads: none failed, a
/// certificate for each (every pod is its own identity), each in the kernel's workload map.
fn wait_serving(cluster: &Cluster, node: NodeId, n: usize) -> anyhow::Result<()> {
    let socket = cluster.debug_socket(node);
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        let status = debug_json(&socket, &["status"])?;
        let failed = status["failedWorkloads"].as_array().map_or(0, Vec::len);
        let certificates = status["certificates"].as_array().map_or(0, Vec::len);
        let mapped = status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == "LATCH_WORKLOADS"))
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or(0);
        if failed > 0 {
            bail!("the agent failed to serve {failed} of {n} workloads: {status}");
        }
        if certificates >= n && mapped >= n as u64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the agent did not serve {n} workloads within {SERVE_TIMEOUT:?}: {status}");
        }
        // The status offers no notification; asking is cheap.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pair, agents in `tunnel` mode, and `count` connections held open through them.
fn held(count: usize) -> anyhow::Result<Connections> {
    let pair = Cluster::two_nodes(
        PodSpec::mesh("client", "bench", "client"),
        PodSpec::mesh("server", "bench", "server"),
    )?;
    let echo = EchoServer::start_streaming(&pair.cluster.pod(pair.server).netns(), PORT)?;
    let to = pair.cluster.pod(pair.server).addr4(PORT).to_string();
    let options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    let pair = pair.start_agents(options)?;
    let (cluster, nodes) = (&pair.cluster, [pair.n1, pair.n2]);
    // The pool's connection and every code path of a tunneled connection, once.
    let warmup = probe::rate(cluster, pair.client, &to, 100)?;
    if warmup.failures > 0 {
        bail!("{} of 100 warm-up connections failed", warmup.failures);
    }
    let before = [settled(cluster, nodes[0])?, read_agent(cluster, nodes[1])?];

    let mut child = cluster
        .probe_command(
            pair.client,
            &["hold", "--to", &to, "--count", &count.to_string()],
        )?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting latch-probe hold")?;
    let stdin = child.stdin.take().context("latch-probe hold's stdin")?;
    let mut lines =
        BufReader::new(child.stdout.take().context("latch-probe hold's stdout")?).lines();
    let mut next_line = |what: &str| -> anyhow::Result<serde_json::Value> {
        let line = lines
            .next()
            .with_context(|| format!("latch-probe hold ended before its {what} line"))?
            .context("reading latch-probe hold")?;
        serde_json::from_str(&line).with_context(|| format!("latch-probe hold: {line}"))
    };
    let opened = next_line("open")?;
    let open = opened["open"].as_u64().unwrap_or(0) as usize;
    if opened["event"] != "open" {
        bail!("latch-probe hold failed: {opened}");
    }
    println!(
        "  {open} of {count} connections open and echoed in {:.1}s (echo server accepted {})",
        opened["open_s"].as_f64().unwrap_or(0.0),
        echo.accepted()
    );
    if open < count {
        print_agent_complaints(cluster, &nodes);
    }
    let held = [settled(cluster, nodes[0])?, read_agent(cluster, nodes[1])?];

    // Let go: closing stdin ends the probe, which closes every connection.
    drop(stdin);
    let closed = next_line("closed")?;
    let _ = child.wait();
    let baseline = before.map(|m| m.fds);
    for (node, fds) in nodes.iter().zip(baseline) {
        let back = latch_tests::eventually(Duration::from_secs(60), || {
            cluster
                .node(*node)
                .agent
                .as_ref()
                .is_some_and(|a| a.open_fds() <= fds + 8)
        });
        if !back {
            println!(
                "  node {}'s agent still holds more descriptors than before the connections",
                node.0 + 1
            );
        }
    }
    let after = [settled(cluster, nodes[0])?, read_agent(cluster, nodes[1])?];
    Ok(Connections {
        count,
        open,
        failures: opened["failures"].as_u64().unwrap_or(0) as usize,
        errors: serde_json::from_value(opened["errors"].clone()).unwrap_or_default(),
        open_s: opened["open_s"].as_f64().unwrap_or(0.0),
        still_open: closed["still_open"].as_u64().unwrap_or(0) as usize,
        before,
        held,
        after,
    })
}

/// Each agent's warnings and errors so far (the first ten), to say why a connection failed.
fn print_agent_complaints(cluster: &Cluster, nodes: &[NodeId]) {
    for node in nodes {
        let Some(agent) = cluster.node(*node).agent.as_ref() else {
            continue;
        };
        let complaints: Vec<String> = agent
            .lines()
            .into_iter()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .collect();
        println!(
            "  node {}'s agent: {} warnings and errors{}",
            node.0 + 1,
            complaints.len(),
            if complaints.is_empty() {
                ""
            } else {
                " (the first ten):"
            }
        );
        for line in complaints.iter().take(10) {
            println!("    {line}");
        }
    }
}

/// The node's agent's memory now (after another node's [`settled`]).
fn read_agent(cluster: &Cluster, node: NodeId) -> anyhow::Result<Memory> {
    let pid = cluster
        .node(node)
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .context("the node's agent is not running")?;
    read(pid)
}

fn print(idle: &[Idle], held: &Connections) {
    println!(
        "\n| agent | RSS MB | VmHWM MB | anon MB | (main heap | stacks | other anon) | file MB | threads | fds |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let row = |label: String, m: &Memory| {
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            m.rss_mb,
            m.hwm_mb,
            m.anon_mb,
            m.heap_mb,
            m.stacks_mb,
            m.other_anon_mb,
            m.file_mb,
            m.threads,
            m.fds
        );
    };
    for i in idle {
        row(format!("idle, {} workloads", i.workloads), &i.agent);
    }
    for (side, i) in [("source", 0), ("destination", 1)] {
        row(
            format!("{side}, tunnel mode, before the connections"),
            &held.before[i],
        );
        row(
            format!("{side}, {} tunneled connections held", held.open),
            &held.held[i],
        );
        row(format!("{side}, after they closed"), &held.after[i]);
    }
    let per = held.per_connection_bytes();
    println!(
        "\n{} of {} connections opened ({} failures{}) in {:.1}s; {} still open when let go",
        held.open,
        held.count,
        held.failures,
        if held.errors.is_empty() {
            String::new()
        } else {
            format!(": {}", held.errors.join("; "))
        },
        held.open_s,
        held.still_open
    );
    println!(
        "per held connection: source {:.0} bytes, destination {:.0} bytes of RSS",
        per[0], per[1]
    );
    if let Some(i) = idle.iter().find(|i| i.workloads == IDLE_TARGET_WORKLOADS) {
        println!(
            "target: under {IDLE_TARGET_MB} MB idle with {IDLE_TARGET_WORKLOADS} workloads: \
             {:.1} MB ({})",
            i.agent.rss_mb,
            met(i.agent.rss_mb < IDLE_TARGET_MB)
        );
    }
    let worst = held.held[0].rss_mb.max(held.held[1].rss_mb);
    println!(
        "target: under {CONNECTIONS_TARGET_MB} MB with {} tunneled connections: source {:.1}, \
         destination {:.1} MB ({})",
        held.open,
        held.held[0].rss_mb,
        held.held[1].rss_mb,
        met(worst < CONNECTIONS_TARGET_MB && held.open == held.count)
    );
    let _ = std::io::stdout().flush();
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "missed" }
}
