//! Who may do what: the request's attributes as the API server derives them from method, path
//! and query (`RequestInfoFactory`: group, resource, subresource, namespace, name, verb — a GET
//! of a collection is `list`, with `watch=true` it is `watch`), and the agent's ClusterRole, read
//! from `deploy/rbac.yaml`, deciding them. Discovery paths and `/version` are allowed to everyone,
//! as Kubernetes' `system:discovery` and `system:public-info-viewer` roles allow them.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The attributes of one request, as an authorizer sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `false` for a non-resource URL (`/version`, `/api`, `/healthz`, ...).
    pub resource_request: bool,
    pub verb: String,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// Truthy as Go's `strconv.ParseBool`, as the server reads `watch`.
pub fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// Derive the attributes of a request (`query` already decoded into pairs).
pub fn attributes(method: &str, path: &str, query: &[(String, String)]) -> Attributes {
    let http_verb = match method {
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => return non_resource(&other.to_lowercase()),
    };
    let trimmed = path.trim_matches('/');
    let mut parts: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    let (group, version) = match parts.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => {
            let v = (*v).to_owned();
            parts.drain(..2);
            (String::new(), v)
        }
        ["apis", g, v, rest @ ..] if !rest.is_empty() => {
            let (g, v) = ((*g).to_owned(), (*v).to_owned());
            parts.drain(..3);
            (g, v)
        }
        _ => return non_resource(http_verb),
    };
    let mut attrs = Attributes {
        resource_request: true,
        verb: http_verb.to_owned(),
        api_group: group,
        api_version: version,
        ..Attributes::default()
    };
    // The deprecated `/watch/` prefix.
    if parts.first() == Some(&"watch") && http_verb == "get" {
        attrs.verb = "watch".to_owned();
        parts.remove(0);
    }
    if parts.first() == Some(&"namespaces")
        && let Some(ns) = parts.get(1)
    {
        attrs.namespace = (*ns).to_owned();
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts.drain(..2);
        }
    }
    if parts.len() >= 3 {
        attrs.subresource = parts[2].to_owned();
    }
    if parts.len() >= 2 {
        attrs.name = parts[1].to_owned();
    }
    if let Some(r) = parts.first() {
        attrs.resource = (*r).to_owned();
    }
    if attrs.name.is_empty() && attrs.verb == "get" {
        let watch = query.iter().any(|(k, v)| k == "watch" && parse_bool(v));
        attrs.verb = if watch { "watch" } else { "list" }.to_owned();
    }
    if attrs.name.is_empty() && (attrs.verb == "list" || attrs.verb == "watch") {
        // A field selector pinning metadata.name makes the name visible to resourceNames rules.
        if let Some((_, fs)) = query.iter().find(|(k, _)| k == "fieldSelector") {
            for term in fs.split(',') {
                if let Some(n) = term.strip_prefix("metadata.name=") {
                    attrs.name = n.trim_start_matches('=').to_owned();
                }
            }
        }
    }
    if attrs.name.is_empty() && attrs.verb == "delete" {
        attrs.verb = "deletecollection".to_owned();
    }
    attrs
}

