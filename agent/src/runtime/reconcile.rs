//! Applying a desired state, whichever source made it: [`prepare`] everything that can fail for
//! reasons outside the agent without touching anything running; put the state in force and
//! [`commit`] it (kernel maps, inbound checks, listeners); then enforce it (revoke what it
//! would not cache the same way, close what it no longer allows) and report. A load error or a
//! failed preparation keeps the last good state. docs/config.md describes what a reload does.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use latch_common::{
    ENDPOINT_LOCAL, ENDPOINT_TUNNEL_ONLY, EndpointInfo, WORKLOAD_TUNNEL_ONLY, WorkloadInfo,
};

use super::{
    agent::{Agent, PodRuntime},
    pod::{PreparedPod, prepare_pod, serve_pod},
};
use crate::{
    antispoof::Enrolled,
    config::Config,
    datapath::{install::inbound_link_name, system},
    debug::{
        api::{ReloadResult, WorkloadFailure},
        programs::programs,
    },
    identity::Registry,
    scheduling::busy_poll,
    state::{Snapshot, decide},
    sync::lock,
};

/// How long a reload waits for the connections it closed to end before reporting.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A desired state made ready to commit: the kernel map entries, the pods to start.
pub(super) struct Prepared {
    kernel_workloads: HashMap<u64, WorkloadInfo>,
    kernel_endpoints: HashMap<IpAddr, EndpointInfo>,
    new_pods: Vec<PreparedPod>,
    /// Workload id → why it cannot be served.
    failed: BTreeMap<String, String>,
}

