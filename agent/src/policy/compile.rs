//! Checks a parsed document against Istio's rules (and Latch's limits) and compiles it into the
//! form the engine evaluates: patterns, CIDRs and ports parsed once. Every problem is reported
//! with the field path it is about, all of them, not just the first.

use std::collections::BTreeMap;

pub(crate) use crate::config::report::Problem;
use crate::config::report::problem;

use super::{
    decision::{Action, MtlsMode, PolicyKind, PolicyRef},
    matching::{Cidr, Condition, ConditionValues, Operation, Pattern, Rule, Source},
    model,
};

/// Identity and origin of a loaded policy.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub namespace: String,
    pub name: String,
    pub file: std::path::PathBuf,
    /// 1-based line of the document's `metadata.name`, in the file.
    pub line: usize,
    /// `metadata.creationTimestamp`: of several PeerAuthentications at one level, the oldest
    /// decides (as in Istio).
    pub created: Option<time::OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub(crate) struct AuthzPolicy {
    pub meta: Meta,
    pub action: Action,
    /// Empty: every workload of the namespace.
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
    /// Why decisions involving this policy are not cacheable, if they are not.
    pub uncacheable: Option<&'static str>,
    /// Some rule looks at the destination port (`ports`, `notPorts`, `destination.port`).
    pub port_sensitive: bool,
    /// `istio.io/dry-run: "true"`: evaluated and recorded, never enforced.
    pub dry_run: bool,
    /// Set for a policy with `targetRef(s)`: it applies to gateways and waypoints, which Latch
    /// does not run, so it never applies to workloads; says why.
    pub not_enforced: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct PeerAuthPolicy {
    pub meta: Meta,
    pub selector: BTreeMap<String, String>,
    /// `None` is UNSET.
    pub mode: Option<MtlsMode>,
    pub port_modes: BTreeMap<u16, Option<MtlsMode>>,
}

impl AuthzPolicy {
    pub(crate) fn reference(&self) -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::AuthorizationPolicy,
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
            action: Some(self.action),
        }
    }
}

impl PeerAuthPolicy {
    pub(crate) fn reference(&self) -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::PeerAuthentication,
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
            action: None,
        }
    }
}

/// Problems so far, collected rather than returned one by one.
#[derive(Default)]
pub(crate) struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn list<T, U>(
        &mut self,
        path: &str,
        values: &Option<Vec<T>>,
        parse: impl Fn(&T) -> Result<U, String>,
    ) -> Vec<U> {
        let mut out = Vec::new();
        for (i, value) in values.iter().flatten().enumerate() {
            match parse(value) {
                Ok(v) => out.push(v),
                Err(message) => self.problems.push(problem(format!("{path}[{i}]"), message)),
            }
        }
        out
    }

    fn patterns(&mut self, path: &str, values: &Option<Vec<String>>) -> Vec<Pattern> {
        self.list(path, values, |s| Pattern::parse(s))
    }

    fn hosts(&mut self, path: &str, values: &Option<Vec<String>>) -> Vec<Pattern> {
        self.list(path, values, |s| Pattern::parse(&s.to_ascii_lowercase()))
    }

    /// `namespace/account`, or `account` meaning the policy's `namespace`.
    fn service_accounts(
        &mut self,
        path: &str,
        namespace: &str,
        values: &Option<Vec<String>>,
    ) -> Vec<Pattern> {
        self.list(path, values, |s| match s.split('/').count() {
            1 => Pattern::parse(&format!("{namespace}/{s}")),
            2 if !s.starts_with('/') && !s.ends_with('/') => Pattern::parse(s),
            _ => Err(format!(
                "{s:?} is not a service account (`namespace/name`, or `name` in the policy's \
                 namespace)"
            )),
        })
    }

    fn cidrs(&mut self, path: &str, values: &Option<Vec<String>>) -> Vec<Cidr> {
        self.list(path, values, |s| Cidr::parse(s))
    }

    fn ports(&mut self, path: &str, values: &Option<Vec<model::Scalar>>) -> Vec<u16> {
        self.list(path, values, |s| parse_port(&s.0))
    }

    fn unsupported<T>(&mut self, path: &str, value: &Option<T>, why: &str) {
        if value.is_some() {
            self.problems.push(problem(path, why));
        }
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<Problem>> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.problems)
        }
    }
}

pub(crate) fn parse_port(raw: &str) -> Result<u16, String> {
    match raw.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(_) => Err(format!("{raw:?} is not a port (1..65535)")),
        Err(_) => Err(format!("{raw:?} is not a port")),
    }
}

const WHEN_KEYS: &str = "source.ip, source.namespace, source.principal, destination.ip, \
     destination.port, request.headers[NAME], request.auth.principal, request.auth.audiences, \
     request.auth.presenter, request.auth.claims[NAME]";

