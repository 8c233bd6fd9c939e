//! `cargo xtask bench`: numbers, never pass/fail (thresholds live here, not in tests). Prints
//! markdown tables and writes JSON under `$LATCH_BENCH_OUT` (default `target/bench/`).
//!
//! - `datapath`: connection rate and latency on one two-node topology in three phases: no agents
//!   (baseline), agents with a cached allow (kernel fast path on both nodes; with the
//!   anti-spoofing check's own cost per packet, from test runs of the loaded program), and every
//!   connection carried over the pooled mTLS tunnel (data-plane mode `tunnel`, nothing cached).
//! - `tunnel`: the latency a first, a pooled and a fast-path connection add, and throughput,
//!   against no agents and against an nginx mTLS stream-proxy pair. Each phase is measured in
//!   turns with a second cluster of the same topology that never runs agents (which also hosts
//!   the nginx pair), so that the VM's drift falls on both sides of every comparison alike.
//! - `policy`: the policy engine's decision cost and the revocation sweep, in-process.
//! - `compare`: agent builds or settings side by side, for differences a single run cannot
//!   resolve: each variant's agents run a cluster of their own in data-plane mode `tunnel`, all
//!   set up at once, and the pooled connection's latency is taken from each in turn (with the
//!   no-agent reference in the same rotation).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use latch_tests::{AgentOptions, Cluster, EchoServer, PodId, PodSpec, TwoNodes, env, netns};
use serde::Deserialize;

const PORT: u16 = 8080;

#[derive(Deserialize)]
struct Rate {
    count: usize,
    failures: usize,
    total_s: f64,
    latencies_us: Vec<u64>,
}

