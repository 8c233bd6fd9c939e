//! The agent's Prometheus metrics: Istio's TCP metrics (so Istio dashboards work unchanged), the
//! agent's own `latch_*` metrics, and values read from the agent only when scraped (kernel
//! counters, verdict cache size, certificate expiry). [`http`] serves them; [`labels`] derives
//! Istio's labels of a connection; [`access`] writes the access log, [`audit`] turns the
//! kernel's fast-path connection events into metrics and access-log lines, [`fastpath`] logs a
//! summary of the kernel's own decisions; [`scrape`] is what the running agent is read for at
//! each scrape.
//!
//! Counters are registered without their `_total` suffix: the OpenMetrics encoder appends it.

pub mod access;
pub mod audit;
pub mod fastpath;
pub mod http;
pub mod labels;
pub mod scrape;

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use latch_common::Counter as KernelCounter;

use crate::state::SharedState;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

/// Which side of the connection reported it, as Istio's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's agent.
    Source,
    /// The server's agent.
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(
            encoder,
            match self {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
        )
    }
}

/// Labels of the Istio TCP metrics: Istio's standard labels (names exactly Istio's, so its
/// dashboards and Kiali read them) plus `path`. [`labels`] derives them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Labels {
    pub reporter: Reporter,
    /// Workload name of the client (`labels::WorkloadName`), or `unknown`.
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// SPIFFE ID of the client, or `unknown` (plaintext).
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// SPIFFE ID of the server.
    pub destination_principal: String,
    /// `unknown`: Latch does not watch Services.
    pub destination_service: String,
    pub destination_port: u16,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// The path the connection took (`conn::Via`): `tunnel`, `http`, `plaintext`, `fastpath`.
    pub path: &'static str,
}

/// Labels of Istio's request metrics: the TCP labels of the connection the request came on, its
/// protocol and the answer's status code.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: Labels,
    /// `http` (Latch judges HTTP/1.1 requests).
    pub request_protocol: &'static str,
    pub response_code: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShadowLabels {
    shadow: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JwksFetchLabels {
    jwks_uri: String,
    result: &'static str,
}

/// What the agent reports at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScrapeSnapshot {
    /// Kernel counters summed over CPUs (`KernelMaps::counters`).
    pub kernel_counters: Vec<(KernelCounter, u64)>,
    /// Entries in the kernel verdict cache.
    pub cache_entries: u64,
    /// (SPIFFE ID, seconds until NotAfter) of every current SVID.
    pub cert_expiry: Vec<(String, f64)>,
    /// Seconds the worker has spent busy polling (`dataplane.busyPoll`).
    pub busy_poll_seconds: f64,
    /// The worker's idle stretches that ended within the busy-poll window, and those that
    /// outlasted it (what `dataplane.busyPollAdaptive` decides by).
    pub busy_poll_stretches: (u64, u64),
    /// Workloads of the config the agent could not serve.
    pub failed_workloads: u64,
    /// Kubernetes mode: whether a watch of the API server is failing now (`None` in local mode).
    pub api_failing: Option<bool>,
    /// Kubernetes mode: policy objects whose latest version was refused.
    pub refused_policies: u64,
}

/// Called at each scrape; must be quick (it runs on a blocking thread).
pub type ScrapeSource = Box<dyn Fn() -> ScrapeSnapshot + Send + Sync>;

