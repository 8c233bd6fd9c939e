//! What the engine is asked ([`Target`], [`Connection`], [`HttpRequest`]) and what it answers
//! ([`Decision`], [`ConnectionDecision`], [`Explanation`]), each answer explaining itself.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::normalize::PathNormalization;

/// The destination workload.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// One connection to the target.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The full SPIFFE ID (`spiffe://cluster.local/ns/prod/sa/frontend`); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// One HTTP/1.1 request on a connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// As on the request line; the query string is ignored for matching.
    pub path: &'a str,
    /// The `Host` header (or the authority).
    pub host: &'a str,
    /// Every header field as received (`request.headers[name]` in `when`).
    pub headers: &'a hyper::HeaderMap,
    /// The request's authenticated JWT (RequestAuthentication), `None` when it carried none.
    pub auth: Option<&'a RequestAuth>,
}

/// An empty header map, for requests known only by method, path and host.
pub fn no_headers() -> &'static hyper::HeaderMap {
    static EMPTY: std::sync::LazyLock<hyper::HeaderMap> =
        std::sync::LazyLock::new(hyper::HeaderMap::new);
    &EMPTY
}

/// What a request's verified JWT says: Istio's `request.auth.*` attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAuth {
    /// `iss/sub`: what `requestPrincipals` and `request.auth.principal` match.
    pub principal: String,
    /// The `aud` claim (a string or a list of strings).
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// Every claim of the payload (`request.auth.claims[name]`, nested with `][`).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
        }
    }
}

/// Istio's mTLS modes once `UNSET` has been resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Plaintext connections are refused.
    Strict,
    /// Plaintext and mTLS connections are accepted (Istio's default).
    Permissive,
    /// mTLS is not required; enforced as PERMISSIVE, reported as DISABLE.
    Disable,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        }
    }
}

/// Names one policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// `None` for PeerAuthentication.
    pub action: Option<Action>,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)?;
        if let Some(action) = self.action {
            write!(f, " ({})", action.as_str())?;
        }
        Ok(())
    }
}

/// A final answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// Whether every connection with the same source principal, source namespace, destination
    /// workload and destination port gets the same answer (see [`super::engine`]).
    pub cacheable: bool,
    /// Why (not) cacheable.
    pub cache_reason: String,
    /// The policy that decided, `None` when allowed by default.
    pub decided_by: Option<PolicyRef>,
    /// The index of the deciding rule in `spec.rules`.
    pub rule: Option<usize>,
    pub reason: String,
    /// Matching AUDIT policies (they never change the decision).
    pub audited: Vec<PolicyRef>,
    pub mtls_mode: MtlsMode,
    /// The PeerAuthentication that set `mtls_mode`, `None` for the default.
    pub mtls_source: Option<PolicyRef>,
    /// When `istio.io/dry-run` policies apply: what the decision would be if they were
    /// enforced. Recorded, never enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<Box<DryRun>>,
}

/// The shadow decision of dry-run policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRun {
    /// The dry-run policies that apply.
    pub policies: Vec<PolicyRef>,
    /// The decision with them enforced; `None` when it depends on HTTP attributes not known
    /// for this connection.
    pub allowed: Option<bool>,
    pub decided_by: Option<PolicyRef>,
    pub rule: Option<usize>,
    pub reason: String,
}

/// The answer for a new connection: final, or dependent on its HTTP requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ConnectionDecision {
    Decided(Decision),
    /// Parse the HTTP/1.1 requests and call `evaluate_request` for each; if the connection is
    /// not HTTP, call `evaluate_tcp`.
    NeedsHttp {
        reason: String,
    },
}

/// Whether a decision was made for an HTTP request or a plain connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// How the connections of a pair cross between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// A plaintext source: nothing proves it and nothing is encrypted.
    Plaintext,
    /// Every connection crosses the mTLS tunnel: every byte encrypted.
    Tunneled,
    /// The first connection crosses the mTLS tunnel and proves both identities; repeats go
    /// straight through the kernel fast path, bound to the source address, not encrypted.
    Fastpath,
}

impl Traffic {
    /// What a decision's connections do: tunneled unless the decision may be cached.
    pub fn of(decision: &Decision, plaintext: bool) -> Self {
        if plaintext {
            Self::Plaintext
        } else if decision.cacheable {
            Self::Fastpath
        } else {
            Self::Tunneled
        }
    }

    /// Whether every byte of every connection is encrypted.
    pub fn encrypted(self) -> bool {
        self == Self::Tunneled
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext connection, not encrypted",
            Self::Tunneled => "every connection tunneled over mTLS, encrypted",
            Self::Fastpath => {
                "first connection tunneled over mTLS, repeats through the kernel fast path, not encrypted"
            }
        }
    }
}

/// What `latch policy explain` and the debug API show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub decision: Decision,
    pub protocol: Protocol,
    /// Set when no request was given and the outcome depends on HTTP attributes: `decision`
    /// is then the one for a non-HTTP connection.
    pub needs_http: Option<String>,
    /// How the pair's connections cross between the nodes.
    pub traffic: Traffic,
    /// Whether every byte of the pair's connections is encrypted (`traffic` is `tunneled`).
    pub encrypted: bool,
    /// For a request: its path as given and as policy judged it (normalised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_path: Option<RequestPath>,
}

impl Explanation {
    /// Set how the pair's connections travel (and so whether they are encrypted).
    pub fn with_traffic(mut self, traffic: Traffic) -> Self {
        self.traffic = traffic;
        self.encrypted = traffic.encrypted();
        self
    }
}

/// A request's path before and after normalisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPath {
    pub given: String,
    /// What policy judged (and what the application would receive), without the query string.
    pub normalized: String,
    pub normalization: PathNormalization,
}
