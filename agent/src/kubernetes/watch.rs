//! The watches of Kubernetes mode: Pods and Namespaces into kube-runtime reflector stores, and
//! Istio's AuthorizationPolicy, PeerAuthentication and RequestAuthentication (as dynamic objects of
//! `security.istio.io`, `v1` else `v1beta1`, found by discovery) into [`PolicyObjects`], one
//! object at a time. Each watch runs as a task with kube-runtime's default back-off and never
//! ends on an error: an error is recorded ([`WatchHealth`]) and the watch resumes or re-lists.
//! A missing Istio CRD means "no policies of that kind", checked again every
//! [`CRD_RECHECK`]. Every change of a store or of the policies, and a watch that syncs, fails or
//! recovers, wakes [`Watches::changed`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind},
    discovery,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::Serialize;
use tokio::{sync::Notify, task::JoinHandle};

use super::policies::{Applied, PolicyObjects};
use crate::{policy::PolicyKind, sync::lock};

/// How often a missing Istio CRD is looked for again.
pub const CRD_RECHECK: Duration = Duration::from_secs(30);
/// How often a failing watch's resource is listed (one object) to learn that the API server
/// answers again: a watch resumed after an error sends nothing until something changes.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The Istio API group of the two policy kinds.
const ISTIO_SECURITY: &str = "security.istio.io";

/// What one watch has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchHealth {
    /// Its first full list has been received (stays true through later re-lists).
    pub synced: bool,
    /// The last attempt failed and no event has arrived since.
    pub failing: bool,
    /// The last error, as the client reported it.
    pub last_error: Option<String>,
    /// When the last error happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// For the policy kinds: the API version watched, or `None` while the CRD is missing.
    pub version: Option<String>,
}

/// The state the watches share with the source.
#[derive(Default)]
pub struct Shared {
    pub policies: Mutex<PolicyObjects>,
    health: Mutex<BTreeMap<&'static str, WatchHealth>>,
    /// Woken on every change of a store or of the policies, and when a watch syncs, fails or
    /// recovers.
    pub changed: Notify,
}

impl Shared {
    /// Every watch's health, by watch name.
    pub fn health(&self) -> BTreeMap<&'static str, WatchHealth> {
        lock(&self.health).clone()
    }

    /// Whether every watch has had its first full list.
    pub fn synced(&self) -> bool {
        let health = lock(&self.health);
        WATCHES
            .iter()
            .all(|w| health.get(w).is_some_and(|h| h.synced))
    }

    /// Whether any watch is failing now (the API server is out of reach, or refuses).
    pub fn failing(&self) -> bool {
        lock(&self.health).values().any(|h| h.failing)
    }

    fn update(&self, watch: &'static str, f: impl FnOnce(&mut WatchHealth)) {
        let mut health = lock(&self.health);
        let entry = health.entry(watch).or_default();
        let (was_synced, was_failing) = (entry.synced, entry.failing);
        f(entry);
        // Only a watch that syncs, fails or recovers wakes the source; a new error text during an
        // outage does not (it would reload the whole state on every retry), and the event loop's
        // tick publishes it.
        let flipped = entry.synced != was_synced || entry.failing != was_failing;
        drop(health);
        if flipped {
            self.changed.notify_one();
        }
    }

    fn is_failing(&self, watch: &'static str) -> bool {
        lock(&self.health).get(watch).is_some_and(|h| h.failing)
    }

    fn event(&self, watch: &'static str, init_done: bool) {
        self.update(watch, |h| {
            h.failing = false;
            h.synced |= init_done;
        });
    }

    fn failed(&self, watch: &'static str, error: &dyn std::fmt::Display) {
        let error = error.to_string();
        let first = !lock(&self.health).get(watch).is_some_and(|h| h.failing);
        if first {
            tracing::warn!(
                watch,
                error,
                "Kubernetes watch failing; retrying with back-off, enforcement continues on the last known state"
            );
        }
        self.update(watch, |h| {
            h.failing = true;
            h.last_error = Some(error);
            h.last_error_at = Some(crate::debug::agent::rfc3339(SystemTime::now()));
        });
    }
}

