//! The debug API's vocabulary: the JSON bodies of every endpoint (camelCase on the wire), the
//! query parameters of `/v1/verdicts`, `/v1/verdicts/flush` and `/v1/explain`, and the
//! [`Backend`] trait through which the agent answers. The server serialises these types and the
//! `latch debug` client deserialises the same ones, so the two cannot drift apart.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
};

use serde::{Deserialize, Serialize};

use super::query::{self, QueryError};
pub use crate::{authn::cache::Status as JwksStatus, conn::Direction};

/// What the agent provides to the debug server. Methods other than [`Backend::reload`] are
/// called on a blocking thread, so they may read kernel maps or take locks.
pub trait Backend: Send + Sync + 'static {
    /// `GET /v1/status`; `Err` answers 500 with that message.
    fn status(&self) -> Result<Status, String>;
    /// `GET /v1/workloads`: local workloads and known peers.
    fn workloads(&self) -> Vec<Workload>;
    /// `GET /v1/policies`.
    fn policies(&self) -> Policies;
    /// `GET /v1/verdicts`: the kernel verdict cache, filtered and paged ([`VerdictFilter::page`]
    /// does both). `Err` answers 500.
    fn verdicts(&self, filter: &VerdictFilter) -> Result<VerdictPage, String>;
    /// `GET /v1/certs`: the current SVIDs, never key material.
    fn certs(&self) -> Vec<Cert>;
    /// `GET /v1/connections`: open tunneled connections.
    fn connections(&self) -> Vec<Connection>;
    /// `GET /v1/stats`: kernel counters. `Err` answers 500.
    fn stats(&self) -> Result<Stats, String>;
    /// `GET /v1/explain`: the policy engine's explanation, passed through as JSON. `Err` answers
    /// 400 with that message (the query named something the agent does not know).
    fn explain(&self, query: &ExplainQuery) -> Result<serde_json::Value, String>;
    /// `POST /v1/verdicts/flush`: remove the cached verdicts matching the filter (its offset and
    /// limit are ignored). `Err` answers 500.
    fn flush(&self, filter: &VerdictFilter) -> Result<FlushResult, String>;
    /// `POST /v1/reload`: ask the agent's main loop to reload and wait for the outcome.
    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadResult> + Send>>;
}

// --- /v1/status ------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub node: String,
    /// `fastpath` or `tunnel`.
    pub dataplane_mode: String,
    pub trust_domain: String,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    pub certificates: Vec<CertificateStatus>,
    pub last_reload: ReloadStatus,
    /// Workloads of the config the agent could not serve (their cgroup, netns or listeners),
    /// each failing closed on its own while the others are served.
    #[serde(default)]
    pub failed_workloads: Vec<WorkloadFailure>,
    /// What the source of desired state reports: Kubernetes mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,
}

/// The Kubernetes API as a source of desired state, as the agent sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// `kubernetes`.
    pub kind: String,
    /// Every watch has had its first full list and the state they describe is in force.
    pub ready: bool,
    /// A watch is failing now (the API server is out of reach or refuses): the last known state
    /// stays enforced, and the watches resume (or re-list) when it answers again.
    pub api_failing: bool,
    /// Per watch (`pods`, `namespaces`, `authorizationpolicies`, `peerauthentications`).
    pub watches: Vec<WatchStatus>,
    /// Enrolled pods of this node the agent does not serve yet, each with why.
    #[serde(default)]
    pub waiting_pods: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    pub name: String,
    pub synced: bool,
    pub failing: bool,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// The API version watched (Istio's kinds), `None` while the CRD is missing.
    pub version: Option<String>,
}

