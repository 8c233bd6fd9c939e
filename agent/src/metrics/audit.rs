//! The fast-path audit: every connection the kernel let through on a cached allow, reported by
//! `sock_ops` through the ring buffer when it opens and when it closes, is counted in Istio's TCP
//! metrics (`path="fastpath"`) and written to the access log, as a tunneled connection is. The
//! kernel counts the events it could not report (`latch_fastpath_audit_events_dropped_total`).

use std::{
    collections::{HashMap, hash_map::Entry},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use latch_common::{
    DIRECTION_OUTBOUND, FASTPATH_CLOSED, FASTPATH_OPENED, FastpathEvent, Identity, IpKey,
    TCP_CLOSE_WAIT, TCP_CLOSING, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK,
};

use super::{
    Labels, Metrics, access,
    labels::{self, NONE, UNKNOWN},
};
use crate::{
    conn::{AccessDecision, Direction, Via},
    datapath::{FastpathEvents, maps::ip_from_key},
    identity::{IdentityKey, Registry},
};

/// What the access log says about why a fast-path connection was let through.
const REASON: &str = "cached allow: the kernel let it through (fast path)";

/// Drain the ring buffer until it fails (then say so and stop: the kernel keeps counting what
/// it cannot report).
pub async fn run(mut events: FastpathEvents, metrics: Metrics) {
    loop {
        let batch = match events.next_batch().await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "fast-path audit stopped: reading the event ring buffer failed");
                return;
            }
        };
        let snapshot = metrics.state().map(|s| s.get());
        let registry = snapshot.as_ref().map(|s| &s.registry);
        let events: Vec<FastpathEvent> = batch
            .into_iter()
            .filter_map(|event| {
                event
                    .map_err(|e| tracing::warn!(error = %e, "fast-path audit: record skipped"))
                    .ok()
            })
            .collect();
        // The batch's access-log lines wake the log thread once, at the end.
        let burst = crate::logging::burst();
        record(&metrics, registry, &events);
        drop(burst);
    }
}

/// One fast-path connection event, decoded for people: principals, addresses, direction.
#[derive(Clone, Debug, PartialEq)]
pub struct FastpathConnection {
    pub direction: Direction,
    pub source_principal: String,
    pub destination_principal: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl FastpathConnection {
    /// `None` for a direction the ABI does not define.
    pub fn of(registry: Option<&Registry>, event: &FastpathEvent) -> Option<Self> {
        Some(Self {
            direction: Direction::from_wire(event.direction)?,
            source_principal: identity_name(registry, event.src_identity),
            destination_principal: identity_name(registry, event.dst_identity),
            source: SocketAddr::new(ip_from_key(&event.src_addr), event.src_port),
            destination: SocketAddr::new(ip_from_key(&event.dst_addr), event.dst_port),
        })
    }

    /// Istio's labels of this connection: workloads by address, security `none`, path
    /// `fastpath`.
    pub fn labels(&self, registry: Option<&Registry>) -> Labels {
        let workload = |ip: IpAddr| labels::by_ip(registry, ip);
        let (source, destination) = (workload(self.source.ip()), workload(self.destination.ip()));
        Labels {
            reporter: labels::reporter(self.direction),
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal: self.source_principal.clone(),
            destination_workload: destination.workload,
            destination_workload_namespace: destination.namespace,
            destination_principal: self.destination_principal.clone(),
            destination_service: UNKNOWN.to_owned(),
            destination_port: self.destination.port(),
            connection_security_policy: NONE,
            path: Via::Fastpath.as_str(),
        }
    }

    fn record(&self) -> access::Record<'_> {
        access::Record {
            source_principal: &self.source_principal,
            source_address: Some(self.source),
            destination_principal: &self.destination_principal,
            destination_address: Some(self.destination),
            reason: REASON,
            ..access::Record::new(self.direction, AccessDecision::Allow, Via::Fastpath)
        }
    }
}

