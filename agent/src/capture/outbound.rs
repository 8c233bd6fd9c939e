//! Redirected (captured) outbound connections of one pod.
//!
//! The accepted socket's peer is the application's socket as it sits in the pod's netns: with
//! the pod's netns cookie, the peer's port and the family, the `sock_ops` program has published the
//! original destination. The connection is forwarded from inside the pod's netns (so it leaves
//! with the pod's own address), and once the destination has accepted it the pair's outbound
//! allow is cached for the configured TTL, so the next connection takes the kernel fast path.
//! (The HBONE tunnel replaces the plain forward.)

use std::{net::SocketAddr, sync::Arc, time::Duration};

use latch_common::{AF_INET, AF_INET6, RedirectKey};
use tokio::net::{TcpListener, TcpStream};

use super::NetnsWorker;
use crate::{
    config::DataplaneMode,
    datapath::maps::ip_from_key,
    identity::{LocalWorkload, SpiffeId},
    state::SharedState,
    tunnel::splice::{reset, splice},
    verdicts::{Direction, Pair, SharedMaps, VerdictCache, lock},
};

/// How long the agent waits for the original destination to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything an outbound handler needs for one pod.
pub struct OutboundContext {
    pub workload: LocalWorkload,
    pub netns_cookie: u64,
    pub worker: Arc<NetnsWorker>,
    pub maps: SharedMaps,
    pub cache: VerdictCache,
    pub state: SharedState,
}

/// Accept captured connections until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<OutboundContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |stream, peer, ctx| async move {
        handle(stream, peer, &ctx).await
    })
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: &OutboundContext) {
    let _ = stream.set_nodelay(true);
    let key = RedirectKey {
        netns_cookie: ctx.netns_cookie,
        port: peer.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    };
    let orig = match lock(&ctx.maps).redirect(&key) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            tracing::warn!(workload = %ctx.workload.id, %peer, "captured connection has no original destination; resetting");
            reset(&stream);
            return;
        }
        Err(e) => {
            tracing::error!(workload = %ctx.workload.id, error = %e, "reading redirect map");
            reset(&stream);
            return;
        }
    };
    let dst = SocketAddr::new(ip_from_key(&orig.addr), orig.port);
    let snapshot = ctx.state.get();
    let src_id = &ctx.workload.identity;
    let dst_id: Option<SpiffeId> = snapshot
        .registry
        .endpoint(&dst.ip())
        .map(|e| e.identity.clone());

    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, ctx.worker.connect(dst, None)).await
    {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            access_log(
                src_id,
                dst_id.as_ref(),
                dst,
                "refused",
                Some(&e.to_string()),
            );
            reset(&stream);
            return;
        }
        Err(_) => {
            access_log(src_id, dst_id.as_ref(), dst, "timeout", None);
            reset(&stream);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);

    if let Some(dst_id) = &dst_id {
        let dataplane = &snapshot.config.dataplane;
        if dataplane.mode == DataplaneMode::Fastpath {
            let pair = Pair {
                src: src_id.key(),
                dst: dst_id.key(),
                port: dst.port(),
                direction: Direction::Outbound,
            };
            if let Err(e) = ctx.cache.allow(pair, dataplane.verdict_ttl) {
                tracing::error!(error = %e, "caching outbound allow");
            }
        }
    }
    access_log(src_id, dst_id.as_ref(), dst, "forwarded", None);
    match splice(stream, upstream).await {
        Ok(moved) => {
            tracing::debug!(src = %src_id, %dst, sent = moved.a_to_b, received = moved.b_to_a, "connection closed")
        }
        Err(e) => tracing::debug!(src = %src_id, %dst, error = %e, "connection reset"),
    }
}

fn access_log(
    src: &SpiffeId,
    dst: Option<&SpiffeId>,
    addr: SocketAddr,
    result: &str,
    error: Option<&str>,
) {
    tracing::info!(
        target: "access",
        source_principal = %src,
        destination_principal = dst.map(|d| d.to_string()).unwrap_or_default(),
        destination = %addr,
        path = "redirected",
        result,
        error = error.unwrap_or(""),
        "outbound connection"
    );
}
