//! The destination side of HBONE for one pod: TLS connections on the pod's tunnel listener,
//! presenting the pod's current SVID. Each `CONNECT` is checked (the target must be one of the
//! pod's own addresses; policy comes with the policy engine, allow-all until then), delivered
//! to the application from inside the pod's netns from the loopback marker address, and the
//! pair's inbound verdict is cached — bounded by the client certificate's NotAfter, the pod's
//! own certificate's NotAfter and `verdictTtl` — so the source's next direct connection is
//! admitted by the kernel.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    NetnsWorker,
    inbound::{DELIVERY_MARKER_V4, DELIVERY_MARKER_V6},
};
use crate::{
    config::DataplaneMode,
    identity::{IdentityKey, LocalWorkload, certs::CertStore},
    state::SharedState,
    tls::server_config_with,
    tunnel::hbone::{BoxFuture, Inbound, serve_connection},
    verdicts::{Direction, Pair, VerdictCache},
};

pub struct TunnelContext {
    pub workload: LocalWorkload,
    pub worker: Arc<NetnsWorker>,
    pub cache: VerdictCache,
    pub state: SharedState,
    pub certs: Arc<CertStore>,
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
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

impl Inbound for TunnelContext {
    fn authorize(&self, _source: &str, target: SocketAddr) -> bool {
        // Only this pod's own addresses: the tunnel is not a proxy to anywhere else.
        self.workload.ips.contains(&unmap(target.ip()))
    }

    fn deliver(&self, target: SocketAddr) -> BoxFuture<io::Result<TcpStream>> {
        let worker = self.worker.clone();
        let target = SocketAddr::new(unmap(target.ip()), target.port());
        let marker = match target.ip() {
            IpAddr::V4(_) => SocketAddr::new(DELIVERY_MARKER_V4.into(), 0),
            IpAddr::V6(_) => SocketAddr::new(DELIVERY_MARKER_V6.into(), 0),
        };
        Box::pin(async move { worker.connect(target, Some(marker)).await })
    }

    fn admitted(&self, source: &str, target: SocketAddr, client_not_after: SystemTime) {
        let snapshot = self.state.get();
        let dataplane = &snapshot.config.dataplane;
        tracing::info!(
            target: "access",
            source_principal = source,
            destination_principal = %self.workload.identity,
            destination = %target,
            path = "tunnel",
            decision = "ALLOW",
            "inbound connection"
        );
        if dataplane.mode != DataplaneMode::Fastpath {
            return;
        }
        let own_not_after = self
            .certs
            .current(&self.workload.identity.to_string())
            .map(|c| c.svid.not_after)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let Ok(left) = client_not_after
            .min(own_not_after)
            .duration_since(SystemTime::now())
        else {
            return;
        };
        let pair = Pair {
            src: IdentityKey::of(source),
            dst: self.workload.identity.key(),
            port: target.port(),
            direction: Direction::Inbound,
        };
        if let Err(e) = self.cache.allow(pair, dataplane.verdict_ttl.min(left)) {
            tracing::error!(error = %e, "caching inbound allow");
        }
    }
}
