//! Inbound connections the `sk_lookup` check steered to the agent: plaintext connections with no
//! fresh verdict for the pair. A connection to one of the agent's own ports is reset at once
//! (delivering it would bring it back to the agent). The workload's PeerAuthentication mode for
//! the port decides first:
//! `STRICT` resets the connection (a reset, not a silent hang); `PERMISSIVE` and `DISABLE` let
//! the authorization policy judge it as a source with no principal (by its address only). An
//! admitted connection is delivered to the application from inside the pod's netns, from the
//! client's own address as it would have arrived without the mesh (or, where the pod's routing
//! does not allow that, from the loopback marker 127.0.0.6 or ::1); if the policy depends on HTTP
//! attributes, every request is decided on its own.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use super::{
    PodContext,
    carry::{self, Carried, HttpParty},
    delivery::{deliver, delivered},
    listeners::{own_listener, own_port_refusal},
};
use crate::{
    conn::{AccessDecision, ConnInfo, Direction, Via},
    metrics::access,
    policy::MtlsMode,
    state::{DecidedUnder, decide},
    tunnel::chunk::reset,
};

pub async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |stream, peer, ctx| async move {
        handle(stream, peer, &ctx).await
    })
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: &PodContext) {
    let peer = super::canonical(peer);
    // The steered connection keeps its original destination as its local address.
    let dst = match stream.local_addr() {
        Ok(addr) => super::canonical(addr),
        Err(e) => {
            tracing::warn!(error = %e, "inbound connection without local address");
            reset(&stream);
            return;
        }
    };
    let (snapshot, decided_under) = DecidedUnder::now(&ctx.state);
    let destination = ctx.workload.identity.to_string();
    let refuse = |policy: &str, reason: &str, dry_run: Option<decide::Shadow>| {
        carry::decided(
            &ctx.metrics,
            &access::Record {
                dry_run,
                source_address: Some(peer),
                destination_principal: &destination,
                destination_address: Some(dst),
                policy,
                reason,
                ..access::Record::new(Direction::Inbound, AccessDecision::Deny, Via::Plaintext)
            },
        );
        reset(&stream);
    };
    // A connection to one of the agent's own ports would be delivered to the agent again.
    if let Some(listener) = own_listener(&snapshot.config.ports, dst.port()) {
        refuse("", &own_port_refusal(listener, dst.port()), None);
        return;
    }
    let (mode, mode_source) = decide::mtls_mode(&snapshot, &ctx.workload, dst.port());
    if mode == MtlsMode::Strict {
        refuse(
            &mode_source,
            "plaintext connection rejected (mTLS STRICT)",
            None,
        );
        return;
    }
    let outcome = decide::connection(&snapshot, &ctx.workload, None, Some(peer.ip()), dst);
    let (http, policy, reason, dry_run) = match outcome {
        decide::Outcome::Decided(j) if !j.allowed => {
            refuse(&j.policy, &j.reason, j.dry_run);
            return;
        }
        decide::Outcome::Decided(j) => (false, j.policy, j.reason, j.dry_run),
        decide::Outcome::Http => (
            true,
            String::new(),
            "decided per HTTP request".to_owned(),
            None,
        ),
    };
    let (app, announced) = match deliver(
        &ctx.delivery,
        &ctx.deliveries,
        ctx.netns_cookie,
        dst,
        Some(peer.ip()),
    )
    .await
    {
        Ok(delivered) => delivered,
        Err(e) => {
            tracing::info!(source = %peer, destination = %dst, error = %e, "inbound delivery failed");
            reset(&stream);
            return;
        }
    };
    let carried = Box::new(Carried {
        info: ConnInfo {
            source: None,
            destination: ctx.workload.identity.clone(),
            destination_address: dst,
            source_ip: Some(peer.ip()),
            direction: Direction::Inbound,
            path: Via::Plaintext,
            workload: ctx.workload.id.clone(),
        },
        source_address: Some(peer),
        policy,
        reason: format!(
            "plaintext accepted (mTLS {} from {mode_source}); {reason}",
            mode.as_str()
        ),
        dry_run,
        decided_under,
    });
    if http {
        let party = HttpParty {
            metrics: ctx.metrics.clone(),
            state: ctx.state.clone(),
            workload: ctx.workload.clone(),
            source: None,
            source_ip: Some(peer.ip()),
        };
        // Boxed, as for tunneled connections: the HTTP server's state would otherwise make
        // every plaintext connection's future, spliced ones included, as large as its own.
        Box::pin(carry::http(&ctx.tracker, carried, party, stream, app)).await
    } else {
        carry::splice(&ctx.tracker, carried, stream, app, false, |carried| {
            carried.admitted(&ctx.metrics)
        })
        .await
    }
    drop(announced);
    delivered(&ctx.delivery, dst);
}