/// Bucket bounds of `latch_tunnel_handshake_seconds`: 100 µs to 5 s.
pub const HANDSHAKE_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Bucket bounds of `istio_request_duration_milliseconds`: Istio's own.
pub const REQUEST_DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The metric name and help of each kernel counter (the match makes a new counter a compile
/// error here until it has a metric).
pub fn kernel_metric(counter: KernelCounter) -> (&'static str, &'static str) {
    match counter {
        KernelCounter::FastpathAllowed => (
            "latch_fastpath_connections",
            "Connections allowed in the kernel by a cached allow, without the agent.",
        ),
        KernelCounter::Redirected => (
            "latch_redirected_connections",
            "Outbound connections redirected to the agent's capture listener.",
        ),
        KernelCounter::CachedDeny => (
            "latch_cached_deny_connections",
            "Outbound connections refused in the kernel (EPERM) by a cached deny.",
        ),
        KernelCounter::InboundAdmitted => (
            "latch_inbound_admitted",
            "Inbound connections delivered straight to the pod by a cached inbound verdict.",
        ),
        KernelCounter::InboundSteered => (
            "latch_inbound_steered",
            "Inbound connections steered to the agent's inbound listener.",
        ),
        KernelCounter::InboundRejected => (
            "latch_inbound_rejected",
            "Inbound connections reset because no inbound listener was there to take them.",
        ),
        KernelCounter::SpoofDropped => (
            "latch_spoof_dropped",
            "Packets dropped at an interface of the node for an address or MAC they may not use (anti-spoofing).",
        ),
        KernelCounter::FastpathAuditDropped => (
            "latch_fastpath_audit_events_dropped",
            "Fast-path connection events (opened or closed) the kernel could not report to the \
             agent (ring buffer full): those connections are missing from the Istio metrics and \
             the access log.",
        ),
    }
}

struct Inner {
    registry: Registry,
    opened: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    sent: Family<Labels, Counter>,
    received: Family<Labels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    dry_run: Family<ShadowLabels, Counter>,
    jwt_refused: Counter,
    jwks_fetches: Family<JwksFetchLabels, Counter>,
    handshake: Histogram,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    source: Arc<RwLock<Option<ScrapeSource>>>,
    /// Where workload names come from (the agent's state); `None` names every workload
    /// `unknown`.
    state: RwLock<Option<SharedState>>,
}

/// The agent's metrics; cheap to clone, every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<Labels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = family(
            &mut registry,
            "istio_tcp_connections_opened",
            "TCP connections opened through the mesh.",
        );
        let closed = family(
            &mut registry,
            "istio_tcp_connections_closed",
            "TCP connections closed through the mesh.",
        );
        let sent = family(
            &mut registry,
            "istio_tcp_sent_bytes",
            "Bytes sent by the client on mesh TCP connections.",
        );
        let received = family(
            &mut registry,
            "istio_tcp_received_bytes",
            "Bytes received by the client on mesh TCP connections.",
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "latch_policy_decisions",
            "Authorization decisions made by the agent, by result.",
            decisions.clone(),
        );
        let dry_run = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "latch_policy_dry_run_decisions",
            "Decisions on which istio.io/dry-run policies applied, by what they would have decided \
             (allow, deny, or undecided where it depends on an unparsed HTTP request).",
            dry_run.clone(),
        );
        let jwt_refused = Counter::default();
        registry.register(
            "latch_jwt_refused",
            "HTTP requests refused with 401 because their JWT did not verify (RequestAuthentication).",
            jwt_refused.clone(),
        );
        let jwks_fetches = Family::<JwksFetchLabels, Counter>::default();
        registry.register(
            "latch_jwks_fetches",
            "JWKS fetches of RequestAuthentication issuers, by URI and result (ok or error).",
            jwks_fetches.clone(),
        );
        let handshake = Histogram::new(HANDSHAKE_BUCKETS);
        registry.register(
            "latch_tunnel_handshake_seconds",
            "Time to establish an HBONE tunnel (TLS handshake and CONNECT).",
            handshake.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "istio_requests",
            "HTTP requests judged at L7 by the destination's agent, by response code.",
            requests.clone(),
        );
        let request_duration: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(REQUEST_DURATION_BUCKETS_MS));
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from an HTTP request's head to its answer's head, in milliseconds.",
            request_duration.clone(),
        );
        let source = Arc::new(RwLock::new(None));
        registry.register_collector(Box::new(ScrapeCollector(source.clone())));
        Self(Arc::new(Inner {
            registry,
            opened,
            closed,
            sent,
            received,
            decisions,
            dry_run,
            jwt_refused,
            jwks_fetches,
            handshake,
            requests,
            request_duration,
            source,
            state: RwLock::new(None),
        }))
    }

    /// Where the workload names of the labels come from; replaces any earlier state.
    pub fn set_state(&self, state: SharedState) {
        *crate::sync::write(&self.0.state) = Some(state);
    }

    /// The state the labels are derived from, if set.
    pub(crate) fn state(&self) -> Option<SharedState> {
        crate::sync::read(&self.0.state).clone()
    }

    /// Istio's labels of a connection the agent carries ([`labels::of_connection`]), with the
    /// workload names of the state in force.
    pub fn labels_of(&self, info: &crate::conn::ConnInfo) -> Labels {
        let snapshot = self.state().map(|s| s.get());
        labels::of_connection(snapshot.as_ref().map(|s| &s.registry), info)
    }

    /// Where the scrape-time values come from; replaces any earlier source.
    pub fn set_scrape_source(&self, source: ScrapeSource) {
        *crate::sync::write(&self.0.source) = Some(source);
    }

    pub fn connection_opened(&self, labels: &Labels) {
        self.connections_opened(labels, 1);
    }

    /// `count` connections with the same labels opened.
    pub fn connections_opened(&self, labels: &Labels, count: u64) {
        self.0.opened.get_or_create(labels).inc_by(count);
    }

    /// A connection ended: `sent` bytes went to the client (the response side, Istio's
    /// `istio_tcp_sent_bytes_total`) and `received` bytes came from it.
    pub fn connection_closed(&self, labels: &Labels, sent: u64, received: u64) {
        self.connections_closed(labels, 1, sent, received);
    }

    /// `count` connections with the same labels ended, with `sent` and `received` bytes between
    /// them (as [`Metrics::connection_closed`]).
    pub fn connections_closed(&self, labels: &Labels, count: u64, sent: u64, received: u64) {
        self.0.closed.get_or_create(labels).inc_by(count);
        self.0.sent.get_or_create(labels).inc_by(sent);
        self.0.received.get_or_create(labels).inc_by(received);
    }

    pub fn policy_decision(&self, allowed: bool) {
        let decision = if allowed { "allow" } else { "deny" };
        self.0
            .decisions
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    /// A decision on which dry-run policies applied, and what they would have decided.
    pub fn dry_run_decision(&self, shadow: &'static str) {
        self.0.dry_run.get_or_create(&ShadowLabels { shadow }).inc();
    }

    /// A request refused because its JWT did not verify.
    pub fn jwt_refused(&self) {
        self.0.jwt_refused.inc();
    }

    /// A JWKS fetch of `uri` ended, successfully or not.
    pub fn jwks_fetched(&self, uri: &str, ok: bool) {
        self.0
            .jwks_fetches
            .get_or_create(&JwksFetchLabels {
                jwks_uri: uri.to_owned(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// An HTTP request answered with `response_code` after `elapsed`, on a connection with
    /// `connection`'s labels.
    pub fn request(&self, connection: Labels, response_code: u16, elapsed: Duration) {
        let labels = RequestLabels {
            connection,
            request_protocol: "http",
            response_code,
        };
        self.0.requests.get_or_create(&labels).inc();
        self.0
            .request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
    }

    pub fn handshake(&self, elapsed: Duration) {
        self.0.handshake.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition (calls the scrape source).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)?;
        Ok(out)
    }
}

/// Encodes the [`ScrapeSnapshot`] of the agent at each scrape.
struct ScrapeCollector(Arc<RwLock<Option<ScrapeSource>>>);

impl fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeCollector")
    }
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = match &*crate::sync::read(&self.0) {
            Some(source) => source(),
            None => return Ok(()),
        };
        for (counter, value) in &snapshot.kernel_counters {
            let (name, help) = kernel_metric(*counter);
            let metric = ConstCounter::new(*value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let polled = ConstCounter::new(snapshot.busy_poll_seconds);
        polled.encode(encoder.encode_descriptor(
            "latch_busy_poll_seconds",
            "Time the agent's worker spent polling for I/O after data-path activity instead of \
             sleeping (dataplane.busyPoll).",
            None,
            polled.metric_type(),
        )?)?;
        let mut stretches = encoder.encode_descriptor(
            "latch_busy_poll_idle_stretches",
            "Idle stretches of the agent's worker, by whether the next data-path activity came \
             within the busy-poll window (polling would catch it) or after it; windows start \
             only while most recent ones came within (dataplane.busyPollAdaptive).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let (within, after) = snapshot.busy_poll_stretches;
        for (ended, count) in [("within_window", within), ("after_window", after)] {
            ConstCounter::new(count).encode(stretches.encode_family(&[("ended", ended)])?)?;
        }
        let failed = ConstGauge::new(snapshot.failed_workloads as i64);
        failed.encode(encoder.encode_descriptor(
            "latch_workloads_failed",
            "Workloads of the config the agent could not serve (each fails closed on its own; \
             latch debug status says why).",
            None,
            failed.metric_type(),
        )?)?;
        let refused = ConstGauge::new(snapshot.refused_policies as i64);
        refused.encode(encoder.encode_descriptor(
            "latch_policy_objects_refused",
            "Policy objects whose latest version was refused (Kubernetes mode; each keeps its last \
             good version, or is not in force; latch debug policies says why).",
            None,
            refused.metric_type(),
        )?)?;
        if let Some(failing) = snapshot.api_failing {
            let failing = ConstGauge::new(i64::from(failing));
            failing.encode(encoder.encode_descriptor(
                "latch_kubernetes_api_failing",
                "1 while a watch of the Kubernetes API server is failing (the last known state \
                 stays enforced), else 0.",
                None,
                failing.metric_type(),
            )?)?;
        }
        let entries = ConstGauge::new(snapshot.cache_entries as i64);
        entries.encode(encoder.encode_descriptor(
            "latch_verdict_cache_entries",
            "Entries in the kernel verdict cache (expired ones included until evicted).",
            None,
            entries.metric_type(),
        )?)?;
        if !snapshot.cert_expiry.is_empty() {
            let mut family = encoder.encode_descriptor(
                "latch_certificate_expiry_seconds",
                "Seconds until the NotAfter of each current SVID.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (identity, seconds) in &snapshot.cert_expiry {
                let labels = [("identity", identity.as_str())];
                ConstGauge::new(*seconds).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
