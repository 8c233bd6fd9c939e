//! HTTP/1.1 enforcement inside a carried connection. When a workload's policy depends on the
//! method, path or host of requests, the agent does not splice bytes blindly: it serves the
//! incoming stream as HTTP/1.1 (hyper), makes every request ready for policy
//! ([`super::request_head`]: its host checked, its path normalised and rewritten; a bad one gets
//! `400`), has the [`Enforcer`] authenticate it (a token that does not verify: `401` and Envoy's
//! body `Jwt verification fails`) and then authorize it, forwards the allowed ones to the
//! application over one upstream connection, and answers the others itself with
//! `403 Forbidden` and Envoy's body `RBAC: access denied`. A stream that is not HTTP/1.1 ends
//! with an error, so a non-HTTP connection that only L7 rules could allow is denied, and a
//! client that does not finish a request head in time is disconnected.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

pub use super::request_head::BadRequest;
use super::request_head::prepare;
use crate::conn::RequestHead;
use crate::policy::normalize::PathNormalization;

/// The answer of [`Enforcer::authenticate`]: `false` refuses the request with `401`.
pub type Authenticated<'a> = futures::future::BoxFuture<'a, bool>;

/// What the HTTP server asks the enforcement point about each request.
pub trait Enforcer: Send + Sync + 'static {
    /// The path normalisation in force for the next request (read per request, so a reload
    /// applies to the next one; whatever it is, the application receives the path judged).
    fn path_normalization(&self) -> PathNormalization;
    /// Authenticate the request before [`Self::authorize`]: check its tokens, set `head.auth`,
    /// and rewrite `request` (and `head.headers` with it) as the application must receive it.
    /// `false` answers `401`. The default authenticates nothing.
    fn authenticate<'a>(
        &'a self,
        head: &'a mut RequestHead,
        request: &'a mut hyper::http::request::Parts,
    ) -> Authenticated<'a> {
        let _ = (head, request);
        Box::pin(std::future::ready(true))
    }
    /// The decision on a request as policy sees it: `true` forwards it.
    fn authorize(&self, head: &RequestHead) -> bool;
    /// A request answered with `400` before policy was asked; `request` is its method and
    /// target as received.
    fn refused(&self, request: &str, why: &BadRequest);
    /// Any request's answer head, `elapsed` after its head arrived (request metrics).
    fn answered(&self, _status: StatusCode, _elapsed: Duration) {}
}

type Body = BoxBody<Bytes, hyper::Error>;