struct Phase {
    name: &'static str,
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    failures: usize,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run_rate(
    cluster: &Cluster,
    client: PodId,
    server: PodId,
    count: usize,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let pod = cluster.pod(client);
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.args([
        "rate",
        "--to",
        &cluster.pod(server).addr4(PORT).to_string(),
        "--count",
        &count.to_string(),
    ]);
    netns::enter(&mut cmd, &pod.netns(), Some(&pod.cgroup))?;
    let out = cmd.output().context("running latch-probe rate")?;
    if !out.status.success() {
        bail!(
            "latch-probe rate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r: Rate =
        serde_json::from_slice(&out.stdout).context("parsing latch-probe rate output")?;
    r.latencies_us.sort_unstable();
    Ok(Phase {
        name,
        rate: (r.count - r.failures) as f64 / r.total_s,
        p50_us: percentile(&r.latencies_us, 0.50),
        p99_us: percentile(&r.latencies_us, 0.99),
        failures: r.failures,
    })
}

fn probe_json(
    cluster: &Cluster,
    client: PodId,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let pod = cluster.pod(client);
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.args(args);
    netns::enter(&mut cmd, &pod.netns(), Some(&pod.cgroup))?;
    let out = cmd.output().context("running latch-probe")?;
    if !out.status.success() {
        bail!(
            "latch-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing latch-probe output")
}

/// Bytes per second moved by `streams` connections of `mib` MiB each to `to` (both directions).
fn throughput(
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

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `count` sequential connections from `client` to `to`, each a one-byte request and its echo.
fn rate(cluster: &Cluster, client: PodId, to: &str, count: usize) -> anyhow::Result<Rate> {
    let v = probe_json(
        cluster,
        client,
        &["rate", "--to", to, "--count", &count.to_string()],
    )?;
    serde_json::from_value(v).context("parsing latch-probe rate output")
}

/// Connections measured in turns, added up.
#[derive(Default)]
struct Tally {
    count: usize,
    failures: usize,
    seconds: f64,
    latencies: Vec<u64>,
}

impl Tally {
    fn add(&mut self, r: Rate) {
        self.count += r.count;
        self.failures += r.failures;
        self.seconds += r.total_s;
        self.latencies.extend(r.latencies_us);
    }

    /// Completed connections per second.
    fn rate(&self) -> f64 {
        (self.count - self.failures) as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        percentile(&sorted, p)
    }

    fn phase(&self, name: &'static str) -> Phase {
        Phase {
            name,
            rate: self.rate(),
            p50_us: self.percentile(0.5),
            p99_us: self.percentile(0.99),
            failures: self.failures,
        }
    }
}

/// The benchmarks' topology: a client pod on node 1 and an echo server on [`PORT`] in a pod on
/// node 2; with the server's address.
fn client_and_echo() -> anyhow::Result<(TwoNodes, EchoServer, String)> {
    let pair = Cluster::two_nodes(
        PodSpec::mesh("client", "bench", "client"),
        PodSpec::mesh("server", "bench", "server"),
    )?;
    let echo = pair.cluster.echo_server(pair.server, PORT)?;
    let to = pair.cluster.pod(pair.server).addr4(PORT).to_string();
    Ok((pair, echo, to))
}

/// The no-agent reference: a second cluster of the same topology that never runs agents, measured
/// in turns with each phase (see [`paired`]). It also hosts the nginx pair the tunnel is compared
/// with, so that the two are measured in turns too.
///
/// The reference makes as many connections as all the phases together, to one address, within a
/// minute or two; a client whose closed connections wait in TIME_WAIT for a minute would run out
/// of free ports for that destination (connect() then searches the port range for
/// milliseconds), so the direct turns are spread over [`REFERENCE_CLIENTS`] pods, and the nginx
/// pair's client is a pod of its own.
struct Reference {
    nginx: Option<latch_tests::nginx::NginxPair>,
    _echo: latch_tests::EchoServer,
    cluster: Cluster,
    clients: Vec<PodId>,
    /// Turns taken so far: which client is next.
    turns: std::cell::Cell<usize>,
    nginx_client: PodId,
    server: PodId,
    /// The echo server, directly.
    to: String,
}

/// Client pods of the reference's direct turns.
const REFERENCE_CLIENTS: usize = 4;

/// How the reference's client reaches its echo server.
#[derive(Clone, Copy)]
enum Via {
    Direct,
    Nginx,
}

impl Reference {
    fn new() -> anyhow::Result<Self> {
        let (pair, echo, to) = client_and_echo()?;
        let TwoNodes {
            mut cluster,
            n1,
            client,
            server,
            ..
        } = pair;
        let mut clients = vec![client];
        for i in 1..REFERENCE_CLIENTS {
            clients.push(
                cluster.add_pod(n1, PodSpec::mesh(&format!("client{i}"), "bench", "client"))?,
            );
        }
        let nginx_client = cluster.add_pod(n1, PodSpec::mesh("nginx", "bench", "client"))?;
        Ok(Self {
            nginx: None,
            _echo: echo,
            cluster,
            clients,
            turns: std::cell::Cell::new(0),
            nginx_client,
            server,
            to,
        })
    }

    /// An nginx mTLS stream-proxy pair (sidecar style) in front of the echo server.
    fn start_nginx(&mut self) -> anyhow::Result<()> {
        self.nginx = Some(latch_tests::nginx::NginxPair::start(
            &self.cluster,
            self.nginx_client,
            self.server,
            PORT,
        )?);
        Ok(())
    }

    fn client_and_destination(&self, via: Via) -> (PodId, String) {
        match via {
            Via::Direct => {
                let turn = self.turns.replace(self.turns.get() + 1);
                (self.clients[turn % self.clients.len()], self.to.clone())
            }
            Via::Nginx => (
                self.nginx_client,
                format!("127.0.0.1:{}", latch_tests::nginx::CLIENT_PORT),
            ),
        }
    }

    fn rate(&self, via: Via, count: usize) -> anyhow::Result<Rate> {
        let (client, to) = self.client_and_destination(via);
        rate(&self.cluster, client, &to, count)
    }

    fn throughput(&self, via: Via, streams: usize, mib: usize) -> anyhow::Result<f64> {
        let (client, to) = self.client_and_destination(via);
        throughput(&self.cluster, client, &to, streams, mib)
    }
}

/// Connections per turn of a paired measurement.
const TURN: usize = 250;

/// A phase's p50 and the no-agent reference's p50 over the same stretch of time.
#[derive(Clone, Copy)]
struct Paired {
    p50_us: u64,
    reference_p50_us: u64,
}

impl Paired {
    fn added_us(&self) -> i64 {
        self.p50_us as i64 - self.reference_p50_us as i64
    }
}

/// Measure `count` connections with `measure` and as many directly through the reference, in
/// alternating turns of [`TURN`]: this VM's speed drifts by tens of microseconds per connection
/// within a minute, and a phase measured apart from its baseline would carry that drift into the
/// difference. Returns (the phase's tally, the reference's).
fn paired(
    reference: &Reference,
    count: usize,
    mut measure: impl FnMut(usize) -> anyhow::Result<Rate>,
) -> anyhow::Result<(Tally, Tally)> {
    let (mut mine, mut theirs) = (Tally::default(), Tally::default());
    let mut left = count;
    while left > 0 {
        let n = left.min(TURN);
        mine.add(measure(n)?);
        theirs.add(reference.rate(Via::Direct, n)?);
        left -= n;
    }
    Ok((mine, theirs))
}

/// [`paired`] for latency, where every connection must succeed; the reference's latencies are
/// also added to `all`.
fn paired_latency(
    reference: &Reference,
    all: &mut Vec<u64>,
    count: usize,
    measure: impl FnMut(usize) -> anyhow::Result<Rate>,
) -> anyhow::Result<Paired> {
    let (mine, theirs) = paired(reference, count, measure)?;
    if mine.failures + theirs.failures > 0 {
        bail!(
            "{} of {} connections failed ({} of the reference's)",
            mine.failures,
            mine.count,
            theirs.failures
        );
    }
    all.extend_from_slice(&theirs.latencies);
    Ok(Paired {
        p50_us: mine.percentile(0.5),
        reference_p50_us: theirs.percentile(0.5),
    })
}

/// Rounds of the throughput comparison (no agents, tunnel, nginx pair in turn); medians are
/// reported, and ratios are of medians. (The rounds' own ratios were tried as well: runs seconds
/// apart differ as much as runs a minute apart on this VM, so pairing them within a round only
/// compounded two runs' noise.)
const THROUGHPUT_ROUNDS: usize = 5;

struct TunnelReport {
    handoff_us: f64,
    nginx: Paired,
    /// The reference over the whole run.
    baseline_p50: u64,
    first_p50: u64,
    pooled: Paired,
    /// The same with `dataplane.busyPoll: 0s`.
    pooled_no_poll: Paired,
    fast: Paired,
    /// Throughput with one stream, and with eight.
    one: Rounds,
    eight: Rounds,
}

/// Every throughput round's bytes per second, by setup.
#[derive(Default)]
struct Rounds {
    base: Vec<f64>,
    tunnel: Vec<f64>,
    nginx: Vec<f64>,
}

impl Rounds {
    /// The medians: no agents, tunnel, nginx pair.
    fn medians(&self) -> [f64; 3] {
        [&self.base, &self.tunnel, &self.nginx].map(|runs| median(runs.clone()))
    }

    /// Tunnel / no agents, of the medians.
    fn over_base(&self) -> f64 {
        let [base, tunnel, _] = self.medians();
        tunnel / base
    }

    /// Tunnel / nginx pair, of the medians.
    fn over_nginx(&self) -> f64 {
        let [_, tunnel, nginx] = self.medians();
        tunnel / nginx
    }
}

fn tunnel(count: usize, samples: usize, mib: usize) -> anyhow::Result<TunnelReport> {
    let mut reference = Reference::new()?;
    reference.start_nginx()?;
    // Every reference latency measured, for the no-agent row.
    let mut all_reference = Vec::new();
    let (pair, _echo, to) = client_and_echo()?;
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = pair;
    // Another identity on the server's node: a restarted agent's first connection goes there, so
    // the measured first connection of the pair finds a warm agent, as it would in a cluster.
    let other = cluster.add_pod(n2, PodSpec::mesh("other", "bench", "other"))?;
    let _other_echo = cluster.echo_server(other, PORT)?;

    run_rate(&cluster, client, server, count / 10, "warm-up")?;
    reference.rate(Via::Direct, count / 10)?;
    reference.rate(Via::Nginx, count / 10)?;

    // First connections: every sample starts with an empty pool and an empty cache (the client's
    // agent restarted, then warmed up on another pair).
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, fast_options.clone())?;
    cluster.start_agent(n2, fast_options)?;
    let mut first = Vec::with_capacity(samples);
    for _ in 0..samples {
        for node in [n1, n2] {
            latch::datapath::KernelMaps::open_pinned(&cluster.node(node).pin_dir)?
                .remove_verdicts_where(|_, _| true)?;
        }
        cluster.agent(n1).restart()?;
        run_rate(&cluster, client, other, 1, "warm-up")?;
        first.push(run_rate(&cluster, client, server, 1, "first connection")?.p50_us);
    }
    first.sort_unstable();
    run_rate(&cluster, client, server, count / 10, "warm-up")?;
    let fast = paired_latency(&reference, &mut all_reference, count, |n| {
        rate(&cluster, client, &to, n)
    })?;
    for node in [n1, n2] {
        cluster.agent(node).terminate()?;
        cluster.agent(node).uninstall()?;
    }

    let tunnel_options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, tunnel_options.clone())?;
    cluster.start_agent(n2, tunnel_options.clone())?;
    run_rate(&cluster, client, server, count / 10, "warm-up")?;
    let pooled = paired_latency(&reference, &mut all_reference, count, |n| {
        rate(&cluster, client, &to, n)
    })?;
    // Throughput: no agents, the tunnel and the nginx pair in turns.
    let (mut one, mut eight) = (Rounds::default(), Rounds::default());
    for _ in 0..THROUGHPUT_ROUNDS {
        for (rounds, streams, mib) in [(&mut one, 1, mib), (&mut eight, 8, mib / 4)] {
            rounds
                .base
                .push(reference.throughput(Via::Direct, streams, mib)?);
            rounds
                .tunnel
                .push(throughput(&cluster, client, &to, streams, mib)?);
            rounds
                .nginx
                .push(reference.throughput(Via::Nginx, streams, mib)?);
        }
    }
    for node in [n1, n2] {
        cluster.agent(node).terminate()?;
        cluster.agent(node).uninstall()?;
    }
    // What busy polling is worth: the same pooled connections with it turned off.
    let no_poll_options = AgentOptions {
        busy_poll: Some("0s".into()),
        ..tunnel_options
    };
    cluster.start_agent(n1, no_poll_options.clone())?;
    cluster.start_agent(n2, no_poll_options)?;
    run_rate(&cluster, client, server, count / 10, "warm-up")?;
    let pooled_no_poll = paired_latency(&reference, &mut all_reference, count, |n| {
        rate(&cluster, client, &to, n)
    })?;
    for node in [n1, n2] {
        cluster.agent(node).terminate()?;
        cluster.agent(node).uninstall()?;
    }

    // The same through the nginx mTLS stream-proxy pair (sidecar style), no agents.
    let nginx_latency = paired_latency(&reference, &mut all_reference, count, |n| {
        reference.rate(Via::Nginx, n)
    })?;
    all_reference.sort_unstable();
    Ok(TunnelReport {
        handoff_us: handoff_us()?,
        nginx: nginx_latency,
        baseline_p50: percentile(&all_reference, 0.5),
        first_p50: percentile(&first, 0.5),
        pooled,
        pooled_no_poll,
        fast,
        one,
        eight,
    })
}

/// What one hand-off of a few bytes from one thread's socket to another's costs on this machine
/// (half the p50 round trip of a one-byte ping-pong over loopback): the floor under every hop a
/// proxy adds, whatever the proxy does.
fn handoff_us() -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    const ROUNDS: usize = 20_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read(&mut b)? == 1 {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr).context("connecting on loopback")?;
    s.set_nodelay(true)?;
    let mut rtt = Vec::with_capacity(ROUNDS);
    let mut b = [0u8; 1];
    for _ in 0..ROUNDS {
        let t = std::time::Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
    rtt.sort_unstable();
    Ok(percentile(&rtt, 0.5) as f64 / 2000.0)
}

fn print_tunnel(r: &TunnelReport, out_dir: &std::path::Path) -> anyhow::Result<()> {
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
    let path = out_dir.join("tunnel.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The datapath phases, each with the no-agent reference's connection rate over the same turns;
/// the first is the reference itself over all of them.
/// One agent build or setting under comparison.
struct Variant {
    label: String,
    options: AgentOptions,
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;

    /// `LABEL=AGENT_BINARY[,busyPoll=DURATION]`.
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
                _ => {
                    bail!("variant {label}: unknown setting {setting:?} (known: busyPoll=DURATION)")
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
    cluster: Cluster,
    client: PodId,
    to: String,
    _echo: EchoServer,
    /// The source and destination agents' process IDs.
    agents: [u32; 2],
    tally: Tally,
    /// CPU time the source and destination agents used during the variant's turns.
    cpu_ns: [u64; 2],
}

/// CPU time used so far by all threads of process `pid`, in nanoseconds (the first field of
/// each thread's `schedstat`, kept by the scheduler itself rather than sampled at ticks); 0 if
/// it cannot be read.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The value after `name` among `args`.
fn flag(args: &[String], name: &str) -> anyhow::Result<Option<usize>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let value = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a number"))?;
            Ok(Some(
                value.parse().with_context(|| format!("{name} {value:?}"))?,
            ))
        }
    }
}

fn compare(args: &[String], out_dir: &std::path::Path) -> anyhow::Result<()> {
    let turns = flag(args, "--turns")?.unwrap_or(30);
    let per_turn = flag(args, "--per-turn")?.unwrap_or(TURN);
    let mut specs = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg.starts_with("--") {
            rest.next();
        } else {
            specs.push(arg.parse::<Variant>()?);
        }
    }
    if specs.is_empty() {
        bail!("compare: name at least one variant, LABEL=AGENT_BINARY[,busyPoll=DURATION]");
    }
    println!(
        "compare: pooled tunneled connections (1-byte request + echo), {turns} turns of \
         {per_turn} per variant, each variant in a cluster of its own, with the no-agent \
         reference in the rotation"
    );
    let reference = Reference::new()?;
    let mut clusters = Vec::new();
    for variant in &specs {
        let (pair, echo, to) = client_and_echo()?;
        let pair = pair.start_agents(variant.options.clone())?;
        rate(&pair.cluster, pair.client, &to, per_turn)?;
        let agents = [pair.n1, pair.n2].map(|n| {
            pair.cluster
                .node(n)
                .agent
                .as_ref()
                .and_then(|a| a.pid())
                .unwrap_or_default()
        });
        clusters.push(Compared {
            cluster: pair.cluster,
            client: pair.client,
            to,
            _echo: echo,
            agents,
            tally: Tally::default(),
            cpu_ns: [0; 2],
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
            c.tally.add(rate(&c.cluster, c.client, &c.to, per_turn)?);
            for (sum, (pid, before)) in c.cpu_ns.iter_mut().zip(c.agents.iter().zip(before)) {
                *sum += cpu_ns(*pid).saturating_sub(before);
            }
        }
    }
    let reference_p50 = reference_tally.percentile(0.5);
    println!(
        "\n| variant | p50 µs | p99 µs | added to no agents µs | source agent CPU µs | \
         destination agent CPU µs | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| no agents (reference) | {reference_p50} | {} | 0 | | | {} |",
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
            "| {} | {p50} | {} | {added} | {source_cpu:.1} | {destination_cpu:.1} | {} |",
            variant.label,
            tally.percentile(0.99),
            tally.failures
        );
        rows.push(serde_json::json!({
            "label": variant.label, "p50_us": p50, "added_p50_us": added,
            "p99_us": tally.percentile(0.99), "failures": tally.failures,
            "source_agent_cpu_us": source_cpu, "destination_agent_cpu_us": destination_cpu,
        }));
    }
    println!(
        "\n(agent CPU: per connection, all of the agent's threads, from /proc/PID/task/*/schedstat; \
         with busy polling on it includes the polling)"
    );
    let json = serde_json::json!({
        "benchmark": "compare", "turns": turns, "per_turn": per_turn,
        "no_agents_p50_us": reference_p50, "variants": rows,
    });
    let path = out_dir.join("compare.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Nanoseconds per packet of the anti-spoofing check, by kind of packet.
type PacketCosts = Vec<(&'static str, u32)>;

fn datapath(count: usize) -> anyhow::Result<(Vec<(Phase, f64)>, PacketCosts)> {
    let reference = Reference::new()?;
    let (pair, _echo, to) = client_and_echo()?;
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = pair;
    let warmup = count / 10;
    let mut all_reference = Tally::default();

    run_rate(&cluster, client, server, warmup, "warm-up")?;
    reference.rate(Via::Direct, warmup)?;

    // Fast path: agents on both nodes; the first connection crosses the tunnel, the rest go
    // straight through the kernel on both sides.
    let fast_options = AgentOptions {
        verdict_ttl: "1h".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, fast_options.clone())?;
    cluster.start_agent(n2, fast_options)?;
    run_rate(&cluster, client, server, warmup, "warm-up")?;
    let (fast, fast_reference) = paired(&reference, count, |n| rate(&cluster, client, &to, n))?;
    // An agent without the check (an older build, through LATCH_BIN) has no per-packet cost.
    let antispoof = antispoof_cost(&cluster, client, server).unwrap_or_else(|e| {
        println!("no anti-spoofing cost measured: {e:#}");
        Vec::new()
    });
    for node in [n1, n2] {
        cluster.agent(node).terminate()?;
        cluster.agent(node).uninstall()?;
    }

    // Through the agents: data-plane mode `tunnel` caches nothing, so every connection is
    // redirected and carried over the (pooled) mTLS tunnel.
    let tunnel_options = AgentOptions {
        dataplane_mode: "tunnel".into(),
        ..AgentOptions::default()
    };
    cluster.start_agent(n1, tunnel_options.clone())?;
    cluster.start_agent(n2, tunnel_options)?;
    run_rate(&cluster, client, server, warmup, "warm-up")?;
    let (redirected, redirected_reference) =
        paired(&reference, count, |n| rate(&cluster, client, &to, n))?;
    for tally in [&fast_reference, &redirected_reference] {
        all_reference.count += tally.count;
        all_reference.failures += tally.failures;
        all_reference.seconds += tally.seconds;
        all_reference.latencies.extend_from_slice(&tally.latencies);
    }
    let phases = vec![
        (
            all_reference.phase("no agents (all turns)"),
            all_reference.rate(),
        ),
        (
            fast.phase("agents, cached allow (fast path)"),
            fast_reference.rate(),
        ),
        (
            redirected.phase("through the agents (mTLS tunnel)"),
            redirected_reference.rate(),
        ),
    ];
    Ok((phases, antispoof))
}

fn policy(out_dir: &std::path::Path) -> anyhow::Result<()> {
    use latch_tests::policy_bench::{decision_cost, revocation};
    println!("policy benchmark: decision cost by loaded policies; revocation of cached verdicts");
    let iterations = 200_000;
    let costs = [10, 1_000, 10_000]
        .into_iter()
        .map(|n| decision_cost(n, iterations))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let base = costs[0].ns_per_decision;
    println!("\n| policies loaded | ns per decision | ratio to 10 policies |");
    println!("|---:|---:|---:|");
    for c in &costs {
        println!(
            "| {} | {:.0} | {:.2} |",
            c.policies,
            c.ns_per_decision,
            c.ns_per_decision / base
        );
    }
    let r = revocation(100_000)?;
    println!("\n| revocation | entries | removed | ms |");
    println!("|---|---:|---:|---:|");
    println!(
        "| read every entry | {} | 0 | {:.1} |",
        r.entries,
        r.read_all.as_secs_f64() * 1e3
    );
    println!(
        "| sweep, nothing to revoke | {} | 0 | {:.1} |",
        r.entries,
        r.sweep_nothing_to_revoke.as_secs_f64() * 1e3
    );
    println!(
        "| deny-all: revoke every entry | {} | {} | {:.1} |",
        r.entries,
        r.removed,
        r.revoke_all.as_secs_f64() * 1e3
    );
    let at_10k = costs.last().map(|c| c.ns_per_decision).unwrap_or_default();
    println!(
        "\ntargets: under 1000 ns per decision at 10,000 policies ({at_10k:.0} ns); revocation of 100,000 entries under 100 ms ({:.1} ms)",
        r.revoke_all.as_secs_f64() * 1e3
    );
    let json = serde_json::json!({
        "benchmark": "policy",
        "decisions": costs.iter().map(|c| serde_json::json!({
            "policies": c.policies, "ns_per_decision": c.ns_per_decision,
            "ratio_to_10": c.ns_per_decision / base,
        })).collect::<Vec<_>>(),
        "revocation": {
            "entries": r.entries, "removed": r.removed,
            "read_all_ms": r.read_all.as_secs_f64() * 1e3,
            "sweep_nothing_to_revoke_ms": r.sweep_nothing_to_revoke.as_secs_f64() * 1e3,
            "revoke_all_ms": r.revoke_all.as_secs_f64() * 1e3,
        },
    });
    let path = out_dir.join("policy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Let the benchmark and everything it starts (agents, applications, clients) run on every online
/// CPU. A process may inherit a narrower affinity than the machine has (this workplace's process
/// supervisor pins itself, and so every process it starts, to CPU 0); the simulated cluster would
/// then run on one core and measure that instead.
fn use_every_cpu() -> anyhow::Result<()> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let mut cpus = CpuSet::new();
    for range in online.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (usize, usize) = (
            first.parse().context("parsing the online CPUs")?,
            last.parse().context("parsing the online CPUs")?,
        );
        for cpu in first..=last {
            cpus.set(cpu).context("adding a CPU to the set")?;
        }
    }
    let count = |set: &CpuSet| {
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .count()
    };
    let inherited = count(&sched_getaffinity(Pid::from_raw(0)).context("reading CPU affinity")?);
    sched_setaffinity(Pid::from_raw(0), &cpus).context("setting CPU affinity")?;
    let now = count(&sched_getaffinity(Pid::from_raw(0)).context("reading CPU affinity")?);
    if now != inherited {
        println!("running on {now} CPUs (the benchmark was started on {inherited})");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("");
    use_every_cpu()?;
    let count = args
        .iter()
        .position(|a| a == "--count")
        .and_then(|i| args.get(i + 1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(5000);
    let out_dir = std::env::var_os("LATCH_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    match what {
        "datapath" => {}
        "tunnel" => {
            const MIB: usize = 256;
            println!(
                "tunnel benchmark: {count} connections per latency phase; throughput: one stream \
                 of {MIB} MiB, eight of {} MiB (echoed back), median of {THROUGHPUT_ROUNDS} rounds \
                 of no agents, tunnel and nginx pair in turn; client on node 1, server on node 2",
                MIB / 4
            );
            let report = tunnel(count, 20, MIB)?;
            return print_tunnel(&report, &out_dir);
        }
        "policy" => return policy(&out_dir),
        "compare" => return compare(&args[1..], &out_dir),
        _ => bail!(
            "unknown benchmark {what:?}; available: datapath, tunnel, policy [--count N], \
             compare [--turns N] [--per-turn M] LABEL=AGENT_BINARY[,busyPoll=DURATION]..."
        ),
    }
    println!(
        "datapath benchmark: {count} connections per phase (one-byte request + echo each), client on node 1, server on node 2"
    );
    let (phases, antispoof) = datapath(count)?;
    println!(
        "\n| phase | conn/s | no agents, same turns, conn/s | ratio | p50 µs | p99 µs | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (p, reference_rate) in &phases {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {} | {} | {} |",
            p.name,
            p.rate,
            reference_rate,
            p.rate / reference_rate,
            p.p50_us,
            p.p99_us,
            p.failures
        );
    }
    println!(
        "\n(each phase taken in turns of {TURN} connections with a second cluster of the same \
         topology and no agents)"
    );
    let (fast, fast_reference) = &phases[1];
    println!(
        "\nfast path keeps {:.1}% of the connection rate with no agents (target: at least 97%)",
        fast.rate / fast_reference * 100.0
    );
    if !antispoof.is_empty() {
        println!("\n| anti-spoofing check, per packet (BPF_PROG_TEST_RUN, 1,000,000 runs) | ns |");
        println!("|---|---:|");
        for (label, ns) in &antispoof {
            println!("| {label} | {ns} |");
        }
    }
    let json = serde_json::json!({
        "benchmark": "datapath",
        "connections_per_phase": count,
        "antispoof_ns_per_packet": antispoof.iter().map(|(label, ns)| serde_json::json!({
            "packet": label, "ns": ns,
        })).collect::<Vec<_>>(),
        "phases": phases.iter().map(|(p, reference_rate)| serde_json::json!({
            "name": p.name, "conn_per_s": p.rate,
            "no_agents_same_turns_conn_per_s": reference_rate,
            "ratio_to_no_agents": p.rate / reference_rate,
            "p50_us": p.p50_us, "p99_us": p.p99_us, "failures": p.failures,
        })).collect::<Vec<_>>(),
    });
    let path = out_dir.join("datapath.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The anti-spoofing check's own cost per packet, on node 1 of the fast-path cluster (agents
/// running): the loaded program is run on crafted frames with `BPF_PROG_TEST_RUN`, a million
/// times each, as if each had come in on the given interface.
fn antispoof_cost(cluster: &Cluster, client: PodId, server: PodId) -> anyhow::Result<PacketCosts> {
    let node = cluster.node(cluster.pod(client).node);
    let (c, s) = (cluster.pod(client), cluster.pod(server));
    let client_mac = latch_tests::l2::mac(&c.netns_name, "eth0")?;
    let bridge_mac = latch_tests::l2::mac(&node.netns_name, "br0")?;
    let host_if = c.host_if.clone();
    let frames = vec![
        (
            "an enrolled pod's packet at its own port (bound source, MAC check)",
            host_if.clone(),
            tcp4(bridge_mac, client_mac, c.ipv4, s.ipv4),
        ),
        (
            "a packet from a pod on another node at the node's link",
            "fab0".to_owned(),
            tcp4(client_mac, bridge_mac, s.ipv4, c.ipv4),
        ),
        (
            "the same, IPv6",
            "fab0".to_owned(),
            tcp6(client_mac, bridge_mac, s.ipv6, c.ipv6),
        ),
        (
            "a packet from outside the mesh at the node's link",
            "fab0".to_owned(),
            tcp4(client_mac, bridge_mac, "10.244.99.9".parse()?, c.ipv4),
        ),
    ];
    netns::in_netns(&node.netns(), move || {
        let id = *latch::datapath::install::programs_on_interface(nix::net::if_::if_nametoindex(
            host_if.as_str(),
        )?)?
        .first()
        .context("no program on the pod's interface")?;
        let program = bpf_run::prog_fd_by_id(id).context("opening the program")?;
        frames
            .into_iter()
            .map(|(label, ifname, frame)| {
                let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())?;
                let run = bpf_run::test_run(&program, &frame, ifindex, 1_000_000)
                    .with_context(|| format!("BPF_PROG_TEST_RUN: {label}"))?;
                // TCX_NEXT: every one of these frames passes.
                anyhow::ensure!(run.retval == u32::MAX, "{label}: dropped ({})", run.retval);
                Ok((label, run.ns_per_run))
            })
            .collect()
    })
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP SYN header (checksums are not looked at).
fn syn() -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp
}

fn tcp4(dst: [u8; 6], src: [u8; 6], from: std::net::Ipv4Addr, to: std::net::Ipv4Addr) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&syn());
    ethernet(dst, src, 0x0800, &ip)
}

fn tcp6(dst: [u8; 6], src: [u8; 6], from: std::net::Ipv6Addr, to: std::net::Ipv6Addr) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&syn());
    ethernet(dst, src, 0x86dd, &ip)
}

/// Two BPF commands for the per-packet cost: a program's fd by its id, and a test run.
mod bpf_run {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

    use latch::datapath::syscall::bpf_call as bpf;

    pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
        #[repr(C)]
        struct Attr {
            prog_id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let fd = bpf(
            BPF_PROG_GET_FD_BY_ID,
            &mut Attr {
                prog_id: id,
                next_id: 0,
                open_flags: 0,
            },
        )?;
        // SAFETY: a new fd the kernel handed us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub struct Run {
        pub retval: u32,
        pub ns_per_run: u32,
    }

    /// Run a `sched_cls` program `repeat` times on `frame`, as come in on `ifindex` of the
    /// calling thread's namespace.
    pub fn test_run(
        prog: &impl AsFd,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> std::io::Result<Run> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        // `struct __sk_buff` up to and including `ifindex` (word 10); the rest stays zero.
        let mut ctx = [0u32; 11];
        ctx[10] = ifindex;
        let mut attr = Attr {
            prog_fd: prog.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: std::mem::size_of_val(&ctx) as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(Run {
            retval: attr.retval,
            ns_per_run: attr.duration,
        })
    }
}
