//! The `latch agent` process: install the datapath, bring the kernel maps and the per-pod
//! listeners in line with the config and its policies, then serve until SIGTERM, reloading on
//! SIGHUP and when the config file or a policy file changes.
//!
//! A reload is prepared completely (parse, validate, load every policy, resolve cgroups, open
//! namespaces and listeners) before anything running is touched; if any step fails the agent
//! logs why and keeps the last good state. Once a new state is in place, every cached verdict it
//! would not cache the same way is removed from the kernel and every open connection it no
//! longer allows is closed, and only then is the reload reported as applied.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use latch_common::{
    ENDPOINT_LOCAL, ENDPOINT_TUNNEL_ONLY, EndpointInfo, WORKLOAD_TUNNEL_ONLY, WorkloadInfo,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};

use crate::{
    antispoof::{AntiSpoof, Enrolled},
    capture::{NetnsWorker, PodListeners, inbound, outbound, tunneled},
    config::{CertificateSource, Config, DataplaneMode, MtlsMode},
    datapath::{Datapath, DatapathSettings, DeliveryMap, install::inbound_link_name, system},
    debug::{
        DebugServer,
        agent::{AgentView, Published, ReloadRequest},
        api::{ProgramStatus, ReloadResult, WorkloadFailure},
    },
    file_watch::FileWatch,
    identity::{
        LocalWorkload, Registry,
        ca::DevCa,
        certs::{self, CertStore, Source},
    },
    metrics::{self, Metrics},
    policy::{self, PolicySet},
    scheduling::busy_poll,
    state::{SharedState, Snapshot},
    sync::lock,
    tunnel::{
        handshakes::Handshakes,
        hbone::{Retire, TunnelClient},
        tracked::Tracker,
    },
    verdicts::{SharedMaps, VerdictCache, decide},
};

/// How long a reload waits for the connections it closed to end before reporting.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How often the config file is checked for changes (SIGHUP reloads at once), and certificates
/// for rotation.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// A pod this agent serves: its listeners' tasks and its netns worker.
struct PodRuntime {
    workload: LocalWorkload,
    _tasks: Vec<AbortOnDrop<()>>,
    _worker: Arc<NetnsWorker>,
}

/// A pod whose netns is entered (and, if it is new, whose listeners are open) but that is not
/// yet serving.
struct PreparedPod {
    workload: LocalWorkload,
    worker: Arc<NetnsWorker>,
    /// `None` for a pod that is being replaced: it rebinds after the old listeners close.
    listeners: Option<PodListeners>,
}

struct Agent {
    config_path: PathBuf,
    datapath: Datapath,
    antispoof: AntiSpoof,
    maps: SharedMaps,
    deliveries: Arc<DeliveryMap>,
    cache: VerdictCache,
    state: SharedState,
    pods: BTreeMap<String, PodRuntime>,
    certs: Arc<CertStore>,
    tunnel: TunnelClient,
    /// TLS handshakes in progress on the tunnel listeners, per source address.
    handshakes: Handshakes,
    tracker: Tracker,
    metrics: Metrics,
    published: Published,
}

/// A task that is aborted when this handle is dropped (a pod's listeners when the pod goes, the
/// debug and metrics servers when `run` returns).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the access log gets a summary of the kernel's fast-path activity.
const SUMMARY_EVERY: u32 = 40;

/// A sampled summary of what the kernel decided on its own (no per-connection log exists for
/// the fast path): every [`SUMMARY_EVERY`] watch ticks, the counters' increase since the last
/// summary, if any.
#[derive(Default)]
struct FastpathSummary {
    ticks: u32,
    last: BTreeMap<&'static str, u64>,
}

impl FastpathSummary {
    fn tick(&mut self, maps: &SharedMaps) {
        self.ticks += 1;
        if !self.ticks.is_multiple_of(SUMMARY_EVERY) {
            return;
        }
        let Ok(counters) = lock(maps).counters() else {
            return;
        };
        let mut delta = BTreeMap::new();
        for (counter, value) in counters {
            let before = self.last.insert(counter.name(), value).unwrap_or(0);
            delta.insert(counter.name(), value.saturating_sub(before));
        }
        if delta.values().any(|d| *d > 0) {
            tracing::info!(
                target: "access",
                event = "fastpath summary",
                path = "fastpath",
                encrypted = false,
                interval_s = (WATCH_INTERVAL * SUMMARY_EVERY).as_secs(),
                counters = %serde_json::to_string(&delta).unwrap_or_default(),
                "kernel fast-path activity"
            );
        }
    }
}