const PODS: &str = "pods";
const NAMESPACES: &str = "namespaces";
const AUTHORIZATION_POLICIES: &str = "authorizationpolicies";
const PEER_AUTHENTICATIONS: &str = "peerauthentications";
const REQUEST_AUTHENTICATIONS: &str = "requestauthentications";
/// Every watch, by name.
const WATCHES: [&str; 5] = [
    PODS,
    NAMESPACES,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    REQUEST_AUTHENTICATIONS,
];

/// The running watches; dropping this stops them.
pub struct Watches {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Watches {
    /// Start every watch on `client` (inside the tokio runtime).
    pub fn start(client: &Client) -> Self {
        let shared = Arc::new(Shared::default());
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
        let tasks = vec![
            tokio::spawn(reflect(
                PODS,
                Api::<Pod>::all(client.clone()),
                pods_writer,
                shared.clone(),
            )),
            tokio::spawn(reflect(
                NAMESPACES,
                Api::<Namespace>::all(client.clone()),
                namespaces_writer,
                shared.clone(),
            )),
            tokio::spawn(watch_policies(
                client.clone(),
                PolicyKind::AuthorizationPolicy,
                shared.clone(),
            )),
            tokio::spawn(watch_policies(
                client.clone(),
                PolicyKind::PeerAuthentication,
                shared.clone(),
            )),
            tokio::spawn(watch_policies(
                client.clone(),
                PolicyKind::RequestAuthentication,
                shared.clone(),
            )),
        ];
        Self {
            pods,
            namespaces,
            shared,
            tasks,
        }
    }
}

/// Keep `writer`'s store in line with the objects of `api`, for good.
async fn reflect<K>(
    name: &'static str,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    shared: Arc<Shared>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let stream = reflector::reflector(
        writer,
        watcher(api.clone(), watcher::Config::default()).default_backoff(),
    );
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = next_or_recovered(&mut stream, name, &shared, &api).await {
        match event {
            Ok(event) => {
                let init_done = matches!(event, watcher::Event::InitDone);
                shared.event(name, init_done);
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    shared.changed.notify_one();
                }
            }
            Err(e) => shared.failed(name, &e),
        }
    }
}

/// The next item of a watch's `stream`. While the watch `name` is failing, its resource is also
/// listed (one object) every [`PROBE_EVERY`], and an answer marks it healthy again: a watch that
/// resumes after an error sends nothing until something changes, so its stream alone would
/// leave the failure standing.
async fn next_or_recovered<S, K>(
    stream: &mut S,
    name: &'static str,
    shared: &Shared,
    api: &Api<K>,
) -> Option<S::Item>
where
    S: futures::Stream + Unpin,
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    loop {
        if !shared.is_failing(name) {
            return stream.next().await;
        }
        tokio::select! {
            item = stream.next() => return item,
            _ = tokio::time::sleep(PROBE_EVERY) => {
                let one = kube::api::ListParams::default().limit(1);
                if api.list(&one).await.is_ok() {
                    tracing::info!(watch = name, "Kubernetes API server answers again");
                    shared.event(name, false);
                }
            }
        }
    }
}

fn watch_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::AuthorizationPolicy => AUTHORIZATION_POLICIES,
        PolicyKind::PeerAuthentication => PEER_AUTHENTICATIONS,
        PolicyKind::RequestAuthentication => REQUEST_AUTHENTICATIONS,
    }
}

