//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams over mutual TLS, the wire protocol
//! of Istio ambient. The client pools HTTP/2 connections per (source identity, destination
//! identity, destination address), so only a pair's first connection pays for the handshake
//! (a busy pair gets up to one connection per CPU, so its streams are encrypted in parallel);
//! the server verifies the client, asks its [`Inbound`] whether the source may reach the target,
//! and answers `200` (then bytes), `403` (policy) or `503` (application unreachable).
//!
//! The client does not wait for the answer to start: what the source application has already
//! written is sent on the stream right behind the `CONNECT` (up to [`EARLY_DATA`] bytes), so a
//! request travels with the `CONNECT` instead of one round trip after it. The server reads the
//! stream only once it has admitted the connection and connected the application; on `403` or
//! `503` those bytes are discarded and the source connection is reset, exactly as if they had
//! never left the source node. The `200` itself is held back for the application's first bytes
//! (see [`super::answer`]), so that a request's answer crosses in one TLS record.
//!
//! Both sides use the `h2` crate directly: the stream is read and written by the task that
//! relays it (see [`H2Stream`]), with no helper task in between.
//!
//! What a connection's handshake proved holds only while the certificates are within their
//! validity and the trust bundle they were verified against is the one in force. The server
//! checks both before each new stream: a client whose certificate has expired (or is not yet
//! valid), or a connection proven under a bundle since replaced, gets `401` and a `GOAWAY`, so
//! it re-proves on a new connection. The server also sends `GOAWAY` once the client's
//! certificate expires, and when the bundle changes: open streams finish if the new bundle
//! still verifies the client, and are reset at once if it does not ([`Proof`]). The client
//! never opens a stream on a pooled connection whose proof has expired, and pools connections
//! per trust epoch ([`PoolKey::trust`]); [`TunnelClient::retire`] takes the connections of an
//! old bundle out of the pool.
//!
//! Both answers carry [`CACHEABLE_HEADER`]: whether the destination's decision holds for every
//! connection of the identity pair to that port, so the source may cache it in its kernel. A
//! decision that depends on more (L7 attributes, addresses) is answered with `0` and the source
//! sends every connection of the pair through the tunnel.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::{BufMut as _, Bytes};
use h2::{
    RecvStream, SendStream,
    client::{ResponseFuture, SendRequest},
    server::SendResponse,
};
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::{
    answer::{AnswerClock, PendingAnswer},
    forwarded,
    h2stream::H2Stream,
    splice::{poll_once, read_now},
};
use crate::{busy_poll::Traffic, tls::peer_identity};

/// Per-stream and per-connection HTTP/2 flow-control windows, sized for bulk transfer.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame either side accepts: bulk data moves in few frames (the default is
/// 16 KiB, one frame per TLS record).
const MAX_FRAME: u32 = 1024 * 1024;
/// Tunneled connections one HTTP/2 connection may carry at once.
const MAX_STREAMS: u32 = 4096;
/// Largest header list (HPACK-decoded, RFC 9113 §6.5.2) either side accepts: a `CONNECT` and
/// its answer are a few hundred bytes (h2's default would be 16 MiB; ztunnel's server takes
/// 64 KiB, its client 16 KiB).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How long a tunnel client may take to complete TLS and the HTTP/2 preface, unless the config
/// says otherwise (`tunnel.handshakeTimeout`; ztunnel's TLS listener allows 10 s too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a tunnel may take, dial and answer together. A pooled connection whose
/// `CONNECT` goes unanswered that long leaves the pool (its peer is gone or stuck).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive on tunnel connections: an idle connection to a peer that vanished (a node that
/// died without closing it) is found dead within about a minute and leaves the pool.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// The longest the server waits, on a timer, for a client certificate to expire before sending
/// `GOAWAY` (tokio's timers reach about two years); a later NotAfter is still checked before each
/// stream.
const EXPIRY_TIMER_MOST: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most bytes of the source's that are sent before the destination has answered.
pub const EARLY_DATA: usize = 64 * 1024;
/// Response header: `1` if the source may cache the answer for the identity pair and port.
pub const CACHEABLE_HEADER: &str = "x-latch-cacheable";

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An established tunnel stream (bytes after the `200`).
pub type TunnelStream = H2Stream;

