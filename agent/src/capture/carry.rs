//! Relaying an admitted connection: a tracked byte splice, or — when the destination's policy
//! depends on HTTP attributes — HTTP/1.1 with a policy decision per request. Either way the
//! connection is listed while it lasts (and closed if policy stops allowing it), and one
//! access-log line records it when it ends.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    identity::LocalWorkload,
    metrics::{Metrics, access},
    state::SharedState,
    tunnel::{
        http::{self, Authorize, RequestHead},
        splice::Remote,
        tracked::{ConnInfo, Tracked, Tracker, Which},
    },
    verdicts::{Direction, decide},
};

/// Everything the access log says about a carried connection.
pub struct Carried {
    pub info: ConnInfo,
    pub source_address: Option<SocketAddr>,
    pub policy: String,
    pub reason: String,
}

/// One inbound policy decision: counted in the metrics and written to the access log.
pub fn decided(metrics: &Metrics, record: &access::Record<'_>) {
    metrics.policy_decision(record.decision == "ALLOW");
    access::decision(record);
}

impl Carried {
    /// The admission of this (inbound) connection, counted and logged.
    pub fn admitted(&self, metrics: &Metrics) {
        decided(metrics, &self.record());
    }

    /// The access-log line of the connection's end: bytes, duration and how it ended.
    fn log_closed(
        &self,
        tracked: &Tracked,
        started: Instant,
        result: &std::io::Result<impl Sized>,
    ) {
        let (sent, received) = tracked.totals();
        let mut record = access::Record {
            bytes_sent: sent,
            bytes_received: received,
            duration: Some(started.elapsed()),
            ..self.record()
        };
        let why;
        if let Err(e) = result {
            why = format!("{}; ended: {e}", self.reason);
            record.reason = &why;
        }
        access::closed(&record);
    }

    /// The access-log record of this admitted connection.
    fn record(&self) -> access::Record<'_> {
        access::Record {
            direction: match self.info.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            source_principal: &self.info.source,
            source_address: self.source_address,
            destination_principal: &self.info.destination,
            destination_address: Some(self.info.destination_address),
            decision: "ALLOW",
            policy: &self.policy,
            reason: &self.reason,
            path: self.info.path,
            ..Default::default()
        }
    }
}

/// Splice `remote` and `local` (see [`Tracked::splice`]) while the connection is listed.
pub async fn splice(
    tracker: &Tracker,
    carried: Carried,
    remote: impl Into<Remote>,
    local: TcpStream,
    local_is_source: bool,
) {
    let started = Instant::now();
    let tracked = tracker.register(carried.info.clone());
    let result = tracked.splice(remote, local, local_is_source).await;
    carried.log_closed(&tracked, started, &result);
}

/// The destination workload and caller of an HTTP-enforced connection.
pub struct HttpParty {
    pub metrics: Metrics,
    pub state: SharedState,
    pub workload: LocalWorkload,
    pub source: Option<Arc<str>>,
    pub source_ip: Option<IpAddr>,
}

/// Serve `remote` as HTTP/1.1 towards the application `app`, deciding every request with the
/// current policy.
pub async fn http<R>(
    tracker: &Tracker,
    mut carried: Carried,
    party: HttpParty,
    remote: R,
    app: TcpStream,
) where
    R: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    carried.info.path = "http";
    let tracked = tracker.register(carried.info.clone());
    let target = carried.info.destination_address;
    let source_address = carried.source_address;
    let destination = carried.info.destination.clone();
    let authorize: Authorize = Arc::new(move |head: &RequestHead| {
        let snapshot = party.state.get();
        let judgement = decide::request(
            &snapshot,
            &party.workload,
            party.source.as_deref(),
            party.source_ip,
            target,
            head,
        );
        let request = format!("{} {}", head.method, head.path);
        decided(
            &party.metrics,
            &access::Record {
                direction: "inbound",
                source_principal: party.source.as_deref().unwrap_or_default(),
                source_address,
                destination_principal: &destination,
                destination_address: Some(target),
                decision: if judgement.allowed { "ALLOW" } else { "DENY" },
                policy: &judgement.policy,
                reason: &judgement.reason,
                path: "http",
                request: &request,
                ..Default::default()
            },
        );
        judgement.allowed
    });
    let downstream = tracked.counted(remote, Which::Sent);
    let upstream = tracked.counted(app, Which::Received);
    let result = tokio::select! {
        r = http::serve(downstream, upstream, authorize) => r,
        () = tracked.closed() => Err(std::io::Error::other("closed by the agent: no longer allowed")),
    };
    carried.log_closed(&tracked, started, &result);
}
