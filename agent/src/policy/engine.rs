//! Decides connections and requests against the policies of a [`PolicySet`], in Istio's order
//! (`docs/policy.md`, Decisions); among several matching policies the first by (namespace, name)
//! is reported as the decider. [`PolicySet::evaluate_connection`] does not know the L7 fields yet
//! and answers [`ConnectionDecision::NeedsHttp`] unless every request and a non-HTTP connection
//! get the same answer; [`PolicySet::evaluate_request`] knows them; [`PolicySet::evaluate_tcp`]
//! applies Istio's TCP rules. Whether a decision is `cacheable` is judged per workload and port, as
//! `docs/policy.md` (What is cached) says.

use super::{
    PolicySet,
    compile::AuthzPolicy,
    decision::{
        Action, Connection, ConnectionDecision, Decision, DryRun, Explanation, HttpRequest,
        MtlsMode, PolicyRef, Protocol, Target, Traffic,
    },
    matching::{Attrs, L7, Tri},
    request_authn,
};

/// Which L7 evaluation a decision uses.
#[derive(Clone, Copy)]
enum Phase<'a> {
    Connection,
    Request(&'a HttpRequest<'a>),
    Tcp,
}

/// A decision, or why it depends on the request.
enum Outcome {
    /// The decision, and whether an applicable policy has L7 fields.
    Final(Decision, bool),
    DependsOnHttp(String),
}

impl PolicySet {
    /// Decide a new connection before any byte is read.
    pub fn evaluate_connection(&self, target: &Target, conn: &Connection) -> ConnectionDecision {
        match self.authorize_connection(target, conn) {
            ConnectionDecision::Decided(decision) if decision.allowed => {
                match self.request_authentication(target) {
                    Some(policy) => ConnectionDecision::NeedsHttp {
                        reason: format!(
                            "allowed for the connection, and RequestAuthentication {policy} \
                             applies: the token of each HTTP request is checked"
                        ),
                    },
                    None => ConnectionDecision::Decided(decision),
                }
            }
            other => other,
        }
    }

    /// The first RequestAuthentication (`namespace/name`) that applies to `target`, if any: its
    /// tokens are checked only on requests Latch parses, so an allowed connection to `target`
    /// has to be parsed as HTTP (as Envoy checks every request of a sidecar's workload).
    fn request_authentication(&self, target: &Target) -> Option<String> {
        request_authn::applying(
            &self.inner.request_authn,
            &self.inner.root_namespace,
            target,
        )
        .find(|p| !p.rules.is_empty())
        .map(|p| format!("{}/{}", p.meta.namespace, p.meta.name))
    }

    /// [`Self::evaluate_connection`] by AuthorizationPolicy and the mTLS mode alone.
    fn authorize_connection(&self, target: &Target, conn: &Connection) -> ConnectionDecision {
        let attrs = attrs(conn);
        match decide(self, target, &attrs, Phase::Connection) {
            Outcome::DependsOnHttp(reason) => ConnectionDecision::NeedsHttp { reason },
            // Without L7 fields anywhere, TCP rules are the same rules.
            Outcome::Final(decision, false) => ConnectionDecision::Decided(decision),
            Outcome::Final(decision, true) => match decide(self, target, &attrs, Phase::Tcp) {
                Outcome::Final(tcp, _) if tcp.allowed != decision.allowed => {
                    ConnectionDecision::NeedsHttp {
                        reason: format!(
                            "{} for any HTTP request, but {} for a non-HTTP connection ({})",
                            verdict(decision.allowed),
                            verdict(tcp.allowed),
                            tcp.reason
                        ),
                    }
                }
                _ => ConnectionDecision::Decided(decision),
            },
        }
    }

    /// Decide one HTTP request on a connection.
    pub fn evaluate_request(
        &self,
        target: &Target,
        conn: &Connection,
        request: &HttpRequest,
    ) -> Decision {
        final_decision(self, target, conn, Phase::Request(request))
    }

    /// Decide a connection that turned out not to carry HTTP.
    pub fn evaluate_tcp(&self, target: &Target, conn: &Connection) -> Decision {
        final_decision(self, target, conn, Phase::Tcp)
    }