/// Streams a pooled connection carries at once before the pair opens another one.
pub(crate) const SPREAD_AT: usize = 4;

/// Most pooled connections per pair: one per CPU (asked once: the answer reads cgroup files).
pub(crate) fn max_connections() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A tunnel stream opened by the client; while it lives it counts as active on its pooled
/// connection.
pub struct ClientStream {
    io: TunnelStream,
    _active: Active,
}

impl From<ClientStream> for super::splice::Remote {
    fn from(stream: ClientStream) -> Self {
        super::splice::Remote::Tunnel {
            stream: stream.io,
            keep: Some(Box::new(stream._active)),
        }
    }
}

/// One active stream on a pooled connection. When the last stream of a connection ends and the
/// pair has other connections, this one leaves the pool (and closes once nothing uses it), so a
/// burst's extra connections do not outlive it.
struct Active {
    count: Arc<AtomicUsize>,
    pool: std::sync::Weak<Mutex<Pool>>,
    key: PoolKey,
}

impl Active {
    fn new(count: &Arc<AtomicUsize>, pool: &Arc<Mutex<Pool>>, key: &PoolKey) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self {
            count: count.clone(),
            pool: Arc::downgrade(pool),
            key: key.clone(),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pool.get_mut(&self.key)
            && entry.conns.len() > 1
        {
            entry.conns.retain(|p| {
                !Arc::ptr_eq(&p.active, &self.count) || p.active.load(Ordering::Relaxed) > 0
            });
        }
    }
}

/// The pooled connections of each pair, and how many are being dialled.
type Pool = HashMap<PoolKey, PoolEntry>;

#[derive(Default)]
struct PoolEntry {
    conns: Vec<Pooled>,
    dialing: usize,
}

/// What [`TunnelClient::open`] does for a pair.
enum Pick {
    /// A pooled connection, already counting this stream as active.
    Use(Pooled, Active),
    Dial,
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

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
    /// The destination's policy denied the connection.
    pub fn is_denied(&self) -> bool {
        matches!(self, TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN)
    }
}

/// Which pooled HTTP/2 connection a tunnel uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: String,
    pub dst: String,
    /// The tunnel endpoint (`<pod IP>:15008`).
    pub endpoint: SocketAddr,
    /// The epoch of the source's trust bundle that a connection of this key is verified with
    /// (see [`crate::identity::certs::TrustEpoch`]): a connection proven under another bundle is
    /// never used.
    pub trust: u64,
}

#[derive(Clone)]
struct Pooled {
    sender: SendRequest<Bytes>,
    /// The connection's task has ended: no new streams on it.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The earlier NotAfter of the two certificates this connection was proven with.
    proof_not_after: SystemTime,
    /// What else the connection was proven with, and how to end it.
    proven: Arc<Proven>,
    /// Streams open on it now.
    active: Arc<AtomicUsize>,
}

/// A pooled connection's server certificate, and the handle that ends the connection.
struct Proven {
    /// The server certificate's NotBefore.
    not_before: SystemTime,
    /// The server's chain, as verified (to verify again when the trust bundle changes).
    server_chain: Vec<CertificateDer<'static>>,
    /// Ends the connection's task (and with it the connection) at once.
    abort: tokio::task::AbortHandle,
}

impl Pooled {
    /// Whether both certificates it was proven with are within their validity at `now`.
    fn proof_holds(&self, now: SystemTime) -> bool {
        self.proven.not_before <= now && now <= self.proof_not_after
    }
}