/// Istio's dry-run annotation.
pub(crate) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Compile an AuthorizationPolicy; `meta` is already checked, `annotations` are its metadata's.
pub(crate) fn authorization_policy(
    meta: Meta,
    annotations: Option<&BTreeMap<String, String>>,
    spec: &model::AuthorizationPolicySpec,
) -> Result<AuthzPolicy, Vec<Problem>> {
    let mut c = Checker::default();
    let not_enforced = target_refs(
        &mut c,
        spec.target_ref.is_some(),
        spec.target_refs.is_some(),
        spec.selector.is_some(),
    );
    let dry_run = match annotations
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .map(String::as_str)
    {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            c.problems.push(problem(
                format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("{other:?} is neither \"true\" nor \"false\""),
            ));
            false
        }
    };
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            c.problems.push(problem(
                "spec.action",
                "CUSTOM is not supported by Latch (no external authorizer)",
            ));
            Action::Deny
        }
        Some(other) => {
            c.problems.push(problem(
                "spec.action",
                format!("unknown action {other:?} (expected ALLOW, DENY or AUDIT)"),
            ));
            Action::Deny
        }
    };
    if spec.action.as_deref() != Some("CUSTOM") {
        c.unsupported(
            "spec.provider",
            &spec.provider,
            "provider is only valid with action CUSTOM, which Latch does not support",
        );
    }
    let selector = selector(&mut c, spec.selector.as_ref());
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        rules.push(compile_rule(
            &mut c,
            &format!("spec.rules[{i}]"),
            &meta.namespace,
            rule,
        ));
    }
    let uncacheable = rules.iter().find_map(uncacheable);
    let port_sensitive = rules.iter().any(|r| {
        r.to.iter()
            .any(|op| !op.ports.is_empty() || !op.not_ports.is_empty())
            || r.when.iter().any(Condition::uses_destination_port)
    });
    c.finish(AuthzPolicy {
        meta,
        action,
        selector,
        rules,
        uncacheable,
        port_sensitive,
        dry_run,
        not_enforced,
    })
}

/// `targetRef` / `targetRefs`: the policy is for gateways and waypoints. Accepted (users' YAML
/// carries them) but never applied to a workload; the reason is what `latch policy check` warns.
/// Istio refuses a policy with both a selector and target references.
pub(crate) fn target_refs(
    c: &mut Checker,
    target_ref: bool,
    target_refs: bool,
    selector: bool,
) -> Option<String> {
    if !target_ref && !target_refs {
        return None;
    }
    let field = if target_ref {
        "targetRef"
    } else {
        "targetRefs"
    };
    if selector {
        c.problems.push(problem(
            format!("spec.{field}"),
            format!("{field} and selector are mutually exclusive"),
        ));
    }
    Some(format!(
        "spec.{field}: applies to gateways or waypoints, which Latch does not run; not enforced \
         at workloads"
    ))
}

fn uncacheable(rule: &Rule) -> Option<&'static str> {
    uncacheable_on(rule, None)
}

/// Why a decision that consults `rule` could not be cached, for connections to `port` (`None`:
/// any port). A rule whose operations all name other ports cannot match, so it never makes a
/// decision on `port` depend on anything; of its operations, only those that can match `port`
/// count for L7.
fn uncacheable_on(rule: &Rule, port: Option<u16>) -> Option<&'static str> {
    let here = |op: &&Operation| port.is_none_or(|p| op.port_matches(p));
    if !rule.to.is_empty() && !rule.to.iter().any(|op| here(&op)) {
        return None;
    }
    if rule.from.iter().any(Source::uses_source_ip) {
        return Some("source IP");
    }
    if let Some(why) = rule.when.iter().find_map(Condition::uses_ip) {
        return Some(why);
    }
    (rule.to.iter().filter(here).any(Operation::has_l7)
        || rule.from.iter().any(Source::has_l7)
        || rule.when.iter().any(Condition::is_l7))
    .then_some("HTTP attributes")
}

impl AuthzPolicy {
    /// Why a decision on `port` that consults this policy could not be cached, if it could not.
    pub(crate) fn uncacheable_on(&self, port: u16) -> Option<&'static str> {
        self.uncacheable?;
        self.rules
            .iter()
            .find_map(|rule| uncacheable_on(rule, Some(port)))
    }
}

fn selector(
    c: &mut Checker,
    selector: Option<&model::WorkloadSelector>,
) -> BTreeMap<String, String> {
    let labels = selector
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    for key in labels.keys() {
        if key.is_empty() {
            c.problems.push(problem(
                "spec.selector.matchLabels",
                "a label key must not be empty",
            ));
        }
    }
    labels
}

