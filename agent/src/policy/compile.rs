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
struct Checker {
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

const WHEN_KEYS: &str =
    "source.ip, source.namespace, source.principal, destination.ip, destination.port";

/// Compile an AuthorizationPolicy; `meta` is already checked.
pub(crate) fn authorization_policy(
    meta: Meta,
    spec: &model::AuthorizationPolicySpec,
) -> Result<AuthzPolicy, Vec<Problem>> {
    let mut c = Checker::default();
    let not_targets =
        "targetRef is not supported by Latch (it has no gateways or waypoints); use selector";
    c.unsupported("spec.targetRef", &spec.target_ref, not_targets);
    c.unsupported(
        "spec.targetRefs",
        &spec.target_refs,
        &not_targets.replace("targetRef", "targetRefs"),
    );
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
        rules.push(compile_rule(&mut c, &format!("spec.rules[{i}]"), rule));
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
    })
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
    rule.to
        .iter()
        .filter(here)
        .any(Operation::has_l7)
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

fn compile_rule(c: &mut Checker, path: &str, rule: &model::Rule) -> Rule {
    let mut out = Rule::default();
    for (i, from) in rule.from.iter().flatten().enumerate() {
        let path = format!("{path}.from[{i}]");
        match &from.source {
            Some(source) if *source != model::Source::default() => {
                out.from
                    .push(compile_source(c, &format!("{path}.source"), source));
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

fn compile_source(c: &mut Checker, path: &str, s: &model::Source) -> Source {
    let no_jwt = "is not supported by Latch (no JWT authentication)";
    c.unsupported(
        &format!("{path}.requestPrincipals"),
        &s.request_principals,
        &format!("requestPrincipals {no_jwt}"),
    );
    c.unsupported(
        &format!("{path}.notRequestPrincipals"),
        &s.not_request_principals,
        &format!("notRequestPrincipals {no_jwt}"),
    );
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
        ip_blocks: c.cidrs(&format!("{path}.ipBlocks"), &s.ip_blocks),
        not_ip_blocks: c.cidrs(&format!("{path}.notIpBlocks"), &s.not_ip_blocks),
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
    let typed = |c: &mut Checker,
                 p: &str,
                 v: &Option<Vec<String>>,
                 raw: &Option<Vec<model::Scalar>>| match w.key.as_str() {
        "source.ip" => ConditionValues::SourceIp(c.cidrs(p, v)),
        "destination.ip" => ConditionValues::DestinationIp(c.cidrs(p, v)),
        "source.namespace" => ConditionValues::SourceNamespace(c.patterns(p, v)),
        "source.principal" => ConditionValues::SourcePrincipal(c.patterns(p, v)),
        _ => ConditionValues::DestinationPort(c.ports(p, raw)),
    };
    match w.key.as_str() {
        "source.ip" | "destination.ip" | "source.namespace" | "source.principal"
        | "destination.port" => Some(Condition {
            values: typed(c, &vpath, &values, &w.values),
            not_values: typed(c, &npath, &not_values, &w.not_values),
        }),
        "" => {
            c.problems.push(problem(
                format!("{path}.key"),
                format!("a condition needs a `key` (one of {WHEN_KEYS})"),
            ));
            None
        }
        other => {
            c.problems.push(problem(
                format!("{path}.key"),
                format!("{other:?} is not supported by Latch; supported keys: {WHEN_KEYS}"),
            ));
            None
        }
    }
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
