//! The HTTP side: hyper's HTTP/1.1 server on the caller's listener, one task per connection;
//! each request recorded, authorized (403 `Status`), held while the server is silent, then
//! answered: discovery, GET of one object, lists (`PodList`, ...) and watches — chunked
//! newline-delimited `WatchEvent`s fed from the store's history, with selectors, bookmarks,
//! `timeoutSeconds`, initial events, and 410 Gone for a resourceVersion older than the
//! compaction.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    discovery,
    rbac::{Attributes, Rbac, parse_bool},
    selector::{FieldSelector, LabelSelector},
    store::{Filter, ISTIO_GROUP, Kind, Store, event_for},
};

type Body = BoxBody<Bytes, Infallible>;

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// In arrival order, from 0.
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// The raw query string (percent-encoded as sent).
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    /// What the authorizer saw: verb (`get`, `list`, `watch`, `create`, ...), group, resource...
    pub attrs: Attributes,
    /// Whether the ClusterRole (or the public discovery paths) allowed it.
    pub allowed: bool,
    /// The HTTP status answered (200 for a watch, whatever its events); `None` while unanswered
    /// (held by an outage); 0 when the connection was closed without an answer (unreachable).
    pub status: Option<u16>,
}

impl RequestRecord {
    /// The first value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn verb(&self) -> &str {
        &self.attrs.verb
    }

    pub fn resource(&self) -> &str {
        &self.attrs.resource
    }
}

/// A watch being served now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenWatch {
    /// The [`RequestRecord::seq`] of the request that opened it.
    pub seq: u64,
    pub kind: Kind,
    pub path: String,
    pub params: Vec<(String, String)>,
    /// Events sent so far (initial events, bookmarks and errors included).
    pub events_sent: u64,
}

/// What tests can observe and wait on: every request, and the watches open now.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub requests: Vec<RequestRecord>,
    pub open_watches: BTreeMap<u64, OpenWatch>,
}

/// State shared by the server's tasks and the test's handle.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Bumped after every change of `store` (objects or hooks): watches and held requests wake.
    pub changed: watch::Sender<u64>,
    pub rbac: Rbac,
    pub observed: Mutex<Observed>,
    pub observed_changed: Condvar,
    pub addr: SocketAddr,
}

impl Shared {
    pub fn new(rbac: Rbac, addr: SocketAddr, store: Store) -> Self {
        Self {
            store: Mutex::new(store),
            changed: watch::Sender::new(0),
            rbac,
            observed: Mutex::new(Observed::default()),
            observed_changed: Condvar::new(),
            addr,
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the store (or a hook) and wake every watch.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.store());
        self.changed.send_modify(|n| *n += 1);
        out
    }

    pub fn observe<T>(&self, f: impl FnOnce(&mut Observed) -> T) -> T {
        let out = f(&mut self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        self.observed_changed.notify_all();
        out
    }
}

/// Accept connections on `listener` until `shutdown` fires.
pub async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => panic!("kube_api: adopting the listener: {e}"),
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { handle(shared, req).await }
                    });
                    // A client going away mid-watch is an error here; nothing to do about it.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decode a query string into its pairs.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(
            serde_json::to_vec(body).expect("JSON serializes"),
        ))
        .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A `Status` object, as every error answer and watch `ERROR` event carries.
pub fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn error(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status(code, reason, message, details),
    )
}

fn not_found_path() -> Response<Body> {
    error(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

/// What `handle` fails with while the server is unreachable ([`super::KubeApiServer::go_unavailable`]):
/// hyper then closes the connection without an answer.
#[derive(Debug)]
pub struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the test API server is unreachable")
    }
}

impl std::error::Error for Unreachable {}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Unreachable> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let params = parse_query(&query);
    let attrs = super::rbac::attributes(&method, &path, &params);
    let allowed = shared.rbac.allows(&attrs, &path);
    let seq = shared.observe(|o| {
        let seq = o.requests.len() as u64;
        o.requests.push(RequestRecord {
            seq,
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            params: params.clone(),
            attrs: attrs.clone(),
            allowed,
            status: None,
        });
        seq
    });

    // An outage: hold the request, unanswered, until the server speaks again.
    let mut changed = shared.changed.subscribe();
    loop {
        changed.borrow_and_update();
        if !shared.store().silent {
            break;
        }
        if changed.changed().await.is_err() {
            break;
        }
    }

    if shared.store().unavailable {
        shared.observe(|o| o.requests[seq as usize].status = Some(0));
        return Err(Unreachable);
    }
    let resp = respond(&shared, req, seq, &method, &path, &params, &attrs, allowed);
    let code = resp.status().as_u16();
    shared.observe(|o| o.requests[seq as usize].status = Some(code));
    Ok(resp)
}

