//! The destination side of HBONE for one pod: TLS connections on the pod's tunnel listener (their
//! handshake limits: [`crate::tunnel::handshakes`]), each `CONNECT` checked to target one of the
//! pod's own addresses on a port that is not the agent's (`403` otherwise), then decided by the
//! pod's policy for the verified source: `403`; or the application connected from inside the pod's
//! netns from the client's own address and the bytes spliced (the verdict cached as
//! [`crate::verdicts`] rules); or, when HTTP attributes decide, each request on its own.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};

use super::{
    PodContext,
    carry::{self, Carried, HttpParty},
    delivery::{deliver, delivered},
    listeners::{own_listener, own_port_refusal},
};
use crate::{
    conn::{AccessDecision, ConnInfo, Direction, Via},
    identity::Registry,
    metrics::access,
    state::{DecidedUnder, decide},
    tls::{Role, server_config_with, verify_svid},
    tunnel::{
        chunk::reset,
        handshakes::InProgress,
        hbone::{Admission, BoxFuture, Caller, Inbound, Proof, accept_connection},
    },
    verdicts::{
        Pair,
        rule::{self, Decided},
    },
};

pub async fn serve(listener: TcpListener, ctx: Arc<PodContext>) {
    let workload = ctx.workload.id.clone();
    super::accept_loop(listener, ctx, workload, |tcp, peer, ctx| {
        // Counted in the order of accepts; beyond the source's share, reset at once.
        let limit = ctx.state.get().config.tunnel.max_handshakes_per_source;
        let in_progress = ctx.handshakes.start(peer.ip(), limit);
        async move {
            let Some(in_progress) = in_progress else {
                reset(&tcp);
                return;
            };
            if let Err(e) = handle(tcp, in_progress, &ctx).await {
                tracing::info!(workload = %ctx.workload.id, %peer, error = %e, "tunnel connection ended with an error");
            }
        }
    })
    .await
}

async fn handle(tcp: TcpStream, in_progress: InProgress, ctx: &Arc<PodContext>) -> io::Result<()> {
    let id = ctx.workload.identity.to_string();
    let (bundle, trust) = ctx
        .certs
        .current(&id)
        .map(|c| (c.bundle.to_vec(), c.trust))
        .ok_or_else(|| io::Error::other(format!("no certificate for {id}")))?;
    let config = &ctx.state.get().config;
    let tls = server_config_with(ctx.certs.resolver(&id), bundle, &config.trust_domain)
        .map_err(io::Error::other)?;
    let connection = accept_connection(tcp, tls, config.tunnel.handshake_timeout).await;
    drop(in_progress);
    connection?
        .proven_under(trust)
        .draining_with(ctx.drain.clone())
        .serve(ctx.clone())
        .await
}

/// The client's address, for policy, logs and delivery: the one the source names for the stream
/// (`Forwarded`) if the registry gives it the identity the certificate proved, else the tunnel
/// connection's own; and whether the registry confirms it (only a confirmed address is given to
/// the application as the connection's source).
fn client_address(registry: &Registry, caller: &Caller) -> (SocketAddr, bool) {
    let confirms = |ip: &IpAddr| {
        registry
            .endpoint(ip)
            .is_some_and(|e| e.identity == caller.identity)
    };
    if let Some(named) = caller.forwarded_for {
        if confirms(&named.ip()) {
            return (named, true);
        }
        tracing::info!(source = %caller.identity, named = %named, tunnel = %caller.address, "the registry does not give the address the source names to its identity; using the tunnel connection's");
    }
    (caller.address, confirms(&caller.address.ip()))
}

impl Inbound for PodContext {
    fn admit(self: Arc<Self>, caller: Caller, target: SocketAddr) -> BoxFuture<Admission> {
        Box::pin(async move { self.decide(caller, target).await })
    }

    fn proof(&self, caller: &Caller, chain: &[CertificateDer<'static>]) -> Proof {
        let id = self.workload.identity.to_string();
        let Some(current) = self.certs.current(&id) else {
            return Proof::Revoked;
        };
        if current.trust == caller.trust {
            return Proof::Holds;
        }
        let trust_domain = self.state.get().config.trust_domain.clone();
        match verify_svid(
            chain,
            &current.bundle,
            &trust_domain,
            Role::Client,
            SystemTime::now(),
        ) {
            Ok(_) => Proof::Retire,
            Err(_) => Proof::Revoked,
        }
    }

    fn trust_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.certs.trust_changes())
    }
}

