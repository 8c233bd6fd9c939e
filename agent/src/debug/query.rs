//! URL query strings for the debug API: splitting and percent-decoding `a=b&c=d` on the server,
//! percent-encoding on the client. Only what the debug endpoints need (no `url` dependency).

/// Why a query string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("query parameter `{name}`: bad percent-encoding in {value:?}")]
    Encoding { name: String, value: String },
    #[error("query parameter `{name}`={value:?}: {why}")]
    Value {
        name: String,
        value: String,
        why: String,
    },
    #[error("query parameter `{0}` is given more than once")]
    Repeated(String),
    #[error("unknown query parameter `{name}` (expected one of: {expected})")]
    Unknown { name: String, expected: String },
    #[error("query parameter `{0}` is required")]
    Missing(String),
}

/// The decoded `name=value` pairs of a query string, in order (`+` is a space; empty pairs are
/// skipped; a name without `=` has an empty value).
pub fn parse(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(raw_name).ok_or_else(|| QueryError::Encoding {
                name: raw_name.to_owned(),
                value: raw_name.to_owned(),
            })?;
            let value = decode(raw_value).ok_or_else(|| QueryError::Encoding {
                name: name.clone(),
                value: raw_value.to_owned(),
            })?;
            Ok((name, value))
        })
        .collect()
}

/// Check every parameter is one of `known` and none repeats.
pub fn check_names(pairs: &[(String, String)], known: &[&str]) -> Result<(), QueryError> {
    for (i, (name, _)) in pairs.iter().enumerate() {
        if !known.contains(&name.as_str()) {
            return Err(QueryError::Unknown {
                name: name.clone(),
                expected: known.join(", "),
            });
        }
        if pairs[..i].iter().any(|(n, _)| n == name) {
            return Err(QueryError::Repeated(name.clone()));
        }
    }
    Ok(())
}

/// The value of `name`, if given.
pub fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Parse the value of `name` with `FromStr`, describing the expected form on failure.
pub fn get_parsed<T: std::str::FromStr>(
    pairs: &[(String, String)],
    name: &str,
    expected: &str,
) -> Result<Option<T>, QueryError> {
    get(pairs, name)
        .map(|value| {
            value.parse().map_err(|_| QueryError::Value {
                name: name.to_owned(),
                value: value.to_owned(),
                why: format!("expected {expected}"),
            })
        })
        .transpose()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decode one component; `None` if an escape is malformed or the result is not UTF-8.
pub fn decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode one component (everything but RFC 3986 unreserved characters).
pub fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Build `name=value&...` from the pairs whose value is present (empty string if none).
pub fn build<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<String>)>) -> String {
    pairs
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| format!("{}={}", encode(name), encode(&v))))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let id = "spiffe://cluster.local/ns/prod/sa/front end";
        let q = build([("identity", Some(id.to_owned())), ("port", None)]);
        assert_eq!(
            parse(&q).expect("valid"),
            vec![("identity".into(), id.into())]
        );
        assert_eq!(parse("a=1+2&&b").expect("valid").len(), 2);
        assert!(matches!(parse("a=%zz"), Err(QueryError::Encoding { .. })));
        assert!(matches!(parse("a=%f"), Err(QueryError::Encoding { .. })));
        assert!(matches!(parse("a=%ff"), Err(QueryError::Encoding { .. })));
        let pairs = parse("a=1&a=2").expect("valid");
        assert_eq!(
            check_names(&pairs, &["a"]),
            Err(QueryError::Repeated("a".into()))
        );
        assert!(matches!(
            check_names(&pairs, &["b"]),
            Err(QueryError::Unknown { .. })
        ));
    }
}
