//! Redirected (captured) outbound connections of one pod.
//!
//! The accepted socket's peer is the application's socket as it sits in the pod's netns: with
//! the pod's netns cookie, the peer's port and the family, the `sock_ops` program has published the
//! original destination. The connection is carried through an HBONE tunnel (HTTP/2 CONNECT over
//! mutual TLS, dialled from inside the pod's netns so it leaves with the pod's own address) to the
//! destination pod's tunnel port, proving both identities. Once the destination agent answers
//! `200` the pair's outbound allow is cached — bounded by both certificates' NotAfter and
//! `verdictTtl` — so the next connection takes the kernel fast path. Workloads in `tunnel` mode
//! are never cached.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use latch_common::{AF_INET, AF_INET6, RedirectKey};
use tokio::net::{TcpListener, TcpStream};

use super::NetnsWorker;
use crate::{
    config::DataplaneMode,
    datapath::maps::ip_from_key,
    identity::{LocalWorkload, certs::CertStore},
    state::SharedState,
    tls::client_config_with,
    tunnel::{
        hbone::{Dial, PoolKey, TunnelClient},
        splice::{reset, splice_io},
    },
    verdicts::{Direction, Pair, SharedMaps, VerdictCache, lock},
};

/// How long the agent waits for the tunnel to the destination to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything an outbound handler needs for one pod.
pub struct OutboundContext {
    pub workload: LocalWorkload,
    pub netns_cookie: u64,
    pub worker: Arc<NetnsWorker>,
    pub maps: SharedMaps,
    pub cache: VerdictCache,
    pub state: SharedState,
    pub certs: Arc<CertStore>,
    pub tunnel: TunnelClient,
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
    let src_id = ctx.workload.identity.to_string();
    let Some(endpoint) = snapshot.registry.endpoint(&dst.ip()) else {
        access_log(&src_id, "", dst, "refused", "not a mesh endpoint");
        reset(&stream);
        return;
    };
    let dst_id = endpoint.identity.to_string();
    let Some(current) = ctx.certs.current(&src_id) else {
        access_log(
            &src_id,
            &dst_id,
            dst,
            "refused",
            "no certificate for the source",
        );
        reset(&stream);
        return;
    };
    let config = &snapshot.config;
    let key = PoolKey {
        src: src_id.clone(),
        dst: dst_id.clone(),
        endpoint: SocketAddr::new(dst.ip(), config.ports.tunnel),
    };
    // Only a new pooled connection needs a TLS client config: build it in the dialler.
    let worker = ctx.worker.clone();
    let tunnel_endpoint = key.endpoint;
    let resolver = ctx.certs.resolver(&src_id);
    let trust_domain = config.trust_domain.clone();
    let expected = dst_id.clone();
    let dial = move || Dial {
        tcp: Box::pin(async move { worker.connect(tunnel_endpoint, None).await }),
        tls: client_config_with(resolver, current.bundle.to_vec(), &trust_domain, &expected)
            .map_err(|e| e.to_string()),
        client_not_after: current.svid.not_after,
    };
    let opened = match tokio::time::timeout(OPEN_TIMEOUT, ctx.tunnel.open(&key, dst, dial)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            let result = if e.is_denied() { "denied" } else { "refused" };
            access_log(&src_id, &dst_id, dst, result, &e.to_string());
            reset(&stream);
            return;
        }
        Err(_) => {
            access_log(&src_id, &dst_id, dst, "timeout", "the tunnel did not open");
            reset(&stream);
            return;
        }
    };

    let dataplane = &config.dataplane;
    if dataplane.mode == DataplaneMode::Fastpath
        && let Ok(left) = opened.proof_not_after.duration_since(SystemTime::now())
    {
        let pair = Pair {
            src: ctx.workload.identity.key(),
            dst: endpoint.identity.key(),
            port: dst.port(),
            direction: Direction::Outbound,
        };
        if let Err(e) = ctx.cache.allow(pair, dataplane.verdict_ttl.min(left)) {
            tracing::error!(error = %e, "caching outbound allow");
        }
    }
    access_log(
        &src_id,
        &dst_id,
        dst,
        "tunneled",
        if opened.new_connection {
            "new mTLS connection"
        } else {
            "pooled mTLS connection"
        },
    );
    match splice_io(opened.stream, stream).await {
        Ok(moved) => {
            tracing::debug!(src = %src_id, %dst, sent = moved.b_to_a, received = moved.a_to_b, "connection closed")
        }
        Err(e) => tracing::debug!(src = %src_id, %dst, error = %e, "connection reset"),
    }
}

fn access_log(src: &str, dst: &str, addr: SocketAddr, result: &str, detail: &str) {
    tracing::info!(
        target: "access",
        source_principal = src,
        destination_principal = dst,
        destination = %addr,
        path = "tunnel",
        result,
        detail,
        "outbound connection"
    );
}