/// The answer to a request let through (not held by an outage).
#[allow(clippy::too_many_arguments)]
fn respond(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    seq: u64,
    method: &str,
    path: &str,
    params: &[(String, String)],
    attrs: &Attributes,
    allowed: bool,
) -> Response<Body> {
    if !allowed {
        let details = if attrs.resource_request {
            let mut d = json!({"group": attrs.api_group, "kind": attrs.resource});
            if !attrs.name.is_empty() {
                d["name"] = json!(attrs.name);
            }
            Some(d)
        } else {
            Some(json!({}))
        };
        return error(
            403,
            "Forbidden",
            &shared.rbac.forbidden_message(attrs, path),
            details,
        );
    }
    if !attrs.resource_request {
        let accept = req
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        return non_resource(shared, path, &accept);
    }
    let Some(kind) = Kind::by_resource(&attrs.api_group, &attrs.api_version, &attrs.resource)
    else {
        return not_found_path();
    };
    if kind.is_istio() && !shared.store().istio_installed {
        return not_found_path();
    }
    if method != "GET" {
        return error(
            405,
            "MethodNotAllowed",
            &format!(
                "the test API server serves reads only; {method} is not supported on {}",
                attrs.resource
            ),
            Some(json!({"kind": attrs.resource})),
        );
    }
    // A namespace's own path (/api/v1/namespaces/<name>) names it twice, as namespace and name;
    // it is in no namespace.
    let namespace = if kind.namespaced() {
        attrs.namespace.clone()
    } else {
        String::new()
    };
    let name = attrs.name.clone();
    match attrs.verb.as_str() {
        "get" => {
            if !attrs.subresource.is_empty() && attrs.subresource != "status" {
                return not_found_path();
            }
            get(shared, kind, &attrs.api_version, &namespace, &name)
        }
        "list" => list(shared, kind, &attrs.api_version, &namespace, params),
        "watch" => watch(
            shared.clone(),
            seq,
            kind,
            attrs,
            &namespace,
            path,
            params.to_vec(),
        ),
        _ => not_found_path(),
    }
}

fn non_resource(shared: &Shared, path: &str, accept: &str) -> Response<Body> {
    let installed = shared.store().istio_installed;
    let path = path.trim_end_matches('/');
    let aggregated = |core: bool| {
        let mut resp = json_response(StatusCode::OK, &discovery::aggregated(core, installed));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
        );
        resp
    };
    match path {
        "/version" => json_response(StatusCode::OK, &discovery::version()),
        "/healthz" | "/livez" | "/readyz" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        "/api" if discovery::wants_aggregated(accept) => aggregated(true),
        "/api" => json_response(
            StatusCode::OK,
            &discovery::api_versions(&shared.addr.to_string()),
        ),
        "/api/v1" => json_response(StatusCode::OK, &discovery::resource_list("", "v1")),
        "/apis" if discovery::wants_aggregated(accept) => aggregated(false),
        "/apis" => json_response(StatusCode::OK, &discovery::group_list(installed)),
        p if installed && p == format!("/apis/{ISTIO_GROUP}") => {
            json_response(StatusCode::OK, &discovery::api_group(ISTIO_GROUP))
        }
        p if installed
            && Kind::AuthorizationPolicy
                .versions()
                .iter()
                .any(|v| p == format!("/apis/{ISTIO_GROUP}/{v}")) =>
        {
            let version = p.rsplit('/').next().unwrap_or("v1");
            json_response(
                StatusCode::OK,
                &discovery::resource_list(ISTIO_GROUP, version),
            )
        }
        _ => not_found_path(),
    }
}

/// The object as a request at `version` sees it: `apiVersion` of that version.
fn at_version(kind: Kind, version: &str, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(kind.api_version(version));
    obj
}

