//! The Kubernetes API as a [`Source`] of desired state: the node config file (the ConfigMap,
//! noticed as the file source notices it) plus the watches ([`Watches`]): enrolled pods of this
//! node become workloads once found on disk ([`LocalPods`]), enrolled pods of other nodes
//! become peers, and each policy object's last good version goes into the policy set. Changes
//! are coalesced for [`COALESCE`] and applied by the runtime as any reload is.
//!
//! Start-up waits for every watch's first full list without touching the kernel, so what an
//! earlier run pinned goes on enforcing meanwhile; the first commit then revokes whatever the
//! cluster no longer allows. Readiness ([`Readiness`]) turns true once a state made from synced
//! watches is in force.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use kube::Client;
use tokio::time::Interval;

use super::{
    desired::desired,
    local::LocalPods,
    watch::{Shared, Watches},
};
use crate::{
    config::{Config, Node},
    debug::api::{RefusedPolicy, SourceStatus, WatchStatus},
    identity::Registry,
    runtime::source::{FileSource, Source, restart_only_unchanged},
    state::{Snapshot, with_policy_defaults},
    sync::lock,
};

/// How long changes are gathered into one reload.
pub const COALESCE: Duration = Duration::from_millis(100);
/// How often pods of this node not found on disk yet are looked for again.
pub const RETRY_PODS: Duration = Duration::from_secs(1);
/// How often start-up says it is still waiting for the API server.
const WAITING_REPORT: Duration = Duration::from_secs(10);

/// Whether the agent is ready: shared with the `/ready` endpoint.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The Kubernetes API and the node config file, as one source.
pub struct KubeSource {
    config_path: PathBuf,
    /// The node from the downward API (`NODE_NAME`, `HOST_IP`), unless the file names it.
    node: Option<Node>,
    file: FileSource,
    client: Client,
    watches: Option<Watches>,
    local: LocalPods,
    retry: Interval,
    /// What the last load could not serve yet (pods waiting, pods failed, problems).
    waiting: Vec<String>,
    /// The last load was made from synced watches; set ready once it is in force.
    loaded_synced: bool,
    readiness: Readiness,
    /// The problems last logged, so each is logged once, not at every reload.
    logged: Vec<String>,
    /// When a change of the watched objects was seen that no reload has taken yet.
    pending: Option<tokio::time::Instant>,
}

impl KubeSource {
    /// A source on `client` for the node config at `config_path`. Must be made inside the
    /// tokio runtime.
    pub fn new(
        config_path: &Path,
        node: Option<Node>,
        client: Client,
        local: LocalPods,
        readiness: Readiness,
    ) -> Self {
        let mut retry = tokio::time::interval(RETRY_PODS);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            config_path: config_path.to_owned(),
            node,
            file: FileSource::new(config_path, crate::runtime::WATCH_INTERVAL),
            client,
            watches: None,
            local,
            retry,
            waiting: Vec::new(),
            loaded_synced: false,
            readiness,
            logged: Vec::new(),
            pending: None,
        }
    }

    fn shared(&self) -> anyhow::Result<&Arc<Shared>> {
        self.watches
            .as_ref()
            .map(|w| &w.shared)
            .context("the Kubernetes watches are not started")
    }

    /// The desired state of node config `config` and what the watches hold now.
    fn build(&mut self, mut config: Config) -> anyhow::Result<Snapshot> {
        let watches = self
            .watches
            .as_ref()
            .context("the Kubernetes watches are not started")?;
        let pods = watches.pods.state();
        let namespaces = watches.namespaces.state();
        let wanted = desired(
            &config.node.name,
            pods.iter().map(AsRef::as_ref),
            namespaces.iter().map(AsRef::as_ref),
        );
        let policies = lock(&watches.shared.policies).set(&config.root_namespace);
        self.loaded_synced = watches.shared.synced();
        let local = tokio::task::block_in_place(|| self.local.workloads(&wanted.local));
        let mut problems = wanted.problems;
        problems.extend(local.waiting);
        problems.extend(local.failed);
        self.log_problems(&problems);
        self.waiting = problems;
        config.workloads = local.workloads;
        config.peers = wanted.peers;
        let registry = Registry::from_config(&config)
            .with_context(|| format!("the pods of the cluster (node {})", config.node.name))?;
        let policies = with_policy_defaults(policies, &config);
        Ok(Snapshot {
            config,
            registry,
            policies,
        })
    }

    fn log_problems(&mut self, problems: &[String]) {
        for problem in problems {
            if !self.logged.contains(problem) {
                tracing::warn!(problem, "enrolled pod not served (yet)");
            }
        }
        self.logged = problems.to_vec();
    }

    fn read_config(&self) -> anyhow::Result<Config> {
        Ok(Config::load_for_kubernetes(
            &self.config_path,
            self.node.clone(),
        )?)
    }
}

