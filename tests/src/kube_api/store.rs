//! The server's storage, as etcd and the API server's registry keep it: the kinds it serves
//! ([`Kind`]), every object as its JSON, one cluster-wide increasing resourceVersion, the history
//! of changes since the last compaction (what watches replay), and how one change looks to one
//! watch with selectors (an object leaving a watch's selector is a `DELETED` to that watch).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::selector::{FieldSelector, LabelSelector};

/// The kinds the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
}

/// The group of Istio's security kinds, served only while their CRDs are installed.
pub const ISTIO_GROUP: &str = "security.istio.io";

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::RequestAuthentication => "requestauthentications",
        }
    }

    pub fn singular(self) -> String {
        self.kind().to_lowercase()
    }

    /// The API group: `""` for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Namespace => "",
            _ => ISTIO_GROUP,
        }
    }

    /// The versions it is served at, the preferred one first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::Pod | Kind::Namespace => &["v1"],
            _ => &["v1", "v1beta1"],
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// Whether it comes from a CRD (Istio's), served only while installed.
    pub fn is_istio(self) -> bool {
        self.group() == ISTIO_GROUP
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["po"],
            Kind::Namespace => &["ns"],
            Kind::AuthorizationPolicy => &["ap"],
            Kind::PeerAuthentication => &["pa"],
            Kind::RequestAuthentication => &["ra"],
        }
    }

    pub fn categories(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["all"],
            Kind::Namespace => &[],
            _ => &["istio-io", "security-istio-io"],
        }
    }

    /// Subresources listed by discovery (the server serves none of them).
    pub fn subresources(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["status"],
            Kind::Namespace => &["finalize", "status"],
            _ => &["status"],
        }
    }

    /// The fields a `fieldSelector` may name, as the real registry's field sets have them.
    pub fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Kind::Namespace => &["metadata.name", "status.phase"],
            _ => &["metadata.name", "metadata.namespace"],
        }
    }

    pub fn api_version(self, version: &str) -> String {
        match self.group() {
            "" => version.to_owned(),
            g => format!("{g}/{version}"),
        }
    }

    /// The kind an object's `apiVersion` and `kind` name, if the server serves it.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        Kind::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.group() == group && k.versions().contains(&version))
    }

    /// The kind served at `(group, version, resource)`.
    pub fn by_resource(group: &str, version: &str, resource: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            k.plural() == resource && k.group() == group && k.versions().contains(&version)
        })
    }
}

/// What a change did to the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change in the history: the object after it (for a deletion, its final state, carrying the
/// deletion's resourceVersion) and before it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub ty: ChangeType,
    pub object: Value,
    pub prev: Option<Value>,
}

/// What one list or watch selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(&labels_of(obj)) && self.fields.matches(obj)
    }
}

pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The watch event type a change makes for a watch with `filter`, and the object it carries
/// (the API server's cacher: an object leaving the selector is a `DELETED` carrying its previous
/// content with the change's resourceVersion; one entering it is `ADDED`).
pub fn event_for(change: &Change, filter: &Filter) -> Option<(&'static str, Value)> {
    let cur = change.ty != ChangeType::Deleted && filter.matches(&change.object);
    let old = change.prev.as_ref().is_some_and(|p| filter.matches(p));
    match (cur, old) {
        (true, false) => Some(("ADDED", change.object.clone())),
        (true, true) => Some(("MODIFIED", change.object.clone())),
        (false, true) => {
            let mut prev = change.prev.clone().expect("old passes");
            prev["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(("DELETED", prev))
        }
        (false, false) => None,
    }
}

/// Why the store refused a change: the HTTP code, the `Status` reason and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.code, self.reason)
    }
}

impl std::error::Error for StoreError {}

fn err(code: u16, reason: &'static str, message: String) -> StoreError {
    StoreError {
        code,
        reason,
        message,
    }
}

type Key = (String, String);

