//! A pod's captured outbound connections: the original destination from the kernel's redirect
//! map, then an HBONE tunnel (dialled from the pod's netns, so it leaves with the pod's address)
//! to the destination pod's node, which proves both identities and answers. The answer's verdict
//! is cached for the pair when [`crate::verdicts::rule`] allows, so the pair's next connection
//! takes the kernel fast path. Details: docs/tunnel.md (*HBONE*), docs/policy.md (*What is
//! cached*).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use latch_common::{AF_INET, AF_INET6, RedirectKey};
use tokio::net::{TcpListener, TcpStream};

use super::{
    PodContext,
    carry::{self, Carried},
};
use crate::{
    conn::{AccessDecision, ConnInfo, Direction, Via},
    datapath::maps::ip_from_key,
    metrics::access,
    state::DecidedUnder,
    tls::client_config_with,
    tunnel::{
        chunk::reset,
        hbone::{Dial, PoolKey, TunnelError},
        splice::Remote,
    },
    verdicts::{
        Pair,
        rule::{self, Decided},
    },
};

/// Accept captured connections until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |stream, peer, ctx| async move {
        handle(stream, peer, &ctx).await
    })
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: &PodContext) {
    // Boxed, and freed before the relay: the opening (with a TLS handshake, when it dials) takes
    // far more room than the relay, and a task is as large as its largest step for as long as
    // the connection lives.
    let Some(Admitted {
        carried,
        remote,
        handshake,
    }) = Box::pin(admit(&stream, peer, ctx)).await
    else {
        reset(&stream);
        return;
    };
    // Recorded once the answer's first bytes are on their way to the application.
    let admitted = |carried: &Carried| {
        if let Some(elapsed) = handshake {
            ctx.metrics.handshake(elapsed);
        }
        let info = &carried.info;
        access_log(
            info.source.as_ref().map_or("", |id| id.as_str()),
            info.destination.as_str(),
            info.destination_address,
            AccessDecision::Allow,
            &carried.reason,
        );
    };
    carry::splice(&ctx.tracker, carried, remote, stream, true, admitted).await
}

/// An outbound connection its destination admitted: what the relay needs.
struct Admitted {
    carried: Box<Carried>,
    remote: Remote,
    /// How long the TLS handshake took, if the tunnel was dialled for it.
    handshake: Option<Duration>,
}

