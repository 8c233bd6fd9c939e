//! HBONE over real sockets on loopback with real TLS: bytes and half-close through a tunnel,
//! pooling (one HTTP/2 connection for many streams), 403 and 503 answers, a server with the
//! wrong identity refused by the client, and the server's limits: a client that does not
//! complete its handshakes in time is disconnected, oversized header lists are refused. The
//! client's keepalive, its respect of the server's stream limit, its per-pod connections to a
//! server that is not Latch's, and a server's drain.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    Admission, BoxFuture, CACHEABLE_HEADER, Caller, Dial, Drain, EARLY_DATA, Inbound, Keepalive,
    PoolKey, TunnelClient, TunnelError, accept_connection,
    pool::{SPREAD_AT, max_connections},
};
use crate::{
    identity::ca::{DevCa, init},
    tls::{client_config, server_config},
    tunnel::splice::{
        Transferred,
        tests::{pair, splice},
    },
};

const TD: &str = "cluster.local";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
const HOUR: Duration = Duration::from_secs(3600);

struct TestInbound {
    allow: bool,
    /// Never answer (a destination agent that is stuck).
    stuck: std::sync::atomic::AtomicBool,
    admitted: Mutex<Vec<(String, SocketAddr)>>,
}

impl Inbound for TestInbound {
    fn admit(self: Arc<Self>, caller: Caller, target: SocketAddr) -> BoxFuture<Admission> {
        assert!(
            caller.not_after > SystemTime::now(),
            "the client certificate's NotAfter is passed on"
        );
        if self.stuck.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        if !self.allow {
            return Box::pin(async { Admission::Forbidden { cacheable: true } });
        }
        let admitted = self
            .admitted
            .lock()
            .map(|mut a| a.push((caller.identity.to_string(), target)));
        assert!(admitted.is_ok());
        Box::pin(async move {
            match TcpStream::connect(target).await {
                Ok(app) => Admission::Admit {
                    cacheable: true,
                    carry: Box::new(move |stream| {
                        Box::pin(async move {
                            let _ = splice(stream, app).await;
                        })
                    }),
                },
                Err(_) => Admission::Unreachable,
            }
        })
    }
}

struct Fixture {
    ca: DevCa,
    endpoint: SocketAddr,
    app: SocketAddr,
    tcp_accepts: Arc<AtomicUsize>,
    inbound: Arc<TestInbound>,
    /// The server's connections count in it (not in the process's).
    drain: Drain,
}

async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });
    addr
}

async fn fixture(name: &str, allow: bool, server_id: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("latch-hbone-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cert, key) = init(&dir).expect("CA");
    let ca = DevCa::load(&cert, &key).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    let server_svid = ca.mint(server_id, HOUR).expect("server svid");
    let tls =
        server_config(&server_svid, vec![ca.certificate().clone()], TD).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tunnel");
    let endpoint = listener.local_addr().expect("addr");
    let tcp_accepts = Arc::new(AtomicUsize::new(0));
    let inbound = Arc::new(TestInbound {
        allow,
        stuck: false.into(),
        admitted: Mutex::new(Vec::new()),
    });
    let drain = Drain::new();
    {
        let tcp_accepts = tcp_accepts.clone();
        let inbound: Arc<dyn Inbound> = inbound.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tcp_accepts.fetch_add(1, Ordering::SeqCst);
                let (tls, inbound, drain) = (tls.clone(), inbound.clone(), drain.clone());
                tokio::spawn(async move {
                    if let Ok(connection) = accept_connection(tcp, tls, HOUR).await {
                        let _ = connection.draining_with(drain).serve(inbound).await;
                    }
                });
            }
        });
    }
    Fixture {
        ca,
        endpoint,
        app: echo_app().await,
        tcp_accepts,
        inbound,
        drain,
    }
}

fn dialer(f: &Fixture, expected: &str) -> impl FnOnce() -> Dial + use<> {
    dialer_to(f, expected, f.endpoint)
}