/// What becomes of a pooled connection proven under a trust bundle no longer in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retire {
    /// Not concerned: it stays in the pool.
    Keep,
    /// Out of the pool: no new streams; open ones finish, then it closes.
    Drain,
    /// Closed at once, its open streams reset: the bundle in force no longer verifies the
    /// server.
    Close,
}

/// An opened tunnel and what it was proven with.
pub struct Opened {
    pub stream: ClientStream,
    /// The earlier NotAfter of the client's and the server's certificates: no verdict proven
    /// through this tunnel may outlive it.
    pub proof_not_after: SystemTime,
    /// A new HTTP/2 connection (and TLS handshake) was made for it.
    pub new_connection: bool,
    /// The destination said its allow holds for the whole identity pair and port.
    pub cacheable: bool,
    /// For a new connection: how long TCP, TLS and the HTTP/2 handshake took.
    pub handshake: Option<std::time::Duration>,
}

fn cacheable(headers: &hyper::http::HeaderMap) -> bool {
    headers
        .get(CACHEABLE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// How to reach a tunnel endpoint: a TCP connection (made inside the source pod's netns), the
/// TLS client config for the pair, and the NotAfter of the client certificate it presents.
pub struct Dial {
    pub tcp: BoxFuture<io::Result<TcpStream>>,
    pub tls: Result<Arc<rustls::ClientConfig>, String>,
    pub client_not_after: SystemTime,
}

/// The HBONE client with its connection pool.
#[derive(Clone)]
pub struct TunnelClient {
    pool: Arc<Mutex<Pool>>,
    open_timeout: Duration,
}

impl Default for TunnelClient {
    fn default() -> Self {
        Self {
            pool: Arc::default(),
            open_timeout: OPEN_TIMEOUT,
        }
    }
}

impl TunnelClient {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same client with another limit on opening a tunnel than [`OPEN_TIMEOUT`].
    pub fn with_open_timeout(mut self, limit: Duration) -> Self {
        self.open_timeout = limit;
        self
    }

    /// Open a tunnel to `authority` (the original destination) through the endpoint of `key`,
    /// reusing the least busy live pooled connection, or dialling with `dial()` if there is none
    /// or all are busy and the pair may have another. While the destination decides, what
    /// `source` has already written is sent on the stream (see [`EARLY_DATA`]). Dialling and the
    /// answer together may take [`OPEN_TIMEOUT`]; a pooled connection that did not answer in time
    /// leaves the pool.
    pub async fn open(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        client: Option<SocketAddr>,
        dial: impl FnOnce() -> Dial,
        source: Option<&TcpStream>,
    ) -> Result<Opened, TunnelError> {
        let deadline = tokio::time::Instant::now() + self.open_timeout;
        let timed_out = || TunnelError::Timeout {
            addr: key.endpoint,
            authority,
            limit: self.open_timeout,
        };
        let (pooled, active, handshake) = match self.pick(key) {
            Pick::Use(p, active) => (p, active, None),
            Pick::Dial => {
                let started = std::time::Instant::now();
                let dialled = tokio::time::timeout_at(deadline, self.connect(key, dial())).await;
                self.dialled(key);
                let pooled = dialled.map_err(|_| timed_out())??;
                let active = Active::new(&pooled.active, &self.pool, key);
                (pooled, active, Some(started.elapsed()))
            }
        };
        let http = |source| {
            self.evict(key);
            TunnelError::Http {
                addr: key.endpoint,
                source,
            }
        };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string());
        if let Some(client) = client {
            request = request.header(forwarded::FORWARDED, forwarded::header(client));
        }
        let request = request
            .body(())
            .map_err(|source| TunnelError::Request { authority, source })?;
        let exchange = async {
            let mut sender = pooled.sender.clone().ready().await.map_err(http)?;
            let (response, mut send) = sender.send_request(request, false).map_err(http)?;
            let (response, source_ended) = match source {
                Some(source) => answer_with_early_data(response, &mut send, source).await?,
                None => (response.await, false),
            };
            Ok::<_, TunnelError>((response, send, source_ended))
        };
        let Ok(exchanged) = tokio::time::timeout_at(deadline, exchange).await else {
            self.forget(key, &pooled);
            return Err(timed_out());
        };
        let (response, send, source_ended) = exchanged?;
        let response = response.map_err(|source| TunnelError::Http {
            addr: key.endpoint,
            source,
        })?;
        let cacheable = cacheable(response.headers());
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                addr: key.endpoint,
                authority,
                status: response.status(),
                cacheable,
            });
        }
        Ok(Opened {
            stream: ClientStream {
                io: H2Stream::new(send, response.into_body()).send_ended(source_ended),
                _active: active,
            },
            proof_not_after: pooled.proof_not_after,
            new_connection: handshake.is_some(),
            cacheable,
            handshake,
        })
    }

    /// The least busy live connection of the pair, unless all are busy (or there is none) and
    /// the pair may have another: then the caller dials, counted until [`Self::dialled`].
    fn pick(&self, key: &PoolKey) -> Pick {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pool.entry(key.clone()).or_default();
        let now = SystemTime::now();
        // A connection whose certificates are no longer (or not yet) valid proves nothing.
        entry
            .conns
            .retain(|p| !p.closed.load(Ordering::Relaxed) && p.proof_holds(now));
        let least_busy = entry
            .conns
            .iter()
            .min_by_key(|p| p.active.load(Ordering::Relaxed))
            .cloned();
        let room = entry.conns.len() + entry.dialing < max_connections();
        match least_busy {
            Some(p) if !room || p.active.load(Ordering::Relaxed) < SPREAD_AT => {
                // Counted under the pool's lock, so a burst of opens sees each other.
                let active = Active::new(&p.active, &self.pool, key);
                Pick::Use(p, active)
            }
            _ => {
                entry.dialing += 1;
                Pick::Dial
            }
        }
    }

    /// Retire the pooled connections of the keys `which` names, given each key and the chain
    /// its server proved: [`Retire::Drain`] takes it out of the pool (open streams finish),
    /// [`Retire::Close`] also ends it at once. Returns how many were taken out.
    pub fn retire(&self, which: impl Fn(&PoolKey, &[CertificateDer<'static>]) -> Retire) -> usize {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let mut retired = 0;
        for (key, entry) in pool.iter_mut() {
            entry
                .conns
                .retain(|p| match which(key, &p.proven.server_chain) {
                    Retire::Keep => true,
                    Retire::Drain => {
                        retired += 1;
                        false
                    }
                    Retire::Close => {
                        p.proven.abort.abort();
                        retired += 1;
                        false
                    }
                });
        }
        pool.retain(|_, e| !e.conns.is_empty() || e.dialing > 0);
        retired
    }

    /// A dial started by [`Self::pick`] has ended (either way).
    fn dialled(&self, key: &PoolKey) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pool.get_mut(key) {
            entry.dialing = entry.dialing.saturating_sub(1);
            if entry.conns.is_empty() && entry.dialing == 0 {
                pool.remove(key);
            }
        }
    }

    /// Take one connection out of the pair's pool (it closes once nothing uses it).
    fn forget(&self, key: &PoolKey, pooled: &Pooled) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pool.get_mut(key) {
            entry
                .conns
                .retain(|p| !Arc::ptr_eq(&p.active, &pooled.active));
        }
    }

    fn evict(&self, key: &PoolKey) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drop every pooled connection whose key matches (identities rotated or revoked).
    pub fn evict_where(&self, pred: impl Fn(&PoolKey) -> bool) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !pred(k));
    }

    /// Number of pooled HTTP/2 connections.
    pub fn pooled_connections(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.conns.len())
            .sum()
    }

    async fn connect(&self, key: &PoolKey, dial: Dial) -> Result<Pooled, TunnelError> {
        let addr = key.endpoint;
        let tcp = dial
            .tcp
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        set_tunnel_options(&tcp);
        // The server name is not used for verification (the SPIFFE verifier checks the
        // identity); it is only sent as SNI.
        let name = ServerName::IpAddress(addr.ip().into());
        let config = dial.tls.clone().map_err(|e| TunnelError::Tls {
            addr,
            source: io::Error::other(e),
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, Traffic::new(tcp))
            .await
            .map_err(|source| TunnelError::Tls { addr, source })?;
        let server_chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (server_not_before, server_not_after) = server_chain
            .first()
            .map(validity)
            .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            // The server never starts streams: a PUSH_PROMISE is a protocol error.
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::Http { addr, source })?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended = closed.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %addr, error = %e, "tunnel connection closed");
            }
            ended.store(true, Ordering::Relaxed);
        });
        let pooled = Pooled {
            sender,
            closed,
            proof_not_after: server_not_after.min(dial.client_not_after),
            proven: Arc::new(Proven {
                not_before: server_not_before,
                server_chain,
                abort: task.abort_handle(),
            }),
            active: Arc::default(),
        };
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .conns
            .push(pooled.clone());
        Ok(pooled)
    }
}

