//! The HBONE client: [`TunnelClient::open`] sends a `CONNECT` (with `baggage` and `traceparent`,
//! as ztunnel does) on a pooled connection (dialling one when the pair has none free: TCP from
//! the source pod's netns, TLS, HTTP/2) and sends what the source has already written right
//! behind it, up to [`EARLY_DATA`] bytes, so a request does not wait one round trip for the
//! answer. Every connection PINGs its server ([`Keepalive`]) and closes when a PING goes
//! unanswered. See `docs/tunnel.md` (*HBONE*, *Early data*).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::ResponseFuture};
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    drain::{self, Drain},
    pool::{Active, Pick, Pool, PoolKey, Pooled, Retire, Slot},
    protocol::{
        BAGGAGE_HEADER, BoxFuture, CACHEABLE_HEADER, CONNECTION_WINDOW, EARLY_DATA, MAX_FRAME,
        MAX_HEADER_LIST, PING_INTERVAL, PING_TIMEOUT, STREAM_WINDOW, TRACEPARENT_HEADER,
        TunnelError, TunnelStream, baggage, set_tunnel_options, traceparent,
    },
};
use crate::{
    scheduling::busy_poll::Traffic,
    tls::handshake,
    tunnel::{
        chunk::{take_now, try_take},
        forwarded,
        h2stream::H2Stream,
        splice::Remote,
    },
};

/// How long opening a tunnel may take, dial and answer together. A pooled connection whose
/// `CONNECT` goes unanswered that long leaves the pool (its peer is gone or stuck).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a tunnel endpoint: a TCP connection (made inside the source pod's netns), the
/// TLS client config for the pair, and the NotAfter of the client certificate it presents.
pub struct Dial {
    pub tcp: BoxFuture<io::Result<TcpStream>>,
    pub tls: Result<Arc<rustls::ClientConfig>, String>,
    pub client_not_after: SystemTime,
}

/// A dial [`Pool::pick`] counted, uncounted when it ends however it ends (a timeout drops it):
/// when it fails, or once the first stream on the new connection has its answer, so that the
/// streams waiting for it ([`Pick::Wait`]) find the server's stream limit known (its SETTINGS
/// come before any answer).
struct Dialling {
    pool: Pool,
    slot: Slot,
}

impl Drop for Dialling {
    fn drop(&mut self) {
        self.pool.dialled(&self.slot);
    }
}

/// HTTP/2 keepalive of the client's connections: a PING every `interval` (the first one
/// `interval` after the handshake), and the connection closed when one is not answered within
/// `timeout` (ztunnel's client: 10 s and 20 s). A dead or stuck server's connection leaves the
/// pool instead of taking streams that would wait for [`OPEN_TIMEOUT`].
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

/// A stream whose request has gone out, on the connection it went out on.
struct Started {
    pooled: Pooled,
    active: Active,
    /// How long dialling took, if this stream's connection was dialled for it.
    handshake: Option<Duration>,
    /// The dial, still counted until this stream has its answer.
    dialling: Option<Dialling>,
    response: ResponseFuture,
    send: SendStream<Bytes>,
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
    pub handshake: Option<Duration>,
}

/// A tunnel stream opened by the client; while it lives it counts as active on its pooled
/// connection.
pub struct ClientStream {
    io: TunnelStream,
    _active: Active,
    /// Counts the stream as open for a drain ([`super::drain`]).
    _open: drain::Open,
}

