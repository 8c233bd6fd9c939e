//! The `latch agent` process: install the datapath, bring the kernel maps and the per-pod
//! listeners in line with the desired state, then serve until SIGTERM, reloading on SIGHUP, on
//! `POST /v1/reload` and when the desired state changes.
//!
//! A [`source::Source`] produces the desired state as a [`crate::state::Snapshot`] (the config file today:
//! [`source::FileSource`]; the Kubernetes API next) and says when it may have changed;
//! [`reconcile`] applies a snapshot whichever source made it. [`event_loop`] knows only the
//! trait, so a second source plugs in without a second runtime. [`pod`] starts a pod's listeners,
//! [`trust`] rotates certificates. docs/runtime.md has the reasoning.

pub mod event_loop;
pub mod pod;
pub mod reconcile;
pub mod source;
pub mod trust;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::task::JoinHandle;

use crate::{
    antispoof::AntiSpoof,
    config::Config,
    datapath::{Datapath, DeliveryMap},
    debug::agent::Published,
    identity::certs::CertStore,
    metrics::Metrics,
    state::SharedState,
    tunnel::{handshakes::Handshakes, hbone::TunnelClient, tracked::Tracker},
    verdicts::{SharedMaps, VerdictCache},
};

/// How often the config file is checked for changes (SIGHUP reloads at once), and certificates
/// for rotation.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Run the agent until SIGTERM/SIGINT, on a tokio runtime with the config's
/// `dataplane.workerThreads`. Programs and maps stay pinned when it returns.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.dataplane.worker_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(async {
            // Made inside the runtime: it registers with the reactor and the timer.
            let source = source::FileSource::new(config_path, WATCH_INTERVAL);
            event_loop::run(source, config).await
        })
}

/// Remove everything the agent pinned for this config.
pub fn uninstall(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    crate::datapath::uninstall(&config.bpf_pin_dir)?;
    Ok(())
}

/// What the running agent holds: the kernel side, the state in force, the pods it serves and
/// the handles their listeners share.
struct Agent {
    /// Where the desired state comes from, as errors name it (the config file).
    origin: PathBuf,
    datapath: Datapath,
    antispoof: AntiSpoof,
    maps: SharedMaps,
    deliveries: Arc<DeliveryMap>,
    cache: VerdictCache,
    state: SharedState,
    pods: BTreeMap<String, pod::PodRuntime>,
    certs: Arc<CertStore>,
    tunnel: TunnelClient,
    /// TLS handshakes in progress on the tunnel listeners, per source address.
    handshakes: Handshakes,
    tracker: Tracker,
    metrics: Metrics,
    published: Published,
}

/// A task that is aborted when this handle is dropped (a pod's listeners when the pod goes, the
/// debug and metrics servers when the event loop returns).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
