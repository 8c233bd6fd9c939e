//! The HBONE server: [`serve_connection`] accepts a tunnel connection (TLS and the HTTP/2
//! preface within [`HANDSHAKE_TIMEOUT`]) and serves its `CONNECT` streams, each decided by the
//! [`Inbound`]: `200` and the bytes, `403` (policy), `503` (application unreachable), or `401`
//! and `GOAWAY` once what the connection was proven with no longer holds ([`Proof`]) or the agent
//! drains ([`Drain`]). See `docs/tunnel.md` (*HBONE*, *How long a proof holds*).

use std::{
    io,
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::drain::Drain;
use super::protocol::{
    BoxFuture, CACHEABLE_HEADER, CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW,
    TunnelStream, set_tunnel_options,
};
use crate::{
    identity::SpiffeId,
    scheduling::busy_poll::Traffic,
    tls::handshake,
    tunnel::{
        answer::{AnswerClock, PendingAnswer},
        chunk::poll_once,
        forwarded,
        h2stream::H2Stream,
    },
};

/// How long a tunnel client may take to complete TLS and the HTTP/2 preface, unless the config
/// says otherwise (`tunnel.handshakeTimeout`; ztunnel's TLS listener allows 10 s too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunneled connections one HTTP/2 connection may carry at once.
const MAX_STREAMS: u32 = 4096;
/// The longest the server waits, on a timer, for a client certificate to expire before sending
/// `GOAWAY` (tokio's timers reach about two years); a later NotAfter is still checked before each
/// stream.
const EXPIRY_TIMER_MOST: Duration = Duration::from_secs(365 * 24 * 3600);

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
    pub identity: SpiffeId,
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
    /// Counted open in it; `GOAWAY` when it starts.
    drain: Drain,
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
    let (tls, client) = handshake::accept(tls, Traffic::new(tcp)).await?;
    let caller = Caller {
        identity: client.identity,
        address: peer,
        forwarded_for: None,
        not_after: client.peer.not_after,
        not_before: client.peer.not_before,
        trust: 0,
    };
    let chain: Arc<[CertificateDer<'static>]> = client.peer.chain.into();
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
        drain: Drain::node(),
    })
}

impl ServerConnection {
    /// Record that the client was verified with the trust bundle of epoch `trust`.
    pub fn proven_under(mut self, trust: u64) -> Self {
        self.caller.trust = trust;
        self
    }

    /// Count the connection in `drain` instead of [`Drain::node`].
    pub fn draining_with(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Serve the connection's `CONNECT` streams, one per tunneled connection, each decided by
    /// `inbound`, until the client closes it. `GOAWAY` is sent when a stream finds the proof no
    /// longer holds (`401`), when the client's certificate expires, when the trust bundle
    /// changes (see [`Proof`]) and when the drain starts (the agent is stopping).
    pub async fn serve(self, inbound: Arc<dyn Inbound>) -> Result<(), io::Error> {
        let Self {
            mut connection,
            caller,
            chain,
            peer,
            drain,
        } = self;
        let _open = drain.open();
        let mut draining = pin!(drain.started());
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
                () = &mut draining, if !going_away => {
                    tracing::debug!(%peer, source = %caller.identity, "draining; GOAWAY");
                    going_away = true;
                    connection.graceful_shutdown();
                    continue;
                }
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
            crate::scheduling::busy_poll::activity();
            let (request, respond) =
                stream.map_err(|e| io::Error::other(format!("HTTP/2 with {peer}: {e}")))?;
            tokio::spawn(handle_connect(Box::new(Connect {
                request,
                respond,
                caller: caller.clone(),
                inbound: inbound.clone(),
                clock: clock.clone(),
                go_away: go_away.clone(),
            })));
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

/// One `CONNECT` stream and what answering it needs.
struct Connect {
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    caller: Caller,
    inbound: Arc<dyn Inbound>,
    clock: AnswerClock,
    go_away: Arc<tokio::sync::Notify>,
}

/// Answer one `CONNECT` and carry its stream. The answering is boxed and freed before the
/// carrying, and the stream's parts come boxed too: a task is as large as its largest step, and
/// its arguments stay in it, for as long as the connection lives.
async fn handle_connect(connect: Box<Connect>) {
    if let Some(carried) = Box::pin(answer_connect(connect)).await {
        carried.await
    }
}

/// Decide a `CONNECT` and answer it if it is refused; if it is admitted, the relay to the
/// application, polled once (the early data delivered) and with the answer's timer running.
async fn answer_connect(connect: Box<Connect>) -> Option<BoxFuture<()>> {
    let Connect {
        request,
        respond,
        mut caller,
        inbound,
        clock,
        go_away,
    } = *connect;
    let unauthorized = |respond| {
        refuse(respond, status(StatusCode::UNAUTHORIZED));
        go_away.notify_one();
    };
    // What the handshake proved holds only while the client's certificate is valid.
    if !caller.certificate_valid_at(SystemTime::now()) {
        tracing::info!(source = %caller.identity, client = %caller.address, "CONNECT refused: the client certificate the connection was proven with is not valid now");
        unauthorized(respond);
        return None;
    }
    if request.method() != Method::CONNECT {
        refuse(respond, status(StatusCode::METHOD_NOT_ALLOWED));
        return None;
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        refuse(respond, status(StatusCode::BAD_REQUEST));
        return None;
    };
    if let Some(value) = request.headers().get(forwarded::FORWARDED) {
        match forwarded::parse(value) {
            Ok(client) => caller.forwarded_for = Some(client),
            Err(e) => {
                tracing::info!(source = %caller.identity, %target, error = %e, "CONNECT refused");
                refuse(respond, status(StatusCode::BAD_REQUEST));
                return None;
            }
        }
    }
    match inbound.admit(caller, target).await {
        Admission::Admit { cacheable, carry } => {
            // The 200 goes with the application's first bytes (see `answer`).
            let (held, timer) = PendingAnswer::new(respond, answer(StatusCode::OK, cacheable));
            let mut carried = carry(H2Stream::answering(held, request.into_body()));
            // The first poll delivers the early data to the application; then the timer.
            if poll_once(carried.as_mut()).await.is_pending() {
                timer.start(&clock);
                return Some(carried);
            }
        }
        Admission::Forbidden { cacheable } => {
            refuse(respond, answer(StatusCode::FORBIDDEN, cacheable))
        }
        Admission::Unreachable => refuse(respond, status(StatusCode::SERVICE_UNAVAILABLE)),
        Admission::Unauthorized => unauthorized(respond),
    }
    None
}