fn non_resource(verb: &str) -> Attributes {
    Attributes {
        verb: verb.to_owned(),
        ..Attributes::default()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
}

/// The agent's permissions: the ClusterRole of `deploy/rbac.yaml` and the user its binding names.
#[derive(Clone, Debug)]
pub struct Rbac {
    /// The ClusterRole's name.
    pub role: String,
    /// The user the requests are made as: `system:serviceaccount:<ns>:<name>` of the binding's
    /// ServiceAccount subject.
    pub user: String,
    rules: Vec<Rule>,
}

/// The paths Kubernetes' `system:discovery` and `system:public-info-viewer` roles give everyone.
const PUBLIC_PATHS: &[&str] = &[
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/readyz",
    "/version",
    "/version/",
    "/openapi",
    "/openapi/*",
];

impl Rbac {
    /// `deploy/rbac.yaml` of this repository.
    pub fn default_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent")
            .join("deploy/rbac.yaml")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The first ClusterRole of a multi-document YAML, and the user of the ClusterRoleBinding
    /// that binds it (its first ServiceAccount subject).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut role = None;
        let mut user = None;
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let doc = serde_json::Value::deserialize(doc).context("parsing a YAML document")?;
            match doc["kind"].as_str() {
                Some("ClusterRole") if role.is_none() => {
                    let name = doc["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    let rules: Vec<Rule> = serde_json::from_value(doc["rules"].clone())
                        .context("the ClusterRole's rules")?;
                    role = Some((name, rules));
                }
                Some("ClusterRoleBinding") => {
                    if let Some(sa) = doc["subjects"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|s| s["kind"] == "ServiceAccount")
                    {
                        user = Some((
                            doc["roleRef"]["name"].as_str().unwrap_or("").to_owned(),
                            format!(
                                "system:serviceaccount:{}:{}",
                                sa["namespace"].as_str().unwrap_or(""),
                                sa["name"].as_str().unwrap_or("")
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        let Some((name, rules)) = role else {
            bail!("no ClusterRole");
        };
        let user = match user {
            Some((bound, user)) if bound == name => user,
            _ => bail!("no ClusterRoleBinding binds ClusterRole {name} to a ServiceAccount"),
        };
        Ok(Self {
            role: name,
            user,
            rules,
        })
    }

    /// Whether a request with these attributes (on `path`) is allowed.
    pub fn allows(&self, attrs: &Attributes, path: &str) -> bool {
        if !attrs.resource_request {
            if attrs.verb == "get" && PUBLIC_PATHS.iter().any(|p| path_matches(p, path)) {
                return true;
            }
            return self.rules.iter().any(|r| {
                has(&r.verbs, &attrs.verb)
                    && r.non_resource_urls.iter().any(|p| path_matches(p, path))
            });
        }
        let resource = if attrs.subresource.is_empty() {
            attrs.resource.clone()
        } else {
            format!("{}/{}", attrs.resource, attrs.subresource)
        };
        self.rules.iter().any(|r| {
            has(&r.verbs, &attrs.verb)
                && has(&r.api_groups, &attrs.api_group)
                && (has(&r.resources, &resource)
                    || (!attrs.subresource.is_empty()
                        && r.resources
                            .iter()
                            .any(|x| x == &format!("*/{}", attrs.subresource))))
                && (r.resource_names.is_empty()
                    || (!attrs.name.is_empty() && r.resource_names.contains(&attrs.name)))
        })
    }

    /// The message of the 403, as the real authorizer words it.
    pub fn forbidden_message(&self, attrs: &Attributes, path: &str) -> String {
        if !attrs.resource_request {
            return format!(
                "forbidden: User \"{}\" cannot {} path \"{path}\"",
                self.user, attrs.verb
            );
        }
        let resource = if attrs.subresource.is_empty() {
            attrs.resource.clone()
        } else {
            format!("{}/{}", attrs.resource, attrs.subresource)
        };
        let what = if attrs.name.is_empty() {
            format!("{} is forbidden", attrs.resource)
        } else {
            format!("{} \"{}\" is forbidden", attrs.resource, attrs.name)
        };
        let scope = if attrs.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{}\"", attrs.namespace)
        };
        format!(
            "{what}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            self.user, attrs.verb, attrs.api_group
        )
    }
}

fn has(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn verbs_as_the_server_maps_them() {
        let a = attributes("GET", "/api/v1/pods", &[]);
        assert_eq!((a.verb.as_str(), a.resource.as_str()), ("list", "pods"));
        let a = attributes("GET", "/api/v1/pods", &q(&[("watch", "1")]));
        assert_eq!(a.verb, "watch");
        let a = attributes("GET", "/api/v1/watch/namespaces/prod/pods", &[]);
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("watch", "prod"));
        let a = attributes("GET", "/api/v1/namespaces/prod/pods/web", &[]);
        assert_eq!(
            (a.verb.as_str(), a.namespace.as_str(), a.name.as_str()),
            ("get", "prod", "web")
        );
        let a = attributes("GET", "/api/v1/namespaces/prod", &[]);
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.name.as_str()),
            ("get", "namespaces", "prod")
        );
        let a = attributes("GET", "/api/v1/namespaces/prod/pods/web/log", &[]);
        assert_eq!(a.subresource, "log");
        let a = attributes(
            "GET",
            "/apis/security.istio.io/v1/namespaces/prod/authorizationpolicies",
            &q(&[("watch", "true")]),
        );
        assert_eq!(
            (a.verb.as_str(), a.api_group.as_str(), a.resource.as_str()),
            ("watch", "security.istio.io", "authorizationpolicies")
        );
        let a = attributes("DELETE", "/api/v1/namespaces/prod/pods", &[]);
        assert_eq!(a.verb, "deletecollection");
        assert!(!attributes("GET", "/apis/security.istio.io/v1", &[]).resource_request);
        assert!(!attributes("GET", "/version", &[]).resource_request);
    }

    #[test]
    fn the_repository_role_allows_reads_of_what_the_agent_watches_only() {
        let rbac = Rbac::load(&Rbac::default_path()).expect("deploy/rbac.yaml");
        assert_eq!(rbac.user, "system:serviceaccount:latch-system:latch");
        let allowed =
            |m: &str, p: &str, qs: &[(&str, &str)]| rbac.allows(&attributes(m, p, &q(qs)), p);
        assert!(allowed("GET", "/api/v1/pods", &[("watch", "true")]));
        assert!(allowed("GET", "/api/v1/namespaces/prod/pods/web", &[]));
        assert!(allowed("GET", "/api/v1/namespaces", &[]));
        assert!(allowed(
            "GET",
            "/apis/security.istio.io/v1beta1/peerauthentications",
            &[]
        ));
        assert!(allowed("GET", "/apis", &[]));
        assert!(allowed("GET", "/version", &[]));
        assert!(!allowed("GET", "/api/v1/secrets", &[]));
        assert!(!allowed("GET", "/api/v1/namespaces/prod/pods/web/log", &[]));
        assert!(!allowed("POST", "/api/v1/namespaces/prod/pods", &[]));
        assert!(!allowed("GET", "/metrics", &[]));
        let a = attributes("GET", "/api/v1/namespaces/prod/secrets", &[]);
        assert_eq!(
            rbac.forbidden_message(&a, "/api/v1/namespaces/prod/secrets"),
            "secrets is forbidden: User \"system:serviceaccount:latch-system:latch\" cannot list resource \"secrets\" in API group \"\" in the namespace \"prod\""
        );
    }
}
