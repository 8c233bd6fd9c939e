//! Relaying an admitted connection: a tracked byte splice, or — when the destination's policy
//! depends on HTTP attributes — HTTP/1.1 with a policy decision per request. Either way the
//! connection is listed while it lasts (and closed if policy stops allowing it), and one
//! access-log line records it when it ends.

use std::{
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::Arc,
    task::Poll,
    time::Instant,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    authn,
    conn::{AccessDecision, ConnInfo, Direction, RequestHead, Via},
    identity::{LocalWorkload, SpiffeId},
    metrics::{Metrics, access},
    policy::{Target, normalize::PathNormalization},
    state::{DecidedUnder, SharedState, decide},
    tunnel::{
        chunk::poll_once,
        http::{self, BadRequest, Enforcer},
        splice::Remote,
        tracked::{Tracked, Tracker, Which},
    },
};

/// Everything the access log says about a carried connection.
pub struct Carried {
    pub info: ConnInfo,
    pub source_address: Option<SocketAddr>,
    pub policy: String,
    pub reason: String,
    /// The shadow decision of dry-run policies on its admission.
    pub dry_run: Option<decide::Shadow>,
    /// The state the connection was admitted under.
    pub decided_under: DecidedUnder,
}

/// One inbound policy decision: counted in the metrics and written to the access log.
pub fn decided(metrics: &Metrics, record: &access::Record<'_>) {
    metrics.policy_decision(record.decision == AccessDecision::Allow);
    if let Some(shadow) = record.dry_run {
        metrics.dry_run_decision(shadow.as_str());
    }
    access::decision(record);
}

impl Carried {
    /// List the connection. A reload that committed a newer state between the decision and
    /// this registration has already run its close step without seeing it, so it is judged
    /// again here; either way no connection admitted under an old state outlives a reload that
    /// no longer allows it.
    fn register(&self, tracker: &Tracker) -> Tracked {
        let tracked = tracker.register(self.info.clone());
        if let Some(now) = self.decided_under.newer()
            && !decide::still_allowed(&now, &self.info)
        {
            tracked.close();
        }
        tracked
    }

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
            source_principal: self.info.source.as_ref().map_or("", SpiffeId::as_str),
            source_address: self.source_address,
            destination_principal: self.info.destination.as_str(),
            destination_address: Some(self.info.destination_address),
            policy: &self.policy,
            reason: &self.reason,
            dry_run: self.dry_run,
            ..access::Record::new(self.info.direction, AccessDecision::Allow, self.info.path)
        }
    }
}

/// Splice `remote` and `local` (see [`Tracked::splice`]) while the connection is listed. The
/// relay is polled once before anything else: whatever has already arrived (a `CONNECT`'s early
/// data for the application, or the application's answer for the client) moves at once, and
/// only then is the connection counted in the metrics and `admitted` run (the decision's
/// access-log line and what else the caller records), while the other end is busy with those
/// bytes.
pub fn splice<'a>(
    tracker: &'a Tracker,
    carried: Box<Carried>,
    remote: impl Into<Remote>,
    local: TcpStream,
    local_is_source: bool,
    admitted: impl FnOnce(&Carried) + 'a,
) -> impl Future<Output = ()> + 'a {
    let remote = remote.into();
    // Not an `async fn`, whose arguments the future would hold twice (as passed, and moved into
    // its body): a held connection keeps this future as long as it lives.
    async move {
        let started = Instant::now();
        let tracked = carried.register(tracker);
        let result = {
            let mut relay = pin!(tracked.splice(remote, local, local_is_source));
            let first = poll_once(relay.as_mut()).await;
            // Those bytes woke the client or the application; if the kernel put that thread on
            // this CPU, it runs now rather than after the bookkeeping.
            std::thread::yield_now();
            // And whatever else became ready meanwhile (the client's next connection, say) goes
            // before this one's bookkeeping and end.
            crate::scheduling::yielding::behind_ready().await;
            tracked.count_opened();
            admitted(&carried);
            match first {
                Poll::Ready(result) => result,
                Poll::Pending => relay.await,
            }
        };
        carried.log_closed(&tracked, started, &result);
    }
}

/// The destination workload and caller of an HTTP-enforced connection.
pub struct HttpParty {
    pub metrics: Metrics,
    pub state: SharedState,
    pub workload: LocalWorkload,
    pub source: Option<SpiffeId>,
    pub source_ip: Option<IpAddr>,
}

