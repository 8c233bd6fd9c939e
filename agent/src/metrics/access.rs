//! The access log: one structured JSON line (tracing target `access`, on stdout) per policy
//! decision, per carried connection when it ends, and per fast-path connection when it opens
//! and when it ends, so an auditor can trace every
//! authenticated hop: time, both SPIFFE IDs and addresses, port, decision, the policy that
//! decided, the path (`tunnel`, `plaintext`, `http`, `fastpath`), whether the connection's bytes are
//! encrypted, bytes and duration.

use std::{net::SocketAddr, time::Duration};

use crate::conn::{AccessDecision, Direction, Via};

/// One access-log record.
#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub direction: Direction,
    pub source_principal: &'a str,
    pub source_address: Option<SocketAddr>,
    pub destination_principal: &'a str,
    pub destination_address: Option<SocketAddr>,
    pub decision: AccessDecision,
    /// `namespace/name` of the policy that decided, or empty.
    pub policy: &'a str,
    /// Why, in words.
    pub reason: &'a str,
    /// The shadow decision of dry-run policies, if any applied.
    pub dry_run: Option<crate::state::decide::Shadow>,
    pub path: Via,
    /// For `http`: method and path of the request.
    pub request: &'a str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Option<Duration>,
}

impl Record<'_> {
    /// A record of `decision` on a connection `via` that path, on `direction`'s side; the rest
    /// empty, to be filled in.
    pub fn new(direction: Direction, decision: AccessDecision, via: Via) -> Self {
        Record {
            direction,
            source_principal: "",
            source_address: None,
            destination_principal: "",
            destination_address: None,
            decision,
            policy: "",
            reason: "",
            dry_run: None,
            path: via,
            request: "",
            bytes_sent: 0,
            bytes_received: 0,
            duration: None,
        }
    }
}

/// A decision was made (connection refused or admitted, or an HTTP request judged).
pub fn decision(r: &Record<'_>) {
    emit(r, "decision");
}

/// A connection opened that no decision of the agent's saw (the kernel fast path).
pub fn opened(r: &Record<'_>) {
    emit(r, "connection opened");
}

/// A carried (or fast-path) connection ended.
pub fn closed(r: &Record<'_>) {
    emit(r, "connection closed");
}

impl Record<'_> {
    /// Whether the connection's bytes cross encrypted: a tunneled connection is, and so is an
    /// HTTP request with a verified source (it came through the tunnel); plaintext sources and
    /// the kernel fast path are not.
    pub fn encrypted(&self) -> bool {
        match self.path {
            Via::Tunnel => true,
            Via::Http => !self.source_principal.is_empty(),
            Via::Plaintext | Via::Fastpath => false,
        }
    }
}

fn emit(r: &Record<'_>, what: &str) {
    let port = r.destination_address.map(|a| a.port()).unwrap_or_default();
    tracing::info!(
        target: "access",
        event = what,
        direction = r.direction.as_str(),
        source_principal = r.source_principal,
        source_address = %Address(r.source_address),
        destination_principal = r.destination_principal,
        destination_address = %Address(r.destination_address),
        destination_port = port,
        decision = r.decision.as_str(),
        policy = r.policy,
        reason = r.reason,
        dry_run = r.dry_run.map_or("", |s| s.as_str()),
        path = r.path.as_str(),
        encrypted = r.encrypted(),
        request = r.request,
        bytes_sent = r.bytes_sent,
        bytes_received = r.bytes_received,
        duration_ms = r.duration.map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default(),
        "access"
    );
}

/// An address as the access log writes it: `ip:port`, empty when unknown (formatted into the
/// line, with no string of its own).
struct Address(Option<SocketAddr>);

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}