fn get(shared: &Shared, kind: Kind, version: &str, namespace: &str, name: &str) -> Response<Body> {
    let obj = shared.store().get(kind, namespace, name).cloned();
    match obj {
        Some(obj) => json_response(StatusCode::OK, &at_version(kind, version, obj)),
        None => {
            let mut details = json!({"name": name, "kind": kind.plural()});
            if !kind.group().is_empty() {
                details["group"] = json!(kind.group());
            }
            error(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", kind.plural()),
                Some(details),
            )
        }
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn filter(kind: Kind, namespace: &str, params: &[(String, String)]) -> Result<Filter, String> {
    Ok(Filter {
        namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
        labels: LabelSelector::parse(param(params, "labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(param(params, "fieldSelector").unwrap_or(""), kind)?,
    })
}

fn bad_request(message: &str) -> Response<Body> {
    error(400, "BadRequest", message, None)
}

fn invalid(message: &str) -> Response<Body> {
    error(
        422,
        "Invalid",
        message,
        Some(json!({"kind": "ListOptions", "group": "meta.k8s.io"})),
    )
}

/// The `resourceVersion` parameter; the error is the 422's message.
fn parse_rv(rv: Option<&str>) -> Result<Option<u64>, String> {
    match rv {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            format!("resourceVersion: Invalid value: \"{v}\": must be a non-negative integer")
        }),
    }
}

fn expired(rv: u64, compacted: u64) -> Value {
    status(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({compacted})"),
        None,
    )
}

fn list(
    shared: &Shared,
    kind: Kind,
    version: &str,
    namespace: &str,
    params: &[(String, String)],
) -> Response<Body> {
    let filter = match filter(kind, namespace, params) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    if param(params, "continue").is_some_and(|c| !c.is_empty()) {
        // This server returns every item at once and never hands out a continue token.
        return bad_request("continue key is not valid: this server never issued it");
    }
    let rv = match parse_rv(param(params, "resourceVersion")) {
        Ok(rv) => rv,
        Err(message) => return invalid(&message),
    };
    let matching = param(params, "resourceVersionMatch").filter(|m| !m.is_empty());
    if matching.is_some() && rv.is_none() {
        return invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
        );
    }
    if let Some(m) = matching
        && m != "Exact"
        && m != "NotOlderThan"
    {
        return invalid(&format!(
            "resourceVersionMatch: Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\""
        ));
    }
    if matching == Some("Exact") && rv == Some(0) {
        return invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        );
    }
    let store = shared.store();
    let (items, list_rv) = match (rv, matching) {
        (Some(n), _) if n > store.rv => {
            return error(
                504,
                "Timeout",
                &format!("Too large resource version: {n}, current: {}", store.rv),
                Some(json!({
                    "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                    "retryAfterSeconds": 1
                })),
            );
        }
        (Some(n), Some("Exact")) => {
            if n < store.compacted {
                return json_response(StatusCode::GONE, &expired(n, store.compacted));
            }
            (store.list(kind, &filter, Some(n)), n)
        }
        _ => (store.list(kind, &filter, None), store.rv),
    };
    drop(store);
    let items: Vec<Value> = items
        .into_iter()
        .map(|o| {
            let mut o = at_version(kind, version, o);
            // Built-in kinds' list items carry no kind/apiVersion; CRDs' (unstructured) do.
            if !kind.is_istio()
                && let Some(m) = o.as_object_mut()
            {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": kind.api_version(version),
            "metadata": {"resourceVersion": list_rv.to_string()},
            "items": items,
        }),
    )
}

/// A response body fed by a channel: one chunk per watch event.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("JSON");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, version: &str, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind(), "apiVersion": kind.api_version(version), "metadata": meta}),
    )
}

struct WatchSpec {
    kind: Kind,
    version: String,
    filter: Filter,
    bookmarks: bool,
    timeout: Duration,
}

/// Removes the watch from [`Observed::open_watches`] however its task ends.
struct OpenGuard {
    shared: Arc<Shared>,
    seq: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let seq = self.seq;
        self.shared.observe(|o| o.open_watches.remove(&seq));
    }
}

