//! Istio-compatible authorization: `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication` ([`request_authn`]: the JWT rules a workload's requests are checked
//! with) files loaded
//! ([`load`], [`compile`]: all or nothing, every error as `file:line:col: field.path: why`) into a
//! [`PolicySet`], which decides connections and requests exactly as Istio does (`engine`,
//! [`matching`], [`peer_auth`], [`index`]; the rules: `docs/policy.md`). [`cli`] formats
//! `latch policy check` and `explain`; [`normalize`] is Istio's `pathNormalization`.

pub mod cli;
mod compile;
mod decision;
mod engine;
mod error;
mod index;
pub(crate) mod load;
mod matching;
pub mod model;
pub mod normalize;
mod peer_auth;
mod request_authn;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use decision::{
    Action, Connection, ConnectionDecision, Decision, DryRun, Explanation, HttpRequest, MtlsMode,
    PolicyKind, PolicyRef, Protocol, RequestAuth, RequestPath, Target, Traffic, no_headers,
};
pub use error::PolicyError;
pub use request_authn::{JwtRule, KeySource, TokenLocation};

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;

use compile::{AuthzPolicy, PeerAuthPolicy};
use index::Index;
use request_authn::RequestAuthnPolicy;

/// A loaded, checked and indexed set of policies. Cloning is cheap (shared).
#[derive(Debug, Clone)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    root_namespace: String,
    default_mtls: MtlsMode,
    /// `mtls.strictFastpath`: STRICT ports may take the kernel fast path after the first
    /// connection (identity proven once, then bound to the source address; not encrypted).
    strict_fastpath: bool,
    /// Sorted by (namespace, name); positions are the ids used by the indexes.
    authz: Vec<AuthzPolicy>,
    peer: Vec<PeerAuthPolicy>,
    authz_index: Index,
    peer_index: Index,
    /// Sorted by (namespace, name).
    request_authn: Vec<RequestAuthnPolicy>,
    files: Vec<FileSummary>,
}

/// One checked policy, loaded on its own: Kubernetes mode keeps each object's last good
/// version, so one bad object never takes the others down.
#[derive(Debug, Clone)]
pub struct PolicyObject(Compiled);

#[derive(Debug, Clone)]
enum Compiled {
    Authorization(AuthzPolicy),
    PeerAuthentication(PeerAuthPolicy),
    RequestAuthentication(RequestAuthnPolicy),
}

impl PolicyObject {
    /// Check one object given as YAML (or JSON) text; `origin` names it in the errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self, Vec<PolicyError>> {
        load::object(origin, text)
    }

    pub fn kind(&self) -> PolicyKind {
        match self.0 {
            Compiled::Authorization(_) => PolicyKind::AuthorizationPolicy,
            Compiled::PeerAuthentication(_) => PolicyKind::PeerAuthentication,
            Compiled::RequestAuthentication(_) => PolicyKind::RequestAuthentication,
        }
    }
}

/// What one loaded file held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    pub file: PathBuf,
    pub authorization_policies: usize,
    pub peer_authentications: usize,
    /// What was accepted but is not enforced (`file:line: kind ns/name: why`).
    pub warnings: Vec<String>,
    pub request_authentications: usize,
    /// `PolicyTest` documents, skipped by the loader (`latch policy test` runs them).
    pub policy_tests: usize,
}

/// One RequestAuthentication, for `latch policy check` and the debug API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestAuthnSummary {
    pub namespace: String,
    pub name: String,
    /// The issuer of each JWT rule.
    pub issuers: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub file: PathBuf,
    pub line: usize,
    /// Why it is never applied to a workload (`targetRef`), if so.
    pub not_enforced: Option<String>,
}

/// One policy, for the debug API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySummary {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// `None` for PeerAuthentication.
    pub action: Option<Action>,
    pub rules: usize,
    pub selector: BTreeMap<String, String>,
    pub file: PathBuf,
    pub line: usize,
    /// `istio.io/dry-run`: evaluated and recorded, never enforced.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Why the policy is never applied to a workload (`targetRef`), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<String>,
}

impl PolicySet {
    /// No policies: everything is allowed, mTLS is PERMISSIVE.
    pub fn empty(root_namespace: &str) -> Self {
        Self::build(root_namespace, Vec::new(), Vec::new(), Vec::new())
    }

    /// Load every policy in `paths` (files, or directories whose `*.yaml`/`*.yml` files are
    /// read in name order). Either every document is valid, or all errors are returned.
    pub fn load(paths: &[PathBuf], root_namespace: &str) -> Result<Self, Vec<PolicyError>> {
        load::load(paths, root_namespace)
    }

    /// As [`Self::load`], from in-memory `(file name, text)` pairs.
    pub fn from_yaml(
        sources: &[(&Path, &str)],
        root_namespace: &str,
    ) -> Result<Self, Vec<PolicyError>> {
        load::from_texts(sources, root_namespace)
    }

