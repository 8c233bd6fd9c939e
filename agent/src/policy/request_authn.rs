//! Istio's `RequestAuthentication`: checks a parsed document (every problem with its field path)
//! and compiles it into the [`JwtRule`]s that [`crate::authn`] verifies tokens with, and selects
//! the rules that apply to a workload ([`select`]) as Istio does: a policy applies to the
//! workloads its selector matches in its namespace (no selector: all of them), a policy in the
//! root namespace to the matching workloads of every namespace.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hyper::header::HeaderName;

use super::{
    compile::{Meta, Problem},
    decision::Target,
    model,
};
use crate::{authn::keys::KeySet, config::report::problem};

/// One checked RequestAuthentication.
#[derive(Debug, Clone)]
pub(crate) struct RequestAuthnPolicy {
    pub meta: Meta,
    /// Empty: every workload of the namespace.
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<Arc<JwtRule>>,
    /// What was accepted but is not enforced (`targetRef`), for `latch policy check`.
    pub warnings: Vec<Problem>,
    /// The same, each as `file:line:col: field: why` (set by the loader, which knows lines).
    pub located_warnings: Vec<String>,
}

/// One trusted issuer: where its tokens are found, how they are checked, what is passed on.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `namespace/name` of the RequestAuthentication, for logs.
    pub policy: String,
    pub issuer: String,
    /// Accepted `aud` values; empty: the audience is not checked.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Where tokens are looked for, in order.
    pub locations: Vec<TokenLocation>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
    pub output_claim_to_headers: Vec<(HeaderName, String)>,
    /// The JWKS fetch timeout of this rule (`timeout`), if set; else the config's.
    pub fetch_timeout: Option<Duration>,
}

/// Where an issuer's public keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Fetched over HTTPS (and cached) from this URI.
    Uri(hyper::Uri),
    /// Given in the policy (`jwks`).
    Inline(Arc<KeySet>),
}

/// One place a token may be carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header whose value is `prefix` then the token (the prefix matched without regard to
    /// ASCII case, as `Bearer ` is).
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl TokenLocation {
    /// Istio's default: `Authorization: Bearer <token>` and `?access_token=<token>`.
    pub fn defaults() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: hyper::header::AUTHORIZATION,
                prefix: "Bearer ".to_owned(),
            },
            TokenLocation::Param("access_token".to_owned()),
        ]
    }
}

/// Compile a RequestAuthentication; `meta` is already checked.
pub(crate) fn compile(
    meta: Meta,
    spec: &model::RequestAuthenticationSpec,
) -> Result<RequestAuthnPolicy, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for (path, value) in [
        ("spec.targetRef", &spec.target_ref),
        ("spec.targetRefs", &spec.target_refs),
    ] {
        if value.is_some() {
            warnings.push(problem(
                path,
                "accepted but not enforced: it targets gateways and waypoints, which Latch does \
                 not have; workloads are chosen by spec.selector",
            ));
        }
    }
    let selector = spec
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    if selector.keys().any(String::is_empty) {
        problems.push(problem(
            "spec.selector.matchLabels",
            "a label key must not be empty",
        ));
    }
    let policy = format!("{}/{}", meta.namespace, meta.name);
    let mut rules = Vec::new();
    for (i, raw) in spec.jwt_rules.iter().flatten().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        match rule(&policy, &path, raw) {
            Ok(rule) => rules.push(Arc::new(rule)),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(RequestAuthnPolicy {
        meta,
        selector,
        rules,
        warnings,
        located_warnings: Vec::new(),
    })
}

