//! The destination side of HBONE for one pod: TLS connections on the pod's tunnel listener,
//! presenting the pod's current SVID. Each `CONNECT` must target one of the pod's own addresses
//! and is decided by the pod's authorization policy for the verified source identity:
//! - deny: `403`, and the answer says whether the source may cache the deny;
//! - allow: the application is connected from inside the pod's netns (from the loopback marker
//!   address) and the bytes are spliced; if the verdict holds for the whole identity pair it is
//!   cached — bounded by the client's and the pod's certificates' NotAfter and `verdictTtl` — so
//!   the source's next direct connection is admitted by the kernel;
//! - depends on HTTP attributes: the application is connected and every request is decided on
//!   its own; nothing is cached.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    NetnsWorker,
    carry::{self, Carried, HttpParty},
    inbound::{DELIVERY_MARKER_V4, DELIVERY_MARKER_V6},
};
use crate::{
    config::DataplaneMode,
    identity::{IdentityKey, LocalWorkload, certs::CertStore},
    metrics::{Metrics, access},
    state::SharedState,
    tls::server_config_with,
    tunnel::{
        hbone::{Admission, BoxFuture, Caller, Inbound, serve_connection},
        tracked::{ConnInfo, Tracker},
    },
    verdicts::{Direction, Pair, VerdictCache, decide},
};

pub struct TunnelContext {
    pub workload: LocalWorkload,
    pub worker: Arc<NetnsWorker>,
    pub cache: VerdictCache,
    pub state: SharedState,
    pub certs: Arc<CertStore>,
    pub tracker: Tracker,
    pub metrics: Metrics,
}

pub async fn serve(listener: TcpListener, ctx: Arc<TunnelContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |tcp, peer, ctx| async move {
        if let Err(e) = handle(tcp, &ctx).await {
            tracing::info!(workload = %ctx.workload.id, %peer, error = %e, "tunnel connection ended with an error");
        }
    })
    .await
}

async fn handle(tcp: TcpStream, ctx: &Arc<TunnelContext>) -> io::Result<()> {
    let id = ctx.workload.identity.to_string();
    let bundle = ctx
        .certs
        .current(&id)
        .map(|c| c.bundle.to_vec())
        .ok_or_else(|| io::Error::other(format!("no certificate for {id}")))?;
    let trust_domain = ctx.state.get().config.trust_domain.clone();
    let tls = server_config_with(ctx.certs.resolver(&id), bundle, &trust_domain)
        .map_err(io::Error::other)?;
    serve_connection(tcp, tls, ctx.clone()).await
}

/// Connect to the application at `target` from inside the pod's netns, from the loopback
/// marker address the inbound check lets through.
pub async fn deliver(worker: &NetnsWorker, target: SocketAddr) -> io::Result<TcpStream> {
    worker.connect(target, Some(marker(target))).await
}

/// A delivered connection to `target` has ended: make the sockets of the next deliveries now,
/// while no connection waits for them.
pub fn delivered(worker: &NetnsWorker, target: SocketAddr) {
    worker.replenish(target, marker(target));
}

