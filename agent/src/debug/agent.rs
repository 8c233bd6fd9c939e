//! The running agent's answers to the debug API: every endpoint reads the live state (the
//! current snapshot, the kernel maps, the certificate store, the connection tracker); flush
//! writes the verdict map; reload asks the agent's main loop and waits for its result.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use latch_common::{
    DECISION_ALLOW, Identity, MAX_DELIVERIES, MAX_ENDPOINTS, MAX_INBOUND_LISTENERS, MAX_REDIRECTS,
    MAX_VERDICTS, MAX_WORKLOADS, map_names,
};
use tokio::sync::{mpsc, oneshot};

use super::api::{
    Backend, Cert, CertificateStatus, Connection, Decision, ExplainQuery, FlushResult, MapStatus,
    Policies, PolicySummary, ProgramStatus, RefusedPolicy, ReloadResult, ReloadStatus,
    SourceStatus, Stats, Status, Verdict, VerdictFilter, VerdictPage, Workload, WorkloadFailure,
};
use crate::{
    conn::Direction,
    datapath::system,
    identity::{
        IdentityKey, Registry,
        certs::{CertStore, rotation_at, seconds_left},
    },
    state::{SharedState, decide},
    sync::lock,
    tunnel::tracked::Tracker,
    verdicts::{SharedMaps, VerdictCache},
};

/// A reload request from the debug API to the agent's main loop.
pub type ReloadRequest = oneshot::Sender<ReloadResult>;

/// What the main loop publishes for the debug API besides the snapshot.
#[derive(Clone, Default)]
pub struct Published {
    inner: Arc<Mutex<PublishedInner>>,
}

#[derive(Default)]
struct PublishedInner {
    programs: Vec<ProgramStatus>,
    last_reload: Option<ReloadStatus>,
    policy_errors: Vec<String>,
    failed_workloads: Vec<WorkloadFailure>,
    source: Option<SourceStatus>,
    refused_policies: Vec<RefusedPolicy>,
}

impl Published {
    pub fn set_programs(&self, programs: Vec<ProgramStatus>) {
        lock(&self.inner).programs = programs;
    }

    /// How many workloads the agent could not serve.
    pub fn failed_workloads(&self) -> usize {
        lock(&self.inner).failed_workloads.len()
    }

    /// The workloads the agent could not serve, with why.
    pub fn set_failed_workloads(&self, failed: Vec<WorkloadFailure>) {
        lock(&self.inner).failed_workloads = failed;
    }

    /// What the source of desired state reports now (Kubernetes mode), and the policy objects
    /// it refused.
    pub fn set_source(&self, source: Option<SourceStatus>, refused: Vec<RefusedPolicy>) {
        let mut inner = lock(&self.inner);
        inner.source = source;
        inner.refused_policies = refused;
    }

    /// Whether a source reports beside the state (Kubernetes mode).
    pub fn has_source(&self) -> bool {
        lock(&self.inner).source.is_some()
    }

    /// Whether the source says its API is failing, and how many policy objects it refused.
    pub fn source_health(&self) -> (bool, usize) {
        let inner = lock(&self.inner);
        (
            inner.source.as_ref().is_some_and(|s| s.api_failing),
            inner.refused_policies.len(),
        )
    }