    /// The decision for `request`, or without one, for the connection (as plain TCP when the
    /// outcome depends on HTTP, saying so).
    pub fn explain(
        &self,
        target: &Target,
        conn: &Connection,
        request: Option<&HttpRequest>,
    ) -> Explanation {
        let plaintext = conn.source_principal.is_none();
        if let Some(request) = request {
            let decision = self.evaluate_request(target, conn, request);
            let traffic = Traffic::of(&decision, plaintext);
            return Explanation {
                decision,
                protocol: Protocol::Http,
                needs_http: None,
                traffic,
                encrypted: traffic.encrypted(),
                request_path: None,
            };
        }
        let (decision, needs_http) = match self.evaluate_connection(target, conn) {
            ConnectionDecision::Decided(decision) => (decision, None),
            ConnectionDecision::NeedsHttp { reason } => {
                (self.evaluate_tcp(target, conn), Some(reason))
            }
        };
        let traffic = if needs_http.is_some() && !plaintext {
            Traffic::Tunneled
        } else {
            Traffic::of(&decision, plaintext)
        };
        Explanation {
            decision,
            protocol: Protocol::Tcp,
            needs_http,
            traffic,
            encrypted: traffic.encrypted(),
            request_path: None,
        }
    }

    /// Whether an AuthorizationPolicy applying to `target` has L7 fields in an operation that
    /// can match `port` (the caller then has to parse HTTP on that port).
    pub fn has_l7_for(&self, target: &Target, port: u16) -> bool {
        self.applicable(target).iter().any(|&id| {
            let policy = &self.inner.authz[id as usize];
            !policy.dry_run
                && policy.rules.iter().any(|r| {
                    let here = r.to.is_empty() || r.to.iter().any(|op| op.port_matches(port));
                    let l7 = r.from.iter().any(|s| s.has_l7())
                        || r.when.iter().any(|c| c.is_l7())
                        || r.to.iter().any(|op| op.has_l7() && op.port_matches(port));
                    here && l7
                })
        })
    }

    /// Every AuthorizationPolicy rule, as (policy, index in `spec.rules`), in (namespace, name)
    /// order: what a coverage report lists.
    pub fn authorization_rules(&self) -> Vec<(PolicyRef, usize)> {
        self.inner
            .authz
            .iter()
            .flat_map(|p| (0..p.rules.len()).map(|i| (p.reference(), i)))
            .collect()
    }

    /// Every rule of every AuthorizationPolicy applying to `target` that matches the connection
    /// (as a non-HTTP connection when `request` is `None`), whatever the decision: what a
    /// coverage report counts.
    pub fn matching_rules(
        &self,
        target: &Target,
        conn: &Connection,
        request: Option<&HttpRequest>,
    ) -> Vec<(PolicyRef, usize)> {
        let attrs = attrs(conn);
        let mut found = Vec::new();
        for id in self.applicable(target) {
            let policy = &self.inner.authz[id as usize];
            let l7 = match request {
                Some(r) => L7::Request(r),
                None => L7::Tcp {
                    allow: policy.action == Action::Allow,
                },
            };
            for (i, rule) in policy.rules.iter().enumerate() {
                if rule.matches(&attrs, l7) == Tri::Yes {
                    found.push((policy.reference(), i));
                }
            }
        }
        found
    }

    fn denied_internal(&self, reason: String) -> Decision {
        Decision {
            allowed: false,
            cacheable: false,
            cache_reason: "internal error".to_owned(),
            decided_by: None,
            rule: None,
            reason,
            audited: Vec::new(),
            mtls_mode: self.inner.default_mtls,
            mtls_source: None,
            dry_run: None,
        }
    }

    /// Whether an AuthorizationPolicy applying to `target` looks at the destination port, or
    /// (STRICT ports being uncacheable) its mTLS mode differs by port: if not, every port of the
    /// workload gets the same decision for a given source.
    pub fn port_sensitive(&self, target: &Target) -> bool {
        self.applicable(target)
            .iter()
            .any(|&id| self.inner.authz[id as usize].port_sensitive)
            || (!self.inner.strict_fastpath && self.mtls_port_sensitive(target))
    }

