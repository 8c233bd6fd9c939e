//! A workload's SPIFFE ID in Kubernetes form, and the 128-bit key the kernel stores for it.

use latch_common::Identity;
use sha2::{Digest, Sha256};

/// A Kubernetes-form SPIFFE ID: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
/// written out and keyed once, when it is made (a connection reads both, and makes neither).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(skip)]
    uri: String,
    #[serde(skip)]
    key: IdentityKey,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let uri = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            key: IdentityKey::of(&uri),
            uri,
        }
    }

    /// The key the kernel maps use for this identity.
    pub fn key(&self) -> IdentityKey {
        self.key
    }

    /// The ID written out (`spiffe://…`).
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Whether `uri` is this ID as written out, compared in place (no string or key made).
    pub fn is(&self, uri: &str) -> bool {
        let parts = || {
            let rest = uri.strip_prefix("spiffe://")?;
            let rest = rest.strip_prefix(self.trust_domain.as_str())?;
            let rest = rest.strip_prefix("/ns/")?;
            let rest = rest.strip_prefix(self.namespace.as_str())?;
            Some(rest.strip_prefix("/sa/")? == self.service_account)
        };
        parts().unwrap_or(false)
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

/// The key the kernel stores for an identity: the first 16 bytes of SHA-256 of the SPIFFE ID.
/// Stable across agent restarts (so pinned verdicts stay meaningful), and 128 bits wide so that
/// two identities cannot be made to share a key by choosing their names (a birthday search
/// would take about 2^64 hashes). The registry still rejects a collision, should one ever occur.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey(pub Identity);

impl IdentityKey {
    pub fn of(spiffe_id: &str) -> Self {
        let digest = Sha256::digest(spiffe_id.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(Identity::new(first))
    }

    /// The key in lowercase hex, 32 digits, in digest order.
    pub fn hex(&self) -> String {
        self.0.bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_renders_kubernetes_form() {
        let id = SpiffeId::new("cluster.local", "prod", "frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/frontend");
    }

    #[test]
    fn the_written_out_id_and_its_key_are_made_once_and_agree() {
        let id = SpiffeId::new("cluster.local", "prod", "frontend");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/frontend");
        assert_eq!(id.key(), IdentityKey::of(id.as_str()));
        assert!(id.is(id.as_str()));
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = SpiffeId::new("cluster.local", "prod", "frontend");
        let b = SpiffeId::new("cluster.local", "prod", "payment");
        assert_eq!(
            a.key(),
            IdentityKey::of("spiffe://cluster.local/ns/prod/sa/frontend")
        );
        assert_ne!(a.key(), b.key());
    }

    /// The kernel key is the first 16 bytes of SHA-256 of the written-out ID (the vector is
    /// `printf %s spiffe://cluster.local/ns/prod/sa/frontend | sha256sum`), all 128 bits of it.
    #[test]
    fn the_key_is_the_first_16_bytes_of_sha256_of_the_id() {
        let key = SpiffeId::new("cluster.local", "prod", "frontend").key();
        assert_eq!(key.hex(), "7362477ddf0023707e04c15934e2f73d");
        assert_eq!(
            key.0.bytes,
            [
                0x73, 0x62, 0x47, 0x7d, 0xdf, 0x00, 0x23, 0x70, 0x7e, 0x04, 0xc1, 0x59, 0x34, 0xe2,
                0xf7, 0x3d
            ]
        );
    }

    #[test]
    fn is_compares_with_the_written_form() {
        let id = SpiffeId::new("cluster.local", "prod", "frontend");
        assert!(id.is("spiffe://cluster.local/ns/prod/sa/frontend"));
        for other in [
            "spiffe://cluster.local/ns/prod/sa/frontend2",
            "spiffe://cluster.local/ns/production/sa/frontend",
            "spiffe://cluster.localx/ns/prod/sa/frontend",
            "spiffe://cluster.local/ns/prod/sa/",
            "cluster.local/ns/prod/sa/frontend",
            "",
        ] {
            assert!(!id.is(other), "{other}");
        }
    }
}
