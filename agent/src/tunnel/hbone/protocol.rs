//! What both ends of HBONE agree on: the HTTP/2 limits and keepalive of a tunnel connection,
//! the early-data budget, the cacheable-answer header, and how opening a stream fails.

use std::{future::Future, io, net::SocketAddr, pin::Pin, time::Duration};

use hyper::StatusCode;
use tokio::net::TcpStream;

use crate::tunnel::h2stream::H2Stream;

/// Per-stream and per-connection HTTP/2 flow-control windows, sized for bulk transfer.
pub(super) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(super) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame either side accepts: bulk data moves in few frames (the default is
/// 16 KiB, one frame per TLS record).
pub(super) const MAX_FRAME: u32 = 1024 * 1024;
/// Largest header list (HPACK-decoded, RFC 9113 §6.5.2) either side accepts: a `CONNECT` and
/// its answer are a few hundred bytes (h2's default would be 16 MiB; ztunnel's server takes
/// 64 KiB, its client 16 KiB).
pub(super) const MAX_HEADER_LIST: u32 = 16 * 1024;
/// TCP keepalive on tunnel connections: an idle connection to a peer that vanished (a node that
/// died without closing it) is found dead within about a minute and leaves the pool.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// Most bytes of the source's that are sent before the destination has answered.
pub const EARLY_DATA: usize = 64 * 1024;
/// Response header: `1` if the source may cache the answer for the identity pair and port.
pub const CACHEABLE_HEADER: &str = "x-latch-cacheable";

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An established tunnel stream (bytes after the `200`).
pub type TunnelStream = H2Stream;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to the tunnel endpoint {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{addr} did not answer CONNECT {authority} within {limit:?}")]
    Timeout {
        addr: SocketAddr,
        authority: SocketAddr,
        limit: Duration,
    },
    #[error("reading the source connection before the tunnel opened: {source}")]
    Source {
        #[source]
        source: io::Error,
    },
    #[error("building CONNECT {authority}: {source}")]
    Request {
        authority: SocketAddr,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{addr} answered {status} to CONNECT {authority}")]
    Refused {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
        /// The destination said the refusal holds for the whole identity pair and port.
        cacheable: bool,
    },
}

impl TunnelError {
    /// The destination's policy denied the connection: `403`, or `401` (ztunnel's answer to a
    /// policy deny; Latch's own when the client's proof no longer holds). Other answers are
    /// refusals of another kind.
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            TunnelError::Refused { status, .. }
                if *status == StatusCode::FORBIDDEN || *status == StatusCode::UNAUTHORIZED
        )
    }
}

/// A tunnel socket's options: no delay, and keepalive probes once idle (see [`KEEPALIVE_IDLE`]).
pub(super) fn set_tunnel_options(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_401_or_403_answer_is_a_policy_deny_and_the_others_are_not() {
        let answered = |status: StatusCode| TunnelError::Refused {
            addr: "10.244.2.2:15008".parse().expect("addr"),
            authority: "10.244.2.2:8080".parse().expect("addr"),
            status,
            cacheable: false,
        };
        for status in [StatusCode::FORBIDDEN, StatusCode::UNAUTHORIZED] {
            assert!(answered(status).is_denied(), "{status}");
        }
        for status in [
            StatusCode::BAD_REQUEST,
            StatusCode::METHOD_NOT_ALLOWED,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::BAD_GATEWAY,
        ] {
            assert!(!answered(status).is_denied(), "{status}");
        }
    }
}
