//! The words every layer shares about one connection: which side this node is on
//! ([`Direction`]), how its bytes travel ([`Via`]), what became of it ([`AccessDecision`]), what
//! a carried connection is ([`ConnInfo`]) and the parts of an HTTP request that policy looks at
//! ([`RequestHead`]). They become strings only in the access log and the metrics. It sits below capture, tunnel, verdicts and policy
//! decisions, and imports none of them (only the identity type).

use std::net::{IpAddr, SocketAddr};

use latch_common::{DIRECTION_INBOUND, DIRECTION_OUTBOUND};

use crate::identity::SpiffeId;

/// Which side of the connection this node is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn wire(self) -> u8 {
        match self {
            Direction::Outbound => DIRECTION_OUTBOUND,
            Direction::Inbound => DIRECTION_INBOUND,
        }
    }

    pub fn from_wire(raw: u8) -> Option<Self> {
        match raw {
            DIRECTION_OUTBOUND => Some(Direction::Outbound),
            DIRECTION_INBOUND => Some(Direction::Inbound),
            _ => None,
        }
    }
}

impl Direction {
    /// As the access log and the debug API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a connection's bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// An HBONE stream: mutual TLS between the nodes.
    Tunnel,
    /// From a source that is not in the mesh.
    Plaintext,
    /// Through the tunnel, each HTTP request judged on its own.
    Http,
    /// The kernel admitted it by a cached verdict; no agent in between.
    Fastpath,
}

impl Via {
    /// As the access log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Tunnel => "tunnel",
            Via::Plaintext => "plaintext",
            Via::Http => "http",
            Via::Fastpath => "fastpath",
        }
    }
}

/// What became of a connection or an HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessDecision {
    /// Admitted by policy.
    Allow,
    /// Denied by policy (or a request refused as bad).
    Deny,
    /// Refused before any policy decided (not a mesh endpoint, no certificate, unreachable).
    Refused,
}

impl AccessDecision {
    /// `Allow` if `allowed`, else `Deny`.
    pub fn of(allowed: bool) -> Self {
        if allowed { Self::Allow } else { Self::Deny }
    }

    /// As the access log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessDecision::Allow => "ALLOW",
            AccessDecision::Deny => "DENY",
            AccessDecision::Refused => "REFUSED",
        }
    }
}

/// What a carried connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Source SPIFFE ID; `None` for a plaintext source.
    pub source: Option<SpiffeId>,
    /// Destination SPIFFE ID.
    pub destination: SpiffeId,
    /// The original destination address.
    pub destination_address: SocketAddr,
    /// The source's address as seen by this node, when known.
    pub source_ip: Option<IpAddr>,
    /// Which side of the connection this node is.
    pub direction: Direction,
    /// How its bytes travel.
    pub path: Via,
    /// The local workload (`namespace/name`) this connection belongs to.
    pub workload: String,
}

/// The parts of a request that policy can look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The normalised path (the one the application receives), without the query string.
    pub path: String,
    /// The host (the `Host` header, or the absolute-form target's authority), without a port.
    pub host: String,
    /// Every header field as the application receives it.
    pub headers: hyper::HeaderMap,
    /// The request's verified JWT, if it carried one (RequestAuthentication).
    pub auth: Option<crate::policy::RequestAuth>,
}