/// Everything that can fail for reasons outside the agent: cgroups exist, namespaces open,
/// listeners bind. Nothing running is touched. A workload for which one of these fails is
/// recorded as failed (with the config location and why) and the others are prepared as
/// usual: one pod never blocks the node.
pub(super) fn prepare(
    origin: &Path,
    config: &Config,
    registry: &Registry,
    running: &BTreeMap<String, PodRuntime>,
) -> Prepared {
    let file = origin.display();
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
        let flags = if w.tunnel_only {
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
        if ep.tunnel_only {
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

/// Reconcile `desired` (what the source loaded), wait for the connections it closed to end,
/// and log and publish the outcome under `trigger`; with whether `desired` is now in force.
pub(super) async fn reload(
    agent: &mut Agent,
    trigger: &str,
    desired: anyhow::Result<Snapshot>,
) -> (ReloadResult, bool) {
    let outcome = reconcile(agent, desired);
    let in_force = outcome.is_ok();
    // Whatever happened, the connections the state in force no longer allows were told to
    // close; the reload is reported once they have ended.
    closed_connections_ended(agent).await;
    let (error, ok) = match outcome {
        Ok(Err(e)) => {
            let error = format!("{e:#}");
            tracing::error!(
                trigger,
                error,
                "config reload applied with errors; the new configuration is in force and revocation ran"
            );
            (Some(error), false)
        }
        Ok(Ok(())) => {
            tracing::info!(trigger, "config reloaded");
            (None, true)
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::error!(
                trigger,
                error,
                "config reload failed; keeping the last good configuration"
            );
            (Some(error), false)
        }
    };
    agent.published.reloaded(trigger, error.clone());
    (ReloadResult { ok, error }, in_force)
}

/// Prepare `desired` (an error here, or in loading it, leaves everything as it was: the
/// outer `Err`), then put it in force and commit it (the inner result: an error there is
/// reported with the new state in force and revocation done).
fn reconcile(
    agent: &mut Agent,
    desired: anyhow::Result<Snapshot>,
) -> anyhow::Result<anyhow::Result<()>> {
    let desired = desired?;
    agent
        .certs
        .ensure(&desired.identities())
        .with_context(|| format!("{}: certificates", agent.origin.display()))?;
    let prepared = prepare(
        &agent.origin,
        &desired.config,
        &desired.registry,
        &agent.pods,
    );
    busy_poll::install(
        desired.config.dataplane.busy_poll,
        desired.config.dataplane.busy_poll_adaptive,
    );
    agent.state.replace(desired);
    Ok(commit(agent, prepared))
}

/// Wait until the connections the last commit closed have ended (their sockets reset, their
/// handles dropped), so that "reloaded" means they are gone; bounded: a relay that does not
/// end in time is reported and left to end on its own.
async fn closed_connections_ended(agent: &Agent) {
    if !agent.tracker.closed_ended(CLOSE_WAIT).await {
        tracing::warn!(
            waited_ms = CLOSE_WAIT.as_millis() as u64,
            "connections closed by the reload have not all ended yet"
        );
    }
}

/// Apply a prepared state: kernel maps, inbound checks, listeners; then, always, revoke
/// and close for the snapshot in force. A step that fails does not stop the others: a
/// workload's failure leaves that workload failing closed (its inbound check attached with
/// no listener behind it, its connections redirected to a listener that is not there) and
/// is reported; an error writing the kernel maps is returned after revocation has run.
pub(super) fn commit(agent: &mut Agent, prepared: Prepared) -> anyhow::Result<()> {
    let snapshot = agent.state.get();
    let Prepared {
        kernel_workloads,
        kernel_endpoints,
        new_pods,
        mut failed,
    } = prepared;
    let applied = apply(
        agent,
        &snapshot,
        &kernel_workloads,
        &kernel_endpoints,
        new_pods,
        &mut failed,
    );
    fail_closed(agent, &snapshot, &mut failed);
    report_failures(agent, failed);
    agent.certs.retain(&snapshot.identities());
    let programs = programs(&mut agent.datapath, agent.antispoof.program_id(), &snapshot);
    agent.published.set_programs(programs);
    let enforced = enforce(agent, &snapshot);
    applied.and(enforced)
}

/// The kernel maps and the pods of a prepared state. Pods that fail here join `failed`.
fn apply(
    agent: &mut Agent,
    snapshot: &Snapshot,
    kernel_workloads: &HashMap<u64, WorkloadInfo>,
    kernel_endpoints: &HashMap<IpAddr, EndpointInfo>,
    new_pods: Vec<PreparedPod>,
    failed: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let ports = snapshot.config.ports.clone();
    let configured: HashSet<&str> = snapshot
        .registry
        .workloads
        .iter()
        .map(|w| w.id.as_str())
        .collect();
    let changed: Vec<String> = new_pods.iter().map(|p| p.workload.id.clone()).collect();
    let gone: Vec<String> = agent
        .pods
        .keys()
        .filter(|id| {
            !configured.contains(id.as_str()) || failed.contains_key(*id) || changed.contains(id)
        })
        .cloned()
        .collect();
    let mut errors: Vec<anyhow::Error> = Vec::new();
    for id in gone {
        if let Some(pod) = agent.pods.remove(&id) {
            {
                let mut maps = lock(&agent.maps);
                for ip in &pod.workload.ips {
                    if let Err(e) = maps.remove_inbound_listener(*ip) {
                        errors.push(e.into());
                    }
                }
            }
            if !configured.contains(id.as_str())
                && let Err(e) = agent.datapath.detach_inbound(&id)
            {
                errors.push(e.into());
            }
            tracing::info!(workload = %id, "workload removed");
        }
    }

    // Pods' addresses are bound to their interfaces before their endpoints are written.
    if let Err(e) = agent
        .antispoof
        .set(Enrolled::of(&snapshot.config, &snapshot.registry))
    {
        errors.push(e.into());
    }
    if let Err(e) = write_maps(agent, kernel_workloads, kernel_endpoints) {
        errors.push(e);
    }

    for pod in new_pods {
        let id = pod.workload.id.clone();
        match serve_pod(agent, &ports, pod) {
            Ok(pod) => {
                tracing::info!(workload = %pod.workload.id, identity = %pod.workload.identity, "workload enrolled");
                agent.pods.insert(pod.workload.id.clone(), pod);
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

/// Bring the workload and endpoint maps in line with the prepared entries.
fn write_maps(
    agent: &Agent,
    kernel_workloads: &HashMap<u64, WorkloadInfo>,
    kernel_endpoints: &HashMap<IpAddr, EndpointInfo>,
) -> anyhow::Result<()> {
    let mut maps = lock(&agent.maps);
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
fn fail_closed(agent: &mut Agent, snapshot: &Snapshot, failed: &mut BTreeMap<String, String>) {
    for w in &snapshot.registry.workloads {
        let Some(why) = failed.get_mut(&w.id) else {
            continue;
        };
        {
            let mut maps = lock(&agent.maps);
            for ip in &w.ips {
                if let Err(e) = maps.remove_inbound_listener(*ip) {
                    why.push_str(&format!("; unregistering its inbound listener: {e}"));
                }
            }
        }
        if let Err(e) = agent.datapath.attach_inbound(&w.id, &w.netns) {
            why.push_str(&format!(
                "; its inbound check could not be attached either: {e}"
            ));
        }
    }
}

/// Log and publish the workloads the agent could not serve.
fn report_failures(agent: &Agent, failed: BTreeMap<String, String>) {
    for (workload, error) in &failed {
        tracing::error!(
            workload,
            error,
            "workload not served; it fails closed until a reload fixes it"
        );
    }
    agent.published.set_failed_workloads(
        failed
            .into_iter()
            .map(|(workload, error)| WorkloadFailure { workload, error })
            .collect(),
    );
}

/// Bring what is cached and open in line with `snapshot`: remove every cached verdict it
/// would not cache the same way, close every carried connection it no longer allows.
fn enforce(agent: &Agent, snapshot: &Snapshot) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let revoked = agent.cache.revoke_stale(snapshot)?;
    let closed = agent
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

/// Inbound links pinned by an earlier run for workloads that are no longer configured.
pub(super) fn drop_stale_inbound_links(agent: &mut Agent) -> anyhow::Result<()> {
    // Every configured workload keeps its check: served ones and failed ones alike.
    let wanted: Vec<String> = agent
        .state
        .get()
        .registry
        .workloads
        .iter()
        .map(|w| inbound_link_name(&w.id))
        .collect();
    for pinned in agent.datapath.inbound_attachments()? {
        if !wanted.contains(&pinned) {
            agent.datapath.detach_inbound(&pinned)?;
        }
    }
    Ok(())
}
