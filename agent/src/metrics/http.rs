//! The metrics endpoint: HTTP/1.1 on TCP, `GET /metrics` answers the OpenMetrics text, anything
//! else 404. Encoding runs on a blocking thread because the scrape source reads kernel maps.

use std::{convert::Infallible, io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{CONTENT_TYPE, HeaderValue},
};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::Metrics;

pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("binding the metrics listener on {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Bind `addr` and serve `/metrics` until the future is dropped.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    tracing::info!(%addr, "metrics listening");
    serve_on(listener, metrics).await;
    Ok(())
}

/// Serve `/metrics` on an already bound listener (tests bind port 0).
pub async fn serve_on(listener: tokio::net::TcpListener, metrics: Metrics) {
    serve_http1(listener, "metrics", move |req| handle(req, metrics.clone())).await;
}

/// Serve HTTP/1.1 on `listener` (a node-local endpoint: the metrics, Kubernetes mode's
/// `/ready`), each request answered by `answer`, until the future is dropped; `what` names the
/// endpoint in the log.
pub async fn serve_http1<A, F>(listener: tokio::net::TcpListener, what: &'static str, answer: A)
where
    A: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let local = listener
        .local_addr()
        .map_or_else(|e| format!("unknown address ({e})"), |a| a.to_string());
    let mut backoff = crate::accept::Backoff::new(format_args!("{what} {local}"));
    loop {
        let (stream, _) = backoff.next(|| listener.accept()).await;
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = answer(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(endpoint = what, error = %e, "connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle<B>(req: Request<B>, metrics: Metrics) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    let failure = match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(body)) => return text(StatusCode::OK, CONTENT_TYPE_OPENMETRICS, body),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(error = %failure, "encoding metrics failed");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        "encoding metrics failed\n".into(),
    )
}