/// The objects, the resourceVersion and the history; plus the test hooks' state, which the
/// watches read under the same lock.
#[derive(Default)]
pub struct Store {
    /// The last resourceVersion given out (0: none yet).
    pub rv: u64,
    next_uid: u64,
    objects: BTreeMap<Kind, BTreeMap<Key, Value>>,
    /// Changes after `compacted`, oldest first.
    history: VecDeque<Change>,
    /// Lists and watches at a resourceVersion older than this get 410 Gone.
    pub compacted: u64,
    pub istio_installed: bool,
    /// While set, no request is answered and no watch sends anything.
    pub silent: bool,
    /// Every request is answered 503 Service Unavailable (see `KubeApiServer::go_unavailable`).
    pub unavailable: bool,
    /// Bumped to end every open watch.
    pub drop_generation: u64,
    /// Bumped to make every bookmark-enabled watch send a BOOKMARK.
    pub bookmark_generation: u64,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&kind)?
            .get(&(scope(kind, namespace), name.to_owned()))
    }

    /// The objects of `kind` that `filter` selects, in key order (namespace, name) as etcd lists
    /// them, now or — `at` — as they were at that resourceVersion (not older than the compaction).
    pub fn list(&self, kind: Kind, filter: &Filter, at: Option<u64>) -> Vec<Value> {
        let mut objects = self.objects.get(&kind).cloned().unwrap_or_default();
        if let Some(at) = at {
            for change in self.history.iter().rev().take_while(|c| c.rv > at) {
                if change.kind != kind {
                    continue;
                }
                let key = key_of(kind, &change.object);
                match (&change.ty, &change.prev) {
                    (ChangeType::Added, _) => {
                        objects.remove(&key);
                    }
                    (_, Some(prev)) => {
                        objects.insert(key, prev.clone());
                    }
                    (_, None) => {}
                }
            }
        }
        objects
            .into_values()
            .filter(|o| filter.matches(o))
            .collect()
    }

    /// The changes after resourceVersion `after`.
    pub fn changes_after(&self, after: u64) -> impl Iterator<Item = &Change> {
        let start = self.history.partition_point(|c| c.rv <= after);
        self.history.range(start..)
    }

    /// Forget the history up to now: older resourceVersions are gone (410).
    pub fn compact(&mut self) -> u64 {
        self.compacted = self.rv;
        self.history.clear();
        self.rv
    }

    /// Create `obj`, or replace the object of the same kind, namespace and name.
    pub fn apply(&mut self, obj: Value) -> Result<Value, StoreError> {
        self.write(obj, Mode::Apply, false)
    }

    /// Create `obj`; it must not exist.
    pub fn create(&mut self, obj: Value) -> Result<Value, StoreError> {
        self.write(obj, Mode::Create, false)
    }

    /// Replace an existing object (`metadata.resourceVersion`, if given, must be current).
    pub fn replace(&mut self, obj: Value) -> Result<Value, StoreError> {
        self.write(obj, Mode::Replace, false)
    }

    /// `deleting`: the store itself marks the object as being deleted (`deletionTimestamp`, which
    /// a client's update cannot set or clear).
    fn write(&mut self, mut obj: Value, mode: Mode, deleting: bool) -> Result<Value, StoreError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind_name = obj["kind"].as_str().unwrap_or_default().to_owned();
        let kind = Kind::of(&api_version, &kind_name).ok_or_else(|| {
            err(
                404,
                "NotFound",
                format!("the server doesn't have a resource type for {api_version} {kind_name}"),
            )
        })?;
        if kind.is_istio() && !self.istio_installed {
            return Err(err(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({} {} is not installed)",
                    api_version,
                    kind.plural()
                ),
            ));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(err(
                422,
                "Invalid",
                format!("{} is invalid: metadata.name: Required value", kind.kind()),
            ));
        }
        let namespace = if kind.namespaced() {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_owned();
            obj["metadata"]["namespace"] = json!(ns);
            if self.get(Kind::Namespace, "", &ns).is_none() {
                return Err(err(
                    404,
                    "NotFound",
                    format!("namespaces \"{ns}\" not found"),
                ));
            }
            ns
        } else {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        let existing = self.get(kind, &namespace, &name).cloned();
        match (&existing, mode) {
            (Some(_), Mode::Create) => {
                return Err(err(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.plural()),
                ));
            }
            (None, Mode::Replace) => {
                return Err(err(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural()),
                ));
            }
            _ => {}
        }
        // The stored apiVersion is the preferred version's; each request sees its own.
        obj["apiVersion"] = json!(kind.api_version(kind.versions()[0]));
        match existing {
            None => {
                self.next_uid += 1;
                let meta = &mut obj["metadata"];
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
                meta["creationTimestamp"] = json!(now_rfc3339());
                meta["generation"] = json!(1);
                if let Some(m) = meta.as_object_mut() {
                    m.remove("resourceVersion");
                    m.remove("deletionTimestamp");
                }
                defaults_on_create(kind, &mut obj);
                Ok(self.store_version(kind, &namespace, &name, obj, None))
            }
            Some(old) => {
                let given = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                let current = old["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !given.is_empty() && given != current {
                    return Err(err(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            kind.plural()
                        ),
                    ));
                }
                if kind == Kind::Pod {
                    let was = old["spec"]["nodeName"].as_str().unwrap_or("");
                    let now = obj["spec"]["nodeName"].as_str().unwrap_or("");
                    if !was.is_empty() && was != now {
                        return Err(err(
                            422,
                            "Invalid",
                            format!(
                                "Pod \"{name}\" is invalid: spec.nodeName: Forbidden: pod updates may not change fields other than ... (spec.nodeName is immutable once set: {was} -> {now:?})"
                            ),
                        ));
                    }
                }
                let kept: &[&str] = if deleting {
                    &["uid", "creationTimestamp", "generation"]
                } else {
                    &[
                        "uid",
                        "creationTimestamp",
                        "generation",
                        "deletionTimestamp",
                        "deletionGracePeriodSeconds",
                    ]
                };
                for &field in kept {
                    match old["metadata"].get(field) {
                        Some(v) => obj["metadata"][field] = v.clone(),
                        None => {
                            if let Some(m) = obj["metadata"].as_object_mut() {
                                m.remove(field);
                            }
                        }
                    }
                }
                // An object given without a status keeps its status (as an update of the main
                // resource does); one given with a status sets it too (as the kubelet's update
                // of the status subresource does).
                if obj.get("status").is_none_or(Value::is_null)
                    && let Some(status) = old.get("status")
                {
                    obj["status"] = status.clone();
                }
                if kind == Kind::Namespace {
                    obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                    if obj.get("spec").is_none() {
                        obj["spec"] = old["spec"].clone();
                    }
                }
                obj["metadata"]["resourceVersion"] = json!(current);
                if obj == old {
                    // A no-op update: no new resourceVersion, no event, as the real server.
                    return Ok(old);
                }
                if obj.get("spec") != old.get("spec") {
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(0);
                    obj["metadata"]["generation"] = json!(generation + 1);
                }
                Ok(self.store_version(kind, &namespace, &name, obj, Some(old)))
            }
        }
    }

    /// The first half of a graceful deletion, as `kubectl delete pod` leaves a pod until its
    /// kubelet confirms: `metadata.deletionTimestamp` and `deletionGracePeriodSeconds` set (a
    /// `MODIFIED`); [`Store::delete`] finishes it.
    pub fn begin_deletion(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        grace_seconds: i64,
    ) -> Result<Value, StoreError> {
        let mut obj = self.get(kind, namespace, name).cloned().ok_or_else(|| {
            err(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural()),
            )
        })?;
        if obj["metadata"].get("deletionTimestamp").is_some() {
            return Ok(obj);
        }
        obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace_seconds);
        self.write(obj, Mode::Replace, true)
    }

    /// Delete an object; its final state (with the deletion's resourceVersion) is returned and
    /// is what watches see. A namespace first turns `Terminating`, then its objects go, then it.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Value, StoreError> {
        let key = (scope(kind, namespace), name.to_owned());
        let Some(old) = self.objects.get(&kind).and_then(|m| m.get(&key)).cloned() else {
            return Err(err(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural()),
            ));
        };
        if kind == Kind::Namespace {
            let mut terminating = old.clone();
            terminating["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            terminating["status"]["phase"] = json!("Terminating");
            let old = self.write(terminating, Mode::Replace, true)?;
            for k in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
                let names: Vec<String> = self
                    .objects
                    .get(&k)
                    .map(|m| {
                        m.keys()
                            .filter(|(ns, _)| ns == name)
                            .map(|(_, n)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for n in names {
                    self.delete(k, name, &n)?;
                }
            }
            return Ok(self.remove(kind, key, old));
        }
        Ok(self.remove(kind, key, old))
    }

    fn remove(&mut self, kind: Kind, key: Key, old: Value) -> Value {
        self.objects.entry(kind).or_default().remove(&key);
        self.rv += 1;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            ty: ChangeType::Deleted,
            object: last.clone(),
            prev: Some(old),
        });
        last
    }

    /// Delete every object of the Istio kinds (as deleting their CRDs does) and stop serving them.
    pub fn uninstall_istio(&mut self) {
        for kind in Kind::ALL.into_iter().filter(|k| k.is_istio()) {
            let keys: Vec<Key> = self
                .objects
                .get(&kind)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for (ns, name) in keys {
                self.delete(kind, &ns, &name).expect("listed object exists");
            }
        }
        self.istio_installed = false;
    }

    /// Store `obj` as the object's next version (the next resourceVersion) and record the
    /// change: ADDED without a `prev`ious version, MODIFIED with one.
    fn store_version(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut obj: Value,
        prev: Option<Value>,
    ) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.put(kind, namespace, name, obj.clone());
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            ty: if prev.is_some() {
                ChangeType::Modified
            } else {
                ChangeType::Added
            },
            object: obj.clone(),
            prev,
        });
        obj
    }

    fn put(&mut self, kind: Kind, namespace: &str, name: &str, obj: Value) {
        self.objects
            .entry(kind)
            .or_default()
            .insert((namespace.to_owned(), name.to_owned()), obj);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Apply,
    Create,
    Replace,
}

