//! Name constraints (RFC 5280 §4.2.1.10) of the CAs of a path, the trust anchor included, over
//! the names of every certificate below them. Enforced forms: URI (the host part: SPIFFE
//! X509-SVID §4.2 allows a URI constraint naming the trust domain), DNS name and IP address.
//! A constraint of any other form (directoryName, rfc822Name, otherName, ...) is refused rather
//! than ignored.

use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, GeneralSubtree},
};

use super::error::{Position, Problem, VerifyError};
use x509_parser::oid_registry::OID_X509_EXT_NAME_CONSTRAINTS;

/// Check the name constraints of `ca` (at `by`) against the names of each of `below`.
pub(super) fn check<'a, 'c: 'a>(
    ca: &X509Certificate<'_>,
    by: Position,
    below: impl IntoIterator<Item = (Position, &'a X509Certificate<'c>)>,
) -> Result<(), VerifyError> {
    let refuse_ca = |problem| VerifyError::refused(by, ca, problem);
    let malformed = |reason: &str| {
        refuse_ca(Problem::MalformedExtension {
            name: "nameConstraints",
            reason: reason.to_owned(),
        })
    };
    let (raw, constraints) = match (
        ca.get_extension_unique(&OID_X509_EXT_NAME_CONSTRAINTS),
        ca.name_constraints(),
    ) {
        (Ok(Some(ext)), Ok(Some(nc))) => (ext.value, nc.value),
        (Ok(None), Ok(None)) => return Ok(()),
        (Err(e), _) | (_, Err(e)) => return Err(malformed(&e.to_string())),
        _ => return Err(malformed("does not decode")),
    };
    // x509-parser reads a subtree list it cannot decode as absent: count them in the DER.
    let lengths = |trees: &Option<Vec<GeneralSubtree<'_>>>| trees.as_ref().map(Vec::len);
    let parsed = (
        lengths(&constraints.permitted_subtrees),
        lengths(&constraints.excluded_subtrees),
    );
    match subtree_counts(raw) {
        Some(counts) if counts == parsed && counts != (None, None) => {}
        _ => return Err(malformed("not an RFC 5280 NameConstraints with subtrees")),
    }
    let permitted: &[GeneralSubtree<'_>] = constraints.permitted_subtrees.as_deref().unwrap_or(&[]);
    let excluded: &[GeneralSubtree<'_>] = constraints.excluded_subtrees.as_deref().unwrap_or(&[]);
    for subtree in permitted.iter().chain(excluded) {
        if let Some(form) = unsupported_form(&subtree.base) {
            return Err(refuse_ca(Problem::UnsupportedNameConstraint { form }));
        }
    }
    for (position, cert) in below {
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            let Some(kind) = Kind::of(name) else {
                continue;
            };
            let shown = || show(name);
            let refuse = |problem| VerifyError::refused(position, cert, problem);
            let of_kind = |s: &&GeneralSubtree<'_>| Kind::of(&s.base) == Some(kind);
            let mut permitted_here = permitted.iter().filter(of_kind).peekable();
            let constrained =
                permitted_here.peek().is_some() || excluded.iter().any(|s| of_kind(&s));
            if constrained && kind == Kind::Uri && uri_host(name).is_none() {
                // RFC 5280: URI constraints apply to the host; a URI without one cannot meet them.
                return Err(refuse(Problem::NameNotPermitted { name: shown(), by }));
            }
            if permitted_here.peek().is_some() && !permitted_here.any(|s| matches(&s.base, name)) {
                return Err(refuse(Problem::NameNotPermitted { name: shown(), by }));
            }
            if excluded
                .iter()
                .filter(of_kind)
                .any(|s| matches(&s.base, name))
            {
                return Err(refuse(Problem::NameExcluded { name: shown(), by }));
            }
        }
    }
    Ok(())
}

/// The number of subtrees in the permitted (`[0]`) and excluded (`[1]`) lists of a DER
/// NameConstraints, each absent or non-empty; `None` if it is not that structure (RFC 5280
/// §4.2.1.10, implicit tags).
fn subtree_counts(der: &[u8]) -> Option<(Option<usize>, Option<usize>)> {
    let (0x30, mut body, []) = read_tlv(der)? else {
        return None;
    };
    let mut counts = (None, None);
    for (tag, slot) in [(0xa0, &mut counts.0), (0xa1, &mut counts.1)] {
        let Some((found, trees, rest)) = read_tlv(body) else {
            break;
        };
        if found != tag {
            continue;
        }
        let mut n = 0;
        let mut trees = trees;
        while !trees.is_empty() {
            // GeneralSubtree ::= SEQUENCE { base GeneralName (a context-specific tag), ... }
            let (0x30, subtree, rest) = read_tlv(trees)? else {
                return None;
            };
            let (base, _, _) = read_tlv(subtree)?;
            if base & 0xc0 != 0x80 {
                return None;
            }
            trees = rest;
            n += 1;
        }
        if n == 0 {
            return None;
        }
        *slot = Some(n);
        body = rest;
    }
    body.is_empty().then_some(counts)
}

/// One DER tag-length-value with a one-byte tag: (tag, contents, the bytes after it).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = input.split_at_checked(n)?;
        input = rest;
        bytes
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b))
    };
    let (contents, rest) = input.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The name forms this module enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uri,
    Dns,
    Ip,
}