/// The policy files of `config`, relative paths taken from the config file's directory.
fn policy_paths(config_path: &Path, config: &Config) -> Vec<PathBuf> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config.policies.iter().map(|p| base.join(p)).collect()
}

/// Load every policy the config names (all or nothing).
pub fn load_policies(config_path: &Path, config: &Config) -> anyhow::Result<PolicySet> {
    let default_mtls = match config.mtls.mode {
        MtlsMode::Strict => policy::MtlsMode::Strict,
        MtlsMode::Permissive => policy::MtlsMode::Permissive,
    };
    PolicySet::load(&policy_paths(config_path, config), &config.root_namespace)
        .map(|set| {
            set.with_default_mtls(default_mtls)
                .with_strict_fastpath(config.mtls.strict_fastpath)
        })
        .map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "{} policy error{}:\n{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                lines.join("\n")
            )
        })
}

/// The certificate store for the config's `certificates` section.
fn cert_store(config_path: &Path, config: &Config) -> anyhow::Result<CertStore> {
    let source = match &config.certificates {
        None => None,
        Some(c) => Some(match (c.source, &c.ca_cert, &c.ca_key, &c.dir) {
            (CertificateSource::DevCa, Some(cert), Some(key), _) => Source::DevCa {
                ca: Box::new(
                    DevCa::load(cert, key)
                        .with_context(|| format!("{}: certificates", config_path.display()))?,
                ),
                ttl: c.ttl,
            },
            (CertificateSource::Files, _, _, Some(dir)) => Source::Files { dir: dir.clone() },
            _ => anyhow::bail!("{}: certificates: incomplete", config_path.display()),
        }),
    };
    Ok(CertStore::new(source, &config.trust_domain))
}

fn identities(registry: &Registry) -> Vec<String> {
    registry
        .workloads
        .iter()
        .map(|w| w.identity.to_string())
        .collect()
}

fn settings(config: &Config) -> DatapathSettings {
    DatapathSettings {
        pin_dir: config.bpf_pin_dir.clone(),
        cgroup_root: config.cgroup_root.clone(),
        capture_port: config.ports.capture,
        inbound_port: config.ports.inbound,
        tunnel_port: config.ports.tunnel,
    }
}

/// Run the agent until SIGTERM/SIGINT, on a tokio runtime with the config's
/// `dataplane.workerThreads`. Programs and maps stay pinned when it returns.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.dataplane.worker_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(config_path, config))
}