fn compile_rule(c: &mut Checker, path: &str, namespace: &str, rule: &model::Rule) -> Rule {
    let mut out = Rule::default();
    for (i, from) in rule.from.iter().flatten().enumerate() {
        let path = format!("{path}.from[{i}]");
        match &from.source {
            Some(source) if *source != model::Source::default() => {
                out.from.push(compile_source(
                    c,
                    &format!("{path}.source"),
                    namespace,
                    source,
                ));
            }
            _ => c.problems.push(problem(path, "`source` must not be empty")),
        }
    }
    for (i, to) in rule.to.iter().flatten().enumerate() {
        let path = format!("{path}.to[{i}]");
        match &to.operation {
            Some(op) if *op != model::Operation::default() => {
                out.to
                    .push(compile_operation(c, &format!("{path}.operation"), op));
            }
            _ => c
                .problems
                .push(problem(path, "`operation` must not be empty")),
        }
    }
    for (i, condition) in rule.when.iter().flatten().enumerate() {
        let path = format!("{path}.when[{i}]");
        if let Some(condition) = compile_condition(c, &path, condition) {
            out.when.push(condition);
        }
    }
    out
}

fn compile_source(c: &mut Checker, path: &str, namespace: &str, s: &model::Source) -> Source {
    let no_remote = "is not supported by Latch (no proxies in front of workloads); use ipBlocks";
    c.unsupported(
        &format!("{path}.remoteIpBlocks"),
        &s.remote_ip_blocks,
        &format!("remoteIpBlocks {no_remote}"),
    );
    c.unsupported(
        &format!("{path}.notRemoteIpBlocks"),
        &s.not_remote_ip_blocks,
        &format!("notRemoteIpBlocks {no_remote}"),
    );
    Source {
        principals: c.patterns(&format!("{path}.principals"), &s.principals),
        not_principals: c.patterns(&format!("{path}.notPrincipals"), &s.not_principals),
        namespaces: c.patterns(&format!("{path}.namespaces"), &s.namespaces),
        not_namespaces: c.patterns(&format!("{path}.notNamespaces"), &s.not_namespaces),
        service_accounts: c.service_accounts(
            &format!("{path}.serviceAccounts"),
            namespace,
            &s.service_accounts,
        ),
        not_service_accounts: c.service_accounts(
            &format!("{path}.notServiceAccounts"),
            namespace,
            &s.not_service_accounts,
        ),
        ip_blocks: c.cidrs(&format!("{path}.ipBlocks"), &s.ip_blocks),
        not_ip_blocks: c.cidrs(&format!("{path}.notIpBlocks"), &s.not_ip_blocks),
        request_principals: c.patterns(&format!("{path}.requestPrincipals"), &s.request_principals),
        not_request_principals: c.patterns(
            &format!("{path}.notRequestPrincipals"),
            &s.not_request_principals,
        ),
    }
}

fn compile_operation(c: &mut Checker, path: &str, o: &model::Operation) -> Operation {
    Operation {
        ports: c.ports(&format!("{path}.ports"), &o.ports),
        not_ports: c.ports(&format!("{path}.notPorts"), &o.not_ports),
        methods: c.patterns(&format!("{path}.methods"), &o.methods),
        not_methods: c.patterns(&format!("{path}.notMethods"), &o.not_methods),
        paths: c.patterns(&format!("{path}.paths"), &o.paths),
        not_paths: c.patterns(&format!("{path}.notPaths"), &o.not_paths),
        hosts: c.hosts(&format!("{path}.hosts"), &o.hosts),
        not_hosts: c.hosts(&format!("{path}.notHosts"), &o.not_hosts),
    }
}