fn watch(
    shared: Arc<Shared>,
    seq: u64,
    kind: Kind,
    attrs: &Attributes,
    namespace: &str,
    path: &str,
    mut params: Vec<(String, String)>,
) -> Response<Body> {
    // A watch of one object by name (`/watch/.../pods/<name>`) is a field selector on its name.
    if !attrs.name.is_empty() && param(&params, "fieldSelector").is_none() {
        params.push((
            "fieldSelector".to_owned(),
            format!("metadata.name={}", attrs.name),
        ));
    }
    let filter = match filter(kind, namespace, &params) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    let rv = match parse_rv(param(&params, "resourceVersion")) {
        Ok(rv) => rv,
        Err(message) => return invalid(&message),
    };
    let bookmarks = param(&params, "allowWatchBookmarks").is_some_and(parse_bool);
    let send_initial = param(&params, "sendInitialEvents").map(parse_bool);
    let matching = param(&params, "resourceVersionMatch").filter(|m| !m.is_empty());
    match send_initial {
        Some(true) => {
            if matching != Some("NotOlderThan") {
                return invalid(
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                );
            }
            if !bookmarks {
                return invalid(
                    "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
                );
            }
        }
        _ if matching.is_some() => {
            return invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            );
        }
        _ => {}
    }
    let timeout = match param(&params, "timeoutSeconds").map(str::parse::<u64>) {
        Some(Ok(t)) => Duration::from_secs(t),
        Some(Err(_)) => return bad_request("timeoutSeconds: must be an integer"),
        // The real server picks 30 to 60 minutes; the middle of it.
        None => Duration::from_secs(45 * 60),
    };
    let spec = WatchSpec {
        kind,
        version: attrs.api_version.clone(),
        filter,
        bookmarks,
        timeout,
    };

    // Where the watch starts, and what it sends first, taken at one instant of the store.
    let (initial, start, drop_generation, bookmark_generation) = {
        let store = shared.store();
        let mut initial = Vec::new();
        let start = match (rv, send_initial) {
            (Some(n), _) if n > 0 && n < store.compacted && send_initial != Some(true) => {
                initial.push(event_line("ERROR", &expired(n, store.compacted)));
                None
            }
            // sendInitialEvents=true, or a resourceVersion unset or "0": the state now, as ADDED
            // events, then the changes after it.
            (_, Some(true)) | (None | Some(0), _) => {
                for obj in store.list(kind, &spec.filter, None) {
                    initial.push(event_line("ADDED", &at_version(kind, &spec.version, obj)));
                }
                if send_initial == Some(true) {
                    initial.push(bookmark(kind, &spec.version, store.rv, true));
                }
                Some(store.rv)
            }
            (Some(n), _) => Some(n),
        };
        (
            initial,
            start,
            store.drop_generation,
            store.bookmark_generation,
        )
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    shared.observe(|o| {
        o.open_watches.insert(
            seq,
            OpenWatch {
                seq,
                kind,
                path: path.to_owned(),
                params: params.clone(),
                events_sent: 0,
            },
        )
    });
    let guard = OpenGuard {
        shared: shared.clone(),
        seq,
    };
    tokio::spawn(async move {
        let _guard = guard;
        if !send(&shared, seq, &tx, initial).await {
            return;
        }
        if let Some(start) = start {
            run_watch(
                &shared,
                seq,
                &tx,
                &spec,
                start,
                drop_generation,
                bookmark_generation,
            )
            .await;
        }
    });

    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Send events; false if the client is gone.
async fn send(shared: &Shared, seq: u64, tx: &mpsc::Sender<Bytes>, lines: Vec<Bytes>) -> bool {
    let n = lines.len() as u64;
    for line in lines {
        if tx.send(line).await.is_err() {
            return false;
        }
    }
    if n > 0 {
        shared.observe(|o| {
            if let Some(w) = o.open_watches.get_mut(&seq) {
                w.events_sent += n;
            }
        });
    }
    true
}

enum Step {
    Send(Vec<Bytes>, bool),
    Wait,
    End,
}

async fn run_watch(
    shared: &Shared,
    seq: u64,
    tx: &mpsc::Sender<Bytes>,
    spec: &WatchSpec,
    mut pos: u64,
    drop_generation: u64,
    mut bookmark_generation: u64,
) {
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut changed = shared.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let step = {
            let store = shared.store();
            if store.drop_generation != drop_generation {
                Step::End
            } else if store.silent {
                Step::Wait
            } else if pos < store.compacted {
                Step::Send(
                    vec![event_line("ERROR", &expired(pos, store.compacted))],
                    true,
                )
            } else {
                let mut lines: Vec<Bytes> = store
                    .changes_after(pos)
                    .filter(|c| c.kind == spec.kind)
                    .filter_map(|c| event_for(c, &spec.filter))
                    .map(|(ty, obj)| event_line(ty, &at_version(spec.kind, &spec.version, obj)))
                    .collect();
                pos = store.rv;
                if spec.bookmarks && store.bookmark_generation != bookmark_generation {
                    lines.push(bookmark(spec.kind, &spec.version, store.rv, false));
                }
                bookmark_generation = store.bookmark_generation;
                // Deleting the CRD ends its watches, after the deletions of its objects.
                let end = spec.kind.is_istio() && !store.istio_installed;
                Step::Send(lines, end)
            }
        };
        let silent = match step {
            Step::End => return,
            Step::Wait => true,
            Step::Send(lines, end) => {
                if !send(shared, seq, tx, lines).await || end {
                    return;
                }
                false
            }
        };
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline), if !silent => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("fieldSelector=spec.nodeName%3Dnode-a&watch=true&labelSelector=a+in+(b)&x"),
            vec![
                (
                    "fieldSelector".to_owned(),
                    "spec.nodeName=node-a".to_owned()
                ),
                ("watch".to_owned(), "true".to_owned()),
                ("labelSelector".to_owned(), "a in (b)".to_owned()),
                ("x".to_owned(), String::new()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