    /// A set of policy objects checked one by one ([`PolicyObject::parse`]), as Kubernetes
    /// mode keeps them.
    pub fn from_objects<'a>(
        objects: impl IntoIterator<Item = &'a PolicyObject>,
        root_namespace: &str,
    ) -> Self {
        let (mut authz, mut peer, mut request_authn) = (Vec::new(), Vec::new(), Vec::new());
        for object in objects {
            match &object.0 {
                Compiled::Authorization(p) => authz.push(p.clone()),
                Compiled::PeerAuthentication(p) => peer.push(p.clone()),
                Compiled::RequestAuthentication(p) => request_authn.push(p.clone()),
            }
        }
        Self::build(root_namespace, authz, peer, Vec::new()).with_request_authn(request_authn)
    }

    /// The mTLS mode used where no PeerAuthentication applies (Istio: PERMISSIVE).
    pub fn with_default_mtls(mut self, mode: MtlsMode) -> Self {
        Arc::make_mut(&mut self.inner).default_mtls = mode;
        self
    }

    /// Let STRICT ports be cached (`mtls.strictFastpath`). Off by default: STRICT means mTLS on
    /// every connection, as in Istio, so a STRICT port's verdicts are never cacheable.
    pub fn with_strict_fastpath(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.inner).strict_fastpath = on;
        self
    }

    fn build(
        root_namespace: &str,
        mut authz: Vec<AuthzPolicy>,
        mut peer: Vec<PeerAuthPolicy>,
        files: Vec<FileSummary>,
    ) -> Self {
        authz.sort_by(|a, b| {
            (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name))
        });
        // The oldest first (a policy without a creation time after those with one), then by
        // name: the first of a level decides (`peer_auth`).
        peer.sort_by(|a, b| {
            let key = |p: &PeerAuthPolicy| {
                (
                    p.meta.namespace.clone(),
                    p.meta.created.is_none(),
                    p.meta.created,
                    p.meta.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let authz_index = Index::build(
            authz
                .iter()
                .map(|p| (p.meta.namespace.as_str(), &p.selector)),
        );
        let peer_index = Index::build(
            peer.iter()
                .map(|p| (p.meta.namespace.as_str(), &p.selector)),
        );
        Self {
            inner: Arc::new(Inner {
                root_namespace: root_namespace.to_owned(),
                default_mtls: MtlsMode::Permissive,
                strict_fastpath: false,
                authz,
                peer,
                authz_index,
                peer_index,
                request_authn: Vec::new(),
                files,
            }),
        }
    }

    /// The RequestAuthentications of the set.
    fn with_request_authn(mut self, mut policies: Vec<RequestAuthnPolicy>) -> Self {
        policies.sort_by(|a, b| {
            (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name))
        });
        Arc::make_mut(&mut self.inner).request_authn = policies;
        self
    }

    /// The JWT rules of the RequestAuthentications that apply to `target` (its namespace's
    /// and the root namespace's whose selector it matches); empty: its requests' tokens are
    /// not looked at.
    pub fn jwt_rules_for(&self, target: &Target) -> Vec<Arc<JwtRule>> {
        request_authn::select(
            &self.inner.request_authn,
            &self.inner.root_namespace,
            target,
        )
    }

    /// The RequestAuthentications, for `latch policy check` and the debug API.
    pub fn request_authentications(&self) -> Vec<RequestAuthnSummary> {
        self.inner
            .request_authn
            .iter()
            .map(|p| RequestAuthnSummary {
                namespace: p.meta.namespace.clone(),
                name: p.meta.name.clone(),
                issuers: p.rules.iter().map(|r| r.issuer.clone()).collect(),
                selector: p.selector.clone(),
                file: p.meta.file.clone(),
                line: p.meta.line,
                not_enforced: p
                    .warnings
                    .first()
                    .map(|w| format!("{}: {}", w.path, w.message)),
            })
            .collect()
    }

    /// What was accepted but is not enforced, as `file:line:col: field: why` lines.
    pub fn warnings(&self) -> Vec<String> {
        self.inner
            .request_authn
            .iter()
            .flat_map(|p| p.located_warnings.iter().cloned())
            .collect()
    }

    pub fn root_namespace(&self) -> &str {
        &self.inner.root_namespace
    }

    /// The number of policies of both kinds.
    pub fn len(&self) -> usize {
        self.inner.authz.len() + self.inner.peer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The files read, in order, with what each held.
    pub fn files(&self) -> &[FileSummary] {
        &self.inner.files
    }

    /// Every policy, AuthorizationPolicies first, each kind by (namespace, name).
    pub fn summaries(&self) -> Vec<PolicySummary> {
        let authz = self.inner.authz.iter().map(|p| PolicySummary {
            kind: PolicyKind::AuthorizationPolicy,
            namespace: p.meta.namespace.clone(),
            name: p.meta.name.clone(),
            action: Some(p.action),
            rules: p.rules.len(),
            selector: p.selector.clone(),
            file: p.meta.file.clone(),
            line: p.meta.line,
            dry_run: p.dry_run,
            not_enforced: p.not_enforced.clone(),
        });
        let peer = self.inner.peer.iter().map(|p| PolicySummary {
            kind: PolicyKind::PeerAuthentication,
            namespace: p.meta.namespace.clone(),
            name: p.meta.name.clone(),
            action: None,
            rules: 0,
            selector: p.selector.clone(),
            file: p.meta.file.clone(),
            line: p.meta.line,
            dry_run: false,
            not_enforced: None,
        });
        authz.chain(peer).collect()
    }
}
