//! Policies loaded one object at a time, as Kubernetes mode keeps them: objects as the API
//! server returns them, and the oldest PeerAuthentication of a level deciding.

use std::{collections::BTreeMap, path::Path};

use super::super::{MtlsMode, PolicyKind, PolicyObject, PolicySet, Target};

/// A namespace-wide PeerAuthentication of `prod` as the API server returns it.
fn peer_authentication(name: &str, created: &str, mode: &str) -> String {
    format!(
        r#"{{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
  "metadata": {{"name": "{name}", "namespace": "prod", "uid": "6a1c4f0e-{name}",
    "resourceVersion": "4711", "generation": 2, "creationTimestamp": "{created}",
    "annotations": {{"kubectl.kubernetes.io/last-applied-configuration": "{{}}"}},
    "managedFields": [{{"manager": "kubectl-client-side-apply", "operation": "Update",
      "apiVersion": "security.istio.io/v1", "time": "{created}", "fieldsType": "FieldsV1",
      "fieldsV1": {{"f:spec": {{".": {{}}, "f:mtls": {{}}}}}}}}],
    "ownerReferences": [{{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
      "uid": "0b9d", "controller": true}}],
    "finalizers": ["example.com/keep"]}},
  "spec": {{"mtls": {{"mode": "{mode}"}}}},
  "status": {{"validationMessages": []}}}}"#
    )
}

fn mode_of(set: &PolicySet) -> (MtlsMode, String) {
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "prod",
        labels: &labels,
    };
    let (mode, by) = set.mtls_mode(&target, 8080);
    (mode, by.map(|r| r.name.clone()).unwrap_or_default())
}

fn object(name: &str, created: &str, mode: &str) -> PolicyObject {
    let origin = format!("PeerAuthentication prod/{name}");
    match PolicyObject::parse(
        Path::new(&origin),
        &peer_authentication(name, created, mode),
    ) {
        Ok(object) => object,
        Err(errors) => panic!("{errors:#?}"),
    }
}

#[test]
fn an_object_as_the_api_server_returns_it_is_accepted() {
    let object = object("mesh", "2026-01-02T03:04:05Z", "STRICT");
    assert_eq!(object.kind(), PolicyKind::PeerAuthentication);
    let set = PolicySet::from_objects([&object], "istio-system");
    assert_eq!(mode_of(&set), (MtlsMode::Strict, "mesh".to_owned()));
}

#[test]
fn the_oldest_peer_authentication_of_a_level_decides() {
    // `a-new` sorts first by name, but `z-old` was created first.
    let new = object("a-new", "2026-06-01T00:00:00Z", "DISABLE");
    let old = object("z-old", "2025-06-01T00:00:00Z", "STRICT");
    let set = PolicySet::from_objects([&new, &old], "istio-system");
    assert_eq!(mode_of(&set), (MtlsMode::Strict, "z-old".to_owned()));
    let set = PolicySet::from_objects([&old, &new], "istio-system");
    assert_eq!(mode_of(&set), (MtlsMode::Strict, "z-old".to_owned()));
}

#[test]
fn without_creation_times_the_first_by_name_decides() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: prod}\nspec: {mtls: {mode: DISABLE}}\n";
    let set = PolicySet::from_yaml(&[(Path::new("p.yaml"), text)], "istio-system").expect("set");
    assert_eq!(mode_of(&set), (MtlsMode::Disable, "a".to_owned()));
}

#[test]
fn a_bad_object_is_refused_naming_its_origin_and_field() {
    let text = peer_authentication("bad", "2026-01-02T03:04:05Z", "SOMETIMES");
    let errors = PolicyObject::parse(Path::new("PeerAuthentication prod/bad"), &text)
        .expect_err("an unknown mode");
    let shown = errors[0].to_string();
    assert!(shown.starts_with("PeerAuthentication prod/bad"), "{shown}");
    assert!(shown.contains("spec.mtls.mode"), "{shown}");

    let text = peer_authentication("late", "yesterday", "STRICT");
    let errors = PolicyObject::parse(Path::new("PeerAuthentication prod/late"), &text)
        .expect_err("not a time");
    let shown = errors[0].to_string();
    assert!(shown.contains("metadata.creationTimestamp"), "{shown}");
}