impl PodContext {
    fn refuse(&self, caller: &Caller, target: SocketAddr, policy: &str, reason: &str) {
        self.refuse_shadowed(caller, target, policy, reason, None);
    }

    /// [`Self::refuse`], with the dry-run policies' shadow decision.
    fn refuse_shadowed(
        &self,
        caller: &Caller,
        target: SocketAddr,
        policy: &str,
        reason: &str,
        dry_run: Option<decide::Shadow>,
    ) {
        carry::decided(
            &self.metrics,
            &access::Record {
                dry_run,
                source_principal: caller.identity.as_str(),
                source_address: Some(caller.address),
                destination_principal: self.workload.identity.as_str(),
                destination_address: Some(target),
                policy,
                reason,
                ..access::Record::new(Direction::Inbound, AccessDecision::Deny, Via::Tunnel)
            },
        );
    }

    async fn decide(self: Arc<Self>, mut caller: Caller, target: SocketAddr) -> Admission {
        let target = super::canonical(target);
        caller.address = super::canonical(caller.address);
        caller.forwarded_for = caller.forwarded_for.map(super::canonical);
        // Only this pod's own addresses: the tunnel is not a proxy to anywhere else.
        if !self.workload.ips.contains(&target.ip()) {
            self.refuse(&caller, target, "", "not an address of this workload");
            return Admission::Forbidden { cacheable: false };
        }
        let (snapshot, decided_under) = DecidedUnder::now(&self.state);
        // Read after the generation: a bundle change installs the new bundle, then starts a new
        // generation, so a decision under the new generation sees the new bundle here, and one
        // under the old generation is refused by the cache (nothing it proved is cached).
        if self.certs.trust(self.workload.identity.as_str()) != Some(caller.trust) {
            self.refuse(
                &caller,
                target,
                "",
                "the tunnel connection was proven under a trust bundle no longer in force",
            );
            return Admission::Unauthorized;
        }
        // Nor to the agent's own listeners in the pod: that would carry the client back to the
        // agent (a loop through the inbound listener, or a tunnel inside the tunnel).
        if let Some(listener) = own_listener(&snapshot.config.ports, target.port()) {
            self.refuse(
                &caller,
                target,
                "",
                &own_port_refusal(listener, target.port()),
            );
            return Admission::Forbidden { cacheable: false };
        }
        let confirmed;
        (caller.address, confirmed) = client_address(&snapshot.registry, &caller);
        let source_ip = Some(caller.address.ip());
        let outcome = decide::connection(
            &snapshot,
            &self.workload,
            Some(caller.identity.as_str()),
            source_ip,
            target,
        );
        let lifetime = |allowed: bool, cacheable: bool| {
            let own_not_after = self
                .certs
                .current(self.workload.identity.as_str())
                .map(|c| c.svid.not_after)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            rule::lifetime(
                &snapshot,
                caller.identity.as_str(),
                self.workload.identity.key(),
                target.port(),
                Decided { allowed, cacheable },
                caller.not_after.min(own_not_after),
            )
        };
        let (http, cacheable, policy, reason, dry_run) = match outcome {
            decide::Outcome::Decided(j) if !j.allowed => {
                self.refuse_shadowed(&caller, target, &j.policy, &j.reason, j.dry_run);
                let cacheable = lifetime(false, j.cacheable).is_some();
                return Admission::Forbidden { cacheable };
            }
            decide::Outcome::Decided(j) => (false, j.cacheable, j.policy, j.reason, j.dry_run),
            decide::Outcome::Http => (
                true,
                false,
                String::new(),
                "decided per HTTP request".to_owned(),
                None,
            ),
        };
        let from = confirmed.then_some(caller.address.ip());
        let (app, announced) = match deliver(
            &self.delivery,
            &self.deliveries,
            self.netns_cookie,
            target,
            from,
        )
        .await
        {
            Ok(delivered) => delivered,
            Err(e) => {
                tracing::info!(source = %caller.identity, %target, error = %e, "application unreachable");
                return Admission::Unreachable;
            }
        };
        // Told to the source only if it is cached here too (not when a newer state was
        // committed since the decision, which the source then learns from its next CONNECT).
        let pair = Pair {
            src: caller.identity.key(),
            dst: self.workload.identity.key(),
            port: target.port(),
            direction: Direction::Inbound,
        };
        let cacheable = lifetime(true, cacheable).is_some_and(|ttl| {
            self.cache
                .remember(pair, true, ttl, decided_under.generation())
        });
        let carried = Box::new(Carried {
            info: ConnInfo {
                source: Some(caller.identity.clone()),
                destination: self.workload.identity.clone(),
                destination_address: target,
                source_ip,
                direction: Direction::Inbound,
                path: Via::Tunnel,
                workload: self.workload.id.clone(),
            },
            source_address: Some(caller.address),
            policy,
            reason,
            dry_run,
            decided_under,
        });
        let ctx = self.clone();
        // Only an HTTP-enforced connection needs the caller's identity again.
        let http_source = http.then(|| caller.identity.clone());
        Admission::Admit {
            cacheable,
            carry: Box::new(move |stream| {
                Box::pin(async move {
                    if let Some(source) = http_source {
                        // Every request is decided (and logged) on its own. Boxed: the HTTP
                        // server's state would otherwise make every tunneled connection's
                        // future as large as its own.
                        let party = HttpParty {
                            metrics: ctx.metrics.clone(),
                            state: ctx.state.clone(),
                            workload: ctx.workload.clone(),
                            source: Some(source),
                            source_ip,
                        };
                        Box::pin(carry::http(&ctx.tracker, carried, party, stream, app)).await
                    } else {
                        carry::splice(&ctx.tracker, carried, stream, app, false, |carried| {
                            carried.admitted(&ctx.metrics)
                        })
                        .await
                    }
                    drop(announced);
                    delivered(&ctx.delivery, target);
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"node: { name: n2, address: 10.244.0.2 }
trustDomain: cluster.local
cgroupRoot: /cg
bpfPinDir: /sys/fs/bpf/x
peers:
  - { name: frontend-a, namespace: prod, serviceAccount: frontend, ips: [10.244.1.2], node: 10.244.0.1 }
  - { name: frontend-b, namespace: prod, serviceAccount: frontend, ips: [10.244.1.3], node: 10.244.0.1 }
  - { name: ledger, namespace: prod, serviceAccount: ledger, ips: [10.244.1.4], node: 10.244.0.1 }
"#;

    fn caller(tunnel: &str, forwarded_for: Option<&str>) -> Caller {
        Caller {
            identity: crate::identity::SpiffeId::parse(
                "spiffe://cluster.local/ns/prod/sa/frontend",
            )
            .expect("id"),
            address: tunnel.parse().expect("address"),
            forwarded_for: forwarded_for.map(|a| a.parse().expect("address")),
            not_after: SystemTime::now(),
            not_before: SystemTime::UNIX_EPOCH,
            trust: 1,
        }
    }

    #[test]
    fn the_client_is_the_address_the_source_names_only_if_the_registry_agrees() {
        let config = Config::from_yaml(Path::new("node.yaml"), CONFIG).expect("config");
        let registry = Registry::from_config(&config).expect("registry");
        // (tunnel connection's address, Forwarded, client, confirmed, why)
        let cases = [
            (
                "10.244.1.2:50000",
                Some("10.244.1.3:41000"),
                "10.244.1.3:41000",
                true,
                "another replica of the identity, riding the first one's tunnel",
            ),
            (
                "10.244.1.2:50000",
                None,
                "10.244.1.2:50000",
                true,
                "no Forwarded: the tunnel's own address",
            ),
            (
                "10.244.1.2:50000",
                Some("10.244.1.4:41000"),
                "10.244.1.2:50000",
                true,
                "an address of another identity is not believed",
            ),
            (
                "10.244.1.9:50000",
                Some("10.244.1.8:41000"),
                "10.244.1.9:50000",
                false,
                "unknown addresses: judged by the tunnel's, delivered from the marker",
            ),
        ];
        for (tunnel, named, client, confirmed, why) in cases {
            let expected = (client.parse().expect("address"), confirmed);
            assert_eq!(
                client_address(&registry, &caller(tunnel, named)),
                expected,
                "{why}"
            );
        }
    }
}
