//! What both ends of HBONE agree on: the HTTP/2 limits and keepalive of a tunnel connection,
//! the early-data budget, the cacheable-answer header, the `baggage` and `traceparent` a
//! `CONNECT` carries (as ztunnel's do), and how opening a stream fails.

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
/// HTTP/2 PINGs on the client's connections: one every [`PING_INTERVAL`], and a connection
/// whose PING is not answered within [`PING_TIMEOUT`] is closed (ztunnel's client's values).
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(10);
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// W3C Baggage on a `CONNECT`: who the source is, in the keys ztunnel reads
/// (`k8s.namespace.name`, ...), so that its logs and metrics name Latch's sources.
pub const BAGGAGE_HEADER: &str = "baggage";
/// W3C Trace Context on a `CONNECT`: a new trace per tunneled connection, as ztunnel starts one.
pub const TRACEPARENT_HEADER: &str = "traceparent";
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

/// The `baggage` of a `CONNECT` from `source`: its namespace, the one key of ztunnel's the
/// identity gives (`None` for an identity not of Kubernetes' shape).
pub(super) fn baggage(source: &crate::identity::SpiffeId) -> Option<hyper::header::HeaderValue> {
    let (namespace, _) = source.kubernetes()?;
    hyper::header::HeaderValue::try_from(format!("k8s.namespace.name={namespace}")).ok()
}

/// A new W3C `traceparent` (version 00, random trace and parent IDs, not sampled), as ztunnel
/// starts one for each connection it tunnels; `None` if the system has no randomness to give.
/// Marked sensitive (HPACK: never indexed), since no value is ever sent twice.
pub(super) fn traceparent() -> Option<hyper::header::HeaderValue> {
    use aws_lc_rs::rand::SecureRandom as _;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ids = [0u8; 24];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut ids).ok()?;
    // `00-` 32 hex digits `-` 16 hex digits `-00`.
    let mut text = Vec::with_capacity(55);
    text.extend_from_slice(b"00-");
    for (i, byte) in ids.iter().enumerate() {
        if i == 16 {
            text.push(b'-');
        }
        text.extend([HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]);
    }
    text.extend_from_slice(b"-00");
    let mut value = hyper::header::HeaderValue::from_bytes(&text).ok()?;
    value.set_sensitive(true);
    Some(value)
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
    fn a_traceparent_is_version_00_with_new_random_ids() {
        let parse = |v: hyper::header::HeaderValue| -> Vec<String> {
            v.to_str()
                .expect("ascii")
                .split('-')
                .map(str::to_owned)
                .collect()
        };
        let first = traceparent().expect("traceparent");
        assert!(first.is_sensitive(), "sent never indexed");
        let a = parse(first);
        let b = parse(traceparent().expect("traceparent"));
        assert_eq!(a.len(), 4);
        assert_eq!((a[0].as_str(), a[3].as_str()), ("00", "00"));
        assert_eq!((a[1].len(), a[2].len()), (32, 16));
        assert!(
            a[1].chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a[1], b[1], "each CONNECT starts its own trace");
    }

    #[test]
    fn the_baggage_names_the_source_namespace() {
        let id = crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/frontend")
            .expect("id");
        assert_eq!(
            baggage(&id).expect("baggage").to_str().expect("ascii"),
            "k8s.namespace.name=prod"
        );
    }

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