/// The destination's answer, and whether the source's half of the stream has already ended.
type Answer = (Result<Response<RecvStream>, h2::Error>, bool);

/// Wait for the destination's answer to a `CONNECT`, meanwhile sending what `source` writes (up
/// to [`EARLY_DATA`] bytes) on the stream, and its half-close (`END_STREAM`) if it comes: a
/// request-response client often writes its request and half-closes before anything returns. A
/// source that fails fails the opening, since its error would not be seen twice.
async fn answer_with_early_data(
    response: ResponseFuture,
    send: &mut SendStream<Bytes>,
    source: &TcpStream,
) -> Result<Answer, TunnelError> {
    tokio::pin!(response);
    let mut early = Early {
        buf: bytes::BytesMut::new(),
        left: EARLY_DATA,
        ended: false,
    };
    // What the source wrote before it was accepted is taken at once, so that it leaves with the
    // CONNECT: the reactor has not seen the new socket yet, and waiting for it to would send the
    // CONNECT alone.
    while early.wants_more() {
        let read = read_now(source, &mut early.buf, early.left.min(EARLY_READ));
        match early.forward(read, send)? {
            Forwarded::Sent => {}
            Forwarded::Nothing => break,
            Forwarded::Failed(e) => return Ok((Err(e), early.ended)),
        }
    }
    loop {
        tokio::select! {
            biased;
            answer = &mut response => return Ok((answer, early.ended)),
            readable = source.readable(), if early.wants_more() => {
                early.buf.reserve(early.left);
                let mut room = (&mut early.buf).limit(early.left);
                let read = match readable.and_then(|()| source.try_read_buf(&mut room)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    read => read.map(Some),
                };
                if let Forwarded::Failed(e) = early.forward(read, send)? {
                    return Ok((Err(e), early.ended));
                }
            }
        }
    }
}

