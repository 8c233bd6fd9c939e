//! The measured topology (a client pod on node 1, an echo server on [`PORT`] in a pod on node 2)
//! and its phases with agents: start them on both nodes, warm up, measure, stop
//! ([`Pair::phase`]).

use std::time::Duration;

use latch::datapath::{KernelMaps, system};
use latch_common::{DECISION_ALLOW, DIRECTION_OUTBOUND, Identity, VerdictKey, VerdictValue};
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes, server::PodServer};

use crate::probe::{self, Rate};

/// The echo server's port.
pub const PORT: u16 = 8080;

/// The benchmarks' topology: a client pod on node 1 and an echo server on [`PORT`] in a pod on
/// node 2; with the server's address.
pub fn client_and_echo() -> anyhow::Result<(TwoNodes, PodServer, String)> {
    let pair = Cluster::two_nodes(
        PodSpec::mesh("client", "bench", "client"),
        PodSpec::mesh("server", "bench", "server"),
    )?;
    // In the pod's own cgroup, as an application is: the kernel programs on `cgroupRoot` see its
    // side of each connection (the fast path's audit events at the destination). It answers with
    // as many bytes as it read, without keeping them: the clients count what comes back, and a
    // bulk stream's 256 MiB are not faulted into the server's memory on the CPUs the agents
    // need.
    let echo = pair.cluster.pod_sink_server(pair.server, PORT)?;
    let to = pair.cluster.pod(pair.server).addr4(PORT).to_string();
    Ok((pair, echo, to))
}

/// [`client_and_echo`], the cluster whose nodes run agents phase by phase.
pub struct Pair {
    pub cluster: Cluster,
    pub n1: NodeId,
    pub n2: NodeId,
    pub client: PodId,
    pub server: PodId,
    /// The echo server's address.
    pub to: String,
    _echo: PodServer,
}

impl Pair {
    pub fn new() -> anyhow::Result<Self> {
        let (pair, echo, to) = client_and_echo()?;
        let TwoNodes {
            cluster,
            n1,
            n2,
            client,
            server,
        } = pair;
        Ok(Self {
            cluster,
            n1,
            n2,
            client,
            server,
            to,
            _echo: echo,
        })
    }

    /// `count` connections from the client to the echo server (see [`probe::rate`]).
    pub fn rate(&self, count: usize) -> anyhow::Result<Rate> {
        probe::rate(&self.cluster, self.client, &self.to, count)
    }

    /// Bytes per second of `streams` bulk streams of `mib` MiB each way from the client to the
    /// echo server (see [`probe::throughput`]).
    pub fn throughput(&self, streams: usize, mib: usize) -> anyhow::Result<f64> {
        probe::throughput(&self.cluster, self.client, &self.to, streams, mib)
    }

    /// `count` connections whose figures are not kept.
    pub fn warm_up(&self, count: usize) -> anyhow::Result<()> {
        self.rate(count).map(drop)
    }

    /// Start both nodes' agents with `options`.
    pub fn start_agents(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        for node in [self.n1, self.n2] {
            self.cluster.start_agent(node, options.clone())?;
        }
        Ok(())
    }

    /// Stop both nodes' agents and remove what they installed.
    pub fn stop_agents(&mut self) -> anyhow::Result<()> {
        for node in [self.n1, self.n2] {
            self.cluster.agent(node).terminate()?;
            self.cluster.agent(node).uninstall()?;
        }
        Ok(())
    }

    /// One phase with agents: start them with `options`, warm up with `warmup` connections,
    /// `measure`, stop them.
    pub fn phase<T>(
        &mut self,
        options: &AgentOptions,
        warmup: usize,
        measure: impl FnOnce(&Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.start_agents(options)?;
        self.warm_up(warmup)?;
        let measured = measure(self)?;
        self.stop_agents()?;
        Ok(measured)
    }

    /// The source and destination agents' process IDs (0 where none runs).
    pub fn agent_pids(&self) -> [u32; 2] {
        [self.n1, self.n2].map(|n| {
            self.cluster
                .node(n)
                .agent
                .as_ref()
                .and_then(|a| a.pid())
                .unwrap_or_default()
        })
    }

    /// Put verdicts `first..first + n` in `node`'s verdict map, allows for a day between
    /// identities no pod has: they match no real pair, and only make the map as full as a busy
    /// node's (for whole-map reads and lookups at scale).
    pub fn fill_verdicts(&self, node: NodeId, first: usize, n: usize) -> anyhow::Result<()> {
        let mut maps = KernelMaps::open_pinned(&self.cluster.node(node).pin_dir)?;
        let value = VerdictValue {
            expires_at_ns: system::boot_ns_after(Duration::from_secs(24 * 3600)),
            decision: DECISION_ALLOW,
            _pad: 0,
        };
        for i in first as u64..(first + n) as u64 {
            let mut src = [0xbe; 16];
            src[..8].copy_from_slice(&i.to_le_bytes());
            let key = VerdictKey::new(
                Identity::new(src),
                Identity::new([0xbe; 16]),
                1,
                DIRECTION_OUTBOUND,
            );
            maps.insert_verdict(key, value)?;
        }
        Ok(())
    }
}