/// The SPIFFE ID behind a kernel identity key, or `key:<hex>` for one the agent does not know
/// (as `latch debug verdicts` shows it).
fn identity_name(registry: Option<&Registry>, key: Identity) -> String {
    let key = IdentityKey(key);
    registry
        .and_then(|r| r.identity(key))
        .map_or_else(|| format!("key:{}", key.hex()), ToString::to_string)
}

/// The payload bytes (sent, received) of a closed connection, from the kernel's counts of
/// sequence space. `bytes_acked` counts, on the connecting (outbound) side, the SYN (acknowledged,
/// since the connection was established; an accepted socket starts past its SYN-ACK), and on
/// either side our FIN once acknowledged; `bytes_received` counts the peer's FIN. The state the
/// socket closed from tells which FINs there were: we had sent ours in FIN_WAIT1, FIN_WAIT2,
/// CLOSING and LAST_ACK (acknowledged if nothing was left unacknowledged); the peer had sent its
/// own in CLOSE_WAIT, LAST_ACK and CLOSING, and in FIN_WAIT2 (the usual way out of it is the
/// peer's FIN; a closed socket whose FIN is acknowledged before the peer's FIN comes leaves it at
/// once for a TIME_WAIT socket, and one ended by its timeout or a reset leaves it too, each
/// counting one byte received too few: `docs/observability.md`).
pub fn payload_bytes(event: &FastpathEvent) -> (u64, u64) {
    let state = event.close_state;
    let syn = u64::from(event.direction == DIRECTION_OUTBOUND);
    let our_fin_sent = matches!(
        state,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK
    );
    let our_fin_acked = our_fin_sent && event.all_acked != 0;
    let peer_fin = matches!(
        state,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_FIN_WAIT2
    );
    let sent = event
        .bytes_acked
        .saturating_sub(syn + u64::from(our_fin_acked));
    let received = event.bytes_received.saturating_sub(u64::from(peer_fin));
    (sent, received)
}

/// Write each event's access-log line and count them in the metrics. Events of the same pair
/// (direction, identities, addresses, destination port: what the labels depend on) are named
/// and labelled once per batch and counted with one update per metric: under load, a batch holds
/// hundreds of connections of a few pairs, and the names, labels and label lookups were most of
/// an event's cost.
pub fn record(metrics: &Metrics, registry: Option<&Registry>, events: &[FastpathEvent]) {
    let mut pairs: HashMap<PairKey, PairTally> = HashMap::new();
    for event in events {
        let tally = match pairs.entry(PairKey::of(event)) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => {
                let Some(conn) = FastpathConnection::of(registry, event) else {
                    tracing::warn!(
                        direction = event.direction,
                        "fast-path audit: event with an unknown direction skipped"
                    );
                    continue;
                };
                let labels = conn.labels(registry);
                new.insert(PairTally {
                    conn,
                    labels,
                    counts: Counts::default(),
                })
            }
        };
        tally.log(event);
    }
    for tally in pairs.values() {
        let c = &tally.counts;
        if c.opened > 0 {
            metrics.connections_opened(&tally.labels, c.opened);
        }
        if c.closed > 0 {
            metrics.connections_closed(&tally.labels, c.closed, c.to_source, c.from_source);
        }
    }
}

/// What the names and labels of a fast-path event depend on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PairKey {
    direction: u8,
    src_identity: Identity,
    dst_identity: Identity,
    src_addr: IpKey,
    dst_addr: IpKey,
    dst_port: u16,
}

impl PairKey {
    fn of(event: &FastpathEvent) -> Self {
        Self {
            direction: event.direction,
            src_identity: event.src_identity,
            dst_identity: event.dst_identity,
            src_addr: event.src_addr,
            dst_addr: event.dst_addr,
            dst_port: event.dst_port,
        }
    }
}

/// One pair's connections in a batch: named once, counted together.
struct PairTally {
    /// The pair's first event, decoded (its source port is that event's).
    conn: FastpathConnection,
    labels: Labels,
    counts: Counts,
}