fn rule(policy: &str, path: &str, raw: &model::JwtRule) -> Result<JwtRule, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut bad = |field: &str, message: String| {
        problems.push(problem(format!("{path}.{field}"), message));
    };
    if raw.issuer.trim().is_empty() {
        bad(
            "issuer",
            "required: the `iss` tokens of this rule carry".into(),
        );
    }
    let keys = match (&raw.jwks_uri, &raw.jwks) {
        (Some(_), Some(_)) => {
            bad(
                "jwks",
                "give jwksUri or jwks, not both (which one Latch would trust is ambiguous)".into(),
            );
            None
        }
        (None, None) => {
            bad(
                "jwksUri",
                "required (or an inline jwks): Latch does not discover keys through the \
                 issuer's OpenID configuration"
                    .into(),
            );
            None
        }
        (Some(uri), None) => match jwks_uri(uri) {
            Ok(uri) => Some(KeySource::Uri(uri)),
            Err(why) => {
                bad("jwksUri", why);
                None
            }
        },
        (None, Some(text)) => match KeySet::parse(text) {
            Ok((_, keys)) => Some(KeySource::Inline(Arc::new(keys))),
            Err(why) => {
                bad("jwks", why);
                None
            }
        },
    };
    let mut locations = Vec::new();
    for (i, h) in raw.from_headers.iter().flatten().enumerate() {
        match header_name(&h.name) {
            Ok(name) => locations.push(TokenLocation::Header {
                name,
                prefix: h.prefix.clone().unwrap_or_default(),
            }),
            Err(why) => bad(&format!("fromHeaders[{i}].name"), why),
        }
    }
    for (i, p) in raw.from_params.iter().flatten().enumerate() {
        if p.is_empty() {
            bad(&format!("fromParams[{i}]"), "must not be empty".into());
        } else {
            locations.push(TokenLocation::Param(p.clone()));
        }
    }
    for (i, c) in raw.from_cookies.iter().flatten().enumerate() {
        if c.is_empty() || c.contains([';', '=', ' ', ',']) {
            bad(
                &format!("fromCookies[{i}]"),
                format!("{c:?} is not a cookie name"),
            );
        } else {
            locations.push(TokenLocation::Cookie(c.clone()));
        }
    }
    if locations.is_empty() {
        locations = TokenLocation::defaults();
    }
    let output_payload_to_header = match &raw.output_payload_to_header {
        None => None,
        Some(name) => match header_name(name) {
            Ok(name) => Some(name),
            Err(why) => {
                bad("outputPayloadToHeader", why);
                None
            }
        },
    };
    let mut output_claim_to_headers = Vec::new();
    for (i, c) in raw.output_claim_to_headers.iter().flatten().enumerate() {
        let header = match header_name(&c.header) {
            Ok(name) => Some(name),
            Err(why) => {
                bad(&format!("outputClaimToHeaders[{i}].header"), why);
                None
            }
        };
        if c.claim.is_empty() {
            bad(
                &format!("outputClaimToHeaders[{i}].claim"),
                "must not be empty".into(),
            );
        } else if let Some(header) = header {
            output_claim_to_headers.push((header, c.claim.clone()));
        }
    }
    let fetch_timeout = match &raw.timeout {
        None => None,
        Some(text) => match humantime::parse_duration(text.trim()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                bad("timeout", format!("{text:?} must be greater than zero"));
                None
            }
            Err(e) => {
                bad("timeout", format!("invalid duration {text:?}: {e}"));
                None
            }
        },
    };
    for (i, a) in raw.audiences.iter().flatten().enumerate() {
        if a.is_empty() {
            bad(&format!("audiences[{i}]"), "must not be empty".into());
        }
    }
    match keys {
        Some(keys) if problems.is_empty() => Ok(JwtRule {
            policy: policy.to_owned(),
            issuer: raw.issuer.clone(),
            audiences: raw.audiences.clone().unwrap_or_default(),
            keys,
            locations,
            forward_original_token: raw.forward_original_token.unwrap_or(false),
            output_payload_to_header,
            output_claim_to_headers,
            fetch_timeout,
        }),
        _ => Err(problems),
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

/// An absolute `https://` URI with a host.
fn jwks_uri(text: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URI: {e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(other) => {
            return Err(format!(
                "{text:?}: scheme {other:?}; Latch fetches keys only over https (a key set \
                 fetched in the clear could be replaced on the way)"
            ));
        }
        None => return Err(format!("{text:?} is not an absolute https:// URI")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    Ok(uri)
}

/// The rules of every policy in `policies` that applies to `target`, in policy order.
pub(crate) fn select(
    policies: &[RequestAuthnPolicy],
    root_namespace: &str,
    target: &Target<'_>,
) -> Vec<Arc<JwtRule>> {
    applying(policies, root_namespace, target)
        .flat_map(|p| p.rules.iter().cloned())
        .collect()
}

/// The policies in `policies` that apply to `target`, in policy order.
pub(crate) fn applying<'p>(
    policies: &'p [RequestAuthnPolicy],
    root_namespace: &'p str,
    target: &'p Target<'_>,
) -> impl Iterator<Item = &'p RequestAuthnPolicy> {
    policies
        .iter()
        // Only `targetRef(s)` makes a warning: such a policy is for gateways and waypoints.
        .filter(|p| p.warnings.is_empty())
        .filter(move |p| p.meta.namespace == target.namespace || p.meta.namespace == root_namespace)
        .filter(move |p| {
            p.selector
                .iter()
                .all(|(k, v)| target.labels.get(k).is_some_and(|l| l == v))
        })
}