impl Source for KubeSource {
    fn origin(&self) -> &Path {
        &self.config_path
    }

    async fn initial(&mut self, config: Config) -> anyhow::Result<Snapshot> {
        let watches = Watches::start(&self.client);
        let shared = watches.shared.clone();
        self.watches = Some(watches);
        tracing::info!(
            node = %config.node.name,
            kubepods = %self.local.root().display(),
            "waiting for the first full list of every watch; what an earlier run pinned keeps enforcing"
        );
        while !shared.synced() {
            tokio::select! {
                _ = shared.changed.notified() => {}
                _ = tokio::time::sleep(WAITING_REPORT) => {
                    let health = shared.health();
                    tracing::warn!(watches = ?health, "still waiting for the Kubernetes API server");
                }
            }
        }
        let snapshot = self.build(config);
        self.file.seen();
        snapshot
    }

    /// Cancel-safe (the event loop drops it when another branch wins): a change seen stays
    /// pending in `self` until the reload it asks for is returned.
    async fn changed(&mut self) -> &'static str {
        let shared = match self.shared() {
            Ok(shared) => shared.clone(),
            Err(_) => return std::future::pending().await,
        };
        let waiting = !self.waiting.is_empty();
        loop {
            if let Some(since) = self.pending {
                // Gather what else arrives with it into the same reload.
                tokio::time::sleep_until(since + COALESCE).await;
                self.pending = None;
                return "Kubernetes objects changed";
            }
            tokio::select! {
                trigger = self.file.changed() => return trigger,
                _ = shared.changed.notified() => self.pending = Some(tokio::time::Instant::now()),
                _ = self.retry.tick(), if waiting => return "looking again for pods not found yet",
            }
        }
    }

    fn load(&mut self, current: &Snapshot) -> anyhow::Result<Snapshot> {
        self.file.seen();
        let config = self.read_config()?;
        restart_only_unchanged(&self.config_path, &current.config, &config)?;
        self.build(config)
    }

    fn follow(&mut self, current: &Snapshot) {
        // The config file only: in Kubernetes mode it names no policy files.
        self.file.follow(current);
    }

    fn applied(&mut self, in_force: bool) {
        if in_force && self.loaded_synced && !self.readiness.get() {
            tracing::info!("ready: every watch synced and the cluster's state is in force");
            self.readiness.set();
        }
    }

    fn status(&self) -> (Option<SourceStatus>, Vec<RefusedPolicy>) {
        let Ok(shared) = self.shared() else {
            return (None, Vec::new());
        };
        let watches = shared
            .health()
            .into_iter()
            .map(|(name, h)| WatchStatus {
                name: name.to_owned(),
                synced: h.synced,
                failing: h.failing,
                last_error: h.last_error,
                last_error_at: h.last_error_at,
                version: h.version,
            })
            .collect();
        let refused = lock(&shared.policies).refused();
        (
            Some(SourceStatus {
                kind: "kubernetes".into(),
                ready: self.readiness.get(),
                api_failing: shared.failing(),
                watches,
                waiting_pods: self.waiting.clone(),
            }),
            refused,
        )
    }
}
