//! The debug socket server: owns the socket file (taking over a stale one, refusing a live one,
//! mode 0600 before it listens, removed on drop) and maps HTTP requests to [`Backend`] calls.
//! Nothing a client sends can panic the server or stop it serving other connections.

use std::{
    convert::Infallible,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;

use super::api::{ApiError, Backend, ExplainQuery, VerdictFilter};

/// Largest request body accepted (none of the routes needs one; the limit bounds what a client
/// can make the server buffer).
pub const MAX_BODY: usize = 64 * 1024;
/// A client must send its request headers (and body) within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this many request timeouts (a backstop for clients that
/// trickle a body or never read the answer; `latch debug` makes one request per connection).
const CONNECTION_LIFETIME_FACTOR: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error("creating the debug socket directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("another agent is serving the debug socket at {}", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("checking the existing debug socket {}: {source}", path.display())]
    Probe { path: PathBuf, source: io::Error },
    #[error("removing the stale debug socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("binding the debug socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// A bound, listening debug socket; [`DebugServer::serve`] answers on it.
#[derive(Debug)]
pub struct DebugServer {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so drop only removes our own.
    file_id: (u64, u64),
    request_timeout: Duration,
}

impl DebugServer {
    /// Bind the socket at `path` with mode 0600, creating its directory (0700) if missing. A
    /// socket left behind by a dead agent is replaced; a live one is an error, and so is any
    /// other kind of file. Needs no async runtime.
    pub fn bind(path: &Path) -> Result<Self, DebugError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| DebugError::CreateDir {
                    path: parent.to_owned(),
                    source,
                })?;
        }
        remove_if_stale(path)?;
        let bind_err = |source| DebugError::Bind {
            path: path.to_owned(),
            source,
        };
        // bind, chmod, then listen: no client can connect while the mode is still the umask's.
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(bind_err)?;
        socket
            .bind(&socket2::SockAddr::unix(path).map_err(bind_err)?)
            .map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        socket.listen(128).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        socket.set_cloexec(true).map_err(bind_err)?;
        tracing::info!(socket = %path.display(), "debug socket listening");
        Ok(Self {
            listener: socket.into(),
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// How long a client may take to send a request's headers, and then its body (default
    /// [`REQUEST_TIMEOUT`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve until this future is dropped (or its task aborted); the socket file goes with it.
    /// Each connection runs in its own task.
    pub async fn serve(self, backend: Arc<dyn Backend>) -> io::Result<()> {
        let listener = tokio::net::UnixListener::from_std(self.listener.try_clone()?)?;
        let timeout = self.request_timeout;
        let mut backoff =
            crate::accept::Backoff::new(format_args!("debug socket {}", self.path.display()));
        loop {
            let (stream, _) = backoff.next(|| listener.accept()).await;
            let backend = backend.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let backend = backend.clone();
                    async move { Ok::<_, Infallible>(handle(req, backend, timeout).await) }
                });
                // A client that half-closes after its request still gets the answer.
                let connection = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(timeout * CONNECTION_LIFETIME_FACTOR, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "debug connection ended with an error");
                    }
                    Err(_) => tracing::debug!("debug connection cut off after its time limit"),
                }
            });
        }
    }
}

impl Drop for DebugServer {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file_id)
            .unwrap_or(false);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "removing the debug socket");
        }
    }
}

