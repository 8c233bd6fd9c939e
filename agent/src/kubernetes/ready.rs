//! The readiness endpoint of Kubernetes mode: `GET /ready` on a node-local address answers 200
//! once every watch has synced and the state it describes is in force ([`Readiness`]), 503
//! before; anything else 404. The DaemonSet's readiness probe asks it (`deploy/daemonset.yaml`),
//! so a rolling update moves on to the next node only once this one enforces again.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use super::source::Readiness;

/// Serve `/ready` on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, readiness: Readiness) {
    crate::metrics::http::serve_http1(listener, "readiness", move |req| {
        let response = answer(&req, readiness.get());
        async move { response }
    })
    .await;
}

fn answer<B>(req: &Request<B>, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.uri().path(), ready) {
        ("/ready", true) => (StatusCode::OK, "ready\n"),
        ("/ready", false) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_ready() {
        let req = |path: &str| Request::get(path).body(()).expect("request");
        assert_eq!(
            answer(&req("/ready"), false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(answer(&req("/ready"), true).status(), StatusCode::OK);
        assert_eq!(
            answer(&req("/metrics"), true).status(),
            StatusCode::NOT_FOUND
        );
    }
}