    /// Ids of the AuthorizationPolicies applying to `target`, in (namespace, name) order.
    pub(crate) fn applicable(&self, target: &Target) -> Vec<u32> {
        let inner = &*self.inner;
        let mut ids = Vec::new();
        let selector = |id: u32| &inner.authz[id as usize].selector;
        let mut add = |namespace: &str| {
            if let Some(bucket) = inner.authz_index.bucket(namespace) {
                ids.extend_from_slice(&bucket.wide);
                bucket.selected(target.labels, selector, &mut ids);
            }
        };
        add(&inner.root_namespace);
        if target.namespace != inner.root_namespace {
            add(target.namespace);
        }
        ids.retain(|&id| inner.authz[id as usize].not_enforced.is_none());
        ids.sort_unstable();
        ids
    }
}

/// The first matching policy, and the first that may match depending on HTTP.
#[derive(Default)]
struct Found<'p> {
    yes: Option<(&'p AuthzPolicy, usize)>,
    maybe: Option<(&'p AuthzPolicy, usize)>,
}

impl<'p> Found<'p> {
    fn consider(&mut self, policy: &'p AuthzPolicy, hit: Option<(Tri, usize)>) {
        match hit {
            Some((Tri::Yes, rule)) if self.yes.is_none() => self.yes = Some((policy, rule)),
            Some((Tri::Maybe, rule)) if self.maybe.is_none() => self.maybe = Some((policy, rule)),
            _ => {}
        }
    }
}

/// The first rule that matches (`Yes`), else the first that may (`Maybe`), with its index.
fn first_match(policy: &AuthzPolicy, attrs: &Attrs, l7: L7) -> Option<(Tri, usize)> {
    let mut maybe = None;
    for (i, rule) in policy.rules.iter().enumerate() {
        match rule.matches(attrs, l7) {
            Tri::Yes => return Some((Tri::Yes, i)),
            Tri::Maybe if maybe.is_none() => maybe = Some((Tri::Maybe, i)),
            _ => {}
        }
    }
    maybe
}

fn attrs<'a>(conn: &Connection<'a>) -> Attrs<'a> {
    Attrs::new(
        conn.source_principal,
        conn.source_ip,
        conn.destination_ip,
        conn.destination_port,
    )
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// The decision for `target` under `set` in `phase`, from what is known of the connection.
fn decide(set: &PolicySet, target: &Target, attrs: &Attrs, phase: Phase) -> Outcome {
    let (mtls_mode, mtls_source) = set.mtls_mode(target, attrs.destination_port);
    let plaintext = attrs.principal.is_none();
    if plaintext && mtls_mode == MtlsMode::Strict {
        let by = mtls_source
            .as_ref()
            .map_or_else(|| "the default mode".to_owned(), ToString::to_string);
        return Outcome::Final(
            Decision {
                allowed: false,
                cacheable: false,
                cache_reason: "plaintext source".to_owned(),
                decided_by: mtls_source.clone(),
                rule: None,
                reason: format!("plaintext connection refused: mTLS is STRICT ({by})"),
                audited: Vec::new(),
                mtls_mode,
                mtls_source,
                dry_run: None,
            },
            false,
        );
    }
    let applicable: Vec<&AuthzPolicy> = set
        .applicable(target)
        .into_iter()
        .map(|id| &set.inner.authz[id as usize])
        .collect();
    let judged = judge(
        applicable.iter().copied().filter(|p| !p.dry_run),
        attrs,
        phase,
    );
    let (allowed, by, reason) = match judged.verdict {
        Ok(verdict) => verdict,
        Err(reason) => return Outcome::DependsOnHttp(reason),
    };
    let (audited, uncacheable, has_l7) = (judged.audited, judged.uncacheable, judged.has_l7);
    let dry_run = applicable.iter().any(|p| p.dry_run).then(|| {
        let shadow = judge(applicable.iter().copied(), attrs, phase);
        Box::new(DryRun {
            policies: applicable
                .iter()
                .filter(|p| p.dry_run)
                .map(|p| p.reference())
                .collect(),
            allowed: shadow.verdict.as_ref().ok().map(|(allowed, ..)| *allowed),
            decided_by: shadow
                .verdict
                .as_ref()
                .ok()
                .and_then(|(_, by, _)| by.map(|(p, _)| p.reference())),
            rule: shadow
                .verdict
                .as_ref()
                .ok()
                .and_then(|(_, by, _)| by.map(|(_, rule)| rule)),
            reason: match &shadow.verdict {
                Ok((_, _, reason)) => reason.clone(),
                Err(reason) => reason.clone(),
            },
        })
    });
    let (cacheable, cache_reason) = match uncacheable {
        _ if plaintext => (false, "plaintext source".to_owned()),
        _ if mtls_mode == MtlsMode::Strict && !set.inner.strict_fastpath => (
            false,
            format!(
                "mTLS is STRICT ({}): every connection is tunneled (mtls.strictFastpath is off)",
                mtls_source
                    .as_ref()
                    .map_or_else(|| "the default mode".to_owned(), ToString::to_string)
            ),
        ),
        Some((p, why)) => (false, format!("{} references {why}", p.reference())),
        None => (
            true,
            "depends only on the source identity and the destination workload and port".to_owned(),
        ),
    };
    let decision = Decision {
        allowed,
        cacheable,
        cache_reason,
        decided_by: by.map(|(p, _)| p.reference()),
        rule: by.map(|(_, rule)| rule),
        reason,
        audited,
        mtls_mode,
        mtls_source,
        dry_run,
    };
    Outcome::Final(decision, has_l7)
}