fn marker(target: SocketAddr) -> SocketAddr {
    match target.ip() {
        IpAddr::V4(_) => SocketAddr::new(DELIVERY_MARKER_V4.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(DELIVERY_MARKER_V6.into(), 0),
    }
}

impl Inbound for TunnelContext {
    fn admit(self: Arc<Self>, caller: Caller, target: SocketAddr) -> BoxFuture<Admission> {
        Box::pin(async move { self.decide(caller, target).await })
    }
}

impl TunnelContext {
    fn refuse(&self, caller: &Caller, target: SocketAddr, policy: &str, reason: &str) {
        carry::decided(
            &self.metrics,
            &access::Record {
                direction: "inbound",
                source_principal: &caller.identity,
                source_address: Some(caller.address),
                destination_principal: &self.workload.identity.to_string(),
                destination_address: Some(target),
                decision: "DENY",
                policy,
                reason,
                path: "tunnel",
                ..Default::default()
            },
        );
    }

    async fn decide(self: Arc<Self>, mut caller: Caller, target: SocketAddr) -> Admission {
        let target = super::canonical(target);
        caller.address = super::canonical(caller.address);
        // Only this pod's own addresses: the tunnel is not a proxy to anywhere else.
        if !self.workload.ips.contains(&target.ip()) {
            self.refuse(&caller, target, "", "not an address of this workload");
            return Admission::Forbidden { cacheable: false };
        }
        let snapshot = self.state.get();
        let source_ip = Some(caller.address.ip());
        let outcome = decide::connection(
            &snapshot,
            &self.workload,
            Some(&caller.identity),
            source_ip,
            target,
        );
        let fastpath = snapshot.config.dataplane.mode == DataplaneMode::Fastpath;
        let pair_verdict = || {
            decide::pair(
                &snapshot,
                &caller.identity,
                self.workload.identity.key(),
                target.port(),
            )
        };
        let (http, cacheable, policy, reason) = match outcome {
            decide::Outcome::Decided(j) if !j.allowed => {
                self.refuse(&caller, target, &j.policy, &j.reason);
                let cacheable = j.cacheable && pair_verdict() == Some(false);
                return Admission::Forbidden { cacheable };
            }
            decide::Outcome::Decided(j) => {
                let cacheable = fastpath && j.cacheable && pair_verdict() == Some(true);
                (false, cacheable, j.policy, j.reason)
            }
            decide::Outcome::Http => (
                true,
                false,
                String::new(),
                "decided per HTTP request".to_owned(),
            ),
        };
        let app = match deliver(&self.worker, target).await {
            Ok(app) => app,
            Err(e) => {
                tracing::info!(source = %caller.identity, %target, error = %e, "application unreachable");
                return Admission::Unreachable;
            }
        };
        if cacheable {
            self.cache_allow(&caller, target.port());
        }
        let carried = Carried {
            info: ConnInfo {
                source: caller.identity.to_string(),
                destination: self.workload.identity.to_string(),
                destination_address: target,
                source_ip,
                direction: Direction::Inbound,
                path: "tunnel",
                workload: self.workload.id.clone(),
            },
            source_address: Some(caller.address),
            policy,
            reason,
        };
        let ctx = self.clone();
        Admission::Admit {
            cacheable,
            carry: Box::new(move |stream| {
                Box::pin(async move {
                    if http {
                        // Every request is decided (and logged) on its own.
                        let party = HttpParty {
                            metrics: ctx.metrics.clone(),
                            state: ctx.state.clone(),
                            workload: ctx.workload.clone(),
                            source: Some(caller.identity.clone()),
                            source_ip,
                        };
                        carry::http(&ctx.tracker, carried, party, stream, app).await
                    } else {
                        carry::splice(&ctx.tracker, carried, stream, app, false, |carried| {
                            carried.admitted(&ctx.metrics)
                        })
                        .await
                    }
                    delivered(&ctx.worker, target);
                })
            }),
        }
    }

    /// Cache the pair's inbound allow, bounded by both certificates and `verdictTtl`.
    fn cache_allow(&self, caller: &Caller, port: u16) {
        let ttl = self.state.get().config.dataplane.verdict_ttl;
        let own_not_after = self
            .certs
            .current(&self.workload.identity.to_string())
            .map(|c| c.svid.not_after)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let Ok(left) = caller
            .not_after
            .min(own_not_after)
            .duration_since(SystemTime::now())
        else {
            return;
        };
        let pair = Pair {
            src: IdentityKey::of(&caller.identity),
            dst: self.workload.identity.key(),
            port,
            direction: Direction::Inbound,
        };
        if let Err(e) = self.cache.allow(pair, ttl.min(left)) {
            tracing::error!(error = %e, "caching inbound allow");
        }
    }
}