/// Follow the objects of `kind` into the shared [`PolicyObjects`], for good: discover the CRD's
/// version, watch it, and when it is missing (or goes), hold no object of the kind and look
/// again after [`CRD_RECHECK`].
async fn watch_policies(client: Client, kind: PolicyKind, shared: Arc<Shared>) {
    let name = watch_name(kind);
    let kind_name = format!("{kind:?}");
    loop {
        match discover(&client, &kind_name).await {
            Ok(Some((resource, version))) => {
                shared.update(name, |h| h.version = Some(version.clone()));
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
                follow_policies(api, kind, name, &shared).await;
                // The CRD went away: none of its objects is in force any more.
                tracing::warn!(kind = %kind_name, "Istio CRD removed; no {kind_name} in force");
            }
            Ok(None) => {}
            Err(e) => {
                shared.failed(name, &e);
                tokio::time::sleep(CRD_RECHECK).await;
                continue;
            }
        }
        lock(&shared.policies).retain_listed(kind, &[]);
        shared.update(name, |h| {
            h.version = None;
            h.synced = true;
            h.failing = false;
        });
        shared.changed.notify_one();
        tokio::time::sleep(CRD_RECHECK).await;
    }
}

/// The resource of `kind` in `security.istio.io`, at `v1` if served, else `v1beta1`; `None`
/// when neither is (the CRD is not installed).
async fn discover(
    client: &Client,
    kind: &str,
) -> Result<Option<(kube::api::ApiResource, String)>, kube::Error> {
    for version in ["v1", "v1beta1"] {
        let gvk = GroupVersionKind::gvk(ISTIO_SECURITY, version, kind);
        match discovery::pinned_kind(client, &gvk).await {
            Ok((resource, _)) => return Ok(Some((resource, version.to_owned()))),
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Whether the API server says the resource does not exist.
fn is_missing(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 404,
        kube::Error::Discovery(_) => true,
        _ => false,
    }
}

/// Apply the watch events of `api` to the shared policy objects until the resource is gone
/// (its list answers 404).
async fn follow_policies(
    api: Api<DynamicObject>,
    kind: PolicyKind,
    name: &'static str,
    shared: &Shared,
) {
    let mut stream =
        std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
    let mut listed: Vec<(String, String)> = Vec::new();
    while let Some(event) = next_or_recovered(&mut stream, name, shared, &api).await {
        let event = match event {
            Ok(event) => event,
            Err(watcher::Error::InitialListFailed(e)) if is_missing(&e) => return,
            Err(e) => {
                shared.failed(name, &e);
                continue;
            }
        };
        let init_done = matches!(event, watcher::Event::InitDone);
        match event {
            watcher::Event::Init => listed.clear(),
            watcher::Event::InitApply(object) => {
                listed.push(key_of(&object));
                apply(kind, &object, shared);
            }
            watcher::Event::InitDone => {
                lock(&shared.policies).retain_listed(kind, &listed);
                listed.clear();
            }
            watcher::Event::Apply(object) => apply(kind, &object, shared),
            watcher::Event::Delete(object) => {
                let (namespace, object_name) = key_of(&object);
                lock(&shared.policies).delete(kind, &namespace, &object_name);
                tracing::info!(kind = ?kind, namespace, name = object_name, "policy object deleted");
            }
        }
        shared.event(name, init_done);
        shared.changed.notify_one();
    }
}

fn key_of(object: &DynamicObject) -> (String, String) {
    (
        object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Take one added or changed object; a refused one is logged with what was wrong.
fn apply(kind: PolicyKind, object: &DynamicObject, shared: &Shared) {
    let value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => {
            let (namespace, name) = key_of(object);
            tracing::error!(kind = ?kind, namespace, name, error = %e, "policy object cannot be read; not applied");
            return;
        }
    };
    let applied = lock(&shared.policies).apply(kind, &value);
    match applied {
        Applied::Accepted => {
            let (namespace, name) = key_of(object);
            tracing::info!(kind = ?kind, namespace, name, "policy object accepted");
        }
        Applied::Refused(refused) => tracing::error!(
            kind = ?kind,
            namespace = refused.namespace,
            name = refused.name,
            resource_version = refused.resource_version,
            errors = refused.errors.join("; "),
            last_good_kept = refused.last_good_kept,
            deny = refused.deny,
            "policy object refused; {}",
            if refused.last_good_kept {
                "its last good version stays in force"
            } else {
                "it is not in force"
            }
        ),
    }
}
