//! Start-up, then one loop until SIGTERM/SIGINT: a reload when SIGHUP, the debug API or the
//! [`Source`] asks for one (one path for all three), certificate rotation and the fast-path
//! summary at every tick, the fast-path audit in a task of its own; at the end the tunnels
//! drain.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{
    agent::{AbortOnDrop, Agent, WATCH_INTERVAL},
    reconcile::{self, prepare},
    source::Source,
};
use crate::{
    antispoof::{AntiSpoof, Enrolled},
    config::Config,
    datapath::{Datapath, DatapathSettings},
    debug::{
        DebugServer,
        agent::{AgentView, Published, ReloadRequest},
    },
    metrics::{self, Metrics, fastpath::FastpathSummary},
    scheduling::busy_poll,
    shed,
    state::{SharedState, cert_store},
    tunnel::{
        handshakes::Handshakes,
        hbone::{DRAIN_TIMEOUT, Drain, TunnelClient},
        tracked::Tracker,
    },
    verdicts::{SharedMaps, VerdictCache},
};

/// Start the agent on the desired state `source` makes of `config` (the node config read at
/// start-up), then serve until SIGTERM/SIGINT. Programs and maps stay pinned when it returns.
pub async fn run<S: Source>(mut source: S, config: Config) -> anyhow::Result<()> {
    busy_poll::install(
        config.dataplane.busy_poll,
        config.dataplane.busy_poll_adaptive,
    );
    let origin = source.origin().to_owned();
    // Everything that depends on the outside world is checked before the kernel is touched, so
    // a bad config at start-up leaves nothing attached.
    let snapshot = source.initial(config).await?;
    let certs = Arc::new(cert_store(&origin, &snapshot.config)?);
    certs
        .ensure(&snapshot.identities())
        .with_context(|| format!("{}: certificates", origin.display()))?;
    let config = &snapshot.config;
    // The debug socket is taken first: a second agent for the same node refuses to start here,
    // before it opens a listener or touches the kernel.
    let debug_server = DebugServer::bind(&config.debug_socket)?;
    let prepared = prepare(&origin, config, &snapshot.registry, &BTreeMap::new());
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("{}: metrics: binding {addr}", origin.display()))?,
        ),
        None => None,
    };
    let mut datapath = Datapath::install(settings(config)).context("installing the datapath")?;
    let (antispoof, antispoof_watch) = AntiSpoof::start(
        datapath.antispoof()?,
        Enrolled::of(config, &snapshot.registry),
    )
    .context("starting anti-spoofing")?;
    let _antispoof_watch = AbortOnDrop(antispoof_watch);
    // Each owner opens its own handles on the pinned maps, so that none waits on another's
    // lock: above all, no debug read or reload write ever stalls a captured connection.
    let own_maps = |datapath: &mut Datapath| -> anyhow::Result<SharedMaps> {
        Ok(Arc::new(Mutex::new(datapath.maps()?)))
    };
    let maps = own_maps(&mut datapath)?;
    let redirects = Arc::new(datapath.redirects()?);
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
    let state = SharedState::new(snapshot);
    let metrics = Metrics::new();
    metrics.set_state(state.clone());
    let fastpath_events = datapath
        .fastpath_events()
        .context("opening the fast-path event ring buffer")?;
    let mut agent = Agent {
        origin,
        cache: VerdictCache::new(own_maps(&mut datapath)?, state.clone())?,
        datapath,
        antispoof,
        maps,
        redirects,
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
    reconcile::commit(&mut agent, prepared)?;
    reconcile::drop_stale_inbound_links(&mut agent)?;
    source.applied(true);
    publish_source(&agent, &source);

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    let view = Arc::new(AgentView {
        started: Instant::now(),
        state: agent.state.clone(),
        maps: own_maps(&mut agent.datapath)?,
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
    agent
        .metrics
        .set_scrape_source(metrics::scrape::agent_source(
            own_maps(&mut agent.datapath)?,
            agent.cache.clone(),
            agent.certs.clone(),
            agent.published.clone(),
        ));
    let _audit = AbortOnDrop(tokio::spawn(metrics::audit::run(
        fastpath_events,
        agent.metrics.clone(),
    )));
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
    give_back_start_up_memory();
    let mut summary = FastpathSummary::new(WATCH_INTERVAL);

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    source.follow(&snapshot);
    loop {
        let (trigger, reply) = tokio::select! {
            biased;
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => ("SIGHUP", None),
            Some(reply) = reload_rx.recv() => ("debug API", Some(reply)),
            trigger = source.changed() => (trigger, None),
            _ = tick.tick() => {
                agent.rotate_certificates();
                summary.tick(&agent.maps);
                publish_source(&agent, &source);
                continue;
            }
        };
        let desired = source.load(&agent.state.get());
        let (result, in_force) = reconcile::reload(&mut agent, trigger, desired).await;
        // A reload parses and builds a whole new state beside the one in force.
        shed::trim_heap();
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        source.applied(in_force);
        source.follow(&agent.state.get());
        publish_source(&agent, &source);
    }
    tracing::info!("agent stopping; programs and maps stay pinned, enforcement continues");
    // GOAWAY on the tunnel server connections; open streams may finish.
    Drain::node().on_exit(DRAIN_TIMEOUT).await;
    Ok(())
}

/// Publish what the source reports, for the debug API and the metrics.
fn publish_source<S: Source>(agent: &Agent, source: &S) {
    let (status, refused) = source.status();
    agent.published.set_source(status, refused);
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

/// What start-up alone needed (the eBPF loader, the config parser, certificate issuance) is
/// given back before the agent settles into serving: see [`crate::shed`].
fn give_back_start_up_memory() {
    shed::trim_heap();
    match shed::drop_file_pages() {
        Ok(bytes) => tracing::debug!(bytes, "start-up pages of the binary and libraries unmapped"),
        Err(error) => {
            tracing::warn!(%error, "could not read /proc/self/smaps; start-up pages stay mapped")
        }
    }
}