/// As [`dialer`], to another tunnel endpoint.
fn dialer_to(f: &Fixture, expected: &str, endpoint: SocketAddr) -> impl FnOnce() -> Dial + use<> {
    let svid = f.ca.mint(FRONTEND, HOUR).expect("client svid");
    let tls = client_config(&svid, vec![f.ca.certificate().clone()], TD, expected)
        .expect("client config");
    let client_not_after = svid.not_after;
    move || Dial {
        tcp: Box::pin(TcpStream::connect(endpoint)),
        tls: Ok(tls),
        client_not_after,
    }
}

fn key(f: &Fixture) -> PoolKey {
    PoolKey {
        src: crate::identity::SpiffeId::parse(FRONTEND).expect("id"),
        dst: crate::identity::SpiffeId::parse(PAYMENT).expect("id"),
        endpoint: f.endpoint,
        trust: 1,
    }
}

/// An application's connection as the source agent holds it: (application side, captured side).
async fn captured_connection() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    pair(&listener).await
}

/// Tunnel `captured` to `app` (what it already holds goes out with the `CONNECT`) and relay it.
async fn tunnel_captured(
    f: &Fixture,
    app: SocketAddr,
    captured: TcpStream,
) -> tokio::task::JoinHandle<std::io::Result<Transferred>> {
    let opened = TunnelClient::new()
        .open(&key(f), app, None, dialer(f, PAYMENT), Some(&captured))
        .await
        .expect("tunnel");
    tokio::spawn(splice(opened.stream.into_remote(), captured))
}

#[tokio::test]
async fn bytes_and_half_close_cross_the_tunnel_and_connections_are_pooled() {
    let f = fixture("pool", true, PAYMENT).await;
    let client = TunnelClient::new();
    for (i, payload) in ["first", "second", "third"].iter().enumerate() {
        let mut opened = client
            .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
            .await
            .expect("tunnel");
        assert_eq!(opened.new_connection, i == 0, "only the first stream dials");
        assert!(
            opened.cacheable,
            "the server's cacheable answer reaches the client"
        );
        assert!(opened.proof_not_after > SystemTime::now());
        opened
            .stream
            .write_all(payload.as_bytes())
            .await
            .expect("write");
        opened.stream.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        opened.stream.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, payload.as_bytes());
    }
    assert_eq!(
        f.tcp_accepts.load(Ordering::SeqCst),
        1,
        "one TCP+TLS connection carried all streams"
    );
    assert_eq!(client.pooled_connections(), 1);
    let admitted = f.inbound.admitted.lock().expect("lock").clone();
    assert_eq!(
        admitted,
        vec![(FRONTEND.to_owned(), f.app); 3],
        "the server saw the client's verified identity"
    );
}

#[tokio::test]
async fn what_the_source_wrote_and_its_half_close_go_out_before_the_answer() {
    let f = fixture("early", true, PAYMENT).await;
    let (mut application, captured) = captured_connection().await;
    application
        .write_all(b"request written at once")
        .await
        .expect("write");
    application.shutdown().await.expect("half-close");
    captured.readable().await.expect("the request is waiting");

    let relay = tunnel_captured(&f, f.app, captured).await;
    let mut back = Vec::new();
    application
        .read_to_end(&mut back)
        .await
        .expect("the echo and its end come back");
    assert_eq!(
        back, b"request written at once",
        "the echo app answers only after EOF: the early END_STREAM arrived"
    );
    let moved = relay.await.expect("join").expect("relay");
    assert_eq!(
        moved.b_to_a, 0,
        "the relay found nothing more from the source (sent early, once)"
    );
}