/// The largest single read of early data taken before the reactor has seen the socket.
const EARLY_READ: usize = 16 * 1024;

/// The source's bytes sent before the destination's answer.
struct Early {
    /// Grown as bytes come: a request is usually a few hundred bytes.
    buf: bytes::BytesMut,
    /// Bytes that may still be sent.
    left: usize,
    /// The source's half-close has been sent (`END_STREAM`).
    ended: bool,
}

enum Forwarded {
    Sent,
    /// The source had nothing waiting.
    Nothing,
    /// The stream refused it: the answer is this error.
    Failed(h2::Error),
}

impl Early {
    fn wants_more(&self) -> bool {
        self.left > 0 && !self.ended
    }

    /// Send what one read of the source brought (`None`: nothing was waiting). Within the
    /// stream's initial window, so h2 sends it as it comes. A source that fails fails the
    /// opening.
    fn forward(
        &mut self,
        read: io::Result<Option<usize>>,
        send: &mut SendStream<Bytes>,
    ) -> Result<Forwarded, TunnelError> {
        let sent = match read {
            Ok(None) => return Ok(Forwarded::Nothing),
            Ok(Some(0)) => send
                .send_data(Bytes::new(), true)
                .map(|()| self.ended = true),
            Ok(Some(n)) => send
                .send_data(self.buf.split().freeze(), false)
                .map(|()| self.left -= n),
            Err(source) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(TunnelError::Source { source });
            }
        };
        Ok(sent.map_or_else(Forwarded::Failed, |()| Forwarded::Sent))
    }
}

