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

/// The connection's attributes, normalized once per decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attrs<'a> {
    /// Without `spiffe://`.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
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
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
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
    fn matches(&self, a: &Attrs) -> bool {
        field(&self.principals, &self.not_principals, |p| {
            any(p, a.principal)
        }) && field(&self.namespaces, &self.not_namespaces, |p| {
            any(p, a.namespace)
        }) && field(&self.ip_blocks, &self.not_ip_blocks, |b| {
            any_ip(b, a.source_ip)
        })
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
    fn matches(&self, a: &Attrs) -> bool {
        let hit = |values: &ConditionValues| match values {
            ConditionValues::SourceIp(v) => any_ip(v, a.source_ip),
            ConditionValues::DestinationIp(v) => any_ip(v, Some(a.destination_ip)),
            ConditionValues::SourceNamespace(v) => any(v, a.namespace),
            ConditionValues::SourcePrincipal(v) => any(v, a.principal),
            ConditionValues::DestinationPort(v) => v.contains(&a.destination_port),
        };
        (self.values.is_empty() || hit(&self.values))
            && (self.not_values.is_empty() || !hit(&self.not_values))
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
            Self::SourceNamespace(v) | Self::SourcePrincipal(v) => v.is_empty(),
            Self::DestinationPort(v) => v.is_empty(),
        }
    }
}

impl Rule {
    pub(crate) fn has_l7(&self) -> bool {
        self.to.iter().any(Operation::has_l7)
    }

    /// Whether this rule matches, in the given L7 mode.
    pub(crate) fn matches(&self, a: &Attrs, l7: L7) -> Tri {
        if let L7::Tcp { allow: true } = l7
            && self.has_l7()
        {
            return Tri::No;
        }
        let from = self.from.is_empty() || self.from.iter().any(|s| s.matches(a));
        if !from || !self.when.iter().all(|c| c.matches(a)) {
            return Tri::No;
        }
        if self.to.is_empty() {
            return Tri::Yes;
        }
        self.to
            .iter()
            .fold(Tri::No, |acc, op| acc.or(op.matches(a, l7)))
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