#[tokio::test]
async fn more_than_the_early_data_limit_arrives_whole_and_in_order() {
    let f = fixture("early-bulk", true, PAYMENT).await;
    let (application, captured) = captured_connection().await;
    let request: Vec<u8> = (0..3 * EARLY_DATA + 123).map(|i| (i % 251) as u8).collect();
    let (mut app_read, mut app_write) = application.into_split();
    let writer = {
        let request = request.clone();
        tokio::spawn(async move {
            app_write.write_all(&request).await.expect("write");
            app_write.shutdown().await.expect("half-close");
        })
    };
    captured.readable().await.expect("the request is arriving");

    let relay = tunnel_captured(&f, f.app, captured).await;
    let mut back = Vec::new();
    app_read.read_to_end(&mut back).await.expect("the echo");
    writer.await.expect("writer");
    assert!(back == request, "echo of {} bytes differs", back.len());
    relay.await.expect("join").expect("relay");
}

#[tokio::test]
async fn an_application_that_resets_resets_the_source_connection() {
    let f = fixture("reset", true, PAYMENT).await;
    let resetting = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = resetting.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((mut s, _)) = resetting.accept().await {
            let mut request = [0u8; 5];
            if s.read_exact(&mut request).await.is_ok() {
                crate::tunnel::chunk::reset(&s);
            }
        }
    });
    let (mut application, captured) = captured_connection().await;
    application.write_all(b"hello").await.expect("write");

    let relay = tunnel_captured(&f, app, captured).await;
    let mut buf = [0u8; 8];
    let read = application.read(&mut buf).await;
    assert_eq!(
        read.expect_err("a reset, not an end of stream").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    relay
        .await
        .expect("join")
        .expect_err("the relay ends in the stream's reset");
}

#[tokio::test]
async fn a_pooled_connection_that_stops_answering_times_out_and_leaves_the_pool() {
    let f = fixture("stuck", true, PAYMENT).await;
    // The limit is what is under test, not a wait for something else.
    let client = TunnelClient::new().with_open_timeout(Duration::from_millis(300));
    let opened = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .expect("tunnel");
    drop(opened);
    assert_eq!(client.pooled_connections(), 1);

    f.inbound.stuck.store(true, Ordering::SeqCst);
    let err = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .err()
        .expect("no answer");
    assert!(matches!(err, TunnelError::Timeout { .. }), "{err}");
    assert_eq!(
        client.pooled_connections(),
        0,
        "the silent connection left the pool"
    );

    f.inbound.stuck.store(false, Ordering::SeqCst);
    let opened = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .expect("tunnel again");
    assert!(opened.new_connection, "a new connection was dialled");
    assert_eq!(f.tcp_accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_policy_deny_is_403() {
    let f = fixture("deny", false, PAYMENT).await;
    let err = TunnelClient::new()
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .err()
        .expect("denied");
    assert!(err.is_denied(), "{err}");
    assert!(
        matches!(
            err,
            TunnelError::Refused {
                cacheable: true,
                ..
            }
        ),
        "the refusal says it may be cached: {err}"
    );
}

#[tokio::test]
async fn an_unreachable_application_is_503() {
    let f = fixture("unreachable", true, PAYMENT).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gone = closed.local_addr().expect("addr");
    drop(closed);
    let err = TunnelClient::new()
        .open(&key(&f), gone, None, dialer(&f, PAYMENT), None)
        .await
        .err()
        .expect("503");
    assert!(
        matches!(err, TunnelError::Refused { status, .. } if status == hyper::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let f = fixture("impostor", true, "spiffe://cluster.local/ns/prod/sa/ledger").await;
    let client = TunnelClient::new();
    let err = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, TunnelError::Tls { .. }), "{err}");
    assert_eq!(
        client.pooled_connections(),
        0,
        "nothing pooled for a failed handshake"
    );
    assert!(f.inbound.admitted.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_busy_pair_spreads_over_connections_up_to_one_per_cpu_and_shrinks_back() {
    let f = fixture("spread", true, PAYMENT).await;
    let client = TunnelClient::new();
    let mut open = Vec::new();
    for _ in 0..=SPREAD_AT {
        open.push(
            client
                .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
                .await
                .expect("tunnel"),
        );
    }
    let expected = max_connections().min(2);
    assert_eq!(
        client.pooled_connections(),
        expected,
        "{} streams at once use {expected} connection(s)",
        SPREAD_AT + 1
    );
    drop(open);
    assert_eq!(
        client.pooled_connections(),
        1,
        "once idle, the burst's extra connections leave the pool"
    );
    let again = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .expect("tunnel");
    assert!(
        !again.new_connection,
        "the idle pooled connection is reused"
    );
}

#[tokio::test]
async fn an_application_that_says_nothing_is_still_answered() {
    let f = fixture("silent", true, PAYMENT).await;
    // Accepts and holds its connections without a byte or a close.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let silent = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    // The 200 is held back for the application's first bytes only until its timer runs out;
    // the test's own limit is far beyond that.
    let opened = tokio::time::timeout(
        Duration::from_secs(10),
        TunnelClient::new().open(&key(&f), silent, None, dialer(&f, PAYMENT), None),
    )
    .await
    .expect("answered without the application's bytes")
    .expect("tunnel");
    assert!(opened.cacheable, "the held-back answer is the admission's");
    held.abort();
}

#[tokio::test]
async fn a_client_that_does_not_complete_its_handshakes_in_time_is_disconnected() {
    let f = fixture("slow-handshake", true, PAYMENT).await;
    let server_svid = f.ca.mint(PAYMENT, HOUR).expect("server svid");
    let tls = server_config(&server_svid, vec![f.ca.certificate().clone()], TD).expect("tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            let handshaken = accept_connection(tcp, tls.clone(), Duration::from_millis(200)).await;
            results.push(handshaken.err().map(|e| e.kind()));
        }
        results
    });
    // One connection that never says a word, one that stops in the middle of its ClientHello.
    let mut silent = TcpStream::connect(endpoint).await.expect("connect");
    let mut stalled = TcpStream::connect(endpoint).await.expect("connect");
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    for client in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        // The server closes it: end of stream, or a reset.
        let closed = loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue,
            }
        };
        assert!(closed);
    }
    let results = server.await.expect("server task");
    assert_eq!(
        results,
        [Some(std::io::ErrorKind::TimedOut); 2],
        "both handshakes timed out"
    );
}