/// A tunnel socket's options: no delay, and keepalive probes once idle (see [`KEEPALIVE_IDLE`]).
fn set_tunnel_options(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes);
}

/// NotAfter of a certificate (UNIX_EPOCH if it does not parse: an expired proof).
pub fn not_after(cert: &CertificateDer<'_>) -> SystemTime {
    validity(cert).1
}

/// NotBefore and NotAfter of a certificate (both UNIX_EPOCH if it does not parse: an expired
/// proof).
pub fn validity(cert: &CertificateDer<'_>) -> (SystemTime, SystemTime) {
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| (time(c.validity().not_before), time(c.validity().not_after)))
        .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH))
}

/// Carries an admitted tunnel stream once the `200` is on its way.
pub type Carry = Box<dyn FnOnce(TunnelStream) -> BoxFuture<()> + Send>;

/// What the destination side decided for one `CONNECT`.
pub enum Admission {
    /// `200`: the application is connected; `carry` relays the tunnel stream to it.
    Admit { cacheable: bool, carry: Carry },
    /// `403`: policy denies it.
    Forbidden { cacheable: bool },
    /// `503`: the application cannot be reached.
    Unreachable,
    /// `401`, and `GOAWAY` on the connection: what it was proven with no longer holds (see
    /// [`Inbound::proof`]); the client re-proves on a new connection.
    Unauthorized,
}

/// Whether what a tunnel connection was proven with still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    Holds,
    /// Proven under a trust bundle no longer in force, which the one in force still verifies:
    /// `GOAWAY`, open streams finish, new ones are refused.
    Retire,
    /// The trust bundle in force no longer verifies the client: `GOAWAY` and the connection is
    /// closed at once, its open streams reset.
    Revoked,
}

/// Who is asking, as the tunnel server proved it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The client's verified SPIFFE ID.
    pub identity: Arc<str>,
    /// The tunnel connection's source address: the pod that dialled it, from its netns. Other
    /// pods of the same identity on that node share the connection.
    pub address: SocketAddr,
    /// The address of the client of this stream, as the source says (`Forwarded`); to be
    /// checked against the registry before it is believed.
    pub forwarded_for: Option<SocketAddr>,
    /// NotAfter of the client's certificate: no verdict may outlive it, and no stream is opened
    /// after it.
    pub not_after: SystemTime,
    /// NotBefore of the client's certificate: no stream is opened before it.
    pub not_before: SystemTime,
    /// The trust epoch of the bundle the connection was verified with (see
    /// [`ServerConnection::proven_under`]).
    pub trust: u64,
}

impl Caller {
    /// Whether the client's certificate is within its validity at `now`.
    pub fn certificate_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// The destination side's decisions.
pub trait Inbound: Send + Sync + 'static {
    /// Decide whether `caller` may reach `target` and, if so, connect to the application.
    fn admit(self: Arc<Self>, caller: Caller, target: SocketAddr) -> BoxFuture<Admission>;

