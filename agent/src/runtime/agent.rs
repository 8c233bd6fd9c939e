//! What the running agent holds (the kernel side, the state in force, the pods it serves and the
//! handles their listeners share); its behaviour is in `event_loop`,
//! `reconcile`, `pod` and `trust`.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use crate::{
    antispoof::AntiSpoof,
    capture::PodNetns,
    datapath::{Datapath, DeliveryMap, RedirectMap},
    debug::agent::Published,
    identity::{LocalWorkload, certs::CertStore},
    metrics::Metrics,
    state::SharedState,
    tunnel::{
        handshakes::Handshakes,
        hbone::{Drain, TunnelClient},
        tracked::Tracker,
    },
    verdicts::{SharedMaps, VerdictCache},
};

/// How often the config file is checked for changes (SIGHUP reloads at once), and certificates
/// for rotation.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What the running agent holds: the kernel side, the state in force, the pods it serves and
/// the handles their listeners share.
pub(super) struct Agent {
    /// Where the desired state comes from, as errors name it (the config file).
    pub(super) origin: PathBuf,
    pub(super) datapath: Datapath,
    pub(super) antispoof: AntiSpoof,
    /// The runtime's own handle on the maps (reconcile's writes, the fast-path summary).
    pub(super) maps: SharedMaps,
    pub(super) redirects: Arc<RedirectMap>,
    pub(super) deliveries: Arc<DeliveryMap>,
    pub(super) cache: VerdictCache,
    pub(super) state: SharedState,
    pub(super) pods: BTreeMap<String, PodRuntime>,
    pub(super) certs: Arc<CertStore>,
    pub(super) tunnel: TunnelClient,
    /// TLS handshakes in progress on the tunnel listeners, per source address.
    pub(super) handshakes: Handshakes,
    pub(super) tracker: Tracker,
    pub(super) metrics: Metrics,
    pub(super) published: Published,
}

/// A task that is aborted when this handle is dropped (a pod's listeners when the pod goes, the
/// debug and metrics servers when the event loop returns).
pub(super) struct AbortOnDrop<T>(pub(super) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pod this agent serves: its listeners' tasks, its netns netns, and the drain of its tunnel
/// server connections (started when the pod is no longer served: they send `GOAWAY`, so clients
/// dial its new listener, if any, instead of using a connection proven for what is gone).
pub(super) struct PodRuntime {
    pub(super) workload: LocalWorkload,
    pub(super) _tasks: Vec<AbortOnDrop<()>>,
    pub(super) _netns: Arc<PodNetns>,
    pub(super) drain: Drain,
}

impl Drop for PodRuntime {
    fn drop(&mut self) {
        self.drain.start();
    }
}
