//! Certificates over time: rotate the SVIDs that are due, and when a rotation brings another
//! trust bundle, drop what the old bundle proved (cached verdicts, pooled tunnel connections).
//! docs/tunnel.md describes rotation and trust changes.

use std::time::{Instant, SystemTime};

use super::agent::Agent;
use crate::{identity::IdentityKey, tls, tunnel::hbone::Retire};

impl Agent {
    /// Rotate SVIDs that are due; failures keep the current SVID and are reported. A rotation
    /// that brought another trust bundle drops what the old one proved.
    pub(super) fn rotate_certificates(&self) {
        let (_rotated, failed) = self.certs.refresh(SystemTime::now());
        for (identity, error) in failed {
            tracing::error!(identity, error = %error, "certificate rotation failed; keeping the current certificate");
        }
        let changed = self.certs.take_trust_changes();
        if !changed.is_empty() {
            self.drop_old_trust(&changed);
        }
    }

    /// The trust bundles of `identities` changed (the new ones are in force): start a new state
    /// generation, so nothing proven under the old bundles and decided before now is cached;
    /// revoke every verdict cached for them (outbound from them, inbound to them); take their
    /// pooled tunnel connections proven under the old bundles out of the pool; then tell the
    /// tunnel servers, which send `GOAWAY` on the connections proven under the old bundles.
    /// Where the new bundle still verifies the peer, open streams finish; where it does not,
    /// the connection is closed at once.
    fn drop_old_trust(&self, identities: &[String]) {
        let started = Instant::now();
        self.state.renew();
        let mut revoked = 0;
        for id in identities {
            match self.cache.revoke_proven_by(IdentityKey::of(id)) {
                Ok(n) => revoked += n,
                Err(e) => {
                    tracing::error!(identity = %id, error = %e, "revoking the verdicts an old trust bundle proved")
                }
            }
        }
        let trust_domain = self.state.get().config.trust_domain.clone();
        let retired = self.tunnel.retire(|key, server_chain| {
            if !identities.iter().any(|id| key.src.is(id)) {
                return Retire::Keep;
            }
            let Some(current) = self.certs.current(key.src.as_str()) else {
                return Retire::Close;
            };
            if current.trust == key.trust {
                return Retire::Keep;
            }
            let verified = tls::verify_svid(
                server_chain,
                &current.bundle,
                &trust_domain,
                tls::Role::Server,
                SystemTime::now(),
            );
            match verified {
                Ok(id) if key.dst.is(&id) => Retire::Drain,
                _ => Retire::Close,
            }
        });
        self.certs.announce_trust_change();
        tracing::info!(
            identities = ?identities,
            revoked,
            pooled_connections_retired = retired,
            elapsed_us = started.elapsed().as_micros() as u64,
            "trust bundle changed; revoked the verdicts and retired the tunnel connections the old bundle proved"
        );
    }
}