    /// Whether a connection proven as `caller`, with the client's `chain`, still holds under
    /// the trust in force. Asked when [`Inbound::trust_changes`] changes.
    fn proof(&self, _caller: &Caller, _chain: &[CertificateDer<'static>]) -> Proof {
        Proof::Holds
    }

    /// Changes when a trust bundle changed; `None`: never.
    fn trust_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Serve one accepted TCP connection on a tunnel listener: [`accept_connection`] within
/// [`HANDSHAKE_TIMEOUT`], then [`ServerConnection::serve`].
pub async fn serve_connection(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    inbound: Arc<dyn Inbound>,
) -> Result<(), io::Error> {
    accept_connection(tcp, tls, HANDSHAKE_TIMEOUT)
        .await?
        .serve(inbound)
        .await
}

type ServerTls = tokio_rustls::server::TlsStream<Traffic<TcpStream>>;

/// A tunnel connection whose client has proven its identity and started HTTP/2.
pub struct ServerConnection {
    connection: h2::server::Connection<ServerTls, Bytes>,
    caller: Caller,
    /// The client's chain, as verified.
    chain: Arc<[CertificateDer<'static>]>,
    peer: SocketAddr,
}

/// The handshakes of an accepted TCP connection on a tunnel listener: TLS with `tls` (which
/// verifies the client's certificate), then HTTP/2's preface and settings, all within `timeout`
/// (a client that has proven nothing by then is disconnected).
pub async fn accept_connection(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<ServerConnection, io::Error> {
    let peer = tcp.peer_addr()?;
    match tokio::time::timeout(timeout, handshakes(tcp, tls, peer)).await {
        Ok(handshaken) => handshaken,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{peer} did not complete the TLS and HTTP/2 handshakes within {timeout:?}"),
        )),
    }
}

async fn handshakes(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
) -> Result<ServerConnection, io::Error> {
    set_tunnel_options(&tcp);
    let tls = tokio_rustls::TlsAcceptor::from(tls)
        .accept(Traffic::new(tcp))
        .await?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let Some(source) = peer_identity(&certs) else {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "client has no SPIFFE identity",
        ));
    };
    let (not_before, not_after) = certs
        .first()
        .map(validity)
        .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
    let caller = Caller {
        identity: source.into(),
        address: peer,
        forwarded_for: None,
        not_after,
        not_before,
        trust: 0,
    };
    let chain: Arc<[CertificateDer<'static>]> =
        certs.into_iter().map(CertificateDer::into_owned).collect();
    let connection = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| io::Error::other(format!("HTTP/2 with {peer}: {e}")))?;
    Ok(ServerConnection {
        connection,
        caller,
        chain,
        peer,
    })
}

impl ServerConnection {
    /// Record that the client was verified with the trust bundle of epoch `trust`.
    pub fn proven_under(mut self, trust: u64) -> Self {
        self.caller.trust = trust;
        self
    }

