//! A Kubernetes API server for tests, where there is no cluster: real paths, real JSON, real
//! objects (k8s-openapi's Pods and Namespaces, Istio's security kinds as JSON), one cluster-wide
//! resourceVersion, lists and watches as kube-rs's reflectors use them, discovery, and the
//! agent's ClusterRole from `deploy/rbac.yaml` enforced and every request recorded.
//!
//! ```no_run
//! use latch_tests::kube_api::{Kind, KubeApiServer, fixtures};
//! use serde_json::json;
//! let server = KubeApiServer::start_local().expect("server"); // or ::start(listener)
//! server.apply(&fixtures::namespace("prod", &[("istio.io/dataplane-mode", "ambient")])).unwrap();
//! server.apply(&fixtures::pod("prod", "web-1").node("node-a").ip("10.244.1.2").build()).unwrap();
//! server.apply(&fixtures::authorization_policy("prod", "deny-all", json!({}))).unwrap();
//! // The agent (or kube::Config::new(server.url().parse()?)) talks to it over plain HTTP.
//! server.merge_patch(Kind::Pod, "prod", "web-1", &json!({"metadata": {"labels": {"v": "2"}}}))
//!     .unwrap();
//! server.delete(Kind::Pod, "prod", "web-1").unwrap();
//! assert!(server.denied().is_empty(), "the agent asked for more than its role grants");
//! assert!(server.requests().iter().all(|r| r.attrs.resource != "secrets"));
//! ```
//!
//! Objects go in with [`KubeApiServer::apply`] / [`KubeApiServer::create`] (any serializable
//! object), change with [`KubeApiServer::update`], [`KubeApiServer::modify`] (typed),
//! [`KubeApiServer::merge_patch`], [`KubeApiServer::set_pod_status`], and go with
//! [`KubeApiServer::begin_deletion`] and [`KubeApiServer::delete`]. Every change gets the next
//! resourceVersion and is seen by the open watches whose selectors it concerns.
//!
//! - [`store`]: the kinds, the objects, the resourceVersion, the history watches replay.
//! - [`selector`]: label and field selectors.
//! - [`rbac`]: request attributes (verbs as the server maps them) and the ClusterRole.
//! - [`discovery`]: `/version`, `/api`, `/apis` and the groups' resource lists.
//! - [`http`]: the hyper server: routing, lists, watches, the request log.
//! - [`fixtures`]: Pods as the kubelet fills them, Namespaces, Istio policies.
//!
//! The server runs on its own thread with its own (current-thread) tokio runtime, so plain
//! `#[test]` functions can use it; dropping the handle stops it and frees its port.
//! Hooks simulate what a real server does on its own: compaction ([`KubeApiServer::compact`]),
//! watches ending ([`KubeApiServer::drop_watches`]), bookmarks ([`KubeApiServer::bookmark`]),
//! an outage ([`KubeApiServer::go_silent`] or [`KubeApiServer::go_unavailable`], then
//! [`KubeApiServer::resume`]), Istio's CRDs coming
//! and going ([`KubeApiServer::install_istio_crds`] / [`KubeApiServer::uninstall_istio_crds`];
//! installed from the start). Nothing happens on a timer except a watch's `timeoutSeconds`;
//! tests wait on what the server saw with [`KubeApiServer::wait_for`] (the request log and the
//! open watches), never on time.
//!
//! Not served: writes through the API (405, or 403 where the role forbids them first), protobuf,
//! pagination (every list is one page, which `limit` allows), subresources other than `status`,
//! kinds other than Pods, Namespaces and Istio's three security kinds.

pub mod discovery;
pub mod fixtures;
pub mod http;
pub mod rbac;
pub mod selector;
pub mod store;

