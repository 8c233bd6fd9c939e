//! What the policy says, in the terms the enforcement points need: a decision for one
//! connection to a workload (or "read its HTTP requests first"), a decision for one HTTP
//! request, the PeerAuthentication mode for a workload's port, the verdict that may be cached
//! for an identity pair, and whether an open connection is still allowed.
//!
//! The kernel caches verdicts per (source identity, destination identity, port), so a verdict
//! is cacheable only if the policy gives the same cacheable answer for every pod that carries
//! the destination identity (local workloads and peers alike): two pods of one service account
//! with different labels, and so different policies, are never cached as one.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use crate::{
    conn::{ConnInfo, Direction, RequestHead, Via},
    identity::{Endpoint, IdentityKey, LocalWorkload, SpiffeId},
    policy::{
        Connection, ConnectionDecision, Decision, Explanation, HttpRequest, MtlsMode, PolicySet,
        RequestPath, Target, Traffic, normalize::normalize_path,
    },
    state::Snapshot,
    tunnel::request_head::strip_port,
};

/// A decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub allowed: bool,
    /// The verdict holds for every connection with the same source identity, destination
    /// workload and port (the engine's view; [`pair`] widens it to the identity).
    pub cacheable: bool,
    /// `namespace/name` of the deciding policy (and rule), empty if none.
    pub policy: String,
    pub reason: String,
    /// The shadow decision of `istio.io/dry-run` policies, if any apply.
    pub dry_run: Option<Shadow>,
}

/// What dry-run policies would have decided (recorded, never enforced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shadow {
    Allow,
    Deny,
    /// It depends on an HTTP request the agent does not parse.
    Undecided,
}

impl Shadow {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Undecided => "undecided",
        }
    }
}

impl From<Decision> for Judgement {
    fn from(d: Decision) -> Self {
        let policy = d
            .decided_by
            .as_ref()
            .map(|p| match d.rule {
                Some(rule) => format!("{}/{} rule {rule}", p.namespace, p.name),
                None => format!("{}/{}", p.namespace, p.name),
            })
            .unwrap_or_default();
        let mut reason = d.reason;
        if !d.audited.is_empty() {
            let audited: Vec<String> = d
                .audited
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            reason = format!("{reason}; audited by {}", audited.join(", "));
        }
        let dry_run = d.dry_run.as_ref().map(|dry| match dry.allowed {
            Some(true) => Shadow::Allow,
            Some(false) => Shadow::Deny,
            None => Shadow::Undecided,
        });
        if let Some(dry) = &d.dry_run {
            let verdict = match dry.allowed {
                Some(true) => "ALLOW",
                Some(false) => "DENY",
                None => "undecided until the HTTP request",
            };
            let by = dry
                .decided_by
                .as_ref()
                .map(|p| match dry.rule {
                    Some(rule) => format!(" by {}/{} rule {rule}", p.namespace, p.name),
                    None => format!(" by {}/{}", p.namespace, p.name),
                })
                .unwrap_or_default();
            reason = format!("{reason}; dry run: {verdict}{by} (not enforced)");
        }
        Self {
            allowed: d.allowed,
            cacheable: d.cacheable,
            policy,
            reason,
            dry_run,
        }
    }
}

/// The decision for a connection, before any bytes are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Decided(Judgement),
    /// The decision depends on the HTTP requests the connection carries.
    Http,
}

fn target<'a>(namespace: &'a str, labels: &'a BTreeMap<String, String>) -> Target<'a> {
    Target { namespace, labels }
}

fn evaluate(
    policies: &PolicySet,
    to: &Target<'_>,
    source: Option<&str>,
    source_ip: Option<IpAddr>,
    destination: SocketAddr,
) -> Outcome {
    let conn = Connection {
        source_principal: source,
        source_ip,
        destination_ip: destination.ip(),
        destination_port: destination.port(),
    };
    match policies.evaluate_connection(to, &conn) {
        ConnectionDecision::Decided(d) => Outcome::Decided(d.into()),
        ConnectionDecision::NeedsHttp { .. } => Outcome::Http,
    }
}

/// The connection from `source` (a verified SPIFFE ID, `None` for plaintext) at `source_ip` to
/// `destination`, one of `workload`'s addresses.
pub fn connection(
    snapshot: &Snapshot,
    workload: &LocalWorkload,
    source: Option<&str>,
    source_ip: Option<IpAddr>,
    destination: SocketAddr,
) -> Outcome {
    let to = target(&workload.namespace, &workload.labels);
    evaluate(&snapshot.policies, &to, source, source_ip, destination)
}

