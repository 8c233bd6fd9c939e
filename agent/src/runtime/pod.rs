//! Pod start-up: enter a pod's netns and open its listeners ([`prepare_pod`], nothing running
//! touched), then attach its inbound check, register its inbound listener and serve it
//! ([`serve_pod`]).

use std::sync::Arc;

use anyhow::Context as _;

use super::agent::{AbortOnDrop, Agent, PodRuntime};
use crate::{
    capture::{
        PodContext, PodListeners, PodNetns, delivery::DeliverySockets, inbound, outbound, tunneled,
    },
    config::{Config, Ports},
    identity::LocalWorkload,
    sync::lock,
    tunnel::hbone::Drain,
};

/// A pod whose netns is entered (and, if it is new, whose listeners are open) but that is not
/// yet serving.
pub(super) struct PreparedPod {
    pub(super) workload: LocalWorkload,
    netns: Arc<PodNetns>,
    /// `None` for a pod that is being replaced: it rebinds after the old listeners close.
    listeners: Option<PodListeners>,
}

/// Enter a workload's netns and, unless it is already served (`replacing`: its listeners are
/// re-opened in commit, once the old ones have closed), open its listeners.
pub(super) fn prepare_pod(
    config: &Config,
    w: &LocalWorkload,
    replacing: bool,
) -> anyhow::Result<PreparedPod> {
    let netns = Arc::new(PodNetns::open(&w.netns).context("entering its netns")?);
    // Failing to set it up only warns (deliveries fall back to the loopback marker).
    netns
        .route_deliveries()
        .context("setting up delivery routing")?;
    let listeners = if replacing {
        None
    } else {
        Some(open_listeners(&netns, &config.ports)?)
    };
    Ok(PreparedPod {
        workload: w.clone(),
        netns,
        listeners,
    })
}

fn open_listeners(netns: &PodNetns, ports: &Ports) -> anyhow::Result<PodListeners> {
    PodListeners::open(netns, ports.capture, ports.inbound, ports.tunnel)
        .context("opening listeners")
}

/// Open a pod's listeners if it has none yet, attach its inbound check, register its
/// inbound listener and start serving it.
pub(super) fn serve_pod(
    agent: &mut Agent,
    ports: &Ports,
    pod: PreparedPod,
) -> anyhow::Result<PodRuntime> {
    let PreparedPod {
        workload,
        netns,
        listeners,
    } = pod;
    let listeners = match listeners {
        Some(l) => l,
        None => open_listeners(&netns, ports)?,
    };
    agent
        .datapath
        .attach_inbound(&workload.id, &workload.netns)
        .context("attaching the inbound check")?;
    {
        let mut maps = lock(&agent.maps);
        maps.mark_agent_listener(&listeners.inbound)
            .context("marking the inbound listener as the agent's")?;
        for ip in &workload.ips {
            maps.set_inbound_listener(*ip, &listeners.inbound)
                .context("registering the inbound listener")?;
        }
    }
    Ok(start_pod(agent, workload, netns, listeners))
}

/// Spawn the pod's listener tasks, one context for all: outbound capture (IPv4 and, if
/// open, IPv6), inbound and tunnel.
fn start_pod(
    agent: &Agent,
    workload: LocalWorkload,
    netns: Arc<PodNetns>,
    listeners: PodListeners,
) -> PodRuntime {
    let drain = Drain::node().child();
    let ctx = Arc::new(PodContext {
        workload: workload.clone(),
        netns_cookie: listeners.netns_cookie,
        netns: netns.clone(),
        delivery: DeliverySockets::new(netns.clone()),
        redirects: agent.redirects.clone(),
        deliveries: agent.deliveries.clone(),
        cache: agent.cache.clone(),
        state: agent.state.clone(),
        certs: agent.certs.clone(),
        tunnel: agent.tunnel.clone(),
        tracker: agent.tracker.clone(),
        metrics: agent.metrics.clone(),
        handshakes: agent.handshakes.clone(),
        drain: drain.clone(),
    });
    let mut tasks = vec![
        AbortOnDrop(tokio::spawn(outbound::serve(
            listeners.capture_v4,
            ctx.clone(),
        ))),
        AbortOnDrop(tokio::spawn(inbound::serve(listeners.inbound, ctx.clone()))),
        AbortOnDrop(tokio::spawn(tunneled::serve(listeners.tunnel, ctx.clone()))),
    ];
    if let Some(v6) = listeners.capture_v6 {
        tasks.push(AbortOnDrop(tokio::spawn(outbound::serve(v6, ctx))));
    }
    PodRuntime {
        workload,
        _tasks: tasks,
        _netns: netns,
        drain,
    }
}