/// A policy object (Kubernetes mode) whose latest version the parser refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedPolicy {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
    /// Each naming the field and why.
    pub errors: Vec<String>,
    /// An earlier version of the object is in force instead; otherwise none is.
    pub last_good_kept: bool,
    /// The refused version asks to DENY (so a DENY is not in force as written).
    pub deny: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadFailure {
    /// `namespace/name`.
    pub workload: String,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    pub name: String,
    /// The kernel's program id.
    pub id: u32,
    /// Where it is attached (a cgroup path, a netns, ...).
    pub attached_to: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStatus {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub identity: String,
    /// RFC 3339.
    pub not_after: String,
    /// Negative once expired.
    pub seconds_left: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// RFC 3339.
    pub at: String,
    pub ok: bool,
    /// What caused it: `startup`, `sighup`, `file`, `api`.
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// --- /v1/workloads -----------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Stable id of the workload within the agent (e.g. `namespace/name`).
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// SPIFFE ID.
    pub identity: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// A pod on this node (otherwise a peer on another node).
    pub local: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

// --- /v1/policies ------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policies {
    pub policies: Vec<PolicySummary>,
    /// Load errors of the last reload.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Policy objects refused one by one (Kubernetes mode): the others stay in force.
    #[serde(default)]
    pub refused: Vec<RefusedPolicy>,
    /// The key sets fetched from RequestAuthentications' `jwksUri`s (one per URI, once a
    /// request has needed it).
    #[serde(default)]
    pub jwks: Vec<JwksStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    /// `AuthorizationPolicy`, `PeerAuthentication` or `RequestAuthentication` (whose `rules`
    /// are its JWT rules).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `ALLOW`/`DENY`/`AUDIT`, or the mTLS mode of a PeerAuthentication.
    pub action: String,
    /// Number of rules.
    pub rules: usize,
    /// The file it was loaded from.
    pub file: String,
    /// `istio.io/dry-run`: evaluated and recorded, never enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Why it is never applied to a workload (`targetRef`), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<String>,
}

// --- /v1/verdicts ------------------------------------------------------------------------------

/// A cached decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// SPIFFE ID, or `key:<hex>` when the identity key is not known to the agent.
    pub source: String,
    pub destination: String,
    pub port: u16,
    pub direction: Direction,
    pub decision: Decision,
    /// Seconds before the kernel ignores it (0 once expired).
    pub seconds_left: f64,
    /// Whether the pair's cached connections are encrypted: never, as a cached allow sends
    /// them through the kernel fast path. Pairs that must be encrypted (STRICT ports without
    /// `mtls.strictFastpath`, `mode: tunnel`) are never cached, so never listed here.
    pub encrypted: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictPage {
    /// Verdicts matching the filter, before paging.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub verdicts: Vec<Verdict>,
}

/// Which verdicts to list or flush.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictFilter {
    /// Matches the source or the destination.
    pub identity: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub port: Option<u16>,
    pub offset: usize,
    pub limit: usize,
}

impl Default for VerdictFilter {
    fn default() -> Self {
        Self {
            identity: None,
            source: None,
            destination: None,
            port: None,
            offset: 0,
            limit: VerdictFilter::DEFAULT_LIMIT,
        }
    }
}

impl VerdictFilter {
    pub const DEFAULT_LIMIT: usize = 100;
    pub const MAX_LIMIT: usize = 10_000;
    const PARAMS: [&str; 6] = [
        "identity",
        "source",
        "destination",
        "port",
        "offset",
        "limit",
    ];