impl Kind {
    fn of(name: &GeneralName<'_>) -> Option<Self> {
        match name {
            GeneralName::URI(_) => Some(Kind::Uri),
            GeneralName::DNSName(_) => Some(Kind::Dns),
            GeneralName::IPAddress(_) => Some(Kind::Ip),
            _ => None,
        }
    }
}

fn unsupported_form(base: &GeneralName<'_>) -> Option<&'static str> {
    match base {
        GeneralName::URI(_) | GeneralName::DNSName(_) | GeneralName::IPAddress(_) => None,
        GeneralName::OtherName(..) => Some("otherName"),
        GeneralName::RFC822Name(_) => Some("rfc822Name"),
        GeneralName::X400Address(_) => Some("x400Address"),
        GeneralName::DirectoryName(_) => Some("directoryName"),
        GeneralName::EDIPartyName(_) => Some("ediPartyName"),
        GeneralName::RegisteredID(_) => Some("registeredID"),
        GeneralName::Invalid(..) => Some("undecodable"),
    }
}

fn show(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI {u:?}"),
        GeneralName::DNSName(d) => format!("DNS {d:?}"),
        GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
            Ok(v4) => format!("IP {}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*ip) {
                Ok(v6) => format!("IP {}", std::net::Ipv6Addr::from(v6)),
                Err(_) => format!("IP of {} bytes", ip.len()),
            },
        },
        other => format!("{other:?}"),
    }
}

/// Whether `name` is within the subtree `base` (both of the same form).
fn matches(base: &GeneralName<'_>, name: &GeneralName<'_>) -> bool {
    match (base, name) {
        (GeneralName::URI(constraint), GeneralName::URI(_)) => {
            uri_host(name).is_some_and(|host| host_matches(constraint, host))
        }
        (GeneralName::DNSName(constraint), GeneralName::DNSName(dns)) => {
            dns_matches(constraint, dns)
        }
        (GeneralName::IPAddress(constraint), GeneralName::IPAddress(ip)) => {
            ip_matches(constraint, ip)
        }
        _ => false,
    }
}

