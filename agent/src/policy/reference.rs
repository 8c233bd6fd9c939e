//! A deliberately plain evaluator for tests: it reads the parsed YAML model directly (no
//! compilation, no index), checks every policy for applicability and applies Istio's order.
//! It shares no matching code with the engine; PeerAuthentication is not modelled.

use std::{collections::BTreeMap, net::IpAddr};

use super::model::{AuthorizationPolicyDoc, Operation, Rule, Scalar, Source};

pub(crate) struct Request<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// Full SPIFFE ID, `None` for plaintext.
    pub principal: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub port: u16,
    /// (method, path, host); `None` for a non-HTTP connection.
    pub http: Option<(&'a str, &'a str, &'a str)>,
}

/// Whether Istio allows `req`.
pub(crate) fn allowed(policies: &[AuthorizationPolicyDoc], root: &str, req: &Request) -> bool {
    let applies = |p: &&AuthorizationPolicyDoc| {
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        let labels = p
            .spec
            .selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        (ns == root || ns == req.namespace)
            && labels.iter().all(|(k, v)| req.labels.get(k) == Some(v))
    };
    let action = |p: &AuthorizationPolicyDoc| p.spec.action.clone().unwrap_or("ALLOW".into());
    let hit = |p: &AuthorizationPolicyDoc| {
        let is_allow = action(p) == "ALLOW";
        p.spec
            .rules
            .iter()
            .flatten()
            .any(|r| rule(r, req, is_allow))
    };
    let applicable: Vec<&AuthorizationPolicyDoc> = policies.iter().filter(applies).collect();
    if applicable.iter().any(|p| action(p) == "DENY" && hit(p)) {
        return false;
    }
    let allows: Vec<_> = applicable.iter().filter(|p| action(p) == "ALLOW").collect();
    allows.is_empty() || allows.iter().any(|p| hit(p))
}

fn str_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn bits(ip: IpAddr) -> (bool, u128) {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => (true, u128::from(u32::from(v4)) << 96),
        IpAddr::V6(v6) => (false, u128::from(v6)),
    }
}

fn ip_in(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = block.split_once('/').unwrap_or((block, ""));
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    let (v4, net) = bits(net);
    let (ip_v4, ip) = bits(ip);
    let max = if v4 { 32 } else { 128 };
    let len: u32 = len.parse().unwrap_or(max);
    v4 == ip_v4 && (len == 0 || (net ^ ip) >> (128 - len) == 0)
}

/// `values` unset/empty or one matches; `not_values` unset/empty or none matches.
fn check<T>(values: &Option<Vec<T>>, not_values: &Option<Vec<T>>, m: impl Fn(&T) -> bool) -> bool {
    let set = |v: &Option<Vec<T>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let any = |v: &Option<Vec<T>>| v.iter().flatten().any(&m);
    (!set(values) || any(values)) && (!set(not_values) || !any(not_values))
}

fn principal<'a>(req: &Request<'a>) -> Option<&'a str> {
    req.principal.map(|p| p.trim_start_matches("spiffe://"))
}

fn namespace<'a>(req: &Request<'a>) -> Option<&'a str> {
    let (_, rest) = principal(req)?.split_once("/ns/")?;
    rest.split('/').next()
}

fn source(s: &Source, req: &Request) -> bool {
    let opt = |value: Option<&str>, p: &String| value.is_some_and(|v| str_match(p, v));
    check(&s.principals, &s.not_principals, |p| opt(principal(req), p))
        && check(&s.namespaces, &s.not_namespaces, |p| opt(namespace(req), p))
        && check(&s.ip_blocks, &s.not_ip_blocks, |b| {
            req.source_ip.is_some_and(|ip| ip_in(b, ip))
        })
}

fn has_http_fields(o: &Operation) -> bool {
    [
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
        &o.hosts,
        &o.not_hosts,
    ]
    .iter()
    .any(|f| f.as_ref().is_some_and(|v| !v.is_empty()))
}

fn operation(o: &Operation, req: &Request) -> bool {
    let port = |p: &Scalar| p.0.parse::<u16>() == Ok(req.port);
    let ports = check(&o.ports, &o.not_ports, port);
    let Some((method, path, host)) = req.http else {
        // TCP: for the rules that get here, HTTP fields are dropped.
        return ports;
    };
    let path = path.split('?').next().unwrap_or(path);
    let host = host.to_lowercase();
    ports
        && check(&o.methods, &o.not_methods, |m| str_match(m, method))
        && check(&o.paths, &o.not_paths, |p| str_match(p, path))
        && check(&o.hosts, &o.not_hosts, |h| {
            str_match(&h.to_lowercase(), &host)
        })
}

fn rule(r: &Rule, req: &Request, is_allow: bool) -> bool {
    let tos = r.to.iter().flatten().filter_map(|t| t.operation.as_ref());
    if req.http.is_none() && is_allow && tos.clone().any(has_http_fields) {
        return false;
    }
    let froms: Vec<_> = r
        .from
        .iter()
        .flatten()
        .filter_map(|f| f.source.as_ref())
        .collect();
    let tos: Vec<_> = tos.collect();
    (froms.is_empty() || froms.iter().any(|s| source(s, req)))
        && (tos.is_empty() || tos.iter().any(|o| operation(o, req)))
        && r.when.iter().flatten().all(|c| {
            let text = |s: &Scalar| s.0.clone();
            let m = |v: &String| match c.key.as_str() {
                "source.ip" => req.source_ip.is_some_and(|ip| ip_in(v, ip)),
                "destination.ip" => ip_in(v, req.destination_ip),
                "source.namespace" => namespace(req).is_some_and(|n| str_match(v, n)),
                "source.principal" => principal(req).is_some_and(|p| str_match(v, p)),
                "destination.port" => v.parse::<u16>() == Ok(req.port),
                _ => false,
            };
            let values = c.values.as_ref().map(|v| v.iter().map(text).collect());
            let not_values = c.not_values.as_ref().map(|v| v.iter().map(text).collect());
            check(&values, &not_values, m)
        })
}