use std::{net::SocketAddr, path::Path, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::{Context as _, anyhow};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::sync::oneshot;

pub use http::{Observed, OpenWatch, RequestRecord};
pub use rbac::Rbac;
pub use store::{Kind, StoreError};

use http::Shared;

/// A running test API server; stops (and frees its port) on drop.
pub struct KubeApiServer {
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeApiServer {
    /// Serve on `listener` (bound by the caller: on 127.0.0.1:0, or inside a network namespace
    /// with [`crate::netns::in_netns`]), with the ClusterRole of `deploy/rbac.yaml` and Istio's
    /// CRDs installed.
    pub fn start(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        Self::start_with(listener, Rbac::load(&Rbac::default_path())?)
    }

    /// Serve on a fresh port of 127.0.0.1.
    pub fn start_local() -> anyhow::Result<Self> {
        Self::start(std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?)
    }

    /// Serve with the role and user of another RBAC file.
    pub fn start_with_rbac_file(
        listener: std::net::TcpListener,
        rbac: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(listener, Rbac::load(rbac)?)
    }

    pub fn start_with(listener: std::net::TcpListener, rbac: Rbac) -> anyhow::Result<Self> {
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let addr = listener.local_addr().context("the listener's address")?;
        let mut store = store::Store::new();
        store.istio_installed = true;
        let shared = Arc::new(Shared::new(rbac, addr, store));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the server's runtime")?;
        let (shutdown, shutdown_rx) = oneshot::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kube-api-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(http::serve(listener, serving, shutdown_rx));
                // Dropping the runtime drops every connection's task, and with them the sockets.
                drop(runtime);
            })
            .context("starting the server's thread")?;
        Ok(Self {
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://<addr>`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The user requests are authorized as (the ServiceAccount of the RBAC file's binding).
    pub fn user(&self) -> &str {
        &self.shared.rbac.user
    }

    /// Create the object, or replace the one of the same kind, namespace and name (its uid and
    /// creationTimestamp kept, `generation` bumped if `spec` changed, nothing if nothing changed).
    /// Takes any serializable object: a k8s-openapi type or Istio JSON. Returns it as stored.
    pub fn apply<T: Serialize>(&self, obj: &T) -> anyhow::Result<Value> {
        let obj = serde_json::to_value(obj).context("serializing the object")?;
        Ok(self.shared.mutate(|s| s.apply(obj))?)
    }

    /// Create the object; it must not exist (409 AlreadyExists otherwise).
    pub fn create<T: Serialize>(&self, obj: &T) -> anyhow::Result<Value> {
        let obj = serde_json::to_value(obj).context("serializing the object")?;
        Ok(self.shared.mutate(|s| s.create(obj))?)
    }

    /// Change an object in place, as a client's read-modify-write would.
    pub fn update(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> anyhow::Result<Value> {
        Ok(self.shared.mutate(|s| {
            let mut obj = s
                .get(kind, namespace, name)
                .cloned()
                .ok_or_else(|| StoreError {
                    code: 404,
                    reason: "NotFound",
                    message: format!("{} \"{name}\" not found", kind.plural()),
                })?;
            f(&mut obj);
            s.replace(obj)
        })?)
    }

    /// [`Self::update`] through a typed object (`Pod`, `Namespace`).
    pub fn modify<K>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut K),
    ) -> anyhow::Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let kind = Kind::of(K::API_VERSION, K::KIND)
            .ok_or_else(|| anyhow!("this server does not serve {}", K::KIND))?;
        let mut failed = None;
        let stored = self.update(kind, namespace, name, |obj| {
            match serde_json::from_value::<K>(obj.clone()) {
                Ok(mut typed) => {
                    f(&mut typed);
                    match serde_json::to_value(&typed) {
                        Ok(v) => *obj = v,
                        Err(e) => failed = Some(anyhow!(e)),
                    }
                }
                Err(e) => failed = Some(anyhow!(e)),
            }
        })?;
        if let Some(e) = failed {
            return Err(e.context(format!("converting {} {namespace}/{name}", K::KIND)));
        }
        Ok(serde_json::from_value(stored)?)
    }

    /// Set a pod's whole `status` (podIPs, hostIP, phase, qosClass, containerStatuses...), as the
    /// kubelet does.
    pub fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: PodStatus,
    ) -> anyhow::Result<Pod> {
        self.modify::<Pod>(namespace, name, |p| p.status = Some(status))
    }

    /// Delete an object (`namespace` is ignored for cluster-scoped kinds). Returns its final
    /// state, as the `DELETED` event carries it. Deleting a Namespace deletes what is in it.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> anyhow::Result<Value> {
        Ok(self.shared.mutate(|s| s.delete(kind, namespace, name))?)
    }

    /// Apply a JSON merge patch (RFC 7386) to an object, as `kubectl patch --type=merge` does:
    /// `json!({"metadata": {"labels": {"app": "api"}}})`; `null` removes a field.
    pub fn merge_patch(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> anyhow::Result<Value> {
        self.update(kind, namespace, name, |obj| store::merge_patch(obj, patch))
    }

    /// Start a graceful deletion: `deletionTimestamp` and `deletionGracePeriodSeconds` set (a
    /// `MODIFIED`, the pod still there, as until its kubelet confirms); [`Self::delete`] ends it.
    pub fn begin_deletion(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        grace_seconds: i64,
    ) -> anyhow::Result<Value> {
        Ok(self
            .shared
            .mutate(|s| s.begin_deletion(kind, namespace, name, grace_seconds))?)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared.store().get(kind, namespace, name).cloned()
    }

    /// The last resourceVersion given out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Serve `security.istio.io` (`v1`, `v1beta1`): discovery lists it, its resources answer.
    /// Installed from the start.
    pub fn install_istio_crds(&self) {
        self.shared.mutate(|s| s.istio_installed = true);
    }

    /// Remove Istio's CRDs: their objects are deleted (watches see `DELETED`), the watches on
    /// them end, and the group and its resources answer 404.
    pub fn uninstall_istio_crds(&self) {
        self.shared.mutate(store::Store::uninstall_istio);
    }

    pub fn istio_crds_installed(&self) -> bool {
        self.shared.store().istio_installed
    }

    /// Compact the history at the current resourceVersion: a watch from, or an exact list at, an
    /// older resourceVersion gets 410 Gone (`Expired`), as do open watches that had not caught up.
    /// Returns the compaction point.
    pub fn compact(&self) -> u64 {
        self.shared.mutate(store::Store::compact)
    }

    /// End every open watch now (their streams end cleanly, as at a timeout).
    pub fn drop_watches(&self) {
        self.shared.mutate(|s| s.drop_generation += 1);
    }

    /// Send a `BOOKMARK` (at the current resourceVersion) on every open watch that allowed them.
    pub fn bookmark(&self) {
        self.shared.mutate(|s| s.bookmark_generation += 1);
    }

    /// An outage: connections are still accepted, but no request is answered and open watches
    /// send nothing (their timeouts do not fire either) until [`Self::resume`].
    pub fn go_silent(&self) {
        self.shared.mutate(|s| s.silent = true);
    }

    /// An outage that clients see: every open watch ends and every request's connection is
    /// closed without an answer (an API server that is down) until [`Self::resume`]. (Not a
    /// 503: kube-rs's client retries those by itself, so its callers never see them.)
    pub fn go_unavailable(&self) {
        self.shared.mutate(|s| {
            s.unavailable = true;
            s.drop_generation += 1;
        });
    }

    /// End the outage: held requests are answered, watches send what they missed, requests
    /// are answered again.
    pub fn resume(&self) {
        self.shared.mutate(|s| {
            s.silent = false;
            s.unavailable = false;
        });
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.observed().requests
    }

    /// The requests that were refused (403).
    pub fn denied(&self) -> Vec<RequestRecord> {
        self.requests().into_iter().filter(|r| !r.allowed).collect()
    }

    /// The watches open now.
    pub fn open_watches(&self) -> Vec<OpenWatch> {
        self.observed().open_watches.into_values().collect()
    }

    /// A copy of the request log and the open watches.
    pub fn observed(&self) -> Observed {
        self.shared
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Block until `cond` holds of the requests and open watches (checked at every change), or
    /// `limit` passes — a guard against a hung test, not a timing expectation. Returns whether it
    /// held.
    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut(&Observed) -> bool) -> bool {
        let guard = self
            .shared
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .shared
            .observed_changed
            .wait_timeout_while(guard, limit, |o| !cond(o))
            .unwrap_or_else(|e| e.into_inner());
        cond(&guard)
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
