//! The words every layer shares about one connection: which side this node is on
//! ([`Direction`]), what a carried connection is ([`ConnInfo`]) and the parts of an HTTP request
//! that policy looks at ([`RequestHead`]). It sits below capture, tunnel, verdicts and policy
//! decisions, and imports none of them.

use std::net::{IpAddr, SocketAddr};

use latch_common::{DIRECTION_INBOUND, DIRECTION_OUTBOUND};

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

/// What a carried connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Source SPIFFE ID; empty for a plaintext source.
    pub source: String,
    /// Destination SPIFFE ID.
    pub destination: String,
    /// The original destination address.
    pub destination_address: SocketAddr,
    /// The source's address as seen by this node, when known.
    pub source_ip: Option<IpAddr>,
    /// Which side of the connection this node is.
    pub direction: Direction,
    /// `tunnel` (HBONE) or `plaintext`.
    pub path: &'static str,
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
}
