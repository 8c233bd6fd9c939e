//! Compiled rules and how one rule matches one connection or request, Istio's way (the rules:
//! `docs/policy.md`, Decisions). L7 fields exist only on HTTP requests, so a rule is matched in one
//! of three [`L7`] modes with a three-valued [`Tri`] answer: request known; request not known yet
//! (Kleene logic: `Maybe` means "depends on the request"); plain TCP (Istio's TCP rules).

use std::net::IpAddr;

use super::decision::HttpRequest;

/// A compiled string match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// `*`: any non-empty value.
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    /// Compile `raw`; `Err` says why it is not a valid Istio match.
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        let (pattern, inner) = if let Some(rest) = raw.strip_prefix('*') {
            (Self::Suffix(rest.into()), rest)
        } else if let Some(rest) = raw.strip_suffix('*') {
            (Self::Prefix(rest.into()), rest)
        } else {
            (Self::Exact(raw.into()), raw)
        };
        if inner.contains('*') {
            return Err(format!(
                "{raw:?}: `*` may only be a whole value, a prefix (`abc*`) or a suffix (`*abc`)"
            ));
        }
        if raw.is_empty() {
            return Err("an empty string matches nothing".to_owned());
        }
        Ok(pattern)
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Self::Any => !v.is_empty(),
            Self::Exact(p) => v == p.as_bytes(),
            Self::Prefix(p) => v.starts_with(p.as_bytes()),
            Self::Suffix(p) => v.ends_with(p.as_bytes()),
        }
    }

    /// As [`Self::matches`], ignoring ASCII case (hosts).
    pub(crate) fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Self::Any => !v.is_empty(),
            Self::Exact(p) => v.eq_ignore_ascii_case(p.as_bytes()),
            Self::Prefix(p) => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Self::Suffix(p) => {
                v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
        }
    }
}

/// An address range: a CIDR or a single address. IPv4-mapped IPv6 addresses compare as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let bad = || format!("{raw:?} is not an IP address or CIDR");
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{raw:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(Self {
            network: addr,
            prefix,
        })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Three-valued truth: `Maybe` when the answer depends on HTTP attributes not yet known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tri {
    No,
    Maybe,
    Yes,
}

impl Tri {
    fn from_bool(b: bool) -> Self {
        if b { Self::Yes } else { Self::No }
    }
    fn and(self, other: Self) -> Self {
        self.min(other)
    }
    fn or(self, other: Self) -> Self {
        self.max(other)
    }
}

impl PartialOrd for Tri {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Tri {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let rank = |t: &Tri| match t {
            Tri::No => 0,
            Tri::Maybe => 1,
            Tri::Yes => 2,
        };
        rank(self).cmp(&rank(other))
    }
}

/// How L7 fields are evaluated (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(crate) enum L7<'a> {
    Request(&'a HttpRequest<'a>),
    Unknown,
    /// A plain TCP connection, for a rule of the given kind.
    Tcp {
        allow: bool,
    },
}

impl L7<'_> {
    /// An HTTP-only test: `test` on a known request; `Maybe` while the request is unknown; on
    /// plain TCP, ignored (`Yes`; a rule of an ALLOW policy with HTTP fields never matches TCP,
    /// see [`Rule::matches`]).
    fn judge(self, test: impl FnOnce(&HttpRequest) -> bool) -> Tri {
        match self {
            L7::Request(req) => Tri::from_bool(test(req)),
            L7::Unknown => Tri::Maybe,
            L7::Tcp { .. } => Tri::Yes,
        }
    }
}

/// The connection's attributes, normalized once per decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attrs<'a> {
    /// Without `spiffe://`.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// The service account of the source's SPIFFE ID.
    pub service_account: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(
        principal: Option<&'a str>,
        source_ip: Option<IpAddr>,
        destination_ip: IpAddr,
        destination_port: u16,
    ) -> Self {
        let principal = principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        Self {
            principal,
            namespace: principal.and_then(namespace_of),
            service_account: principal.and_then(service_account_of),
            source_ip,
            destination_ip,
            destination_port,
        }
    }
}