/// One HTTP request on a connection whose outcome was [`Outcome::Http`].
pub fn request(
    snapshot: &Snapshot,
    workload: &LocalWorkload,
    source: Option<&str>,
    source_ip: Option<IpAddr>,
    destination: SocketAddr,
    head: &RequestHead,
) -> Judgement {
    let conn = Connection {
        source_principal: source,
        source_ip,
        destination_ip: destination.ip(),
        destination_port: destination.port(),
    };
    let request = HttpRequest {
        method: &head.method,
        path: &head.path,
        host: &head.host,
        headers: &head.headers,
        auth: head.auth.as_ref(),
    };
    let to = target(&workload.namespace, &workload.labels);
    snapshot
        .policies
        .evaluate_request(&to, &conn, &request)
        .into()
}

/// The mTLS mode for `workload`'s `port`, and what set it (a PeerAuthentication, or the
/// config's mesh default).
pub fn mtls_mode(snapshot: &Snapshot, workload: &LocalWorkload, port: u16) -> (MtlsMode, String) {
    let to = target(&workload.namespace, &workload.labels);
    let (mode, source) = snapshot.policies.mtls_mode(&to, port);
    let source = source
        .map(|p| format!("PeerAuthentication {}/{}", p.namespace, p.name))
        .unwrap_or_else(|| "the mesh default (config mtls.mode)".to_owned());
    (mode, source)
}

/// The verdict that may be cached for (`source`, `destination`, `port`): `Some(true)` allow,
/// `Some(false)` deny, `None` if nothing may be cached (a pod of either identity is in `mode:
/// tunnel`, the decision depends on more than the pair, differs between the pods of the
/// destination identity, or no pod carries it).
pub fn pair(
    snapshot: &Snapshot,
    source: &str,
    destination: IdentityKey,
    port: u16,
) -> Option<bool> {
    let registry = &snapshot.registry;
    let pods = registry.pods_of(destination);
    let tunnel_only = |pods: &[(IpAddr, &Endpoint)]| pods.iter().any(|(_, p)| p.tunnel_only);
    if tunnel_only(&pods) || tunnel_only(&registry.pods_of(IdentityKey::of(source))) {
        return None;
    }
    let mut verdict = None;
    for (ip, pod) in pods {
        let to = target(&pod.namespace, &pod.labels);
        let allowed = match evaluate(
            &snapshot.policies,
            &to,
            Some(source),
            None,
            SocketAddr::new(ip, port),
        ) {
            Outcome::Decided(j) if j.cacheable => j.allowed,
            _ => return None,
        };
        if verdict.is_some_and(|v| v != allowed) {
            return None;
        }
        verdict = Some(allowed);
    }
    verdict
}

/// [`pair`] for many entries at once (a revocation sweep): each answer is computed once per
/// (source, destination, port), and once per (source, destination) when no policy of the
/// destination's pods looks at the port.
pub struct PairMemo<'a> {
    snapshot: &'a Snapshot,
    by_port: HashMap<(IdentityKey, IdentityKey, u16), Option<bool>>,
    /// `Some(answer)` for a port-insensitive pair, `None` if it must be asked per port.
    by_pair: HashMap<(IdentityKey, IdentityKey), Option<Option<bool>>>,
}

impl<'a> PairMemo<'a> {
    pub fn new(snapshot: &'a Snapshot) -> Self {
        Self {
            snapshot,
            by_port: HashMap::new(),
            by_pair: HashMap::new(),
        }
    }

    /// The cacheable verdict for (`source`, `destination`, `port`); `None` if nothing may be
    /// cached (including an unknown source identity).
    pub fn get(
        &mut self,
        source: IdentityKey,
        destination: IdentityKey,
        port: u16,
    ) -> Option<bool> {
        let snapshot = self.snapshot;
        let source_id = snapshot.registry.identity(source)?;
        let ask = || pair(snapshot, &source_id.to_string(), destination, port);
        let scope = *self
            .by_pair
            .entry((source, destination))
            .or_insert_with(|| {
                let sensitive = snapshot
                    .registry
                    .pods_of(destination)
                    .iter()
                    .any(|(_, pod)| {
                        snapshot
                            .policies
                            .port_sensitive(&target(&pod.namespace, &pod.labels))
                    });
                (!sensitive).then(ask)
            });
        match scope {
            Some(answer) => answer,
            None => *self
                .by_port
                .entry((source, destination, port))
                .or_insert_with(ask),
        }
    }
}

