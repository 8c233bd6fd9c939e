//! The no-agent reference: a second cluster of the same topology that never runs agents, and
//! measuring a phase in turns with it ([`paired`]), so that the VM's drift falls on both sides of
//! every comparison alike (`docs/benchmarks.md`). It also hosts the nginx pair.

use std::cell::Cell;

use anyhow::bail;
use latch_tests::{Cluster, PodId, PodSpec, TwoNodes, nginx::NginxPair, server::PodServer};

use crate::{
    pair::{PORT, client_and_echo},
    probe::{self, Rate},
    stats::Tally,
};

/// The no-agent reference: a second cluster of the same topology that never runs agents, measured
/// in turns with each phase (see [`paired`]). It also hosts the nginx pair the tunnel is compared
/// with, so that the two are measured in turns too.
///
/// The reference makes as many connections as all the phases together, to one address, within a
/// minute or two; a client whose closed connections wait in TIME_WAIT for a minute would run out
/// of free ports for that destination (connect() then searches the port range for
/// milliseconds), so the direct turns are spread over [`REFERENCE_CLIENTS`] pods, and the nginx
/// pair's client is a pod of its own.
pub struct Reference {
    nginx: Option<NginxPair>,
    _echo: PodServer,
    cluster: Cluster,
    clients: Vec<PodId>,
    /// Turns taken so far: which client is next.
    turns: Cell<usize>,
    nginx_client: PodId,
    server: PodId,
    /// The echo server, directly.
    to: String,
}

/// Client pods of the reference's direct turns.
const REFERENCE_CLIENTS: usize = 4;

/// How the reference's client reaches its echo server.
#[derive(Clone, Copy)]
pub enum Via {
    Direct,
    Nginx,
}

impl Reference {
    pub fn new() -> anyhow::Result<Self> {
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
            turns: Cell::new(0),
            nginx_client,
            server,
            to,
        })
    }

    /// An nginx mTLS stream-proxy pair (sidecar style) in front of the echo server.
    pub fn start_nginx(&mut self) -> anyhow::Result<()> {
        self.nginx = Some(NginxPair::start(
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

    pub fn rate(&self, via: Via, count: usize) -> anyhow::Result<Rate> {
        let (client, to) = self.client_and_destination(via);
        probe::rate(&self.cluster, client, &to, count)
    }

    pub fn throughput(&self, via: Via, streams: usize, mib: usize) -> anyhow::Result<f64> {
        let (client, to) = self.client_and_destination(via);
        probe::throughput(&self.cluster, client, &to, streams, mib)
    }
}

/// Connections per turn of a paired measurement.
pub const TURN: usize = 250;

/// A phase's p50 and the no-agent reference's p50 over the same stretch of time.
#[derive(Clone, Copy)]
pub struct Paired {
    pub p50_us: u64,
    pub reference_p50_us: u64,
}

impl Paired {
    pub fn added_us(&self) -> i64 {
        self.p50_us as i64 - self.reference_p50_us as i64
    }
}

/// Rounds a latency phase's connections are split into, each round's p50s taken apart: a figure
/// is the median of the rounds, reported with their spread.
pub const LATENCY_ROUNDS: usize = 3;

/// A phase's [`Paired`] p50s, one per round.
pub struct PairedRounds(pub Vec<Paired>);

impl PairedRounds {
    /// The phase's p50 of each round.
    pub fn p50_us(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.p50_us as f64).collect()
    }

    /// The reference's p50 of each round.
    pub fn reference_p50_us(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.reference_p50_us as f64).collect()
    }

    /// What the phase added at p50, each round.
    pub fn added_us(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.added_us() as f64).collect()
    }
}

/// [`paired_latency`] over [`LATENCY_ROUNDS`] rounds that share `count` connections.
pub fn paired_latency_rounds(
    reference: &Reference,
    all: &mut Vec<u64>,
    count: usize,
    mut measure: impl FnMut(usize) -> anyhow::Result<Rate>,
) -> anyhow::Result<PairedRounds> {
    let per_round = count.div_ceil(LATENCY_ROUNDS);
    (0..LATENCY_ROUNDS)
        .map(|_| paired_latency(reference, all, per_round, &mut measure))
        .collect::<anyhow::Result<_>>()
        .map(PairedRounds)
}

/// Measure `count` connections with `measure` and as many directly through the reference, in
/// alternating turns of [`TURN`]: this VM's speed drifts by tens of microseconds per connection
/// within a minute, and a phase measured apart from its baseline would carry that drift into the
/// difference. Returns (the phase's tally, the reference's).
pub fn paired(
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
pub fn paired_latency(
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