#[derive(Default)]
struct Counts {
    opened: u64,
    closed: u64,
    /// Istio's sent bytes: to the client (the response).
    to_source: u64,
    /// Istio's received bytes: from the client.
    from_source: u64,
}

impl PairTally {
    /// Write `event`'s access-log line and count it.
    fn log(&mut self, event: &FastpathEvent) {
        let conn = &self.conn;
        let record = access::Record {
            source_address: Some(SocketAddr::new(conn.source.ip(), event.src_port)),
            ..conn.record()
        };
        match event.kind {
            FASTPATH_OPENED => {
                self.counts.opened += 1;
                access::opened(&record);
            }
            FASTPATH_CLOSED => {
                let (sent, received) = payload_bytes(event);
                let (from_source, to_source) = match conn.direction {
                    Direction::Outbound => (sent, received),
                    Direction::Inbound => (received, sent),
                };
                self.counts.closed += 1;
                self.counts.to_source += to_source;
                self.counts.from_source += from_source;
                access::closed(&access::Record {
                    bytes_sent: from_source,
                    bytes_received: to_source,
                    duration: Some(Duration::from_nanos(event.duration_ns)),
                    ..record
                });
            }
            other => tracing::warn!(
                kind = other,
                "fast-path audit: event of an unknown kind skipped"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latch_common::{DIRECTION_INBOUND, IpKey, TCP_ESTABLISHED};

    fn event(kind: u8) -> FastpathEvent {
        FastpathEvent {
            src_identity: IdentityKey::of("spiffe://cluster.local/ns/prod/sa/frontend").0,
            dst_identity: Identity::new([0xab; 16]),
            src_addr: IpKey::from_v4([10, 244, 1, 2]),
            dst_addr: IpKey::from_v4([10, 244, 2, 2]),
            cookie: 7,
            duration_ns: 2_000_000,
            // 300 bytes, the SYN and the FIN acknowledged; 5000 bytes and the peer's FIN.
            bytes_acked: 302,
            bytes_received: 5001,
            src_port: 40_000,
            dst_port: 8080,
            kind,
            direction: DIRECTION_OUTBOUND,
            close_state: TCP_FIN_WAIT2,
            all_acked: 1,
        }
    }

    fn closed_from(state: u8, all_acked: u8, acked: u64, received: u64) -> (u64, u64) {
        payload_bytes(&FastpathEvent {
            close_state: state,
            all_acked,
            bytes_acked: acked,
            bytes_received: received,
            ..event(FASTPATH_CLOSED)
        })
    }

    #[test]
    fn payload_bytes_leave_out_the_syn_and_the_fins_the_close_state_shows() {
        // Active close, peer's FIN last: FIN_WAIT2 -> CLOSE.
        assert_eq!(closed_from(TCP_FIN_WAIT2, 1, 12, 21), (10, 20));
        // Passive close: LAST_ACK -> CLOSE once our FIN is acknowledged.
        assert_eq!(closed_from(TCP_LAST_ACK, 1, 12, 21), (10, 20));
        // LAST_ACK ended by a reset, our FIN never acknowledged.
        assert_eq!(closed_from(TCP_LAST_ACK, 0, 11, 21), (10, 20));
        // Simultaneous close.
        assert_eq!(closed_from(TCP_CLOSING, 1, 12, 21), (10, 20));
        // Reset while established: only the SYN.
        assert_eq!(closed_from(TCP_ESTABLISHED, 0, 11, 20), (10, 20));
        // Reset after the peer's FIN, ours never sent.
        assert_eq!(closed_from(TCP_CLOSE_WAIT, 1, 11, 21), (10, 20));
        // Reset in FIN_WAIT1: our FIN sent, not acknowledged.
        assert_eq!(closed_from(TCP_FIN_WAIT1, 0, 11, 20), (10, 20));
        // Never below zero.
        assert_eq!(closed_from(TCP_FIN_WAIT2, 1, 0, 0), (0, 0));
    }

    #[test]
    fn an_accepted_socket_has_no_syn_in_its_acknowledged_bytes() {
        let accepted = |state: u8, acked: u64, received: u64| {
            payload_bytes(&FastpathEvent {
                direction: DIRECTION_INBOUND,
                close_state: state,
                all_acked: 1,
                bytes_acked: acked,
                bytes_received: received,
                ..event(FASTPATH_CLOSED)
            })
        };
        // Passive close: the client's FIN, then ours, acknowledged.
        assert_eq!(accepted(TCP_LAST_ACK, 21, 11), (20, 10));
        // Reset while established.
        assert_eq!(accepted(TCP_ESTABLISHED, 20, 10), (20, 10));
    }

    #[test]
    fn an_event_without_a_registry_names_identities_by_key_and_workloads_unknown() {
        let conn = FastpathConnection::of(None, &event(FASTPATH_OPENED)).expect("decoded");
        assert_eq!(conn.direction, Direction::Outbound);
        assert_eq!(conn.source.to_string(), "10.244.1.2:40000");
        assert_eq!(conn.destination.to_string(), "10.244.2.2:8080");
        assert_eq!(
            conn.destination_principal,
            format!("key:{}", "ab".repeat(16))
        );
        let l = conn.labels(None);
        assert_eq!(l.path, "fastpath");
        assert_eq!(l.connection_security_policy, "none");
        assert_eq!(l.reporter, super::super::Reporter::Source);
        assert_eq!(l.source_workload, "unknown");
        assert_eq!(l.destination_port, 8080);
    }

    #[test]
    fn an_unknown_direction_is_not_decoded() {
        let mut e = event(FASTPATH_OPENED);
        e.direction = 9;
        assert_eq!(FastpathConnection::of(None, &e), None);
    }

    #[test]
    fn a_batch_counts_each_pair_once_with_all_its_connections() {
        let metrics = Metrics::new();
        let other_port = |kind: u8| FastpathEvent {
            dst_port: 9090,
            ..event(kind)
        };
        let second = |kind: u8| FastpathEvent {
            src_port: 40_001,
            cookie: 8,
            ..event(kind)
        };
        record(
            &metrics,
            None,
            &[
                event(FASTPATH_OPENED),
                second(FASTPATH_OPENED),
                other_port(FASTPATH_OPENED),
                event(FASTPATH_CLOSED),
                second(FASTPATH_CLOSED),
            ],
        );
        let text = metrics.encode().expect("encodes");
        let value = |name: &str, port: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains("path=\"fastpath\"")
                        && l.contains(&format!("destination_port=\"{port}\""))
                })
                .unwrap_or_else(|| panic!("{name} for port {port} in {text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_owned())
                .expect("value")
        };
        assert_eq!(value("istio_tcp_connections_opened_total", "8080"), "2");
        assert_eq!(value("istio_tcp_connections_closed_total", "8080"), "2");
        assert_eq!(value("istio_tcp_received_bytes_total", "8080"), "600");
        assert_eq!(value("istio_tcp_sent_bytes_total", "8080"), "10000");
        assert_eq!(value("istio_tcp_connections_opened_total", "9090"), "1");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total")
                    && l.contains("destination_port=\"9090\"")),
            "{text}"
        );
    }

    #[test]
    fn a_closed_event_counts_bytes_the_way_istio_does() {
        let metrics = Metrics::new();
        record(
            &metrics,
            None,
            &[event(FASTPATH_OPENED), event(FASTPATH_CLOSED)],
        );
        let text = metrics.encode().expect("encodes");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("path=\"fastpath\""))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_owned())
                .expect("value")
        };
        assert_eq!(line("istio_tcp_connections_opened_total"), "1");
        assert_eq!(line("istio_tcp_connections_closed_total"), "1");
        // The client sent 300 (Istio: received by the server), got 5000 back (sent to it).
        assert_eq!(line("istio_tcp_received_bytes_total"), "300");
        assert_eq!(line("istio_tcp_sent_bytes_total"), "5000");
    }
}