    /// Read `?identity=&source=&destination=&port=&offset=&limit=`; unknown or repeated
    /// parameters and bad values are errors.
    pub fn from_query(raw: &str) -> Result<Self, QueryError> {
        let pairs = query::parse(raw)?;
        query::check_names(&pairs, &Self::PARAMS)?;
        let text = |name| query::get(&pairs, name).map(str::to_owned);
        let limit = query::get_parsed(&pairs, "limit", "a number from 1 to 10000")?
            .unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(QueryError::Value {
                name: "limit".into(),
                value: limit.to_string(),
                why: "expected a number from 1 to 10000".into(),
            });
        }
        Ok(Self {
            identity: text("identity"),
            source: text("source"),
            destination: text("destination"),
            port: query::get_parsed(&pairs, "port", "a port number (0-65535)")?,
            offset: query::get_parsed(&pairs, "offset", "a non-negative number")?.unwrap_or(0),
            limit,
        })
    }

    /// The query string that [`VerdictFilter::from_query`] reads back (defaults left out).
    pub fn to_query(&self) -> String {
        query::build([
            ("identity", self.identity.clone()),
            ("source", self.source.clone()),
            ("destination", self.destination.clone()),
            ("port", self.port.map(|p| p.to_string())),
            (
                "offset",
                (self.offset != 0).then(|| self.offset.to_string()),
            ),
            (
                "limit",
                (self.limit != Self::DEFAULT_LIMIT).then(|| self.limit.to_string()),
            ),
        ])
    }

    /// Whether a verdict between `source` and `destination` on `port` matches (paging aside).
    pub fn matches(&self, source: &str, destination: &str, port: u16) -> bool {
        self.identity
            .as_deref()
            .is_none_or(|id| id == source || id == destination)
            && self.source.as_deref().is_none_or(|s| s == source)
            && self.destination.as_deref().is_none_or(|d| d == destination)
            && self.port.is_none_or(|p| p == port)
    }

    /// Filter `all` and cut out the requested page.
    pub fn page(&self, all: impl IntoIterator<Item = Verdict>) -> VerdictPage {
        let matching: Vec<Verdict> = all
            .into_iter()
            .filter(|v| self.matches(&v.source, &v.destination, v.port))
            .collect();
        VerdictPage {
            total: matching.len(),
            offset: self.offset,
            limit: self.limit,
            verdicts: matching
                .into_iter()
                .skip(self.offset)
                .take(self.limit)
                .collect(),
        }
    }
}

// --- /v1/certs, /v1/connections, /v1/stats -----------------------------------------------------

/// A current SVID. Never carries key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cert {
    pub identity: String,
    /// Hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339.
    pub next_rotation: String,
}

/// An open connection through the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub source: String,
    pub destination: String,
    pub destination_address: SocketAddr,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Kernel counters by their stable name (`latch_common::Counter::name`).
    pub counters: BTreeMap<String, u64>,
}

// --- /v1/explain -------------------------------------------------------------------------------

/// A hypothetical request to explain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainQuery {
    /// SPIFFE ID, or `plaintext` for a connection without mTLS.
    pub from: String,
    pub to: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `NAME:VALUE` request headers (`header`, repeatable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

impl ExplainQuery {
    const PARAMS: [&str; 7] = ["from", "to", "port", "sourceIp", "method", "path", "host"];
    /// The one parameter that may repeat: `header=NAME:VALUE`.
    const HEADER: &str = "header";

    /// Build from `from`, `to` (`IP:PORT`, or `IP` with `port` giving the port) and the optional
    /// parts; the client and the server both go through here.
    pub fn new(from: &str, to: &str, port: Option<u16>) -> Result<Self, QueryError> {
        let bad_to = |why: &str| QueryError::Value {
            name: "to".into(),
            value: to.to_owned(),
            why: why.to_owned(),
        };
        let to = match (to.parse::<SocketAddr>(), port) {
            (Ok(addr), None) => addr,
            (Ok(addr), Some(p)) if addr.port() == p => addr,
            (Ok(_), Some(_)) => return Err(bad_to("its port differs from `port`")),
            (Err(_), port) => {
                let ip: IpAddr = to
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| bad_to("expected IP:PORT, or IP with `port`"))?;
                let port = port.ok_or_else(|| bad_to("has no port (give IP:PORT or `port`)"))?;
                SocketAddr::new(ip, port)
            }
        };
        if from.is_empty() {
            return Err(QueryError::Missing("from".into()));
        }
        Ok(Self {
            from: from.to_owned(),
            to,
            source_ip: None,
            method: None,
            path: None,
            host: None,
            headers: Vec::new(),
        })
    }

    /// Read `?from=&to=&port=&sourceIp=&method=&path=&host=&header=NAME:VALUE...`.
    pub fn from_query(raw: &str) -> Result<Self, QueryError> {
        let (headers, pairs): (Vec<_>, Vec<_>) = query::parse(raw)?
            .into_iter()
            .partition(|(name, _)| name == Self::HEADER);
        let mut known = Self::PARAMS.to_vec();
        known.push(Self::HEADER);
        query::check_names(&pairs, &known)?;
        let from = query::get(&pairs, "from").ok_or_else(|| QueryError::Missing("from".into()))?;
        let to = query::get(&pairs, "to").ok_or_else(|| QueryError::Missing("to".into()))?;
        let port = query::get_parsed(&pairs, "port", "a port number (0-65535)")?;
        let text = |name| query::get(&pairs, name).map(str::to_owned);
        Ok(Self {
            source_ip: query::get_parsed(&pairs, "sourceIp", "an IP address")?,
            method: text("method"),
            path: text("path"),
            host: text("host"),
            headers: headers.into_iter().map(|(_, value)| value).collect(),
            ..Self::new(from, to, port)?
        })
    }

    pub fn to_query(&self) -> String {
        query::build(
            [
                ("from", Some(self.from.clone())),
                ("to", Some(self.to.to_string())),
                ("sourceIp", self.source_ip.map(|ip| ip.to_string())),
                ("method", self.method.clone()),
                ("path", self.path.clone()),
                ("host", self.host.clone()),
            ]
            .into_iter()
            .chain(self.headers.iter().map(|h| (Self::HEADER, Some(h.clone())))),
        )
    }
}

