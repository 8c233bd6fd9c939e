//! What every source of desired state does for the event loop, and the check every source
//! applies to a new node config.

use std::{future::Future, path::Path};

use crate::{
    config::Config,
    debug::api::{RefusedPolicy, SourceStatus},
    state::Snapshot,
};

/// A source of desired state, driven by the event loop.
pub trait Source {
    /// Where the desired state comes from, as errors name it (the config file's path).
    fn origin(&self) -> &Path;

    /// The first desired state, from the node config read at start-up. Nothing of the kernel
    /// is touched until it resolves: what an earlier run pinned goes on enforcing meanwhile.
    fn initial(&mut self, config: Config) -> impl Future<Output = anyhow::Result<Snapshot>> + Send;

    /// Resolves when the desired state may have changed, with the reload trigger that says how
    /// it was noticed (it names the reload in the log and the debug API).
    fn changed(&mut self) -> impl Future<Output = &'static str> + Send;

    /// The desired state now, `current` being the one in force. What is there now counts as
    /// seen: a change after this call resolves [`Source::changed`] again. An error keeps the
    /// last good state in force.
    fn load(&mut self, current: &Snapshot) -> anyhow::Result<Snapshot>;

    /// Follow what the state in force (`current`) names; called at start-up and after every
    /// reload, whatever its outcome.
    fn follow(&mut self, current: &Snapshot);

    /// Whether the state the last [`Source::initial`] or [`Source::load`] made was put in force
    /// (`false`: refused, the last good state stays).
    fn applied(&mut self, _in_force: bool) {}

    /// What the source reports beside the state (the debug API's `source`, the metrics), and
    /// the policy objects it refused; nothing for the config file.
    fn status(&self) -> (Option<SourceStatus>, Vec<RefusedPolicy>) {
        (None, Vec::new())
    }
}

/// Refuse a node config that changes a field only a restart can change (`origin` names where
/// it came from).
pub fn restart_only_unchanged(origin: &Path, old: &Config, new: &Config) -> anyhow::Result<()> {
    for (field, changed) in [
        ("bpfPinDir", new.bpf_pin_dir != old.bpf_pin_dir),
        ("cgroupRoot", new.cgroup_root != old.cgroup_root),
        ("ports", new.ports != old.ports),
        ("certificates", new.certificates != old.certificates),
        ("trustDomain", new.trust_domain != old.trust_domain),
        (
            "dataplane.workerThreads",
            new.dataplane.worker_threads != old.dataplane.worker_threads,
        ),
    ] {
        if changed {
            anyhow::bail!(
                "{}: {field} cannot change while the agent runs; restart it",
                origin.display()
            );
        }
    }
    Ok(())
}