/// Does the current state still allow the open connection `info`?
pub fn still_allowed(snapshot: &Snapshot, info: &ConnInfo) -> bool {
    let destination = info.destination_address;
    let Some(pod) = snapshot.registry.endpoint(&destination.ip()) else {
        return false;
    };
    if pod.identity != info.destination {
        return false;
    }
    if info
        .source
        .as_ref()
        .is_some_and(|s| snapshot.registry.identity(s.key()).is_none())
    {
        return false;
    }
    let source = info.source.as_ref().map(SpiffeId::as_str);
    let to = target(&pod.namespace, &pod.labels);
    if source.is_none()
        && snapshot.policies.mtls_mode(&to, destination.port()).0 == MtlsMode::Strict
    {
        return false;
    }
    match evaluate(&snapshot.policies, &to, source, info.source_ip, destination) {
        Outcome::Decided(j) => j.allowed,
        // Per-request enforcement goes on with the current policy; a connection spliced at the
        // destination cannot be, so it is closed. The source side of a tunnel leaves it to the
        // destination.
        Outcome::Http => info.path == Via::Http || info.direction == Direction::Outbound,
    }
}

/// The question `latch policy explain` and `GET /v1/explain` answer.
#[derive(Clone, Debug)]
pub struct Question {
    /// A SPIFFE ID, or `plaintext` for a connection without mTLS.
    pub from: String,
    pub source_ip: Option<IpAddr>,
    pub to: SocketAddr,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// `NAME:VALUE` request headers.
    pub headers: Vec<String>,
}

