//! The discovery documents, shaped as the real server's: `/version`, `/api` (`APIVersions`),
//! `/api/v1` and `/apis/<group>/<version>` (`APIResourceList`), `/apis` (`APIGroupList`),
//! `/apis/<group>` (`APIGroup`), and the aggregated form of `/api` and `/apis`
//! (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`, asked for by the `Accept` header).

use serde_json::{Value, json};

use super::store::{ISTIO_GROUP, Kind};

/// The `Content-Type` of an aggregated discovery answer.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether an `Accept` header asks for aggregated discovery (v2).
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0",
        "gitCommit": "60a317eadfcb839692a5ee2e0ed5a8db6b8f3ed4",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T13:07:59Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    })
}

fn kinds_at(group: &str, version: &str) -> impl Iterator<Item = Kind> {
    Kind::ALL
        .into_iter()
        .filter(move |k| k.group() == group && k.versions().contains(&version))
}

fn verbs(kind: Kind) -> Vec<&'static str> {
    if kind == Kind::Namespace {
        vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ]
    } else {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

fn subresource_verbs(subresource: &str) -> Vec<&'static str> {
    if subresource == "finalize" {
        vec!["update"]
    } else {
        vec!["get", "patch", "update"]
    }
}

/// `/api/v1` or `/apis/<group>/<version>`.
pub fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for kind in kinds_at(group, version) {
        let mut r = json!({
            "name": kind.plural(),
            "singularName": kind.singular(),
            "namespaced": kind.namespaced(),
            "kind": kind.kind(),
            "verbs": verbs(kind),
            "shortNames": kind.short_names(),
        });
        if !kind.categories().is_empty() {
            r["categories"] = json!(kind.categories());
        }
        resources.push(r);
        for sub in kind.subresources() {
            resources.push(json!({
                "name": format!("{}/{sub}", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "kind": kind.kind(),
                "verbs": subresource_verbs(sub),
            }));
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(group, version),
        "resources": resources,
    })
}

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    }
}

fn group_versions(group: &str) -> Vec<Value> {
    let versions: &[&str] = if group == ISTIO_GROUP {
        Kind::AuthorizationPolicy.versions()
    } else {
        &[]
    };
    versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect()
}

/// `/apis/<group>`.
pub fn api_group(group: &str) -> Value {
    let versions = group_versions(group);
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first(),
    })
}

/// `/apis`: the groups served now (only Istio's, when its CRDs are installed).
pub fn group_list(istio_installed: bool) -> Value {
    let groups: Vec<Value> = if istio_installed {
        let mut g = api_group(ISTIO_GROUP);
        if let Some(m) = g.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        vec![g]
    } else {
        Vec::new()
    };
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn aggregated_group(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = kinds_at(group, v)
                .map(|kind| {
                    let gvk = json!({"group": group, "version": v, "kind": kind.kind()});
                    json!({
                        "resource": kind.plural(),
                        "responseKind": gvk,
                        "scope": if kind.namespaced() { "Namespaced" } else { "Cluster" },
                        "singularResource": kind.singular(),
                        "verbs": verbs(kind),
                        "shortNames": kind.short_names(),
                        "categories": kind.categories(),
                        "subresources": kind.subresources().iter().map(|s| json!({
                            "subresource": s,
                            "responseKind": gvk,
                            "verbs": subresource_verbs(s),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    let mut metadata = json!({"creationTimestamp": null});
    if !group.is_empty() {
        metadata["name"] = json!(group);
    }
    json!({"metadata": metadata, "versions": versions})
}

/// Aggregated discovery of `/api` (`core`) or `/apis`.
pub fn aggregated(core: bool, istio_installed: bool) -> Value {
    let items = if core {
        vec![aggregated_group("", &["v1"])]
    } else if istio_installed {
        vec![aggregated_group(
            ISTIO_GROUP,
            Kind::AuthorizationPolicy.versions(),
        )]
    } else {
        Vec::new()
    };
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}