/// What the AuthorizationPolicies in `policies` say about a connection or request.
struct Judged<'p> {
    /// Allowed, by whom (policy and rule), why; or why it depends on HTTP.
    #[allow(clippy::type_complexity)]
    verdict: Result<(bool, Option<(&'p AuthzPolicy, usize)>, String), String>,
    audited: Vec<PolicyRef>,
    /// The first policy that makes the decision uncacheable, and why.
    uncacheable: Option<(&'p AuthzPolicy, &'static str)>,
    /// Whether one of them has HTTP fields.
    has_l7: bool,
}

/// Istio's evaluation of `policies` (applying to the target): any matching DENY denies; if no
/// ALLOW policy applies, allow; else allow only if one matches.
fn judge<'p>(
    policies: impl Iterator<Item = &'p AuthzPolicy>,
    attrs: &Attrs,
    phase: Phase,
) -> Judged<'p> {
    let mut deny = Found::default();
    let mut allow = Found::default();
    let mut allow_applies = false;
    let mut audited = Vec::new();
    let mut uncacheable = None;
    let mut has_l7 = false;
    for policy in policies {
        if uncacheable.is_none() {
            uncacheable = policy
                .uncacheable_on(attrs.destination_port)
                .map(|why| (policy, why));
        }
        has_l7 |= policy.rules.iter().any(|r| r.has_l7());
        let l7 = match phase {
            Phase::Connection => L7::Unknown,
            Phase::Request(r) => L7::Request(r),
            Phase::Tcp => L7::Tcp {
                allow: policy.action == Action::Allow,
            },
        };
        let found = match policy.action {
            Action::Deny => &mut deny,
            Action::Allow => {
                allow_applies = true;
                &mut allow
            }
            Action::Audit => {
                if matches!(first_match(policy, attrs, l7), Some((Tri::Yes, _))) {
                    audited.push(policy.reference());
                }
                continue;
            }
        };
        found.consider(policy, first_match(policy, attrs, l7));
    }
    let verdict = if let Some((p, rule)) = deny.yes {
        Ok((
            false,
            Some((p, rule)),
            format!("denied by {}, rule {rule}", p.reference()),
        ))
    } else if allow_applies && allow.yes.is_none() && allow.maybe.is_none() {
        Ok((
            false,
            None,
            "ALLOW policies apply but none matched".to_owned(),
        ))
    } else if let Some((p, rule)) = deny.maybe.or(if allow.yes.is_none() {
        allow.maybe
    } else {
        None
    }) {
        Err(format!(
            "{}, rule {rule}, depends on HTTP attributes",
            p.reference()
        ))
    } else if let Some((p, rule)) = allow.yes {
        Ok((
            true,
            Some((p, rule)),
            format!("allowed by {}, rule {rule}", p.reference()),
        ))
    } else {
        Ok((
            true,
            None,
            "no ALLOW policy applies to the workload: allowed by default".to_owned(),
        ))
    };
    Judged {
        verdict,
        audited,
        uncacheable,
        has_l7,
    }
}

/// [`decide`] where the answer is final (the request is known, or the connection is TCP).
fn final_decision(set: &PolicySet, target: &Target, conn: &Connection, phase: Phase) -> Decision {
    match decide(set, target, &attrs(conn), phase) {
        Outcome::Final(decision, _) => decision,
        // Unreachable: with the request known, or as TCP, every rule is Yes or No.
        Outcome::DependsOnHttp(reason) => set.denied_internal(reason),
    }
}