    /// Serve the connection's `CONNECT` streams, one per tunneled connection, each decided by
    /// `inbound`, until the client closes it. `GOAWAY` is sent when a stream finds the proof no
    /// longer holds (`401`), when the client's certificate expires, and when the trust bundle
    /// changes (see [`Proof`]).
    pub async fn serve(self, inbound: Arc<dyn Inbound>) -> Result<(), io::Error> {
        let Self {
            mut connection,
            caller,
            chain,
            peer,
        } = self;
        let clock = AnswerClock::new();
        let mut ticking = pin!(clock.run());
        let go_away = Arc::new(tokio::sync::Notify::new());
        let mut going_away = false;
        // A certificate valid for longer than the timer can wait is left to the per-stream check.
        let expires_in = caller
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let watch_expiry = expires_in <= EXPIRY_TIMER_MOST;
        let mut expired = pin!(tokio::time::sleep(expires_in.min(EXPIRY_TIMER_MOST)));
        let mut trust = inbound.trust_changes();
        // A bundle that changed between the handshake and now is seen at once.
        if let Some(watch) = trust.as_mut() {
            watch.mark_changed();
        }
        loop {
            let trust_changed = async {
                match trust.as_mut() {
                    Some(watch) => watch.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let stream = tokio::select! {
                biased;
                stream = connection.accept() => stream,
                () = &mut ticking => continue,
                () = go_away.notified(), if !going_away => {
                    going_away = true;
                    connection.graceful_shutdown();
                    continue;
                }
                () = &mut expired, if watch_expiry && !going_away => {
                    tracing::debug!(%peer, source = %caller.identity, "client certificate expired; GOAWAY");
                    going_away = true;
                    connection.graceful_shutdown();
                    continue;
                }
                changed = trust_changed => {
                    if !changed {
                        trust = None;
                        continue;
                    }
                    match inbound.proof(&caller, &chain) {
                        Proof::Holds => {}
                        Proof::Retire if going_away => {}
                        Proof::Retire => {
                            tracing::debug!(%peer, source = %caller.identity, "trust bundle changed; GOAWAY");
                            going_away = true;
                            connection.graceful_shutdown();
                        }
                        Proof::Revoked => {
                            tracing::info!(%peer, source = %caller.identity, "the trust bundle in force no longer verifies the client; tunnel connection closed");
                            connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                            going_away = true;
                            trust = None;
                        }
                    }
                    continue;
                }
            };
            let Some(stream) = stream else { break };
            crate::busy_poll::activity();
            let (request, respond) =
                stream.map_err(|e| io::Error::other(format!("HTTP/2 with {peer}: {e}")))?;
            tokio::spawn(handle_connect(
                request,
                respond,
                caller.clone(),
                inbound.clone(),
                clock.clone(),
                go_away.clone(),
            ));
            // The new stream first: polling the connection again reads its socket, which more
            // often than not has nothing more, and that can wait.
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

fn answer(code: StatusCode, cacheable: bool) -> Response<()> {
    let mut r = status(code);
    r.headers_mut().insert(
        CACHEABLE_HEADER,
        hyper::header::HeaderValue::from_static(if cacheable { "1" } else { "0" }),
    );
    r
}

/// Answer a stream with `response` and end it.
fn refuse(mut respond: SendResponse<Bytes>, response: Response<()>) {
    if let Err(e) = respond.send_response(response, true) {
        tracing::debug!(error = %e, "CONNECT stream ended before its answer");
    }
}

async fn handle_connect(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    mut caller: Caller,
    inbound: Arc<dyn Inbound>,
    clock: AnswerClock,
    go_away: Arc<tokio::sync::Notify>,
) {
    let unauthorized = |respond| {
        refuse(respond, status(StatusCode::UNAUTHORIZED));
        go_away.notify_one();
    };
    // What the handshake proved holds only while the client's certificate is valid.
    if !caller.certificate_valid_at(SystemTime::now()) {
        tracing::info!(source = %caller.identity, client = %caller.address, "CONNECT refused: the client certificate the connection was proven with is not valid now");
        return unauthorized(respond);
    }
    if request.method() != Method::CONNECT {
        return refuse(respond, status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(respond, status(StatusCode::BAD_REQUEST));
    };
    if let Some(value) = request.headers().get(forwarded::FORWARDED) {
        match forwarded::parse(value) {
            Ok(client) => caller.forwarded_for = Some(client),
            Err(e) => {
                tracing::info!(source = %caller.identity, %target, error = %e, "CONNECT refused");
                return refuse(respond, status(StatusCode::BAD_REQUEST));
            }
        }
    }
    match inbound.admit(caller, target).await {
        Admission::Admit { cacheable, carry } => {
            // The 200 goes with the application's first bytes (see `answer`).
            let (held, timer) = PendingAnswer::new(respond, answer(StatusCode::OK, cacheable));
            let mut carried = pin!(carry(H2Stream::answering(held, request.into_body())));
            // The first poll delivers the early data to the application; then the timer.
            if poll_once(carried.as_mut()).await.is_pending() {
                timer.start(&clock);
                carried.await
            }
        }
        Admission::Forbidden { cacheable } => {
            refuse(respond, answer(StatusCode::FORBIDDEN, cacheable))
        }
        Admission::Unreachable => refuse(respond, status(StatusCode::SERVICE_UNAVAILABLE)),
        Admission::Unauthorized => unauthorized(respond),
    }
}
