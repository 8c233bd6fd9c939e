//! Inbound connections the `sk_lookup` check steered to the agent (no fresh verdict for the
//! pair). Until the policy engine exists, the mesh-wide mTLS mode decides: `STRICT` resets the
//! plaintext connection, `PERMISSIVE` delivers it to the application from inside the pod's
//! netns, from the loopback marker address (127.0.0.6 or ::1) that the inbound check lets
//! through.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

use super::NetnsWorker;
use crate::{
    config::MtlsMode,
    identity::LocalWorkload,
    state::SharedState,
    tunnel::splice::{reset, splice},
};

/// Source address of connections the agent delivers to an application over IPv4. Loopback
/// sources can only originate inside the pod's netns, so the inbound check trusts them.
pub const DELIVERY_MARKER_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6.
pub const DELIVERY_MARKER_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;

pub struct InboundContext {
    pub workload: LocalWorkload,
    pub worker: Arc<NetnsWorker>,
    pub state: SharedState,
}

pub async fn serve(listener: TcpListener, ctx: Arc<InboundContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |stream, peer, ctx| async move {
        handle(stream, peer, &ctx).await
    })
    .await
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: &InboundContext) {
    let peer = unmap(peer);
    // The steered connection keeps its original destination as its local address.
    let dst = match stream.local_addr() {
        Ok(addr) => unmap(addr),
        Err(e) => {
            tracing::warn!(error = %e, "inbound connection without local address");
            reset(&stream);
            return;
        }
    };
    let snapshot = ctx.state.get();
    let source = snapshot
        .registry
        .endpoint(&peer.ip())
        .map(|e| e.identity.to_string());
    let mode = snapshot.config.mtls.mode;
    match mode {
        MtlsMode::Strict => {
            let reason = "plaintext connection rejected (mTLS STRICT)";
            access_log(peer, source.as_deref(), dst, &ctx.workload, "DENY", reason);
            reset(&stream);
        }
        MtlsMode::Permissive => {
            let marker = match dst.ip() {
                IpAddr::V4(_) => SocketAddr::new(DELIVERY_MARKER_V4.into(), 0),
                IpAddr::V6(_) => SocketAddr::new(DELIVERY_MARKER_V6.into(), 0),
            };
            let app = match ctx.worker.connect(dst, Some(marker)).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::info!(target: "access", source = %peer, destination = %dst, error = %e, "inbound delivery failed");
                    reset(&stream);
                    return;
                }
            };
            let reason = "plaintext accepted (mTLS PERMISSIVE)";
            access_log(peer, source.as_deref(), dst, &ctx.workload, "ALLOW", reason);
            let _ = splice(stream, app).await;
        }
    }
}

/// The access-log line of an inbound decision.
fn access_log(
    peer: SocketAddr,
    source: Option<&str>,
    dst: SocketAddr,
    workload: &LocalWorkload,
    decision: &str,
    reason: &str,
) {
    tracing::info!(
        target: "access",
        source = %peer,
        source_principal = source.unwrap_or_default(),
        destination = %dst,
        destination_principal = %workload.identity,
        decision,
        reason,
        "inbound connection"
    );
}
