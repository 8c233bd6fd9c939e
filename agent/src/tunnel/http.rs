//! HTTP/1.1 enforcement inside a carried connection. When a workload's policy depends on the
//! method, path or host of requests, the agent does not splice bytes blindly: it serves the
//! incoming stream as HTTP/1.1 (hyper), asks `authorize` about every request, forwards the
//! allowed ones to the application over one upstream connection, and answers the others itself
//! with `403 Forbidden` and Envoy's body `RBAC: access denied`. A stream that is not HTTP/1.1
//! ends with an error, so a non-HTTP connection that only L7 rules could allow is denied.

use std::{io, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

/// The parts of a request that policy can look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    /// The `Host` header (or the request target's authority), without a port.
    pub host: String,
}

impl RequestHead {
    fn of<B>(req: &Request<B>) -> Self {
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        Self {
            method: req.method().as_str().to_owned(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.path().to_owned())
                .unwrap_or_else(|| "/".to_owned()),
            host: strip_port(&host).to_owned(),
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The per-request decision: `true` forwards the request.
pub type Authorize = Arc<dyn Fn(&RequestHead) -> bool + Send + Sync>;

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

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Serve `downstream` as HTTP/1.1 until it closes, forwarding allowed requests to `upstream`.
pub async fn serve<D, U>(downstream: D, upstream: U, authorize: Authorize) -> io::Result<()>
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
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        let authorize = authorize.clone();
        async move {
            let head = RequestHead::of(&req);
            if !authorize(&head) {
                return Ok::<_, std::convert::Infallible>(forbidden());
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
    // A client may half-close after its last request and still read the answers.
    let served = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(downstream), service)
        .await;
    upstream_task.abort();
    served.map_err(|e| io::Error::other(format!("HTTP/1.1 from the client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    /// An application that answers every request with its method and path.
    async fn app() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("{} {}", req.method(), req.uri().path());
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

    async fn exchange(authorize: Authorize, raw: &[u8]) -> (String, io::Result<()>) {
        let app = app().await;
        let (mut client, proxied) = tokio::io::duplex(64 * 1024);
        let upstream = TcpStream::connect(app).await.expect("connect app");
        let proxy = tokio::spawn(serve(proxied, upstream, authorize));
        client.write_all(raw).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        let result = proxy.await.expect("join");
        (String::from_utf8_lossy(&out).into_owned(), result)
    }

    fn only_post_pay() -> Authorize {
        Arc::new(|h: &RequestHead| h.method == "POST" && h.path == "/v1/pay")
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
        // Bodies have no trailing newline, so find status lines anywhere.
        let statuses: Vec<&str> = out
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &out[i + 9..i + 12])
            .collect();
        assert_eq!(statuses, ["200", "403", "200"], "{out}");
        assert!(out.contains("POST /v1/pay"), "{out}");
        assert!(out.contains("RBAC: access denied"), "{out}");
    }

    #[tokio::test]
    async fn a_stream_that_is_not_http_is_an_error() {
        let (out, result) =
            exchange(only_post_pay(), b"\x16\x03\x01 not http at all\r\n\r\n").await;
        assert!(result.is_err(), "not HTTP: {out}");
        assert!(!out.contains("200"), "{out}");
    }

    #[test]
    fn host_without_port() {
        assert_eq!(strip_port("payment:8080"), "payment");
        assert_eq!(strip_port("payment"), "payment");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
    }
}