impl ClientStream {
    /// The stream as the far side of a splice, keeping its pool slot while it is carried.
    pub fn into_remote(self) -> Remote {
        Remote::Tunnel {
            stream: self.io,
            keep: Some(Box::new((self._active, self._open))),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The HBONE client with its connection pool.
#[derive(Clone)]
pub struct TunnelClient {
    pool: Pool,
    open_timeout: Duration,
    keepalive: Keepalive,
    drain: Drain,
}

impl Default for TunnelClient {
    fn default() -> Self {
        Self {
            pool: Pool::default(),
            open_timeout: OPEN_TIMEOUT,
            keepalive: Keepalive::default(),
            drain: Drain::node(),
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

    /// The same client with its streams counted in `drain` instead of [`Drain::node`].
    pub fn with_drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    /// The same client with another HTTP/2 keepalive than ztunnel's (see [`Keepalive`]).
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Open a tunnel to `authority` (the original destination) through the endpoint of `key`,
    /// reusing the least busy live pooled connection, or dialling with `dial()` if there is none
    /// or all are busy and the pair may have another. `client` is the source pod's address
    /// (sent as `Forwarded`); unless the endpoint is known to run Latch, connections are not
    /// shared between source pods of other addresses (see [`Slot`]). While the destination
    /// decides, what `source` has already written is sent on the stream (see [`EARLY_DATA`]).
    /// Dialling and the answer together may take [`OPEN_TIMEOUT`]; a pooled connection that did
    /// not answer in time leaves the pool.
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
        let slot = self.pool.slot(key, client.map(|c| c.ip()));
        let baggage = baggage(&key.src);
        let traceparent = traceparent();
        // Built for each connection it is sent on (once, unless a pooled one refuses it).
        let request = || {
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.to_string());
            if let Some(client) = client {
                request = request.header(forwarded::FORWARDED, forwarded::header(client));
            }
            if let Some(baggage) = &baggage {
                request = request.header(BAGGAGE_HEADER, baggage.clone());
            }
            if let Some(traceparent) = &traceparent {
                request = request.header(TRACEPARENT_HEADER, traceparent.clone());
            }
            request
                .body(())
                .map_err(|source| TunnelError::Request { authority, source })
        };
        let started = tokio::time::timeout_at(deadline, self.start_stream(&slot, dial, request))
            .await
            .map_err(|_| timed_out())??;
        let Started {
            pooled,
            active,
            handshake,
            dialling,
            response,
            mut send,
        } = started;
        let exchange = async {
            let (response, source_ended) = match source {
                Some(source) => answer_with_early_data(response, &mut send, source).await?,
                None => (response.await, false),
            };
            Ok::<_, TunnelError>((response, send, source_ended))
        };
        let Ok(exchanged) = tokio::time::timeout_at(deadline, exchange).await else {
            self.pool.forget(&pooled);
            return Err(timed_out());
        };
        // The answer is in (or the exchange failed): the streams waiting for this dial may go.
        drop(dialling);
        let (response, send, source_ended) = exchanged?;
        let response = response.map_err(|source| TunnelError::Http {
            addr: key.endpoint,
            source,
        })?;
        let cacheable = cacheable(response.headers());
        // Latch's server marks every 200 and 403 with its cacheable header; ztunnel's never.
        if matches!(response.status(), StatusCode::OK | StatusCode::FORBIDDEN) {
            let latch = response.headers().contains_key(CACHEABLE_HEADER);
            if !latch && slot.source.is_none() && client.is_some() {
                // A shared connection reached a server that is not (or no longer) Latch's:
                // it would take the next pod's streams for this one's.
                self.pool.forget(&pooled);
            }
            self.pool.learn(key.endpoint, latch);
        }
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
                _open: self.drain.open(),
            },
            proof_not_after: pooled.proof_not_after,
            new_connection: handshake.is_some(),
            cacheable,
            handshake,
        })
    }