#[tokio::test]
async fn a_connect_with_an_oversized_header_list_is_refused() {
    let f = fixture("big-headers", true, PAYMENT).await;
    let svid = f.ca.mint(FRONTEND, HOUR).expect("client svid");
    let tls =
        client_config(&svid, vec![f.ca.certificate().clone()], TD, PAYMENT).expect("client config");
    let tcp = TcpStream::connect(f.endpoint).await.expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(f.endpoint.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (sender, connection) = h2::client::handshake(tls).await.expect("HTTP/2");
    tokio::spawn(connection);
    let mut sender = sender.ready().await.expect("ready");
    let request = |padding: usize| {
        hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(f.app.to_string())
            .header("x-padding", "a".repeat(padding))
            .body(())
            .expect("request")
    };
    let (response, _send) = sender.send_request(request(32 * 1024), true).expect("send");
    let response = response.await.expect("answered");
    assert_eq!(
        response.status(),
        hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert!(
        f.inbound.admitted.lock().expect("lock").is_empty(),
        "never reaches the decision"
    );
    // The connection itself is still good for a request of ordinary size.
    let mut sender = sender.ready().await.expect("ready");
    let (response, _send) = sender.send_request(request(100), true).expect("send");
    assert_eq!(
        response.await.expect("answered").status(),
        hyper::StatusCode::OK
    );
}

/// What a test HBONE server starts from: payment's TLS config (an SVID from `ca`), a listener on
/// loopback, its address, and a connection count (and a handle to count with).
struct TestServer {
    tls: Arc<rustls::ServerConfig>,
    listener: TcpListener,
    endpoint: SocketAddr,
    connections: Arc<AtomicUsize>,
    counted: Arc<AtomicUsize>,
}

async fn test_server(ca: &DevCa) -> TestServer {
    let svid = ca.mint(PAYMENT, HOUR).expect("server svid");
    let tls = server_config(&svid, vec![ca.certificate().clone()], TD).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    TestServer {
        tls,
        listener,
        endpoint,
        counted: connections.clone(),
        connections,
    }
}

/// A server that drains as ztunnel does: on its first connection it answers the first CONNECT
/// with `200`, then sends GOAWAY (no new streams; open ones go on) and `bye` on that stream,
/// which stays open. Later connections answer `200` and `hello`. Counts its TCP connections.
async fn draining_server(ca: &DevCa) -> (SocketAddr, Arc<AtomicUsize>) {
    let TestServer {
        tls,
        listener,
        endpoint,
        connections,
        counted,
    } = test_server(ca).await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            let tls = tls.clone();
            tokio::spawn(async move {
                let (tls, _) = crate::tls::handshake::accept(tls, tcp).await.expect("tls");
                let mut h2 = h2::server::handshake(tls).await.expect("h2");
                let mut held = Vec::new();
                while let Some(Ok((_, mut respond))) = h2.accept().await {
                    let mut body = respond
                        .send_response(hyper::Response::new(()), false)
                        .expect("200");
                    if first {
                        h2.graceful_shutdown();
                        body.send_data(bytes::Bytes::from_static(b"bye"), false)
                            .expect("bye");
                    } else {
                        body.send_data(bytes::Bytes::from_static(b"hello"), false)
                            .expect("hello");
                    }
                    held.push(body);
                }
            });
        }
    });
    (endpoint, connections)
}