/// The enforcement point of one HTTP-enforced connection: each request judged with the policy
/// and path normalisation in force when it arrives, and recorded.
struct Gate {
    party: HttpParty,
    /// The connection the requests come on (for the request metrics' labels).
    info: crate::conn::ConnInfo,
    target: SocketAddr,
    source_address: Option<SocketAddr>,
    destination: String,
}

impl Gate {
    fn record(&self, decision: AccessDecision, policy: &str, reason: &str, request: &str) {
        self.record_shadowed(decision, policy, reason, request, None);
    }

    /// [`Self::record`], with the dry-run policies' shadow decision.
    fn record_shadowed(
        &self,
        decision: AccessDecision,
        policy: &str,
        reason: &str,
        request: &str,
        dry_run: Option<decide::Shadow>,
    ) {
        decided(
            &self.party.metrics,
            &access::Record {
                dry_run,
                source_principal: self.party.source.as_ref().map_or("", SpiffeId::as_str),
                source_address: self.source_address,
                destination_principal: &self.destination,
                destination_address: Some(self.target),
                policy,
                reason,
                request,
                ..access::Record::new(Direction::Inbound, decision, Via::Http)
            },
        );
    }
}

impl Enforcer for Gate {
    fn path_normalization(&self) -> PathNormalization {
        self.party.state.get().config.http.path_normalization
    }

    fn authenticate<'a>(
        &'a self,
        head: &'a mut RequestHead,
        request: &'a mut hyper::http::request::Parts,
    ) -> http::Authenticated<'a> {
        Box::pin(async move {
            let snapshot = self.party.state.get();
            let workload = &self.party.workload;
            let rules = snapshot.policies.jwt_rules_for(&Target {
                namespace: &workload.namespace,
                labels: &workload.labels,
            });
            if rules.is_empty() {
                return true;
            }
            let settings = snapshot.config.jwt.clone();
            drop(snapshot);
            match authn::global()
                .authenticate(&rules, &settings, &self.party.metrics, request)
                .await
            {
                Ok(auth) => {
                    head.auth = auth;
                    head.headers = request.headers.clone();
                    true
                }
                Err(refusal) => {
                    tracing::warn!(
                        workload = %workload.id,
                        source = self.party.source.as_ref().map_or("", SpiffeId::as_str),
                        issuer = refusal.issuer.as_deref().unwrap_or(""),
                        policy = refusal.policy.as_deref().unwrap_or(""),
                        reason = %refusal.reason,
                        "request refused: its JWT does not verify"
                    );
                    self.party.metrics.jwt_refused();
                    self.record(
                        AccessDecision::Deny,
                        refusal.policy.as_deref().unwrap_or(""),
                        &format!("jwt verification failed (401): {}", refusal.reason),
                        &format!("{} {}", head.method, head.path),
                    );
                    false
                }
            }
        })
    }

    fn authorize(&self, head: &RequestHead) -> bool {
        let snapshot = self.party.state.get();
        let judgement = decide::request(
            &snapshot,
            &self.party.workload,
            self.party.source.as_ref().map(SpiffeId::as_str),
            self.party.source_ip,
            self.target,
            head,
        );
        let decision = AccessDecision::of(judgement.allowed);
        let request = format!("{} {}", head.method, head.path);
        self.record_shadowed(
            decision,
            &judgement.policy,
            &judgement.reason,
            &request,
            judgement.dry_run,
        );
        judgement.allowed
    }

    fn refused(&self, request: &str, why: &BadRequest) {
        self.record(
            AccessDecision::Deny,
            "",
            &format!("bad request (400): {why}"),
            request,
        );
    }

    fn answered(&self, status: hyper::StatusCode, elapsed: std::time::Duration) {
        let metrics = &self.party.metrics;
        metrics.request(metrics.labels_of(&self.info), status.as_u16(), elapsed);
    }
}