/// Remove a socket file nobody answers on; refuse a live one or a non-socket.
fn remove_if_stale(path: &Path) -> Result<(), DebugError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DebugError::Probe {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(DebugError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(DebugError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "replacing a stale debug socket");
            std::fs::remove_file(path).map_err(|source| DebugError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(DebugError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, body: &impl Serialize) -> Reply {
    let mut bytes = serde_json::to_vec_pretty(body)
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the response: {e}\"}}").into_bytes());
    bytes.push(b'\n');
    let mut reply = Response::new(Full::new(Bytes::from(bytes)));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

fn ok(body: impl Serialize) -> Reply {
    json(StatusCode::OK, &body)
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(
        status,
        &ApiError {
            error: message.into(),
        },
    )
}

/// The routes and the method each takes.
const ROUTES: [(&str, Method); 10] = [
    ("/v1/status", Method::GET),
    ("/v1/workloads", Method::GET),
    ("/v1/policies", Method::GET),
    ("/v1/verdicts", Method::GET),
    ("/v1/certs", Method::GET),
    ("/v1/connections", Method::GET),
    ("/v1/stats", Method::GET),
    ("/v1/explain", Method::GET),
    ("/v1/verdicts/flush", Method::POST),
    ("/v1/reload", Method::POST),
];

/// Run a synchronous backend call on a blocking thread; a panic in it answers 500.
async fn blocking<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    call: impl FnOnce(&dyn Backend) -> T + Send + 'static,
) -> Result<T, Reply> {
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || call(backend.as_ref()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "debug backend call failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the agent failed to answer",
            )
        })
}

/// End the connection after this answer (the rest of the request body is not worth reading).
fn closing(mut reply: Reply) -> Reply {
    reply
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    reply
}

/// Read (and discard) the request body, at most [`MAX_BODY`] bytes.
async fn drain_body(req: Request<Incoming>, timeout: Duration) -> Result<(), Reply> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY} bytes"),
        ))
    };
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let collected =
        tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect()).await;
    match collected {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(closing(error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        ))),
    }
}

async fn handle(req: Request<Incoming>, backend: Arc<dyn Backend>, timeout: Duration) -> Reply {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let reply = route(req, &backend, timeout)
        .await
        .unwrap_or_else(|reply| reply);
    tracing::debug!(%method, %path, status = reply.status().as_u16(), "debug request");
    reply
}

async fn route(
    req: Request<Incoming>,
    backend: &Arc<dyn Backend>,
    timeout: Duration,
) -> Result<Reply, Reply> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let Some((_, allowed)) = ROUTES.iter().find(|(p, _)| *p == path) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}"),
        ));
    };
    if req.method() != allowed {
        let mut reply = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {allowed}, not {}", req.method()),
        );
        reply
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed.as_str()));
        return Err(reply);
    }
    drain_body(req, timeout).await?;
    let bad_query = |e: super::query::QueryError| error(StatusCode::BAD_REQUEST, e.to_string());
    let internal = |e: String| error(StatusCode::INTERNAL_SERVER_ERROR, e);
    Ok(match path.as_str() {
        "/v1/status" => ok(blocking(backend, |b| b.status()).await?.map_err(internal)?),
        "/v1/workloads" => ok(blocking(backend, |b| b.workloads()).await?),
        "/v1/policies" => ok(blocking(backend, |b| b.policies()).await?),
        "/v1/verdicts" => {
            let filter = VerdictFilter::from_query(&query).map_err(bad_query)?;
            ok(blocking(backend, move |b| b.verdicts(&filter))
                .await?
                .map_err(internal)?)
        }
        "/v1/certs" => ok(blocking(backend, |b| b.certs()).await?),
        "/v1/connections" => ok(blocking(backend, |b| b.connections()).await?),
        "/v1/stats" => ok(blocking(backend, |b| b.stats()).await?.map_err(internal)?),
        "/v1/explain" => {
            let query = ExplainQuery::from_query(&query).map_err(bad_query)?;
            ok(blocking(backend, move |b| b.explain(&query))
                .await?
                .map_err(|e| error(StatusCode::BAD_REQUEST, e))?)
        }
        "/v1/verdicts/flush" => {
            let filter = VerdictFilter::from_query(&query).map_err(bad_query)?;
            ok(blocking(backend, move |b| b.flush(&filter))
                .await?
                .map_err(internal)?)
        }
        "/v1/reload" => {
            let result = backend.reload().await;
            let status = if result.ok {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            json(status, &result)
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    })
}

#[cfg(test)]
mod tests;