fn scope(kind: Kind, namespace: &str) -> String {
    if kind.namespaced() {
        namespace.to_owned()
    } else {
        String::new()
    }
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    (
        scope(kind, obj["metadata"]["namespace"].as_str().unwrap_or("")),
        obj["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// What the real server fills in on create that tests rely on.
fn defaults_on_create(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Namespace => {
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            if obj.get("spec").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            obj["status"] = json!({"phase": "Active"});
        }
        Kind::Pod if obj.get("status").is_none_or(Value::is_null) => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        _ => {}
    }
}

/// Apply a JSON merge patch (RFC 7386, `application/merge-patch+json`): objects merge, `null`
/// removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The current time as the API server writes `metav1.Time`: RFC 3339, UTC, whole seconds.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    fn pod(name: &str, node: &str, app: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
               "spec": {"nodeName": node, "containers": []}})
    }

    #[test]
    fn one_increasing_resource_version_and_history() {
        let mut s = Store::new();
        let n = s.apply(ns("prod")).expect("ns");
        assert_eq!(n["metadata"]["resourceVersion"], "1");
        assert_eq!(
            n["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "prod"
        );
        let p = s.apply(pod("a", "node-a", "web")).expect("pod");
        assert_eq!(p["metadata"]["resourceVersion"], "2");
        assert_eq!(p["metadata"]["generation"], 1);
        // No-op: no new version.
        let same = s.apply(pod("a", "node-a", "web")).expect("pod");
        assert_eq!(same["metadata"]["resourceVersion"], "2");
        let p = s.apply(pod("a", "node-a", "api")).expect("pod");
        assert_eq!(p["metadata"]["resourceVersion"], "3");
        assert_eq!(p["metadata"]["uid"], same["metadata"]["uid"]);
        assert!(
            s.apply(pod("a", "node-b", "api")).is_err(),
            "nodeName is immutable"
        );
        assert!(s.create(pod("a", "node-a", "api")).is_err(), "exists");
        let gone = s.delete(Kind::Pod, "prod", "a").expect("delete");
        assert_eq!(gone["metadata"]["resourceVersion"], "4");
        let types: Vec<_> = s.changes_after(1).map(|c| c.ty).collect();
        assert_eq!(
            types,
            [ChangeType::Added, ChangeType::Modified, ChangeType::Deleted]
        );
        // The list as it was at 2.
        let at2 = s.list(Kind::Pod, &Filter::default(), Some(2));
        assert_eq!(at2.len(), 1);
        assert_eq!(at2[0]["metadata"]["labels"]["app"], "web");
        assert!(s.list(Kind::Pod, &Filter::default(), None).is_empty());
    }

    #[test]
    fn leaving_a_selector_is_a_delete_for_that_watch() {
        let mut s = Store::new();
        s.apply(ns("prod")).expect("ns");
        s.apply(pod("a", "node-a", "web")).expect("pod");
        s.apply(pod("a", "node-a", "api")).expect("pod");
        let web = Filter {
            labels: LabelSelector::parse("app=web").expect("selector"),
            ..Filter::default()
        };
        let events: Vec<_> = s
            .changes_after(1)
            .filter_map(|c| event_for(c, &web))
            .collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, "ADDED");
        assert_eq!(events[1].0, "DELETED");
        assert_eq!(events[1].1["metadata"]["labels"]["app"], "web");
        assert_eq!(events[1].1["metadata"]["resourceVersion"], "3");
    }

    #[test]
    fn graceful_deletion_then_deletion() {
        let mut s = Store::new();
        s.apply(ns("prod")).expect("ns");
        s.apply(pod("a", "node-a", "web")).expect("pod");
        let going = s.begin_deletion(Kind::Pod, "prod", "a", 30).expect("begin");
        assert!(going["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(going["metadata"]["deletionGracePeriodSeconds"], 30);
        // A client's update cannot clear it.
        let mut again = going.clone();
        if let Some(m) = again["metadata"].as_object_mut() {
            m.remove("deletionTimestamp");
        }
        again["metadata"]["labels"]["app"] = json!("api");
        let kept = s.replace(again).expect("update");
        assert_eq!(
            kept["metadata"]["deletionTimestamp"],
            going["metadata"]["deletionTimestamp"]
        );
        let gone = s.delete(Kind::Pod, "prod", "a").expect("delete");
        assert!(gone["metadata"]["deletionTimestamp"].is_string());
        let types: Vec<_> = s.changes_after(2).map(|c| c.ty).collect();
        assert_eq!(
            types,
            [
                ChangeType::Modified,
                ChangeType::Modified,
                ChangeType::Deleted
            ]
        );
    }

    #[test]
    fn merge_patch_as_rfc_7386() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1], "e": "x"});
        merge_patch(
            &mut target,
            &json!({"a": {"b": null, "f": 3}, "d": [2], "e": null}),
        );
        assert_eq!(target, json!({"a": {"c": 2, "f": 3}, "d": [2]}));
    }

    #[test]
    fn time_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