fn forbidden() -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(b"RBAC: access denied\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// `401` with Envoy's body, as Istio answers a request whose JWT does not verify.
fn unauthorized() -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(b"Jwt verification fails"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    headers.insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    r
}

/// `400`, saying why, and the connection closes after it.
fn bad_request(why: &BadRequest) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("Bad Request: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_REQUEST;
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Serve `downstream` as HTTP/1.1 until it closes, forwarding allowed requests to `upstream`
/// with their normalised target. A client that has not sent a complete request head
/// `header_read_timeout` after the connection started or the previous answer was written is
/// disconnected (hyper's timer runs while it waits for a head, so this also bounds how long a
/// kept-alive connection may sit idle).
pub async fn serve<D, U>(
    downstream: D,
    upstream: U,
    enforcer: Arc<dyn Enforcer>,
    header_read_timeout: Duration,
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
        .await
        .map_err(|e| io::Error::other(format!("HTTP/1.1 to the application: {e}")))?;
    let upstream_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP/1.1 connection to the application ended");
        }
    });
    let sender: Arc<Mutex<SendRequest<Incoming>>> = Arc::new(Mutex::new(sender));
    let timing = enforcer.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        let enforcer = enforcer.clone();
        async move {
            let mut head = match prepare(&mut req, enforcer.path_normalization()) {
                Ok(head) => head,
                Err(why) => {
                    enforcer.refused(&format!("{} {}", req.method(), req.uri()), &why);
                    return Ok::<_, std::convert::Infallible>(bad_request(&why));
                }
            };
            let (mut parts, body) = req.into_parts();
            if !enforcer.authenticate(&mut head, &mut parts).await {
                return Ok(unauthorized());
            }
            let req = Request::from_parts(parts, body);
            if !enforcer.authorize(&head) {
                return Ok(forbidden());
            }
            let mut sender = sender.lock().await;
            if sender.ready().await.is_err() {
                return Ok(bad_gateway());
            }
            Ok(match sender.send_request(req).await {
                Ok(response) => response.map(http_body_util::BodyExt::boxed),
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding a request to the application");
                    bad_gateway()
                }
            })
        }
    });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (started, timing) = (std::time::Instant::now(), timing.clone());
        let answer = hyper::service::Service::call(&service, req);
        async move {
            let answer = answer.await;
            if let Ok(response) = &answer {
                timing.answered(response.status(), started.elapsed());
            }
            answer
        }
    });
    // A client may half-close after its last request and still read the answers.
    let served = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(downstream), service)
        .await;
    upstream_task.abort();
    served.map_err(|e| {
        if e.is_timeout() {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "HTTP/1.1 from the client: no complete request head within {}",
                    humantime::format_duration(header_read_timeout)
                ),
            )
        } else {
            io::Error::other(format!("HTTP/1.1 from the client: {e}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    /// An application that answers every request with its method, target and host.
    async fn app() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(hyper::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or_default();
                        let body = format!("{} {} host={host}", req.method(), req.uri());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Allows `POST /v1/pay` only, normalising with `mode`, and remembers what it refused.
    struct OnlyPostPay {
        mode: PathNormalization,
        refused: std::sync::Mutex<Vec<String>>,
    }

    impl Enforcer for OnlyPostPay {
        fn path_normalization(&self) -> PathNormalization {
            self.mode
        }
        fn authorize(&self, h: &RequestHead) -> bool {
            h.method == "POST" && h.path == "/v1/pay"
        }
        fn refused(&self, request: &str, why: &BadRequest) {
            self.refused
                .lock()
                .expect("lock")
                .push(format!("{request}: {why}"));
        }
    }

    fn only_post_pay() -> Arc<OnlyPostPay> {
        Arc::new(OnlyPostPay {
            mode: PathNormalization::Base,
            refused: Default::default(),
        })
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn exchange(enforcer: Arc<OnlyPostPay>, raw: &[u8]) -> (String, io::Result<()>) {
        let app = app().await;
        let (mut client, proxied) = tokio::io::duplex(64 * 1024);
        let upstream = TcpStream::connect(app).await.expect("connect app");
        let proxy = tokio::spawn(serve(proxied, upstream, enforcer, TIMEOUT));
        client.write_all(raw).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        let result = proxy.await.expect("join");
        (String::from_utf8_lossy(&out).into_owned(), result)
    }

    /// The status codes in `out` (bodies have no trailing newline, so status lines are found
    /// anywhere).
    fn statuses(out: &str) -> Vec<&str> {
        out.match_indices("HTTP/1.1 ")
            .map(|(i, _)| &out[i + 9..i + 12])
            .collect()
    }

    #[tokio::test]
    async fn forwards_allowed_and_refuses_denied_requests_on_one_connection() {
        let (out, result) = exchange(
            only_post_pay(),
            b"POST /v1/pay HTTP/1.1\r\nHost: payment:8080\r\nContent-Length: 2\r\n\r\nok\
              GET /admin HTTP/1.1\r\nHost: payment\r\n\r\n\
              POST /v1/pay?x=1 HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        result.expect("served");
        assert_eq!(statuses(&out), ["200", "403", "200"], "{out}");
        assert!(out.contains("POST /v1/pay host=payment:8080"), "{out}");
        assert!(out.contains("RBAC: access denied"), "{out}");
    }

    #[tokio::test]
    async fn policy_and_application_see_the_same_normalised_request() {
        let (out, result) = exchange(
            only_post_pay(),
            b"POST /v1/x/../%70ay?a=/../b HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n\
              POST /v1/./pay/.. HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n\
              POST http://payment:8080/v1/pay HTTP/1.1\r\nHost: other\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        result.expect("served");
        assert_eq!(statuses(&out), ["200", "403", "200"], "{out}");
        assert!(out.contains("POST /v1/pay?a=/../b host=payment"), "{out}");
        assert!(out.contains("POST /v1/pay host=payment:8080"), "{out}");
    }

    #[tokio::test]
    async fn a_bad_request_gets_400_and_ends_the_connection() {
        for raw in [
            &b"POST /v1/%zz HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n"[..],
            b"POST /v1/pay HTTP/1.1\r\nHost: payment\r\nHost: other\r\nContent-Length: 0\r\n\r\n",
        ] {
            let enforcer = only_post_pay();
            let mut pipelined = raw.to_vec();
            pipelined.extend_from_slice(
                b"POST /v1/pay HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n",
            );
            let (out, result) = exchange(enforcer.clone(), &pipelined).await;
            result.expect("served");
            assert_eq!(statuses(&out), ["400"], "{out}");
            assert!(out.contains("Bad Request: "), "{out}");
            let refused = enforcer.refused.lock().expect("lock").clone();
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert!(refused[0].starts_with("POST /v1/"), "{refused:?}");
        }
    }

    #[tokio::test]
    async fn a_request_head_not_finished_in_time_ends_the_connection() {
        let app = app().await;
        let (mut client, proxied) = tokio::io::duplex(64 * 1024);
        let upstream = TcpStream::connect(app).await.expect("connect app");
        let proxy = tokio::spawn(serve(
            proxied,
            upstream,
            only_post_pay(),
            Duration::from_millis(50),
        ));
        // Never finished, never half-closed: only the timeout can end it.
        client
            .write_all(b"POST /v1/pay HTTP/1.1\r\nHost: pay")
            .await
            .expect("write");
        let err = proxy.await.expect("join").expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string()
                .contains("no complete request head within 50ms"),
            "{err}"
        );
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        assert!(out.is_empty(), "nothing answered: {out:?}");
    }

    /// Refuses authentication of requests with `x-token: bad`, and strips `x-token` from the
    /// others (what the application receives is what authentication left).
    struct TokenGate;

    impl Enforcer for TokenGate {
        fn path_normalization(&self) -> PathNormalization {
            PathNormalization::Base
        }
        fn authenticate<'a>(
            &'a self,
            head: &'a mut RequestHead,
            request: &'a mut hyper::http::request::Parts,
        ) -> Authenticated<'a> {
            let bad = request.headers.get("x-token").is_some_and(|v| v == "bad");
            request.headers.remove("x-token");
            head.headers = request.headers.clone();
            Box::pin(std::future::ready(!bad))
        }
        fn authorize(&self, h: &RequestHead) -> bool {
            h.headers.get("x-token").is_none()
        }
        fn refused(&self, _: &str, _: &BadRequest) {}
    }

    #[tokio::test]
    async fn a_request_that_fails_authentication_gets_401_and_the_next_is_served() {
        let app = app().await;
        let (mut client, proxied) = tokio::io::duplex(64 * 1024);
        let upstream = TcpStream::connect(app).await.expect("connect app");
        let proxy = tokio::spawn(serve(proxied, upstream, Arc::new(TokenGate), TIMEOUT));
        client
            .write_all(
                b"GET /a HTTP/1.1\r\nHost: payment\r\nx-token: bad\r\n\r\n\
                  GET /b HTTP/1.1\r\nHost: payment\r\nx-token: good\r\n\r\n",
            )
            .await
            .expect("write");
        client.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        proxy.await.expect("join").expect("served");
        let out = String::from_utf8_lossy(&out);
        assert_eq!(statuses(&out), ["401", "200"], "{out}");
        assert!(out.contains("Jwt verification fails"), "{out}");
        assert!(out.contains("www-authenticate: Bearer"), "{out}");
        assert!(out.contains("GET /b host=payment"), "{out}");
    }

    #[tokio::test]
    async fn a_stream_that_is_not_http_is_an_error() {
        let (out, result) =
            exchange(only_post_pay(), b"\x16\x03\x01 not http at all\r\n\r\n").await;
        assert!(result.is_err(), "not HTTP: {out}");
        assert!(!out.contains("200"), "{out}");
    }
}
