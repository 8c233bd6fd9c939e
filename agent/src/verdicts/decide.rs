//! What the policy says, in the terms the enforcement points need: a decision for one
//! connection to a local workload (or "read its HTTP requests first"), a decision for one HTTP
//! request, the PeerAuthentication mode for a workload's port, and the verdict that may be
//! cached for an identity pair.
//!
//! The kernel caches verdicts per (source identity, destination identity, port), so a verdict
//! is cacheable only if the policy gives the same cacheable answer for every workload that
//! carries the destination identity (local workloads and peers alike): two pods of one service
//! account with different labels, and so different policies, are never cached as one.

use std::net::{IpAddr, SocketAddr};

use crate::{
    config::MtlsMode,
    identity::{IdentityKey, LocalWorkload},
    state::Snapshot,
    tunnel::http::RequestHead,
};

/// A decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub allowed: bool,
    /// The verdict holds for every connection of the identity pair to this port.
    pub cacheable: bool,
    /// `namespace/name` of the deciding policy, empty if none.
    pub policy: String,
    pub reason: String,
}

/// The decision for a connection, before any bytes are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Decided(Judgement),
    /// The decision depends on the HTTP requests the connection carries.
    Http,
}

/// The connection from `source` (a verified SPIFFE ID, `None` for plaintext) at `source_ip` to
/// `target`, one of `workload`'s addresses.
pub fn connection(
    _snapshot: &Snapshot,
    _workload: &LocalWorkload,
    source: Option<&str>,
    _source_ip: Option<IpAddr>,
    _target: SocketAddr,
) -> Outcome {
    Outcome::Decided(Judgement {
        allowed: true,
        cacheable: source.is_some(),
        policy: String::new(),
        reason: "no policy engine".into(),
    })
}

/// One HTTP request on a connection whose outcome was [`Outcome::Http`].
pub fn request(
    _snapshot: &Snapshot,
    _workload: &LocalWorkload,
    _source: Option<&str>,
    _source_ip: Option<IpAddr>,
    _target: SocketAddr,
    _head: &RequestHead,
) -> Judgement {
    Judgement {
        allowed: true,
        cacheable: false,
        policy: String::new(),
        reason: "no policy engine".into(),
    }
}

/// The mTLS mode for `workload`'s `port`, and what set it.
pub fn mtls_mode(snapshot: &Snapshot, _workload: &LocalWorkload, _port: u16) -> (MtlsMode, String) {
    (snapshot.config.mtls.mode, "config mtls.mode".into())
}

/// The verdict that may be cached for (`source`, `destination`, `port`): `Some(true)` allow,
/// `Some(false)` deny, `None` if nothing may be cached.
pub fn pair(
    snapshot: &Snapshot,
    _source: &str,
    destination: IdentityKey,
    _port: u16,
) -> Option<bool> {
    snapshot.registry.identity(destination).map(|_| true)
}