    /// Send `request` on a stream of `key`'s pair: on the least busy pooled connection, or on
    /// one dialled with `dial()`. A pooled connection that can no longer open streams (its
    /// server sent GOAWAY, as a draining server does while its open streams finish, or it
    /// failed) leaves the pool and the next is tried, then a new one is dialled: nothing of the
    /// source has been sent yet, so the request goes out once, on a connection that takes it.
    async fn start_stream(
        &self,
        slot: &Slot,
        dial: impl FnOnce() -> Dial,
        request: impl Fn() -> Result<Request<()>, TunnelError>,
    ) -> Result<Started, TunnelError> {
        let send = |pooled: &Pooled, request: Request<()>| {
            let sender = pooled.sender.clone();
            async move { sender.ready().await?.send_request(request, false) }
        };
        let key = &slot.key;
        loop {
            match self.pool.pick(slot) {
                Pick::Use(pooled, active) => match send(&pooled, request()?).await {
                    Ok((response, send)) => {
                        return Ok(Started {
                            pooled,
                            active,
                            handshake: None,
                            dialling: None,
                            response,
                            send,
                        });
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %key.endpoint, error = %e, "a pooled tunnel connection takes no new streams; trying another");
                        self.pool.forget(&pooled);
                    }
                },
                Pick::Wait(dial_ended) => dial_ended.await,
                Pick::Dial => break,
            }
        }
        let started = std::time::Instant::now();
        let dialling = Dialling {
            pool: self.pool.clone(),
            slot: slot.clone(),
        };
        let pooled = self.connect(slot, dial()).await?;
        let active = self.pool.activate(&pooled, slot);
        match send(&pooled, request()?).await {
            Ok((response, send)) => Ok(Started {
                pooled,
                active,
                handshake: Some(started.elapsed()),
                dialling: Some(dialling),
                response,
                send,
            }),
            Err(source) => {
                self.pool.forget(&pooled);
                Err(TunnelError::Http {
                    addr: key.endpoint,
                    source,
                })
            }
        }
    }

    /// Retire the pooled connections of the keys `which` names, given each key and the chain
    /// its server proved: [`Retire::Drain`] takes it out of the pool (open streams finish),
    /// [`Retire::Close`] also ends it at once. Returns how many were taken out.
    pub fn retire(&self, which: impl Fn(&PoolKey, &[CertificateDer<'static>]) -> Retire) -> usize {
        self.pool.retire(which)
    }

    /// Drop every pooled connection whose key matches (identities rotated or revoked).
    pub fn evict_where(&self, pred: impl Fn(&PoolKey) -> bool) {
        self.pool.evict_where(pred)
    }

    /// Number of pooled HTTP/2 connections.
    pub fn pooled_connections(&self) -> usize {
        self.pool.connections()
    }

    /// Dial `slot`'s endpoint (TCP, TLS, HTTP/2) and pool the connection.
    async fn connect(&self, slot: &Slot, dial: Dial) -> Result<Pooled, TunnelError> {
        let addr = slot.key.endpoint;
        let tcp = dial
            .tcp
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        set_tunnel_options(&tcp);
        let config = dial.tls.map_err(|e| TunnelError::Tls {
            addr,
            source: io::Error::other(e),
        })?;
        let (tls, server) = handshake::connect(config, addr.ip(), Traffic::new(tcp))
            .await
            .map_err(|source| TunnelError::Tls { addr, source })?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            // The server never starts streams: a PUSH_PROMISE is a protocol error.
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::Http { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let pings = connection.ping_pong();
        let every = self.keepalive;
        let task = tokio::spawn(async move {
            tokio::select! {
                // The connection first, and no random pick on every wake of this hot task.
                biased;
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %addr, error = %e, "tunnel connection closed");
                    }
                }
                () = keepalive(pings, every) => {
                    tracing::info!(endpoint = %addr, timeout = ?every.timeout, "tunnel connection closed: its server did not answer a PING in time");
                }
            }
            ended.store(true, Ordering::Relaxed);
        });
        let pooled = Pooled::new(
            sender,
            task.abort_handle(),
            closed,
            server,
            dial.client_not_after,
        );
        self.pool.add(slot, pooled.clone());
        Ok(pooled)
    }
}

/// PING the server as `every` says; returns when one goes unanswered. A connection that has
/// ended is left to its own future (its PING fails, and this never returns).
async fn keepalive(pings: Option<h2::PingPong>, every: Keepalive) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every.interval).await;
        match tokio::time::timeout(every.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

fn cacheable(headers: &hyper::http::HeaderMap) -> bool {
    headers
        .get(CACHEABLE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
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
        left: EARLY_DATA,
        ended: false,
    };
    // What the source wrote before it was accepted is taken at once, so that it leaves with the
    // CONNECT: the reactor has not seen the new socket yet, and waiting for it to would send the
    // CONNECT alone.
    while early.wants_more() {
        match early.forward(take_now(source, early.left), send)? {
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
                let read = readable.and_then(|()| try_take(source, early.left));
                if let Forwarded::Failed(e) = early.forward(read, send)? {
                    return Ok((Err(e), early.ended));
                }
            }
        }
    }
}

/// The source's bytes sent before the destination's answer. Each read is a chunk of exactly
/// the bytes read ([`take_now`]), so a connection waiting for its answer, or held open after
/// it, keeps no read buffer.
struct Early {
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
        read: io::Result<Option<Bytes>>,
        send: &mut SendStream<Bytes>,
    ) -> Result<Forwarded, TunnelError> {
        let sent = match read {
            Ok(None) => return Ok(Forwarded::Nothing),
            Ok(Some(chunk)) if chunk.is_empty() => {
                send.send_data(chunk, true).map(|()| self.ended = true)
            }
            Ok(Some(chunk)) => {
                let n = chunk.len();
                send.send_data(chunk, false).map(|()| self.left -= n)
            }
            Err(source) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(TunnelError::Source { source });
            }
        };
        Ok(sent.map_or_else(Forwarded::Failed, |()| Forwarded::Sent))
    }
}