#[tokio::test]
async fn a_draining_server_gets_no_new_streams_and_the_next_tunnel_dials_anew() {
    let f = fixture("goaway", true, PAYMENT).await;
    let (endpoint, connections) = draining_server(&f.ca).await;
    let key = PoolKey {
        endpoint,
        ..key(&f)
    };
    let client = TunnelClient::new();
    let mut held = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, endpoint), None)
        .await
        .expect("first tunnel");
    // `bye` comes after the GOAWAY on the same connection: once it is read, the client has
    // seen the GOAWAY.
    let mut bye = [0u8; 3];
    held.stream.read_exact(&mut bye).await.expect("bye");
    assert_eq!(&bye, b"bye");

    let mut next = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, endpoint), None)
        .await
        .expect("the next tunnel opens on a new connection");
    assert!(next.new_connection);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    let mut hello = [0u8; 5];
    next.stream.read_exact(&mut hello).await.expect("hello");
    assert_eq!(&hello, b"hello");
    assert_eq!(
        client.pooled_connections(),
        1,
        "the draining connection left the pool"
    );
    // The draining connection still carries the stream it had.
    held.stream.write_all(b"still here").await.expect("write");
}

/// A TCP relay from one client to `to` that stops passing the server's bytes on (the server's
/// PING answers among them) once `freeze` is notified; `closed` fires when the client closes
/// its side.
async fn freezing_relay(
    to: SocketAddr,
) -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let freeze = Arc::new(tokio::sync::Notify::new());
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let frozen = freeze.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept");
        let server = TcpStream::connect(to).await.expect("connect");
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let upstream = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = closed_tx.send(());
            server_write
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                () = frozen.notified() => break,
                read = server_read.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        // Hold both sockets open, silent, until the client has gone.
        let _held = (server_read, client_write, upstream.await);
    });
    (addr, freeze, closed)
}