async fn run(config_path: &Path, config: Config) -> anyhow::Result<()> {
    busy_poll::install(config.dataplane.busy_poll);
    let registry =
        Registry::from_config(&config).with_context(|| format!("{}", config_path.display()))?;
    // Everything that depends on the outside world is checked before the kernel is touched, so
    // a bad config at start-up leaves nothing attached.
    let certs = Arc::new(cert_store(config_path, &config)?);
    certs
        .ensure(&identities(&registry))
        .with_context(|| format!("{}: certificates", config_path.display()))?;
    let policies = load_policies(config_path, &config)?;
    // The debug socket is taken first: a second agent for the same node refuses to start here,
    // before it opens a listener or touches the kernel.
    let debug_server = DebugServer::bind(&config.debug_socket)?;
    let prepared = prepare(config_path, &config, &registry, &BTreeMap::new());
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("{}: metrics: binding {addr}", config_path.display()))?,
        ),
        None => None,
    };
    let mut datapath = Datapath::install(settings(&config)).context("installing the datapath")?;
    let (antispoof, antispoof_watch) =
        AntiSpoof::start(datapath.antispoof()?, Enrolled::of(&config, &registry))
            .context("starting anti-spoofing")?;
    let _antispoof_watch = AbortOnDrop(antispoof_watch);
    let maps: SharedMaps = Arc::new(Mutex::new(datapath.maps()?));
    let deliveries = Arc::new(datapath.deliveries()?);
    let stale = deliveries
        .clear()
        .context("clearing deliveries announced by an earlier run")?;
    if stale > 0 {
        tracing::info!(
            removed = stale,
            "cleared deliveries an earlier run announced and never withdrew"
        );
    }
    let state = SharedState::new(Snapshot {
        config,
        registry,
        policies,
    });
    let metrics = Metrics::new();
    let mut agent = Agent {
        config_path: config_path.to_owned(),
        cache: VerdictCache::new(maps.clone(), state.clone())?,
        datapath,
        antispoof,
        maps,
        deliveries,
        state,
        pods: BTreeMap::new(),
        certs,
        tunnel: TunnelClient::new(),
        handshakes: Handshakes::new(),
        tracker: Tracker::with_metrics(metrics.clone()),
        metrics,
        published: Published::default(),
    };
    agent.commit(prepared)?;
    agent.drop_stale_inbound_links()?;

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    let view = Arc::new(AgentView {
        started: std::time::Instant::now(),
        state: agent.state.clone(),
        maps: agent.maps.clone(),
        cache: agent.cache.clone(),
        certs: agent.certs.clone(),
        tracker: agent.tracker.clone(),
        published: agent.published.clone(),
        reloads: reload_tx,
    });
    let socket = debug_server.path().to_owned();
    let _debug = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = debug_server.serve(view).await {
            tracing::error!(socket = %socket.display(), error = %e, "debug socket stopped");
        }
    }));
    agent.metrics.set_scrape_source(agent.scrape_source());
    let _metrics = metrics_listener.map(|listener| {
        let metrics = agent.metrics.clone();
        AbortOnDrop(tokio::spawn(metrics::http::serve_on(listener, metrics)))
    });

    let snapshot = agent.state.get();
    tracing::info!(
        node = %snapshot.config.node.name,
        workloads = snapshot.registry.workloads.len(),
        endpoints = snapshot.registry.endpoints.len(),
        policies = snapshot.policies.len(),
        pin_dir = %snapshot.config.bpf_pin_dir.display(),
        debug_socket = %snapshot.config.debug_socket.display(),
        metrics = %snapshot.config.metrics.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        "agent ready"
    );
    let mut summary = FastpathSummary::default();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut last_seen = agent.watched_stamps();
    let mut files = match FileWatch::new() {
        Ok(files) => Some(files),
        Err(e) => {
            tracing::warn!(error = %e, "no inotify; config and policy changes are noticed by the periodic check only");
            None
        }
    };
    agent.watch_files(&mut files);
    loop {
        tokio::select! {
            // A file event before the periodic check, should both be ready.
            biased;
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                last_seen = agent.watched_stamps();
                agent.reload("SIGHUP").await;
                agent.watch_files(&mut files);
            }
            Some(reply) = reload_rx.recv() => {
                last_seen = agent.watched_stamps();
                let _ = reply.send(agent.reload("debug API").await);
                agent.watch_files(&mut files);
            }
            changed = next_change(&mut files) => {
                if let Err(e) = changed {
                    tracing::warn!(error = %e, "reading inotify events; the periodic check goes on");
                    files = None;
                }
                let stamps = agent.watched_stamps();
                if stamps != last_seen {
                    last_seen = stamps;
                    agent.reload("config or policy file changed").await;
                    agent.watch_files(&mut files);
                }
            }
            _ = watch.tick() => {
                let stamps = agent.watched_stamps();
                if stamps != last_seen {
                    last_seen = stamps;
                    agent.reload("config or policy file changed (periodic check)").await;
                    agent.watch_files(&mut files);
                }
                agent.rotate_certificates();
                summary.tick(&agent.maps);
            }
        }
    }
    tracing::info!("agent stopping; programs and maps stay pinned, enforcement continues");
    Ok(())
}

/// The state a config file describes (config, registry, policies), without touching the
/// kernel: what `latch policy explain` evaluates against.
pub fn offline_snapshot(config_path: &Path) -> anyhow::Result<Snapshot> {
    let config = Config::load(config_path)?;
    let registry =
        Registry::from_config(&config).with_context(|| format!("{}", config_path.display()))?;
    let policies = load_policies(config_path, &config)?;
    Ok(Snapshot {
        config,
        registry,
        policies,
    })
}

/// Remove everything the agent pinned for this config.
pub fn uninstall(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    crate::datapath::uninstall(&config.bpf_pin_dir)?;
    Ok(())
}

/// Modification time and length: enough to notice an edit or a replaced file.
type Stamp = Option<(std::time::SystemTime, u64)>;

fn file_stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Stamps of `path` and, for a directory, of each entry in it (files added, removed or edited).
fn stamps_under(path: &Path, out: &mut Vec<(PathBuf, Stamp)>) {
    out.push((path.to_owned(), file_stamp(path)));
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for name in names {
            out.push((name.clone(), file_stamp(&name)));
        }
    }
}