fn compile_condition(c: &mut Checker, path: &str, w: &model::Condition) -> Option<Condition> {
    if w.values.as_ref().is_none_or(Vec::is_empty)
        && w.not_values.as_ref().is_none_or(Vec::is_empty)
    {
        c.problems
            .push(problem(path, "a condition needs `values` or `notValues`"));
    }
    let texts = |v: &Option<Vec<model::Scalar>>| -> Option<Vec<String>> {
        v.as_ref().map(|v| v.iter().map(|s| s.0.clone()).collect())
    };
    let (values, not_values) = (texts(&w.values), texts(&w.not_values));
    let vpath = format!("{path}.values");
    let npath = format!("{path}.notValues");
    let key = match when_key(&w.key) {
        Ok(key) => key,
        Err(message) => {
            c.problems.push(problem(format!("{path}.key"), message));
            return None;
        }
    };
    let typed = |c: &mut Checker,
                 p: &str,
                 v: &Option<Vec<String>>,
                 raw: &Option<Vec<model::Scalar>>| match &key {
        WhenKey::SourceIp => ConditionValues::SourceIp(c.cidrs(p, v)),
        WhenKey::DestinationIp => ConditionValues::DestinationIp(c.cidrs(p, v)),
        WhenKey::SourceNamespace => ConditionValues::SourceNamespace(c.patterns(p, v)),
        WhenKey::SourcePrincipal => ConditionValues::SourcePrincipal(c.patterns(p, v)),
        WhenKey::DestinationPort => ConditionValues::DestinationPort(c.ports(p, raw)),
        WhenKey::Header(name) => ConditionValues::RequestHeader(name.clone(), c.patterns(p, v)),
        WhenKey::AuthPrincipal => ConditionValues::RequestPrincipal(c.patterns(p, v)),
        WhenKey::AuthAudiences => ConditionValues::RequestAudiences(c.patterns(p, v)),
        WhenKey::AuthPresenter => ConditionValues::RequestPresenter(c.patterns(p, v)),
        WhenKey::Claim(path) => ConditionValues::RequestClaim(path.clone(), c.patterns(p, v)),
    };
    Some(Condition {
        values: typed(c, &vpath, &values, &w.values),
        not_values: typed(c, &npath, &not_values, &w.not_values),
    })
}

/// A `when` key, parsed.
enum WhenKey {
    SourceIp,
    DestinationIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    /// Lower-cased (header names are case-insensitive).
    Header(Box<str>),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `claims[a][b]`: the names, outermost first.
    Claim(Box<[String]>),
}

fn when_key(key: &str) -> Result<WhenKey, String> {
    let bracketed = |prefix: &str| -> Option<Result<Vec<String>, String>> {
        let rest = key.strip_prefix(prefix)?;
        let inner = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        Some(match inner {
            Some(inner) if !inner.is_empty() && !inner.split("][").any(str::is_empty) => {
                Ok(inner.split("][").map(str::to_owned).collect())
            }
            _ => Err(format!("{key:?}: expected {prefix}[NAME]")),
        })
    };
    Ok(match key {
        "source.ip" => WhenKey::SourceIp,
        "destination.ip" => WhenKey::DestinationIp,
        "source.namespace" => WhenKey::SourceNamespace,
        "source.principal" => WhenKey::SourcePrincipal,
        "destination.port" => WhenKey::DestinationPort,
        "request.auth.principal" => WhenKey::AuthPrincipal,
        "request.auth.audiences" => WhenKey::AuthAudiences,
        "request.auth.presenter" => WhenKey::AuthPresenter,
        "" => return Err(format!("a condition needs a `key` (one of {WHEN_KEYS})")),
        _ => {
            if let Some(names) = bracketed("request.headers") {
                let names = names?;
                let [name] = names.as_slice() else {
                    return Err(format!("{key:?}: expected request.headers[NAME]"));
                };
                hyper::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{key:?}: {name:?} is not a header name"))?;
                WhenKey::Header(name.to_ascii_lowercase().into())
            } else if let Some(names) = bracketed("request.auth.claims") {
                WhenKey::Claim(names?.into())
            } else {
                return Err(format!(
                    "{key:?} is not supported by Latch; supported keys: {WHEN_KEYS}"
                ));
            }
        }
    })
}

/// Compile a PeerAuthentication; `meta` is already checked.
pub(crate) fn peer_authentication(
    meta: Meta,
    spec: &model::PeerAuthenticationSpec,
) -> Result<PeerAuthPolicy, Vec<Problem>> {
    let mut c = Checker::default();
    let selector = selector(&mut c, spec.selector.as_ref());
    let mode = mtls_mode(&mut c, "spec.mtls.mode", spec.mtls.as_ref());
    let mut port_modes = BTreeMap::new();
    if let Some(ports) = &spec.port_level_mtls {
        if selector.is_empty() {
            c.problems.push(problem(
                "spec.portLevelMtls",
                "portLevelMtls requires a selector (Istio applies it to selected workloads only)",
            ));
        }
        for (port, mtls) in ports {
            let path = format!("spec.portLevelMtls.{}", port.0);
            match parse_port(&port.0) {
                Ok(p) => {
                    port_modes.insert(p, mtls_mode(&mut c, &format!("{path}.mode"), Some(mtls)));
                }
                Err(message) => c.problems.push(problem(path, message)),
            }
        }
    }
    c.finish(PeerAuthPolicy {
        meta,
        selector,
        mode,
        port_modes,
    })
}

fn mtls_mode(c: &mut Checker, path: &str, mtls: Option<&model::MutualTls>) -> Option<MtlsMode> {
    match mtls.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some(other) => {
            c.problems.push(problem(
                path,
                format!(
                    "unknown mTLS mode {other:?} (expected STRICT, PERMISSIVE, DISABLE or UNSET)"
                ),
            ));
            None
        }
    }
}