#[tokio::test]
async fn a_connection_whose_ping_goes_unanswered_is_closed_and_the_next_tunnel_dials_anew() {
    let f = fixture("keepalive", true, PAYMENT).await;
    let (relay, freeze, closed) = freezing_relay(f.endpoint).await;
    let key = PoolKey {
        endpoint: relay,
        ..key(&f)
    };
    // Frequent PINGs, and a timeout no answer of a loaded machine's loopback comes near.
    let client = TunnelClient::new().with_keepalive(Keepalive {
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(5),
    });
    let opened = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, relay), None)
        .await
        .expect("tunnel through the relay");
    drop(opened);
    freeze.notify_one();
    // Only the client's keepalive closes it: nothing else would (the bound is the test's).
    tokio::time::timeout(Duration::from_secs(60), closed)
        .await
        .expect("the client closed the connection whose PING went unanswered")
        .expect("relay");
    let next = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, f.endpoint), None)
        .await
        .expect("the next tunnel");
    assert!(
        next.new_connection,
        "the closed connection is not used again"
    );
}

/// A server that is not Latch's: it answers every `CONNECT` `200` (with Latch's cacheable header
/// only while `latch` holds) and holds the stream open, takes at most `max_streams` streams per
/// connection, and counts its TCP connections.
async fn foreign_server(
    ca: &DevCa,
    max_streams: u32,
    latch: Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let TestServer {
        tls,
        listener,
        endpoint,
        connections,
        counted,
    } = test_server(ca).await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (tls, latch) = (tls.clone(), latch.clone());
            tokio::spawn(async move {
                let (tls, _) = crate::tls::handshake::accept(tls, tcp).await.expect("tls");
                let mut h2 = h2::server::Builder::new()
                    .max_concurrent_streams(max_streams)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                    .expect("h2");
                let mut held = Vec::new();
                while let Some(Ok((_, mut respond))) = h2.accept().await {
                    let mut answer = hyper::Response::new(());
                    if latch.load(Ordering::SeqCst) {
                        answer.headers_mut().insert(
                            CACHEABLE_HEADER,
                            hyper::header::HeaderValue::from_static("0"),
                        );
                    }
                    held.push(respond.send_response(answer, false).expect("200"));
                }
            });
        }
    });
    (endpoint, connections)
}

#[tokio::test]
async fn a_server_at_its_stream_limit_gets_another_connection_instead_of_a_wait() {
    let f = fixture("max-streams", true, PAYMENT).await;
    let (endpoint, connections) = foreign_server(&f.ca, 1, Arc::new(true.into())).await;
    let key = PoolKey {
        endpoint,
        ..key(&f)
    };
    let client = TunnelClient::new();
    let first = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, endpoint), None)
        .await
        .expect("first tunnel");
    // The server's SETTINGS came before its answer: its limit of one stream is known now.
    let second = client
        .open(&key, f.app, None, dialer_to(&f, PAYMENT, endpoint), None)
        .await
        .expect("the second tunnel opens while the first is still open");
    assert!(second.new_connection);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    drop((first, second));
}

/// `streams` tunnels opened at once, all held, to a fresh server that takes `max_streams`
/// streams per connection: asserts every one opened, and returns the TCP connections the
/// server accepted.
async fn burst(name: &str, max_streams: u32, streams: usize) -> usize {
    let f = fixture(name, true, PAYMENT).await;
    let (endpoint, connections) = foreign_server(&f.ca, max_streams, Arc::new(true.into())).await;
    let key = PoolKey {
        endpoint,
        ..key(&f)
    };
    let client = TunnelClient::new();
    let opens = (0..streams)
        .map(|_| client.open(&key, f.app, None, dialer_to(&f, PAYMENT, endpoint), None));
    let tunnels = futures::future::join_all(opens).await;
    let failed = tunnels.iter().filter(|t| t.is_err()).count();
    assert_eq!(failed, 0, "every one of {streams} streams opens");
    connections.load(Ordering::SeqCst)
}

/// A burst of streams to a pair with no connection yet: a few dials, not one TLS handshake per
/// stream (a Latch server resets the handshakes beyond `tunnel.maxHandshakesPerSource`, 64, in
/// progress from one source, and each stream of the burst would have been reset).
#[tokio::test]
async fn a_burst_to_a_new_pair_dials_at_most_one_connection_per_cpu() {
    let dialled = burst("burst", 1000, 100).await;
    assert!(
        (1..=max_connections()).contains(&dialled),
        "{dialled} connections dialled for a burst of 100 streams"
    );
}