/// The namespace of a SPIFFE path `<trust domain>/ns/<namespace>/sa/<account>`.
pub(crate) fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    parts.next()?;
    (parts.next()? == "ns").then(|| parts.next()).flatten()
}

/// The service account of a SPIFFE path `<trust domain>/ns/<namespace>/sa/<account>`.
pub(crate) fn service_account_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next()?;
    (parts.next()? == "sa").then(|| parts.next()).flatten()
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Rule {
    /// OR-ed; empty matches anything.
    pub from: Vec<Source>,
    /// OR-ed; empty matches anything.
    pub to: Vec<Operation>,
    /// AND-ed.
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    /// Matched against `namespace/serviceAccount` of the source's SPIFFE ID.
    pub service_accounts: Vec<Pattern>,
    pub not_service_accounts: Vec<Pattern>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    /// HTTP only: matched against the request's JWT principal `iss/sub`.
    pub request_principals: Vec<Pattern>,
    pub not_request_principals: Vec<Pattern>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<Pattern>,
    pub not_methods: Vec<Pattern>,
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
    /// Matched ignoring ASCII case.
    pub hosts: Vec<Pattern>,
    pub not_hosts: Vec<Pattern>,
}

#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub values: ConditionValues,
    pub not_values: ConditionValues,
}

/// The values of a `when` condition, typed by its key. Empty means "not set".
#[derive(Debug, Clone)]
pub(crate) enum ConditionValues {
    SourceIp(Vec<Cidr>),
    DestinationIp(Vec<Cidr>),
    SourceNamespace(Vec<Pattern>),
    SourcePrincipal(Vec<Pattern>),
    DestinationPort(Vec<u16>),
    /// The remaining keys are HTTP only.
    /// `request.headers[name]` (name lower-cased); several fields are joined with `,`.
    RequestHeader(Box<str>, Vec<Pattern>),
    /// `request.auth.principal`: the JWT's `iss/sub`.
    RequestPrincipal(Vec<Pattern>),
    /// `request.auth.audiences`: any of the JWT's `aud`.
    RequestAudiences(Vec<Pattern>),
    /// `request.auth.presenter`: the JWT's `azp`.
    RequestPresenter(Vec<Pattern>),
    /// `request.auth.claims[a][b]`: a string claim, or any string of a list claim.
    RequestClaim(Box<[String]>, Vec<Pattern>),
}

/// Whether any pattern matches a possibly absent value (absent matches nothing).
fn any(patterns: &[Pattern], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

fn any_ip(blocks: &[Cidr], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| blocks.iter().any(|b| b.contains(ip)))
}

/// `values` (if set) must match and `not_values` (if set) must not.
fn field<T>(values: &[T], not_values: &[T], matches: impl Fn(&[T]) -> bool) -> bool {
    (values.is_empty() || matches(values)) && (not_values.is_empty() || !matches(not_values))
}

impl Source {
    fn matches(&self, a: &Attrs, l7: L7) -> Tri {
        let service_account = || match (a.namespace, a.service_account) {
            (Some(ns), Some(sa)) => Some(format!("{ns}/{sa}")),
            _ => None,
        };
        let l4 = field(&self.principals, &self.not_principals, |p| {
            any(p, a.principal)
        }) && field(&self.namespaces, &self.not_namespaces, |p| {
            any(p, a.namespace)
        }) && field(&self.service_accounts, &self.not_service_accounts, |p| {
            any(p, service_account().as_deref())
        }) && field(&self.ip_blocks, &self.not_ip_blocks, |b| {
            any_ip(b, a.source_ip)
        });
        if !l4 {
            return Tri::No;
        }
        if !self.has_l7() {
            return Tri::Yes;
        }
        l7.judge(|req| {
            let principal = req.auth.map(|auth| auth.principal.as_str());
            field(
                &self.request_principals,
                &self.not_request_principals,
                |p| any(p, principal),
            )
        })
    }