/// The decision for `question` against the workload that owns its destination address (a
/// local workload or a peer), with the deciding policy and rule. Errors name the bad input.
/// `NAME:VALUE` headers as a header map; errors name the bad one.
fn header_map(headers: &[String]) -> Result<hyper::HeaderMap, String> {
    let mut map = hyper::HeaderMap::new();
    for header in headers {
        let bad = |why: &str| format!("--header {header:?}: {why}");
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| bad("expected NAME:VALUE"))?;
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("not a header name"))?;
        let value = hyper::header::HeaderValue::from_str(value.trim())
            .map_err(|_| bad("not a header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

pub fn explain(snapshot: &Snapshot, question: &Question) -> Result<Explanation, String> {
    let source = match question.from.as_str() {
        "plaintext" => None,
        id => {
            crate::identity::SpiffeId::parse(id).map_err(|e| format!("--from {id:?}: {e}"))?;
            Some(id)
        }
    };
    let destination = SocketAddr::new(question.to.ip().to_canonical(), question.to.port());
    let pod = snapshot
        .registry
        .endpoint(&destination.ip())
        .ok_or_else(|| {
            format!(
                "--to {}: no workload or peer in the config has this address",
                question.to.ip()
            )
        })?;
    let to = target(&pod.namespace, &pod.labels);
    let conn = Connection {
        source_principal: source,
        source_ip: question.source_ip,
        destination_ip: destination.ip(),
        destination_port: destination.port(),
    };
    let any_request = question.method.is_some()
        || question.path.is_some()
        || question.host.is_some()
        || !question.headers.is_empty();
    let headers = header_map(&question.headers)?;
    let mut explanation = if any_request {
        // As the enforcement point sees the request: the path normalised with the config's
        // mode (the query string is never part of it), the host without its port.
        let normalization = snapshot.config.http.path_normalization;
        let given = question.path.as_deref().unwrap_or("/");
        let path = given.split_once('?').map_or(given, |(path, _)| path);
        let normalized = normalize_path(path, normalization).map_err(|e| {
            format!("--path {given:?}: {e} (the agent answers such a request with 400 Bad Request)")
        })?;
        let request = HttpRequest {
            method: question.method.as_deref().unwrap_or("GET"),
            path: &normalized,
            host: strip_port(question.host.as_deref().unwrap_or("")),
            headers: &headers,
            auth: None,
        };
        let mut explanation = snapshot.policies.explain(&to, &conn, Some(&request));
        explanation.request_path = Some(RequestPath {
            given: given.to_owned(),
            normalized: normalized.clone(),
            normalization,
        });
        explanation
    } else {
        snapshot.policies.explain(&to, &conn, None)
    };
    // Nothing is cached when either side is in `mode: tunnel`: every connection of an mTLS
    // pair is tunneled.
    let source_tunnel_only = source.is_some_and(|id| {
        snapshot
            .registry
            .pods_of(IdentityKey::of(id))
            .iter()
            .any(|(_, p)| p.tunnel_only)
    });
    let tunnel_mode = pod.tunnel_only || source_tunnel_only;
    if tunnel_mode && explanation.traffic == Traffic::Fastpath {
        explanation = explanation.with_traffic(Traffic::Tunneled);
    }
    Ok(explanation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: prod }
spec:
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin", "/admin/*"] } }]
  - to: [{ operation: { hosts: ["internal.example"] } }]
  - when: [{ key: "request.headers[x-debug]", values: ["*"] }]
"#;

    fn snapshot(http: &str) -> Snapshot {
        Snapshot::from_texts(
            &format!(
                "node: {{ name: n1, address: 10.244.0.1 }}\ntrustDomain: cluster.local\n\
                 cgroupRoot: /cg\nbpfPinDir: /sys/fs/bpf/x\n{http}\
                 peers:\n  - {{ name: payment, namespace: prod, serviceAccount: payment, \
                 ips: [10.244.2.2], node: 10.244.0.2 }}\n"
            ),
            NO_ADMIN,
        )
    }

    fn ask(snapshot: &Snapshot, path: &str, host: &str) -> Result<Explanation, String> {
        ask_with(snapshot, path, host, &[])
    }

    fn ask_with(
        snapshot: &Snapshot,
        path: &str,
        host: &str,
        headers: &[&str],
    ) -> Result<Explanation, String> {
        explain(
            snapshot,
            &Question {
                from: "spiffe://cluster.local/ns/prod/sa/frontend".into(),
                source_ip: None,
                to: "10.244.2.2:8080".parse().expect("addr"),
                method: Some("GET".into()),
                path: Some(path.into()),
                host: Some(host.into()),
                headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            },
        )
    }

    #[test]
    fn explain_normalises_the_path_with_the_configured_mode() {
        let base = snapshot("");
        let e = ask(&base, "/x/../%61dmin?next=/ok", "payment").expect("explained");
        assert!(!e.decision.allowed, "{e:?}");
        assert_eq!(
            e.request_path,
            Some(RequestPath {
                given: "/x/../%61dmin?next=/ok".into(),
                normalized: "/admin".into(),
                normalization: crate::config::PathNormalization::Base,
            })
        );
        assert!(
            ask(&base, "/a/./b", "payment")
                .expect("ok")
                .decision
                .allowed
        );
        assert!(
            ask(&base, "//admin", "payment")
                .expect("ok")
                .decision
                .allowed
        );

        let merge = snapshot("http: { pathNormalization: MERGE_SLASHES }\n");
        assert!(
            !ask(&merge, "//admin", "payment")
                .expect("ok")
                .decision
                .allowed
        );

        let none = snapshot("http: { pathNormalization: NONE }\n");
        assert!(
            ask(&none, "/x/../admin", "payment")
                .expect("ok")
                .decision
                .allowed
        );

        let err = ask(&base, "/%zz", "payment").expect_err("bad escape");
        assert!(
            err.contains("--path \"/%zz\": invalid percent escape"),
            "{err}"
        );
        assert!(err.contains("400 Bad Request"), "{err}");
    }

    #[test]
    fn explain_judges_request_headers_and_names_a_bad_one() {
        let base = snapshot("");
        let e = ask_with(&base, "/", "payment", &["X-Debug: 1"]).expect("explained");
        assert!(!e.decision.allowed, "{e:?}");
        assert_eq!(e.decision.rule, Some(2), "{e:?}");
        let e = ask_with(&base, "/", "payment", &["x-other: 1"]).expect("explained");
        assert!(e.decision.allowed, "{e:?}");
        let err = ask_with(&base, "/", "payment", &["no colon"]).expect_err("bad header");
        assert!(
            err.contains("--header \"no colon\": expected NAME:VALUE"),
            "{err}"
        );
        let err = ask_with(&base, "/", "payment", &["a b: 1"]).expect_err("bad name");
        assert!(err.contains("not a header name"), "{err}");
    }

    #[test]
    fn explain_judges_the_host_without_its_port() {
        let base = snapshot("");
        let e = ask(&base, "/", "internal.example:8080").expect("explained");
        assert!(!e.decision.allowed, "{e:?}");
    }
}