// --- actions and errors ------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushResult {
    pub removed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadResult {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_filter_query_round_trip_and_errors() {
        let filter = VerdictFilter {
            identity: Some("spiffe://cluster.local/ns/prod/sa/frontend".into()),
            port: Some(8080),
            offset: 5,
            limit: 20,
            ..VerdictFilter::default()
        };
        assert_eq!(VerdictFilter::from_query(&filter.to_query()), Ok(filter));
        assert_eq!(VerdictFilter::from_query(""), Ok(VerdictFilter::default()));
        for bad in [
            "port=http",
            "port=70000",
            "limit=0",
            "limit=10001",
            "offset=-1",
            "colour=red",
        ] {
            assert!(VerdictFilter::from_query(bad).is_err(), "{bad}");
        }
        let err = VerdictFilter::from_query("port=abc").expect_err("bad port");
        assert_eq!(
            err.to_string(),
            "query parameter `port`=\"abc\": expected a port number (0-65535)"
        );
    }

    #[test]
    fn explain_query_takes_the_port_from_to_or_port() {
        let q = ExplainQuery::from_query("from=plaintext&to=10.244.1.2&port=8080").expect("ok");
        assert_eq!(q.to, "10.244.1.2:8080".parse().expect("literal"));
        let q = ExplainQuery::from_query("from=plaintext&to=10.244.1.2:80&method=GET").expect("ok");
        assert_eq!(q.to.port(), 80);
        assert_eq!(q.method.as_deref(), Some("GET"));
        assert_eq!(ExplainQuery::from_query(&q.to_query()), Ok(q));
        let h = ExplainQuery::from_query(
            "from=plaintext&to=10.244.1.2:80&header=x-a%3A1&header=x-b%3A2",
        )
        .expect("headers");
        assert_eq!(h.headers, vec!["x-a:1".to_owned(), "x-b:2".to_owned()]);
        assert_eq!(ExplainQuery::from_query(&h.to_query()), Ok(h));
        assert!(ExplainQuery::from_query("from=plaintext&to=10.244.1.2").is_err());
        assert!(ExplainQuery::from_query("to=10.244.1.2:80").is_err());
        assert!(ExplainQuery::from_query("from=x&to=10.244.1.2:80&port=81").is_err());
        assert!(ExplainQuery::from_query("from=x&to=10.244.1.2:80&sourceIp=nope").is_err());
        let v6 = ExplainQuery::from_query("from=x&to=%5Bfd00%3A%3A2%5D&port=80").expect("v6");
        assert_eq!(v6.to, "[fd00::2]:80".parse().expect("literal"));
    }

    #[test]
    fn page_filters_then_cuts() {
        let v = |s: &str, port| Verdict {
            source: s.into(),
            destination: "d".into(),
            port,
            direction: Direction::Outbound,
            decision: Decision::Allow,
            seconds_left: 1.0,
            encrypted: false,
        };
        let filter = VerdictFilter {
            identity: Some("a".into()),
            offset: 1,
            limit: 1,
            ..VerdictFilter::default()
        };
        let page = filter.page([v("a", 1), v("b", 2), v("a", 3), v("a", 4)]);
        assert_eq!(page.total, 3);
        assert_eq!(page.verdicts, vec![v("a", 3)]);
    }
}