/// Serve `remote` as HTTP/1.1 towards the application `app`, deciding every request with the
/// current policy.
pub async fn http<R>(
    tracker: &Tracker,
    mut carried: Box<Carried>,
    party: HttpParty,
    remote: R,
    app: TcpStream,
) where
    R: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    carried.info.path = Via::Http;
    let tracked = carried.register(tracker);
    tracked.count_opened();
    let header_read_timeout = party.state.get().config.http.header_read_timeout;
    let gate = Arc::new(Gate {
        info: carried.info.clone(),
        party,
        target: carried.info.destination_address,
        source_address: carried.source_address,
        destination: carried.info.destination.to_string(),
    });
    let downstream = tracked.counted(remote, Which::Sent);
    let upstream = tracked.counted(app, Which::Received);
    let result = tokio::select! {
        r = http::serve(downstream, upstream, gate, header_read_timeout) => r,
        () = tracked.closed() => Err(std::io::Error::other("closed by the agent: no longer allowed")),
    };
    carried.log_closed(&tracked, started, &result);
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::tunnel::splice::tests::pair;

    fn test_state() -> SharedState {
        let config = crate::config::Config::from_yaml(
            std::path::Path::new("test.yaml"),
            "node: { name: n1, address: 10.244.0.1 }\ntrustDomain: cluster.local\ncgroupRoot: /cg\nbpfPinDir: /sys/fs/bpf/x\n",
        )
        .expect("config");
        let registry = crate::identity::Registry::from_config(&config).expect("registry");
        SharedState::new(crate::state::Snapshot {
            config,
            registry,
            policies: crate::policy::PolicySet::empty("istio-system"),
        })
    }

    fn carried(decided_under: DecidedUnder) -> Carried {
        Carried {
            info: ConnInfo {
                source: Some(SpiffeId::valid(
                    "spiffe://cluster.local/ns/prod/sa/frontend",
                )),
                destination: SpiffeId::valid("spiffe://cluster.local/ns/prod/sa/payment"),
                destination_address: "10.244.2.2:8080".parse().expect("address"),
                source_ip: None,
                direction: Direction::Inbound,
                path: crate::conn::Via::Tunnel,
                workload: "prod/payment".into(),
            },
            source_address: None,
            policy: String::new(),
            reason: String::new(),
            dry_run: None,
            decided_under,
        }
    }

    #[test]
    fn a_connection_decided_before_a_reload_and_listed_after_it_is_judged_again() {
        let state = test_state();
        let tracker = Tracker::new();
        // Listed under the state it was decided under: kept (the reload's close step, which
        // sees every listed connection, is the one that judges it).
        let current = carried(DecidedUnder::now(&state).1).register(&tracker);
        assert!(!current.is_closed());
        // Decided, then a reload commits a state in which payment is gone and runs its close
        // step, then the connection is listed: it must not survive.
        let decided = DecidedUnder::now(&state).1;
        let next = test_state().get();
        state.replace(crate::state::Snapshot {
            config: next.config.clone(),
            registry: next.registry.clone(),
            policies: next.policies.clone(),
        });
        let late = carried(decided).register(&tracker);
        assert!(
            late.is_closed(),
            "judged under the state in force, and closed"
        );
    }

    #[tokio::test]
    async fn what_has_arrived_moves_before_the_bookkeeping() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut client, remote) = pair(&listener).await;
        let (local, app) = pair(&listener).await;
        client.write_all(b"hello").await.expect("write");
        remote.readable().await.expect("readable");
        // A second handle on the application's socket, to look at it from inside `admitted`.
        let app = app.into_std().expect("std");
        let probe = app.try_clone().expect("clone");
        let mut app = TcpStream::from_std(app).expect("tokio");

        let tracker = Tracker::new();
        let carried = Carried {
            info: ConnInfo {
                source: None,
                destination: SpiffeId::valid("spiffe://cluster.local/ns/prod/sa/payment"),
                destination_address: listener.local_addr().expect("addr"),
                source_ip: None,
                direction: Direction::Inbound,
                path: crate::conn::Via::Plaintext,
                workload: "prod/payment".into(),
            },
            source_address: None,
            policy: String::new(),
            reason: String::new(),
            dry_run: None,
            decided_under: DecidedUnder::now(&test_state()).1,
        };
        let (admitted_tx, admitted_rx) = tokio::sync::oneshot::channel();
        let admitted = move |_: &Carried| {
            let mut buf = [0u8; 16];
            let waiting = probe.peek(&mut buf).map_err(|e| e.kind());
            let _ = admitted_tx.send(waiting);
        };
        let relay = splice(&tracker, Box::new(carried), remote, local, false, admitted);
        let ends = async {
            // Nothing is read from the application's socket before the decision is recorded.
            let waiting = admitted_rx.await.expect("admitted ran");
            let mut got = [0u8; 5];
            app.read_exact(&mut got).await.expect("app reads");
            assert_eq!(&got, b"hello");
            client.shutdown().await.expect("client done");
            app.shutdown().await.expect("app done");
            waiting
        };
        let ((), waiting) = tokio::join!(relay, ends);
        assert_eq!(
            waiting,
            Ok(5),
            "the bytes were at the application before the decision was recorded"
        );
        assert!(tracker.is_empty());
    }
}