    /// Record a reload's outcome; `errors` are the lines of a failed one (empty on success).
    pub fn reloaded(&self, trigger: &str, error: Option<String>) {
        let mut inner = lock(&self.inner);
        inner.policy_errors = error
            .as_deref()
            .map(|e| e.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        inner.last_reload = Some(ReloadStatus {
            at: rfc3339(SystemTime::now()),
            ok: error.is_none(),
            trigger: trigger.to_owned(),
            error,
        });
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The agent as the debug API sees it.
pub struct AgentView {
    pub started: Instant,
    pub state: SharedState,
    pub maps: SharedMaps,
    pub cache: VerdictCache,
    pub certs: Arc<CertStore>,
    pub tracker: Tracker,
    pub published: Published,
    pub reloads: mpsc::Sender<ReloadRequest>,
}

/// The SPIFFE ID behind a kernel identity key, or `key:<hex>` (all 32 digits) for one the agent
/// does not know.
fn identity_name(registry: &Registry, key: Identity) -> String {
    let key = IdentityKey(key);
    registry
        .identity(key)
        .map(ToString::to_string)
        .unwrap_or_else(|| format!("key:{}", key.hex()))
}

impl AgentView {
    fn all_verdicts(&self) -> Result<Vec<Verdict>, String> {
        let raw = lock(&self.maps).verdicts().map_err(|e| e.to_string())?;
        let now = system::now_boot_ns();
        let snapshot = self.state.get();
        let name = |key: Identity| identity_name(&snapshot.registry, key);
        let mut out: Vec<Verdict> = raw
            .iter()
            .filter(|v| v.value.expires_at_ns > now)
            .filter_map(|v| {
                Some(Verdict {
                    source: name(v.key.src_identity),
                    destination: name(v.key.dst_identity),
                    port: v.key.port,
                    direction: Direction::from_wire(v.key.direction)?,
                    decision: if v.value.decision == DECISION_ALLOW {
                        Decision::Allow
                    } else {
                        Decision::Deny
                    },
                    seconds_left: v.remaining_ns(now) as f64 / 1e9,
                    encrypted: false,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.source, &a.destination, a.port).cmp(&(&b.source, &b.destination, b.port))
        });
        Ok(out)
    }
}

impl Backend for AgentView {
    fn status(&self) -> Result<Status, String> {
        let snapshot = self.state.get();
        let config = &snapshot.config;
        let maps = lock(&self.maps);
        let count_err = |e: crate::datapath::DatapathError| e.to_string();
        let verdicts = maps.verdicts().map_err(count_err)?.len() as u64;
        let workloads = maps.workloads().map_err(count_err)?.len() as u64;
        let endpoints = maps.endpoints().map_err(count_err)?.len() as u64;
        let (orig_dst, redirects) = maps.redirect_entries().map_err(count_err)?;
        let deliveries = maps.pending_deliveries() as u64;
        drop(maps);
        let inner = lock(&self.published.inner);
        let now = SystemTime::now();
        let certificates = self
            .certs
            .identities()
            .into_iter()
            .filter_map(|id| {
                let not_after = self.certs.current(&id)?.svid.not_after;
                Some(CertificateStatus {
                    identity: id,
                    not_after: rfc3339(not_after),
                    seconds_left: seconds_left(not_after, now) as i64,
                })
            })
            .collect();
        let map = |name: &str, entries: u64, capacity: u32| MapStatus {
            name: name.to_owned(),
            entries,
            capacity: u64::from(capacity),
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            node: config.node.name.clone(),
            dataplane_mode: format!("{:?}", config.dataplane.mode).to_lowercase(),
            trust_domain: config.trust_domain.clone(),
            programs: inner.programs.clone(),
            maps: vec![
                map(map_names::VERDICTS, verdicts, MAX_VERDICTS),
                map(map_names::WORKLOADS, workloads, MAX_WORKLOADS),
                map(map_names::ENDPOINTS, endpoints, MAX_ENDPOINTS),
                map(map_names::ORIG_DST, orig_dst as u64, MAX_REDIRECTS),
                map(map_names::REDIRECTS, redirects as u64, MAX_REDIRECTS),
                map(
                    map_names::INBOUND_LISTENERS,
                    snapshot
                        .registry
                        .workloads
                        .iter()
                        .map(|w| w.ips.len() as u64)
                        .sum(),
                    MAX_INBOUND_LISTENERS,
                ),
                map(map_names::DELIVERIES, deliveries, MAX_DELIVERIES),
            ],
            certificates,
            last_reload: inner.last_reload.clone().unwrap_or(ReloadStatus {
                at: rfc3339(now - self.started.elapsed()),
                ok: true,
                trigger: "start".to_owned(),
                error: None,
            }),
            failed_workloads: inner.failed_workloads.clone(),
            source: inner.source.clone(),
        })
    }

    fn workloads(&self) -> Vec<Workload> {
        let snapshot = self.state.get();
        let mut out: Vec<Workload> = snapshot
            .registry
            .workloads
            .iter()
            .map(|w| Workload {
                id: w.id.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                identity: w.identity.to_string(),
                service_account: w
                    .identity
                    .kubernetes()
                    .map(|(_, sa)| sa.to_owned())
                    .unwrap_or_default(),
                labels: w.labels.clone(),
                ips: w.ips.clone(),
                local: true,
                node: Some(snapshot.config.node.name.clone()),
                cgroup: Some(w.cgroup.display().to_string()),
                netns: Some(w.netns.display().to_string()),
            })
            .collect();
        let mut peers: BTreeMap<(String, String), Workload> = BTreeMap::new();
        for (ip, e) in snapshot.registry.endpoints.iter().filter(|(_, e)| !e.local) {
            let peer = peers
                .entry((e.namespace.clone(), e.name.clone()))
                .or_insert_with(|| Workload {
                    id: format!("{}/{}", e.namespace, e.name),
                    name: e.name.clone(),
                    namespace: e.namespace.clone(),
                    identity: e.identity.to_string(),
                    service_account: e
                        .identity
                        .kubernetes()
                        .map(|(_, sa)| sa.to_owned())
                        .unwrap_or_default(),
                    labels: e.labels.clone(),
                    ips: Vec::new(),
                    local: false,
                    node: e.node.map(|n| n.to_string()),
                    cgroup: None,
                    netns: None,
                });
            peer.ips.push(*ip);
        }
        for peer in peers.values_mut() {
            peer.ips.sort();
        }
        out.extend(peers.into_values());
        out
    }

    fn policies(&self) -> Policies {
        let snapshot = self.state.get();
        let published = lock(&self.published.inner);
        Policies {
            policies: snapshot
                .policies
                .summaries()
                .into_iter()
                .map(|p| PolicySummary {
                    kind: format!("{:?}", p.kind),
                    namespace: p.namespace,
                    name: p.name,
                    action: p.action.map(|a| a.as_str().to_owned()).unwrap_or_default(),
                    rules: p.rules,
                    file: format!("{}:{}", p.file.display(), p.line),
                    dry_run: p.dry_run,
                    not_enforced: p.not_enforced,
                })
                .chain(
                    snapshot
                        .policies
                        .request_authentications()
                        .into_iter()
                        .map(|p| PolicySummary {
                            kind: "RequestAuthentication".to_owned(),
                            namespace: p.namespace,
                            name: p.name,
                            action: String::new(),
                            rules: p.issuers.len(),
                            file: format!("{}:{}", p.file.display(), p.line),
                            dry_run: false,
                            not_enforced: p.not_enforced,
                        }),
                )
                .collect(),
            errors: published.policy_errors.clone(),
            refused: published.refused_policies.clone(),
            jwks: crate::authn::global().status(),
        }
    }

    fn verdicts(&self, filter: &VerdictFilter) -> Result<VerdictPage, String> {
        Ok(filter.page(self.all_verdicts()?))
    }

    fn certs(&self) -> Vec<Cert> {
        self.certs
            .identities()
            .into_iter()
            .filter_map(|id| {
                let svid = self.certs.current(&id)?.svid;
                Some(Cert {
                    identity: id,
                    serial: svid.serial.clone(),
                    not_before: rfc3339(svid.not_before),
                    not_after: rfc3339(svid.not_after),
                    next_rotation: rfc3339(rotation_at(&svid)),
                })
            })
            .collect()
    }

    fn connections(&self) -> Vec<Connection> {
        self.tracker
            .snapshot()
            .into_iter()
            .map(|c| Connection {
                source: match &c.info.source {
                    Some(id) => id.to_string(),
                    None => c
                        .info
                        .source_ip
                        .map(|ip| format!("plaintext {ip}"))
                        .unwrap_or_else(|| "plaintext".into()),
                },
                destination: c.info.destination.to_string(),
                destination_address: c.info.destination_address,
                bytes_sent: c.sent,
                bytes_received: c.received,
                age_seconds: c.age.as_secs_f64(),
            })
            .collect()
    }

    fn stats(&self) -> Result<Stats, String> {
        let counters = lock(&self.maps).counters().map_err(|e| e.to_string())?;
        Ok(Stats {
            counters: counters
                .into_iter()
                .map(|(c, v)| (c.name().to_owned(), v))
                .collect(),
        })
    }

    fn explain(&self, query: &ExplainQuery) -> Result<serde_json::Value, String> {
        let question = decide::Question {
            from: query.from.clone(),
            source_ip: query.source_ip,
            to: query.to,
            method: query.method.clone(),
            path: query.path.clone(),
            host: query.host.clone(),
            headers: query.headers.clone(),
        };
        let explanation = decide::explain(&self.state.get(), &question)?;
        serde_json::to_value(&explanation).map_err(|e| e.to_string())
    }

    fn flush(&self, filter: &VerdictFilter) -> Result<FlushResult, String> {
        let snapshot = self.state.get();
        let removed = self
            .cache
            .flush_where(|k| {
                filter.matches(
                    &identity_name(&snapshot.registry, k.src_identity),
                    &identity_name(&snapshot.registry, k.dst_identity),
                    k.port,
                )
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(removed, filter = %filter.to_query(), "verdicts flushed through the debug API");
        Ok(FlushResult {
            removed: removed as u64,
        })
    }

    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadResult> + Send>> {
        let reloads = self.reloads.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if reloads.send(reply).await.is_err() {
                return ReloadResult {
                    ok: false,
                    error: Some("the agent is shutting down".into()),
                };
            }
            answer.await.unwrap_or(ReloadResult {
                ok: false,
                error: Some("the agent dropped the reload".into()),
            })
        })
    }
}