/// The host of a URI (`scheme://[userinfo@]host[:port]/...`), if it has one.
fn uri_host<'n>(name: &GeneralName<'n>) -> Option<&'n str> {
    let GeneralName::URI(uri) = name else {
        return None;
    };
    let (_, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(literal) = host_port.strip_prefix('[') {
        literal.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// RFC 5280 URI constraints: `host.example` is that host only, `.example` any host below it
/// (not `example` itself). Compared without regard to ASCII case.
fn host_matches(constraint: &str, host: &str) -> bool {
    if constraint.starts_with('.') {
        host.len() > constraint.len() && ends_with_ignore_case(host, constraint)
    } else {
        host.eq_ignore_ascii_case(constraint)
    }
}

/// RFC 5280 DNS constraints: `example` is that name and every name below it, `.example` only
/// the names below it; the empty constraint is every name.
fn dns_matches(constraint: &str, dns: &str) -> bool {
    let constraint = constraint.strip_suffix('.').unwrap_or(constraint);
    let dns = dns.strip_suffix('.').unwrap_or(dns);
    if constraint.is_empty() {
        return true;
    }
    if constraint.starts_with('.') {
        return dns.len() > constraint.len() && ends_with_ignore_case(dns, constraint);
    }
    dns.eq_ignore_ascii_case(constraint)
        || (dns.len() > constraint.len()
            && ends_with_ignore_case(dns, constraint)
            && dns.as_bytes()[dns.len() - constraint.len() - 1] == b'.')
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// RFC 5280 IP constraints: address and mask (8 bytes for IPv4, 32 for IPv6).
fn ip_matches(constraint: &[u8], ip: &[u8]) -> bool {
    if constraint.len() != 2 * ip.len() {
        return false;
    }
    let (net, mask) = constraint.split_at(ip.len());
    ip.iter()
        .zip(net)
        .zip(mask)
        .all(|((a, n), m)| a & m == n & m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_hosts() {
        let host = |u| uri_host(&GeneralName::URI(u));
        assert_eq!(
            host("spiffe://cluster.local/ns/a/sa/b"),
            Some("cluster.local")
        );
        assert_eq!(host("spiffe://cluster.local"), Some("cluster.local"));
        assert_eq!(host("https://u@h.example:8443/x?y#z"), Some("h.example"));
        assert_eq!(host("https://[fe80::1]:8443/"), Some("fe80::1"));
        assert_eq!(host("urn:uuid:1234"), None);
        assert_eq!(host("spiffe:///path"), None);
    }

    #[test]
    fn host_and_domain_constraints() {
        assert!(host_matches("cluster.local", "cluster.local"));
        assert!(host_matches("cluster.local", "CLUSTER.local"));
        assert!(!host_matches("cluster.local", "a.cluster.local"));
        assert!(host_matches(".cluster.local", "a.cluster.local"));
        assert!(!host_matches(".cluster.local", "cluster.local"));
        assert!(!host_matches(".cluster.local", "acluster.local"));
        assert!(dns_matches("example.com", "example.com"));
        assert!(dns_matches("example.com", "a.b.example.com"));
        assert!(!dns_matches("example.com", "badexample.com"));
        assert!(!dns_matches(".example.com", "example.com"));
        assert!(dns_matches(".example.com", "a.example.com"));
        assert!(dns_matches("", "anything"));
    }

    #[test]
    fn subtree_lists_are_counted_in_the_der() {
        let subtree = [0x30, 0x03, 0x86, 0x01, b'a'];
        let permitted = [[0xa0, 0x0a].as_slice(), &subtree, &subtree].concat();
        let excluded = [[0xa1, 0x05].as_slice(), &subtree].concat();
        let nc = |body: &[u8]| [&[0x30, body.len() as u8], body].concat();
        assert_eq!(subtree_counts(&nc(&permitted)), Some((Some(2), None)));
        assert_eq!(subtree_counts(&nc(&excluded)), Some((None, Some(1))));
        assert_eq!(
            subtree_counts(&nc(&[permitted.clone(), excluded.clone()].concat())),
            Some((Some(2), Some(1)))
        );
        assert_eq!(subtree_counts(&nc(&[])), Some((None, None)));
        // Subtrees wrapped in one SEQUENCE more, excluded before permitted, bytes left over.
        let wrapped = [[0xa0, 0x07, 0x30, 0x05].as_slice(), &subtree].concat();
        assert_eq!(subtree_counts(&nc(&wrapped)), None);
        assert_eq!(subtree_counts(&nc(&[excluded, permitted].concat())), None);
        assert_eq!(subtree_counts(&[nc(&subtree), vec![0]].concat()), None);
        assert_eq!(subtree_counts(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn ip_constraints() {
        let net = [10, 244, 0, 0, 255, 255, 0, 0];
        assert!(ip_matches(&net, &[10, 244, 1, 2]));
        assert!(!ip_matches(&net, &[10, 245, 1, 2]));
        assert!(!ip_matches(&net, &[0u8; 16]), "another family");
    }
}