    /// Whether this source looks at the request's JWT (an HTTP attribute).
    pub(crate) fn has_l7(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }

    pub(crate) fn uses_source_ip(&self) -> bool {
        !self.ip_blocks.is_empty() || !self.not_ip_blocks.is_empty()
    }
}

impl Operation {
    pub(crate) fn has_l7(&self) -> bool {
        [
            &self.methods,
            &self.not_methods,
            &self.paths,
            &self.not_paths,
            &self.hosts,
            &self.not_hosts,
        ]
        .iter()
        .any(|v| !v.is_empty())
    }

    pub(crate) fn port_matches(&self, port: u16) -> bool {
        field(&self.ports, &self.not_ports, |ports| ports.contains(&port))
    }

    fn matches(&self, a: &Attrs, l7: L7) -> Tri {
        let l4 = Tri::from_bool(self.port_matches(a.destination_port));
        if l4 == Tri::No {
            return l4;
        }
        let l7 = match l7 {
            L7::Request(req) => {
                let path = req.path.split(['?', '#']).next().unwrap_or("");
                let is = |v: &[Pattern], s: &str| v.iter().any(|p| p.matches(s));
                let host = |v: &[Pattern]| v.iter().any(|p| p.matches_ignore_case(req.host));
                Tri::from_bool(
                    field(&self.methods, &self.not_methods, |v| is(v, req.method))
                        && field(&self.paths, &self.not_paths, |v| is(v, path))
                        && field(&self.hosts, &self.not_hosts, host),
                )
            }
            L7::Unknown if self.has_l7() => Tri::Maybe,
            L7::Unknown | L7::Tcp { .. } => Tri::Yes,
        };
        l4.and(l7)
    }
}

impl Condition {
    fn matches(&self, a: &Attrs, l7: L7) -> Tri {
        let test = |req: Option<&HttpRequest>| {
            let hit = |values: &ConditionValues| match values {
                ConditionValues::SourceIp(v) => any_ip(v, a.source_ip),
                ConditionValues::DestinationIp(v) => any_ip(v, Some(a.destination_ip)),
                ConditionValues::SourceNamespace(v) => any(v, a.namespace),
                ConditionValues::SourcePrincipal(v) => any(v, a.principal),
                ConditionValues::DestinationPort(v) => v.contains(&a.destination_port),
                ConditionValues::RequestHeader(name, v) => {
                    req.is_some_and(|r| any(v, header(r, name).as_deref()))
                }
                ConditionValues::RequestPrincipal(v) => {
                    any(v, req.and_then(|r| r.auth).map(|x| x.principal.as_str()))
                }
                ConditionValues::RequestAudiences(v) => req
                    .and_then(|r| r.auth)
                    .is_some_and(|x| x.audiences.iter().any(|aud| any(v, Some(aud)))),
                ConditionValues::RequestPresenter(v) => any(
                    v,
                    req.and_then(|r| r.auth)
                        .and_then(|x| x.presenter.as_deref()),
                ),
                ConditionValues::RequestClaim(path, v) => req
                    .and_then(|r| r.auth)
                    .is_some_and(|x| claim_matches(&x.claims, path, v)),
            };
            (self.values.is_empty() || hit(&self.values))
                && (self.not_values.is_empty() || !hit(&self.not_values))
        };
        if self.is_l7() {
            l7.judge(|req| test(Some(req)))
        } else {
            Tri::from_bool(test(None))
        }
    }

    /// Whether the key is an HTTP attribute (`request.*`).
    pub(crate) fn is_l7(&self) -> bool {
        matches!(
            self.values,
            ConditionValues::RequestHeader(..)
                | ConditionValues::RequestPrincipal(_)
                | ConditionValues::RequestAudiences(_)
                | ConditionValues::RequestPresenter(_)
                | ConditionValues::RequestClaim(..)
        )
    }

    pub(crate) fn uses_destination_port(&self) -> bool {
        matches!(self.values, ConditionValues::DestinationPort(_))
    }

