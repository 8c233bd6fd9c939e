//! The rules a SPIFFE ID is parsed and validated by ([`super::SpiffeId::parse`]), per the SPIFFE
//! specification (SPIFFE-ID, section 2):
//! `spiffe://<trust domain><path>`, the trust domain made of lowercase letters, digits, `.`, `-`
//! and `_`; the path empty or `/`-separated non-empty segments of letters, digits, `.`, `-`, `_`
//! (never `.` or `..`); no query, fragment, port, userinfo or percent-encoding; at most 2048
//! bytes. Kubernetes workloads use the path `/ns/<namespace>/sa/<service account>`.

/// Longest SPIFFE ID accepted (bytes), per the specification.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted (bytes).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0:?}: a SPIFFE ID must start with \"spiffe://\"")]
    Scheme(String),
    #[error("{0:?}: the trust domain is empty")]
    EmptyTrustDomain(String),
    #[error("{0:?}: the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong(String),
    #[error(
        "{input:?}: the trust domain has the character {found:?} (only lowercase letters, digits, '.', '-' and '_')"
    )]
    TrustDomainChar { input: String, found: char },
    #[error("{0:?}: a SPIFFE ID has no port")]
    Port(String),
    #[error("{0:?}: a SPIFFE ID has no user info")]
    UserInfo(String),
    #[error("{0:?}: a SPIFFE ID has no query")]
    Query(String),
    #[error("{0:?}: a SPIFFE ID has no fragment")]
    Fragment(String),
    #[error("{0:?}: path segments must not be empty (no \"//\" and no trailing \"/\")")]
    EmptySegment(String),
    #[error("{0:?}: path segments must not be \".\" or \"..\"")]
    DotSegment(String),
    #[error(
        "{input:?}: the path has the character {found:?} (only letters, digits, '.', '-' and '_')"
    )]
    PathChar { input: String, found: char },
    #[error("{0:?}: longer than {MAX_ID_LEN} bytes")]
    TooLong(String),
}

/// Check `input` against the rules above; the length of its trust domain.
pub(super) fn validate(input: &str) -> Result<usize, SpiffeError> {
    let owned = || input.to_owned();
    if input.len() > MAX_ID_LEN {
        return Err(SpiffeError::TooLong(owned()));
    }
    let rest = input
        .strip_prefix("spiffe://")
        .ok_or_else(|| SpiffeError::Scheme(owned()))?;
    if rest.contains('#') {
        return Err(SpiffeError::Fragment(owned()));
    }
    if rest.contains('?') {
        return Err(SpiffeError::Query(owned()));
    }
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.contains('@') {
        return Err(SpiffeError::UserInfo(owned()));
    }
    if td.contains(':') {
        return Err(SpiffeError::Port(owned()));
    }
    if td.is_empty() {
        return Err(SpiffeError::EmptyTrustDomain(owned()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeError::TrustDomainTooLong(owned()));
    }
    if let Some(found) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeError::TrustDomainChar {
            input: owned(),
            found,
        });
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            if segment.is_empty() {
                return Err(SpiffeError::EmptySegment(owned()));
            }
            if segment == "." || segment == ".." {
                return Err(SpiffeError::DotSegment(owned()));
            }
            if let Some(found) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(SpiffeError::PathChar {
                    input: owned(),
                    found,
                });
            }
        }
    }
    Ok(td.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    #[test]
    fn valid_ids_from_the_specification() {
        for id in [
            "spiffe://trustdomain",
            "spiffe://trust-domain.example/path",
            "spiffe://trust_domain.example/path/element",
            "spiffe://td/ns/prod/sa/frontend",
            "spiffe://td/a_b.c-d/E",
            "spiffe://example.org/UPPER/case/Path",
            "spiffe://1.2.3.4/workload",
            "spiffe://td/.../x",
            "spiffe://td/.hidden",
            "spiffe://td/a..b",
        ] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id} must be valid: {e}"));
            assert_eq!(parsed.to_string(), id, "round trip");
        }
    }

    #[test]
    fn invalid_ids_name_the_reason() {
        use SpiffeError as E;
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        type Expect = fn(&SpiffeError) -> bool;
        let cases: Vec<(&str, Expect)> = vec![
            ("http://td/x", |e| matches!(e, E::Scheme(_))),
            ("SPIFFE://td", |e| matches!(e, E::Scheme(_))),
            ("spiffe:/td/x", |e| matches!(e, E::Scheme(_))),
            ("", |e| matches!(e, E::Scheme(_))),
            ("spiffe://", |e| matches!(e, E::EmptyTrustDomain(_))),
            ("spiffe:///path", |e| matches!(e, E::EmptyTrustDomain(_))),
            ("spiffe://td/", |e| matches!(e, E::EmptySegment(_))),
            ("spiffe://td//x", |e| matches!(e, E::EmptySegment(_))),
            ("spiffe://td/x/", |e| matches!(e, E::EmptySegment(_))),
            ("spiffe://td/./x", |e| matches!(e, E::DotSegment(_))),
            ("spiffe://td/../x", |e| matches!(e, E::DotSegment(_))),
            ("spiffe://td/x/..", |e| matches!(e, E::DotSegment(_))),
            ("spiffe://td/x?q=1", |e| matches!(e, E::Query(_))),
            ("spiffe://td/x#frag", |e| matches!(e, E::Fragment(_))),
            ("spiffe://td:80/x", |e| matches!(e, E::Port(_))),
            ("spiffe://user@td/x", |e| matches!(e, E::UserInfo(_))),
            ("spiffe://user:pw@td/x", |e| matches!(e, E::UserInfo(_))),
            ("spiffe://td/%41", |e| {
                matches!(e, E::PathChar { found: '%', .. })
            }),
            ("spiffe://TD/x", |e| {
                matches!(e, E::TrustDomainChar { found: 'T', .. })
            }),
            ("spiffe://t d/x", |e| {
                matches!(e, E::TrustDomainChar { found: ' ', .. })
            }),
            ("spiffe://tdé/x", |e| {
                matches!(e, E::TrustDomainChar { found: 'é', .. })
            }),
            ("spiffe://td/x y", |e| {
                matches!(e, E::PathChar { found: ' ', .. })
            }),
            ("spiffe://td/ünï", |e| {
                matches!(e, E::PathChar { found: 'ü', .. })
            }),
            ("spiffe://td/a+b", |e| {
                matches!(e, E::PathChar { found: '+', .. })
            }),
            ("spiffe://td/a~b", |e| {
                matches!(e, E::PathChar { found: '~', .. })
            }),
            (long_path.as_str(), |e| matches!(e, E::TooLong(_))),
            (long_td.as_str(), |e| matches!(e, E::TrustDomainTooLong(_))),
        ];
        for (input, expected) in cases {
            match SpiffeId::parse(input) {
                Ok(id) => panic!("{input:?} must be invalid, parsed as {id}"),
                Err(e) => {
                    assert!(expected(&e), "{input:?}: unexpected error {e:?}");
                    if input.len() < 100 {
                        assert!(
                            e.to_string().contains(&format!("{input:?}")),
                            "the message quotes the input: {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kubernetes_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/frontend"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/prod/sa/frontend");
        assert_eq!(id.kubernetes(), Some(("prod", "frontend")));
        for other in [
            "spiffe://td",
            "spiffe://td/ns/prod",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/x/a/sa/b",
        ] {
            assert_eq!(
                SpiffeId::parse(other).expect("valid").kubernetes(),
                None,
                "{other}"
            );
        }
    }
}