/// With every connection at its server's stream limit, streams still get connections of
/// their own, as many at once as the pair's bound of dials allows.
#[tokio::test]
async fn streams_beyond_every_connections_limit_each_get_one() {
    assert_eq!(
        burst("all-full", 1, 8).await,
        8,
        "a stream each: the server takes one per connection"
    );
}

#[tokio::test]
async fn source_pods_share_a_connection_only_to_a_server_that_answers_as_latch() {
    let f = fixture("attribution", true, PAYMENT).await;
    let pod = |last: u8| Some(SocketAddr::from(([10, 244, 1, last], 40000)));
    for (latch, expected) in [(false, 2), (true, 1)] {
        let (endpoint, connections) = foreign_server(&f.ca, 100, Arc::new(latch.into())).await;
        let key = PoolKey {
            endpoint,
            ..key(&f)
        };
        let client = TunnelClient::new();
        let mut held = Vec::new();
        for source in [pod(2), pod(3), pod(2)] {
            held.push(
                client
                    .open(&key, f.app, source, dialer_to(&f, PAYMENT, endpoint), None)
                    .await
                    .expect("tunnel"),
            );
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            expected,
            "latch server: {latch}"
        );
        assert_eq!(
            client.pooled_connections(),
            expected,
            "latch server: {latch}"
        );
    }
}

#[tokio::test]
async fn a_draining_server_lets_its_open_stream_finish_then_closes() {
    let f = fixture("drain", true, PAYMENT).await;
    let client = TunnelClient::new().with_drain(Drain::new());
    let mut opened = client
        .open(&key(&f), f.app, None, dialer(&f, PAYMENT), None)
        .await
        .expect("tunnel");
    opened
        .stream
        .write_all(b"during the drain")
        .await
        .expect("write");
    // The echo answers only at the end of its input: the stream stays open until then, so this
    // drain's limit (what is under test) runs out with the connection still counted.
    let drained = f.drain.run(Duration::from_millis(50)).await;
    assert_eq!(
        drained.left, 1,
        "the open stream's connection is waited for"
    );
    opened.stream.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    opened.stream.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"during the drain", "the open stream went on");
    drop(opened);
    // GOAWAY was sent: with its last stream done the server closes the connection, though the
    // client keeps it pooled. Without GOAWAY this would wait for ever.
    let drained = f.drain.run(HOUR).await;
    assert_eq!(drained.left, 0);
}

#[tokio::test]
async fn an_endpoint_that_stops_answering_as_latch_gets_per_pod_connections_again() {
    let f = fixture("unlearn", true, PAYMENT).await;
    let pod = |last: u8| Some(SocketAddr::from(([10, 244, 1, last], 40000)));
    let latch = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (endpoint, connections) = foreign_server(&f.ca, 100, latch.clone()).await;
    let key = PoolKey {
        endpoint,
        ..key(&f)
    };
    let client = TunnelClient::new();
    let mut held = Vec::new();
    for (source, latch_now) in [
        (pod(2), true),
        (pod(3), true),
        // Another server answers on that endpoint from now on (ztunnel in Latch's place).
        (pod(2), false),
        (pod(3), false),
        (pod(2), false),
    ] {
        latch.store(latch_now, Ordering::SeqCst);
        held.push(
            client
                .open(&key, f.app, source, dialer_to(&f, PAYMENT, endpoint), None)
                .await
                .expect("tunnel"),
        );
        if held.len() == 2 {
            assert_eq!(
                connections.load(Ordering::SeqCst),
                1,
                "shared while Latch's"
            );
        }
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "the shared connection left the pool; then each pod dialled its own"
    );
    assert_eq!(client.pooled_connections(), 2);
}