    pub(crate) fn uses_ip(&self) -> Option<&'static str> {
        match self.values {
            ConditionValues::SourceIp(_) => Some("source IP"),
            ConditionValues::DestinationIp(_) => Some("destination IP"),
            _ => None,
        }
    }
}

impl ConditionValues {
    fn is_empty(&self) -> bool {
        match self {
            Self::SourceIp(v) | Self::DestinationIp(v) => v.is_empty(),
            Self::SourceNamespace(v)
            | Self::SourcePrincipal(v)
            | Self::RequestHeader(_, v)
            | Self::RequestPrincipal(v)
            | Self::RequestAudiences(v)
            | Self::RequestPresenter(v)
            | Self::RequestClaim(_, v) => v.is_empty(),
            Self::DestinationPort(v) => v.is_empty(),
        }
    }
}

/// A header's value as policy sees it: absent, the one field, or several joined with `,` (as
/// HTTP folds them, RFC 9110 §5.3). A value that is not visible ASCII never matches.
fn header(request: &HttpRequest, name: &str) -> Option<String> {
    let mut values = request.headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?.to_owned();
    values.try_fold(first, |mut joined, v| {
        joined.push(',');
        joined.push_str(v.to_str().ok()?);
        Some(joined)
    })
}

/// Whether the claim at `path` (nested objects) is a string any pattern matches, or a list with
/// such a string, as Istio matches `request.auth.claims[..]`.
fn claim_matches(
    claims: &serde_json::Map<String, serde_json::Value>,
    path: &[String],
    patterns: &[Pattern],
) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let mut value = claims.get(first);
    for name in rest {
        value = value.and_then(|v| v.get(name));
    }
    match value {
        Some(serde_json::Value::String(s)) => any(patterns, Some(s)),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .any(|item| item.as_str().is_some_and(|s| any(patterns, Some(s)))),
        _ => false,
    }
}

impl Rule {
    /// Whether any field of the rule is an HTTP attribute.
    pub(crate) fn has_l7(&self) -> bool {
        self.to.iter().any(Operation::has_l7)
            || self.from.iter().any(Source::has_l7)
            || self.when.iter().any(Condition::is_l7)
    }

    /// Whether this rule matches, in the given L7 mode.
    pub(crate) fn matches(&self, a: &Attrs, l7: L7) -> Tri {
        if let L7::Tcp { allow: true } = l7
            && self.has_l7()
        {
            return Tri::No;
        }
        let from = if self.from.is_empty() {
            Tri::Yes
        } else {
            self.from
                .iter()
                .fold(Tri::No, |acc, s| acc.or(s.matches(a, l7)))
        };
        let when = self
            .when
            .iter()
            .fold(Tri::Yes, |acc, c| acc.and(c.matches(a, l7)));
        let to = if self.to.is_empty() {
            Tri::Yes
        } else {
            self.to
                .iter()
                .fold(Tri::No, |acc, op| acc.or(op.matches(a, l7)))
        };
        from.and(when).and(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("*").matches("x") && !p("*").matches(""));
        assert!(p("ab*").matches("abc") && !p("ab*").matches("xab"));
        assert!(p("*ab").matches("xab") && !p("*ab").matches("abx"));
        assert!(p("AB.com").matches_ignore_case("ab.COM"));
        assert!(p("*.Com").matches_ignore_case("x.com") && !p("*.com").matches_ignore_case("é"));
        assert!(Pattern::parse("a*b").is_err() && Pattern::parse("*a*").is_err());
    }

    #[test]
    fn cidrs() {
        let c = |s| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.2.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.1.1")));
        assert!(c("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(c("fd00::/8").contains(ip("fd12::1")) && !c("fd00::/8").contains(ip("10.0.0.1")));
        assert!(c("10.1.1.1").contains(ip("10.1.1.1")) && !c("10.1.1.1").contains(ip("10.1.1.2")));
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("x").is_err());
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace_of("cluster.local/ns/prod/sa/x"), Some("prod"));
        assert_eq!(namespace_of("cluster.local/foo"), None);
    }
}
