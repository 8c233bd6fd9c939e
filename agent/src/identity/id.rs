//! The one SPIFFE ID type: parsed from a certificate or a question, or made in Kubernetes form
//! for a workload; and the 128-bit key the kernel stores for it.

use std::{fmt, str::FromStr};

use latch_common::Identity;
use sha2::{Digest, Sha256};

use super::spiffe::{SpiffeError, validate};

/// A SPIFFE ID, `spiffe://<trust domain><path>`; Kubernetes workloads have the path
/// `/ns/<namespace>/sa/<service account>`. Written out and keyed once, when it is made (a
/// connection reads both, and makes neither).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Where the trust domain ends in `uri` (the path starts).
    path_at: usize,
    key: IdentityKey,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// A Kubernetes workload's ID: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self::from_uri(
            format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"),
            SCHEME.len() + trust_domain.len(),
        )
    }

    /// Parse and validate `input` (docs in [`super::spiffe`]).
    pub fn parse(input: &str) -> Result<Self, SpiffeError> {
        let trust_domain_len = validate(input)?;
        Ok(Self::from_uri(
            input.to_owned(),
            SCHEME.len() + trust_domain_len,
        ))
    }

    /// `uri`, which a test knows to be valid.
    #[cfg(test)]
    pub fn valid(uri: &str) -> Self {
        Self::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"))
    }

    fn from_uri(uri: String, path_at: usize) -> Self {
        Self {
            key: IdentityKey::of(&uri),
            uri,
            path_at,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_at]
    }

    /// Empty, or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_at..]
    }

    /// For `/ns/<namespace>/sa/<service account>` paths: (namespace, service account).
    pub fn kubernetes(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
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

    /// Whether `uri` is this ID as written out.
    pub fn is(&self, uri: &str) -> bool {
        self.uri == uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Written out, as everywhere else.
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
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
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.kubernetes(), Some(("prod", "frontend")));
        assert_eq!(
            SpiffeId::parse(id.as_str()).expect("valid"),
            id,
            "made and parsed, the same ID"
        );
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