/// The next change `files` reports; never, without inotify.
async fn next_change(files: &mut Option<FileWatch>) -> std::io::Result<()> {
    match files {
        Some(files) => files.changed().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Watch the config file and the policy paths the current config names.
    fn watch_files(&self, files: &mut Option<FileWatch>) {
        if let Some(files) = files {
            let mut paths = vec![self.config_path.clone()];
            paths.extend(policy_paths(&self.config_path, &self.state.get().config));
            files.watch(&paths);
        }
    }

    /// Stamps of the config file and of every policy file and directory it names.
    fn watched_stamps(&self) -> Vec<(PathBuf, Stamp)> {
        let mut out = vec![(self.config_path.clone(), file_stamp(&self.config_path))];
        for path in policy_paths(&self.config_path, &self.state.get().config) {
            stamps_under(&path, &mut out);
        }
        out
    }

    /// Rotate SVIDs that are due; failures keep the current SVID and are reported. A rotation
    /// that brought another trust bundle drops what the old one proved.
    fn rotate_certificates(&self) {
        let (_rotated, failed) = self.certs.refresh(std::time::SystemTime::now());
        for (identity, error) in failed {
            tracing::error!(identity, error = %error, "certificate rotation failed; keeping the current certificate");
        }
        let changed = self.certs.take_trust_changes();
        if !changed.is_empty() {
            self.drop_old_trust(&changed);
        }
    }

    /// The trust bundles of `identities` changed (the new ones are in force): start a new state
    /// generation, so nothing proven under the old bundles and decided before now is cached;
    /// revoke every verdict cached for them (outbound from them, inbound to them); take their
    /// pooled tunnel connections proven under the old bundles out of the pool; then tell the
    /// tunnel servers, which send `GOAWAY` on the connections proven under the old bundles.
    /// Where the new bundle still verifies the peer, open streams finish; where it does not,
    /// the connection is closed at once.
    fn drop_old_trust(&self, identities: &[String]) {
        let started = std::time::Instant::now();
        self.state.renew();
        let mut revoked = 0;
        for id in identities {
            match self
                .cache
                .revoke_proven_by(crate::identity::IdentityKey::of(id))
            {
                Ok(n) => revoked += n,
                Err(e) => {
                    tracing::error!(identity = %id, error = %e, "revoking the verdicts an old trust bundle proved")
                }
            }
        }
        let trust_domain = self.state.get().config.trust_domain.clone();
        let retired = self.tunnel.retire(|key, server_chain| {
            if !identities.contains(&key.src) {
                return Retire::Keep;
            }
            let Some(current) = self.certs.current(&key.src) else {
                return Retire::Close;
            };
            if current.trust == key.trust {
                return Retire::Keep;
            }
            let verified = crate::tls::verify_svid(
                server_chain,
                &current.bundle,
                &trust_domain,
                crate::tls::Role::Server,
                std::time::SystemTime::now(),
            );
            match verified {
                Ok(id) if id == key.dst => Retire::Drain,
                _ => Retire::Close,
            }
        });
        self.certs.announce_trust_change();
        tracing::info!(
            identities = ?identities,
            revoked,
            pooled_connections_retired = retired,
            elapsed_us = started.elapsed().as_micros() as u64,
            "trust bundle changed; revoked the verdicts and retired the tunnel connections the old bundle proved"
        );
    }

    async fn reload(&mut self, trigger: &str) -> ReloadResult {
        let outcome = self.try_reload();
        // Whatever happened, the connections the state in force no longer allows were told to
        // close; the reload is reported once they have ended.
        self.closed_connections_ended().await;
        match outcome {
            Ok(Err(e)) => {
                let error = format!("{e:#}");
                tracing::error!(
                    trigger,
                    error,
                    "config reload applied with errors; the new configuration is in force and revocation ran"
                );
                self.published.reloaded(trigger, Some(error.clone()));
                ReloadResult {
                    ok: false,
                    error: Some(error),
                }
            }
            Ok(Ok(())) => {
                tracing::info!(trigger, "config reloaded");
                self.published.reloaded(trigger, None);
                ReloadResult {
                    ok: true,
                    error: None,
                }
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(
                    trigger,
                    error,
                    "config reload failed; keeping the last good configuration"
                );
                self.published.reloaded(trigger, Some(error.clone()));
                ReloadResult {
                    ok: false,
                    error: Some(error),
                }
            }
        }
    }

    /// Wait until the connections the last commit closed have ended (their sockets reset, their
    /// handles dropped), so that "reloaded" means they are gone; bounded: a relay that does not
    /// end in time is reported and left to end on its own.
    async fn closed_connections_ended(&self) {
        if !self.tracker.closed_ended(CLOSE_WAIT).await {
            tracing::warn!(
                waited_ms = CLOSE_WAIT.as_millis() as u64,
                "connections closed by the reload have not all ended yet"
            );
        }
    }

    /// What the metrics endpoint reads at each scrape.
    fn scrape_source(&self) -> metrics::ScrapeSource {
        let maps = self.maps.clone();
        let cache = self.cache.clone();
        let certs = self.certs.clone();
        let published = self.published.clone();
        Box::new(move || {
            let kernel_counters = lock(&maps).counters().unwrap_or_default();
            // From the agent's own record: a scrape never walks the kernel's million buckets
            // while connections wait for the maps.
            let cache_entries = cache.len() as u64;
            let now = std::time::SystemTime::now();
            let cert_expiry = certs
                .identities()
                .into_iter()
                .filter_map(|id| {
                    let not_after = certs.current(&id)?.svid.not_after;
                    Some((id, certs::seconds_left(not_after, now)))
                })
                .collect();
            metrics::ScrapeSnapshot {
                kernel_counters,
                cache_entries,
                cert_expiry,
                busy_poll_seconds: busy_poll::busy().as_secs_f64(),
                failed_workloads: published.failed_workloads() as u64,
            }
        })
    }

    /// The programs this agent has in the kernel, for the debug API.
    fn publish_programs(&mut self) {
        let snapshot = self.state.get();
        let root = snapshot.config.cgroup_root.display().to_string();
        let mut programs: Vec<ProgramStatus> = self
            .datapath
            .attached()
            .iter()
            .map(|p| ProgramStatus {
                name: p.name.to_owned(),
                id: p.id,
                attached_to: format!("cgroup {root}"),
            })
            .collect();
        if let Ok(id) = self.datapath.inbound_program_id() {
            programs.extend(snapshot.registry.workloads.iter().map(|w| ProgramStatus {
                name: latch_common::program_names::INBOUND.to_owned(),
                id,
                attached_to: format!("netns {} ({})", w.netns.display(), w.id),
            }));
        }
        programs.push(ProgramStatus {
            name: latch_common::program_names::ANTISPOOF.to_owned(),
            id: self.antispoof.program_id(),
            attached_to: "every Ethernet interface of the node's network namespace (TCX ingress)"
                .to_owned(),
        });
        self.published.set_programs(programs);
    }

    /// Prepare the new state (an error here leaves everything as it was: the outer `Err`), then
    /// put it in force and commit it (the inner result: an error there is reported with the
    /// new state in force and revocation done).
    fn try_reload(&mut self) -> anyhow::Result<anyhow::Result<()>> {
        let config = Config::load(&self.config_path)?;
        let current = self.state.get();
        let old = &current.config;
        for (field, changed) in [
            ("bpfPinDir", config.bpf_pin_dir != old.bpf_pin_dir),
            ("cgroupRoot", config.cgroup_root != old.cgroup_root),
            ("ports", config.ports != old.ports),
            ("certificates", config.certificates != old.certificates),
            ("trustDomain", config.trust_domain != old.trust_domain),
            (
                "dataplane.workerThreads",
                config.dataplane.worker_threads != old.dataplane.worker_threads,
            ),
        ] {
            if changed {
                anyhow::bail!(
                    "{}: {field} cannot change while the agent runs; restart it",
                    self.config_path.display()
                );
            }
        }
        let registry = Registry::from_config(&config)
            .with_context(|| format!("{}", self.config_path.display()))?;
        let policies = load_policies(&self.config_path, &config)?;
        self.certs
            .ensure(&identities(&registry))
            .with_context(|| format!("{}: certificates", self.config_path.display()))?;
        let prepared = prepare(&self.config_path, &config, &registry, &self.pods);
        busy_poll::install(config.dataplane.busy_poll);
        self.state.replace(Snapshot {
            config,
            registry,
            policies,
        });
        Ok(self.commit(prepared))
    }

    /// Apply a prepared state: kernel maps, inbound checks, listeners; then, always, revoke
    /// and close for the snapshot in force. A step that fails does not stop the others: a
    /// workload's failure leaves that workload failing closed (its inbound check attached with
    /// no listener behind it, its connections redirected to a listener that is not there) and
    /// is reported; an error writing the kernel maps is returned after revocation has run.
    fn commit(&mut self, prepared: Prepared) -> anyhow::Result<()> {
        let snapshot = self.state.get();
        let Prepared {
            kernel_workloads,
            kernel_endpoints,
            new_pods,
            mut failed,
        } = prepared;
        let applied = self.apply(
            &snapshot,
            &kernel_workloads,
            &kernel_endpoints,
            new_pods,
            &mut failed,
        );
        self.fail_closed(&snapshot, &mut failed);
        self.report_failures(failed);
        self.certs.retain(&identities(&snapshot.registry));
        self.publish_programs();
        let enforced = self.enforce(&snapshot);
        applied.and(enforced)
    }

    /// The kernel maps and the pods of a prepared state. Pods that fail here join `failed`.
    fn apply(
        &mut self,
        snapshot: &Snapshot,
        kernel_workloads: &HashMap<u64, WorkloadInfo>,
        kernel_endpoints: &HashMap<std::net::IpAddr, EndpointInfo>,
        new_pods: Vec<PreparedPod>,
        failed: &mut BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let ports = snapshot.config.ports.clone();
        let configured: std::collections::HashSet<&str> = snapshot
            .registry
            .workloads
            .iter()
            .map(|w| w.id.as_str())
            .collect();
        let changed: Vec<String> = new_pods.iter().map(|p| p.workload.id.clone()).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|id| {
                !configured.contains(id.as_str())
                    || failed.contains_key(*id)
                    || changed.contains(id)
            })
            .cloned()
            .collect();
        let mut errors: Vec<anyhow::Error> = Vec::new();
        for id in gone {
            if let Some(pod) = self.pods.remove(&id) {
                {
                    let mut maps = lock(&self.maps);
                    for ip in &pod.workload.ips {
                        if let Err(e) = maps.remove_inbound_listener(*ip) {
                            errors.push(e.into());
                        }
                    }
                }
                if !configured.contains(id.as_str())
                    && let Err(e) = self.datapath.detach_inbound(&id)
                {
                    errors.push(e.into());
                }
                tracing::info!(workload = %id, "workload removed");
            }
        }

        // Pods' addresses are bound to their interfaces before their endpoints are written.
        if let Err(e) = self
            .antispoof
            .set(Enrolled::of(&snapshot.config, &snapshot.registry))
        {
            errors.push(e.into());
        }
        if let Err(e) = self.write_maps(kernel_workloads, kernel_endpoints) {
            errors.push(e);
        }

        for PreparedPod {
            workload,
            worker,
            listeners,
        } in new_pods
        {
            let id = workload.id.clone();
            match self.serve_pod(&ports, workload, worker, listeners) {
                Ok(pod) => {
                    tracing::info!(workload = %pod.workload.id, identity = %pod.workload.identity, "workload enrolled");
                    self.pods.insert(pod.workload.id.clone(), pod);
                }
                Err(e) => {
                    failed.insert(id, format!("{e:#}"));
                }
            }
        }
        match errors.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    /// Open a pod's listeners if it has none yet, attach its inbound check, register its
    /// inbound listener and start serving it.
    fn serve_pod(
        &mut self,
        ports: &crate::config::Ports,
        workload: LocalWorkload,
        worker: Arc<NetnsWorker>,
        listeners: Option<PodListeners>,
    ) -> anyhow::Result<PodRuntime> {
        let listeners = match listeners {
            Some(l) => l,
            None => PodListeners::open(&worker, ports.capture, ports.inbound, ports.tunnel)
                .context("opening listeners")?,
        };
        self.datapath
            .attach_inbound(&workload.id, &workload.netns)
            .context("attaching the inbound check")?;
        {
            let mut maps = lock(&self.maps);
            for ip in &workload.ips {
                maps.set_inbound_listener(*ip, &listeners.inbound)
                    .context("registering the inbound listener")?;
            }
        }
        Ok(self.start_pod(workload, worker, listeners))
    }

    /// Bring the workload and endpoint maps in line with the prepared entries.
    fn write_maps(
        &self,
        kernel_workloads: &HashMap<u64, WorkloadInfo>,
        kernel_endpoints: &HashMap<std::net::IpAddr, EndpointInfo>,
    ) -> anyhow::Result<()> {
        let mut maps = lock(&self.maps);
        for (cgroup_id, _) in maps.workloads()? {
            if !kernel_workloads.contains_key(&cgroup_id) {
                maps.remove_workload(cgroup_id)?;
            }
        }
        for (cgroup_id, info) in kernel_workloads {
            maps.set_workload(*cgroup_id, *info)?;
        }
        for (ip, _) in maps.endpoints()? {
            if !kernel_endpoints.contains_key(&ip) {
                maps.remove_endpoint(ip)?;
            }
        }
        for (ip, info) in kernel_endpoints {
            maps.set_endpoint(*ip, *info)?;
        }
        Ok(())
    }

    /// A workload the agent cannot serve fails closed: its inbound check stays (or is put) on
    /// its netns with no listener registered, so every connection without a cached verdict is
    /// reset, and its enrolled cgroup's connections are redirected to a capture listener that
    /// is not there (refused).
    fn fail_closed(&mut self, snapshot: &Snapshot, failed: &mut BTreeMap<String, String>) {
        for w in &snapshot.registry.workloads {
            let Some(why) = failed.get_mut(&w.id) else {
                continue;
            };
            {
                let mut maps = lock(&self.maps);
                for ip in &w.ips {
                    if let Err(e) = maps.remove_inbound_listener(*ip) {
                        why.push_str(&format!("; unregistering its inbound listener: {e}"));
                    }
                }
            }
            if let Err(e) = self.datapath.attach_inbound(&w.id, &w.netns) {
                why.push_str(&format!(
                    "; its inbound check could not be attached either: {e}"
                ));
            }
        }
    }

    /// Log and publish the workloads the agent could not serve.
    fn report_failures(&self, failed: BTreeMap<String, String>) {
        for (workload, error) in &failed {
            tracing::error!(
                workload,
                error,
                "workload not served; it fails closed until a reload fixes it"
            );
        }
        self.published.set_failed_workloads(
            failed
                .into_iter()
                .map(|(workload, error)| WorkloadFailure { workload, error })
                .collect(),
        );
    }

    /// Bring what is cached and open in line with `snapshot`: remove every cached verdict it
    /// would not cache the same way, close every carried connection it no longer allows.
    fn enforce(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let revoked = self.cache.revoke_stale(snapshot)?;
        let closed = self
            .tracker
            .close_where(|info| !decide::still_allowed(snapshot, info));
        if revoked > 0 || closed > 0 {
            tracing::info!(
                revoked,
                closed,
                elapsed_us = started.elapsed().as_micros() as u64,
                "revoked cached verdicts and closed connections the new state no longer allows"
            );
        }
        Ok(())
    }

    fn start_pod(
        &self,
        workload: LocalWorkload,
        worker: Arc<NetnsWorker>,
        listeners: PodListeners,
    ) -> PodRuntime {
        let out_ctx = Arc::new(outbound::OutboundContext {
            workload: workload.clone(),
            netns_cookie: listeners.netns_cookie,
            worker: worker.clone(),
            maps: self.maps.clone(),
            cache: self.cache.clone(),
            state: self.state.clone(),
            certs: self.certs.clone(),
            tunnel: self.tunnel.clone(),
            tracker: self.tracker.clone(),
            metrics: self.metrics.clone(),
        });
        let tunnel_ctx = Arc::new(tunneled::TunnelContext {
            workload: workload.clone(),
            worker: worker.clone(),
            deliveries: self.deliveries.clone(),
            cache: self.cache.clone(),
            state: self.state.clone(),
            certs: self.certs.clone(),
            tracker: self.tracker.clone(),
            metrics: self.metrics.clone(),
            handshakes: self.handshakes.clone(),
        });
        let in_ctx = Arc::new(inbound::InboundContext {
            workload: workload.clone(),
            worker: worker.clone(),
            deliveries: self.deliveries.clone(),
            state: self.state.clone(),
            tracker: self.tracker.clone(),
            metrics: self.metrics.clone(),
        });
        let mut tasks = vec![
            AbortOnDrop(tokio::spawn(outbound::serve(
                listeners.capture_v4,
                out_ctx.clone(),
            ))),
            AbortOnDrop(tokio::spawn(inbound::serve(listeners.inbound, in_ctx))),
            AbortOnDrop(tokio::spawn(tunneled::serve(listeners.tunnel, tunnel_ctx))),
        ];
        if let Some(v6) = listeners.capture_v6 {
            tasks.push(AbortOnDrop(tokio::spawn(outbound::serve(v6, out_ctx))));
        }
        PodRuntime {
            workload,
            _tasks: tasks,
            _worker: worker,
        }
    }

    /// Inbound links pinned by an earlier run for workloads that are no longer configured.
    fn drop_stale_inbound_links(&mut self) -> anyhow::Result<()> {
        // Every configured workload keeps its check: served ones and failed ones alike.
        let wanted: Vec<String> = self
            .state
            .get()
            .registry
            .workloads
            .iter()
            .map(|w| inbound_link_name(&w.id))
            .collect();
        for pinned in self.datapath.inbound_attachments()? {
            if !wanted.contains(&pinned) {
                self.datapath.detach_inbound(&pinned)?;
            }
        }
        Ok(())
    }
}

/// Everything that can fail for reasons outside the agent: cgroups exist, namespaces open,
/// listeners bind. Nothing running is touched. A workload for which one of these fails is
/// recorded as failed (with the config location and why) and the others are prepared as
/// usual: one pod never blocks the node.
fn prepare(
    config_path: &Path,
    config: &Config,
    registry: &Registry,
    running: &BTreeMap<String, PodRuntime>,
) -> Prepared {
    let file = config_path.display();
    let mut failed = BTreeMap::new();
    let mut kernel_workloads = HashMap::new();
    for (i, w) in registry.workloads.iter().enumerate() {
        let cgroup_id = match system::cgroup_id(&w.cgroup) {
            Ok(id) => id,
            Err(e) => {
                failed.insert(
                    w.id.clone(),
                    format!("{file}: workloads[{i}].cgroup (workload {}): {e}", w.id),
                );
                continue;
            }
        };
        let flags = if config.dataplane.mode == DataplaneMode::Tunnel {
            WORKLOAD_TUNNEL_ONLY
        } else {
            0
        };
        kernel_workloads.insert(
            cgroup_id,
            WorkloadInfo {
                identity: w.identity.key().0,
                flags,
                _pad: 0,
            },
        );
    }
    let mut kernel_endpoints = HashMap::new();
    for (ip, ep) in &registry.endpoints {
        let mut flags = if ep.local { ENDPOINT_LOCAL } else { 0 };
        if config.dataplane.mode == DataplaneMode::Tunnel {
            flags |= ENDPOINT_TUNNEL_ONLY;
        }
        kernel_endpoints.insert(
            *ip,
            EndpointInfo {
                identity: ep.identity.key().0,
                flags,
                _pad: 0,
            },
        );
    }
    let mut new_pods = Vec::new();
    for (i, w) in registry.workloads.iter().enumerate() {
        if failed.contains_key(&w.id) || running.get(&w.id).is_some_and(|p| p.workload == *w) {
            continue;
        }
        match prepare_pod(config, w, running.contains_key(&w.id)) {
            Ok(pod) => new_pods.push(pod),
            Err(e) => {
                failed.insert(
                    w.id.clone(),
                    format!("{file}: workloads[{i}] (workload {}): {e:#}", w.id),
                );
            }
        }
    }
    Prepared {
        kernel_workloads,
        kernel_endpoints,
        new_pods,
        failed,
    }
}

/// Enter a workload's netns and, unless it is already served (`replacing`: its listeners are
/// re-opened in commit, once the old ones have closed), open its listeners.
fn prepare_pod(config: &Config, w: &LocalWorkload, replacing: bool) -> anyhow::Result<PreparedPod> {
    let worker = Arc::new(NetnsWorker::spawn(&w.netns).context("entering its netns")?);
    // Failing to set it up only warns (the worker falls back to the loopback marker).
    worker
        .route_deliveries()
        .context("setting up delivery routing")?;
    let listeners = if replacing {
        None
    } else {
        Some(
            PodListeners::open(
                &worker,
                config.ports.capture,
                config.ports.inbound,
                config.ports.tunnel,
            )
            .context("opening listeners")?,
        )
    };
    Ok(PreparedPod {
        workload: w.clone(),
        worker,
        listeners,
    })
}

struct Prepared {
    kernel_workloads: HashMap<u64, WorkloadInfo>,
    kernel_endpoints: HashMap<std::net::IpAddr, EndpointInfo>,
    new_pods: Vec<PreparedPod>,
    /// Workload id → why it cannot be served.
    failed: BTreeMap<String, String>,
}