/// Find the connection's original destination and open a tunnel to it; `None` (logged) if it
/// is not carried, for the caller to reset.
async fn admit(stream: &TcpStream, peer: SocketAddr, ctx: &PodContext) -> Option<Admitted> {
    let key = RedirectKey {
        netns_cookie: ctx.netns_cookie,
        port: peer.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    };
    let orig = match ctx.redirects.get(&key) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            tracing::warn!(workload = %ctx.workload.id, %peer, "captured connection has no original destination; resetting");
            return None;
        }
        Err(e) => {
            tracing::error!(workload = %ctx.workload.id, error = %e, "reading redirect map");
            return None;
        }
    };
    let dst = SocketAddr::new(ip_from_key(&orig.addr), orig.port);
    let (snapshot, decided_under) = DecidedUnder::now(&ctx.state);
    let generation = decided_under.generation();
    let src_id = ctx.workload.identity.to_string();
    let Some(endpoint) = snapshot.registry.endpoint(&dst.ip()) else {
        access_log(
            &src_id,
            "",
            dst,
            AccessDecision::Refused,
            "not a mesh endpoint",
        );
        return None;
    };
    let dst_id = endpoint.identity.to_string();
    let Some(current) = ctx.certs.current(&src_id) else {
        access_log(
            &src_id,
            &dst_id,
            dst,
            AccessDecision::Refused,
            "no certificate for the source",
        );
        return None;
    };
    let config = &snapshot.config;
    let key = PoolKey {
        src: ctx.workload.identity.clone(),
        dst: endpoint.identity.clone(),
        endpoint: SocketAddr::new(dst.ip(), config.ports.tunnel),
        // Read after the generation (see the tunnel server's `decide`).
        trust: current.trust,
    };
    let own_not_after = current.svid.not_after;
    // Only a new pooled connection needs a TLS client config: build it in the dialler.
    let netns = ctx.netns.clone();
    let tunnel_endpoint = key.endpoint;
    let resolver = ctx.certs.resolver(&src_id);
    let trust_domain = config.trust_domain.clone();
    let expected = dst_id.clone();
    let dial = move || Dial {
        tcp: Box::pin(async move { netns.connect(tunnel_endpoint).await }),
        tls: client_config_with(resolver, current.bundle.to_vec(), &trust_domain, &expected)
            .map_err(|e| e.to_string()),
        client_not_after: current.svid.not_after,
    };
    // `mode: tunnel` on either side (the pod's own, else its node's): nothing cached.
    let fastpath = !(ctx.workload.tunnel_only || endpoint.tunnel_only);
    let pair = Pair {
        src: ctx.workload.identity.key(),
        dst: endpoint.identity.key(),
        port: dst.port(),
        direction: Direction::Outbound,
    };
    // The caching rule also asks the source's own view of the policy, so that its next reload
    // corrects anything the destination answered from a view the source no longer has.
    let lifetime = |verdict: Decided, proof_not_after: SystemTime| {
        rule::lifetime(
            &snapshot,
            &src_id,
            endpoint.identity.key(),
            dst.port(),
            verdict,
            proof_not_after,
        )
    };
    // The client as a connection straight to the destination would show it: the pod's address
    // of the destination's family, and the application socket's port.
    let client = ctx
        .workload
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .map(|ip| SocketAddr::new(*ip, peer.port()));
    // The application's first bytes go out behind the CONNECT, before the answer.
    let open = ctx.tunnel.open(&key, dst, client, dial, Some(stream));
    let opened = match open.await {
        Ok(opened) => opened,
        Err(e) => {
            let decision = if e.is_denied() {
                AccessDecision::Deny
            } else {
                AccessDecision::Refused
            };
            access_log(&src_id, &dst_id, dst, decision, &e.to_string());
            if let TunnelError::Refused {
                cacheable: true, ..
            } = e
                && e.is_denied()
                && let Some(ttl) = lifetime(
                    Decided {
                        allowed: false,
                        cacheable: true,
                    },
                    own_not_after,
                )
            {
                ctx.cache.remember(pair, false, ttl, generation);
            }
            return None;
        }
    };

    // Cached before the answer is passed on: a client that has its answer can count on its
    // next connection taking the fast path. In `mode: tunnel` nothing is cached, and the
    // source's own view of the policy is not asked.
    let caching = if !fastpath {
        Caching::TunnelMode
    } else if let Some(ttl) = lifetime(
        Decided {
            allowed: true,
            cacheable: opened.cacheable,
        },
        opened.proof_not_after,
    ) && ctx.cache.remember(pair, true, ttl, generation)
    {
        Caching::Cached
    } else {
        Caching::NotCacheable
    };
    let reason = reason(opened.new_connection, caching);
    let carried = Box::new(Carried {
        info: ConnInfo {
            source: Some(ctx.workload.identity.clone()),
            destination: endpoint.identity.clone(),
            destination_address: dst,
            source_ip: None,
            direction: Direction::Outbound,
            path: Via::Tunnel,
            workload: ctx.workload.id.clone(),
        },
        source_address: None,
        policy: String::new(),
        reason: reason.to_owned(),
        dry_run: None,
        decided_under,
    });
    Some(Admitted {
        carried,
        remote: opened.stream.into_remote(),
        handshake: opened.handshake,
    })
}
/// What became of an allowed pair's verdict at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caching {
    /// Cached: the pair's next connection takes the kernel fast path.
    Cached,
    /// Not cached: the destination's answer or the source's own view of the policy does not
    /// let it be, the proof has expired, or the cache could not take it.
    NotCacheable,
    /// `mode: tunnel`, where nothing is cached.
    TunnelMode,
}

/// The access log's reason for an allowed outbound connection.
fn reason(new_connection: bool, caching: Caching) -> &'static str {
    match (new_connection, caching) {
        (true, Caching::Cached) => "new mTLS connection; verdict cached",
        (true, Caching::NotCacheable) => "new mTLS connection; not cacheable",
        (true, Caching::TunnelMode) => "new mTLS connection; mode tunnel, not cached",
        (false, Caching::Cached) => "pooled mTLS connection; verdict cached",
        (false, Caching::NotCacheable) => "pooled mTLS connection; not cacheable",
        (false, Caching::TunnelMode) => "pooled mTLS connection; mode tunnel, not cached",
    }
}

fn access_log(src: &str, dst: &str, addr: SocketAddr, decision: AccessDecision, reason: &str) {
    access::decision(&access::Record {
        source_principal: src,
        destination_principal: dst,
        destination_address: Some(addr),
        reason,
        ..access::Record::new(Direction::Outbound, decision, Via::Tunnel)
    });
}
