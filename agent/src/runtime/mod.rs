//! The `latch agent` process: install the datapath, bring the kernel maps and the per-pod
//! listeners in line with the desired state, then serve until SIGTERM, reloading on SIGHUP, on
//! `POST /v1/reload` and when the desired state changes.
//!
//! A [`source::Source`] produces the desired state as a [`crate::state::Snapshot`] (the config file today:
//! [`source::FileSource`]; the Kubernetes API next) and says when it may have changed;
//! [`reconcile`] applies a snapshot whichever source made it. [`event_loop`] knows only the
//! trait, so a second source plugs in without a second runtime. [`pod`] starts a pod's listeners,
//! [`trust`] rotates certificates, [`limits`] raises the open-files limit at start.
//! docs/runtime.md has the reasoning.

mod agent;
pub mod event_loop;
pub mod limits;
pub mod pod;
pub mod reconcile;
pub mod source;
pub mod trust;

use std::path::Path;

use anyhow::Context as _;

use crate::config::Config;

pub use agent::WATCH_INTERVAL;

/// Run the agent until SIGTERM/SIGINT, on a tokio runtime with the config's
/// `dataplane.workerThreads`. Programs and maps stay pinned when it returns.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    block_on(config.dataplane.worker_threads, async {
        // Made inside the runtime: it registers with the reactor and the timer.
        let source = source::FileSource::new(config_path, WATCH_INTERVAL);
        event_loop::run(source, config).await
    })?
}

/// Run `main` to completion on a tokio runtime with `worker_threads` workers (the config's
/// `dataplane.workerThreads`).
pub fn block_on<F: std::future::Future>(
    worker_threads: usize,
    main: F,
) -> anyhow::Result<F::Output> {
    match limits::raise_open_files() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open files limit"),
        Err(error) => tracing::warn!(
            %error,
            "could not raise the open files limit: connections beyond it will be refused"
        ),
    }
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        // The busy poller learns from the worker's idle stretches whether polling pays.
        .on_thread_park(crate::scheduling::busy_poll::worker_idle)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(main))
}

/// Remove everything the agent pinned for this config.
pub fn uninstall(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    crate::datapath::uninstall(&config.bpf_pin_dir)?;
    Ok(())
}
