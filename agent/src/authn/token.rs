//! Finding tokens where a rule says they are carried (a header after its prefix, a query
//! parameter, a cookie) and taking them out of the request forwarded to the application.

use hyper::{Uri, header::COOKIE, http::request::Parts};

use crate::policy::TokenLocation;

/// The tokens `location` holds in the request, in order.
pub fn find(location: &TokenLocation, parts: &Parts) -> Vec<String> {
    match location {
        TokenLocation::Header { name, prefix } => parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| strip_prefix_ignore_case(v, prefix))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        TokenLocation::Param(name) => query_pairs(parts.uri.query().unwrap_or_default())
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        TokenLocation::Cookie(name) => parts
            .headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim_matches('"').to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
    }
}

/// Take the token out of the request at `location`: the header (every value carrying the
/// token) or the query parameter. Cookies are left as they are (as Envoy does).
pub fn remove(location: &TokenLocation, token: &str, parts: &mut Parts) {
    match location {
        TokenLocation::Header { name, prefix } => {
            let kept: Vec<_> = parts
                .headers
                .get_all(name)
                .iter()
                .filter(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|v| strip_prefix_ignore_case(v, prefix))
                        .is_none_or(|t| t.trim() != token)
                })
                .cloned()
                .collect();
            parts.headers.remove(name);
            for value in kept {
                parts.headers.append(name.clone(), value);
            }
        }
        TokenLocation::Param(name) => {
            let Some(query) = parts.uri.query() else {
                return;
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    !(k == name && v == token)
                })
                .collect();
            let path = parts.uri.path();
            let target = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            // Only removes characters from a valid target, so it stays valid.
            if let Ok(uri) = target.parse::<Uri>() {
                parts.uri = uri;
            }
        }
        TokenLocation::Cookie(_) => {}
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::get(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn default_locations() {
        let p = parts(
            "/x?a=1&access_token=q.r.s",
            &[("authorization", "bearer a.b.c")],
        );
        let found: Vec<_> = TokenLocation::defaults()
            .iter()
            .flat_map(|l| find(l, &p))
            .collect();
        assert_eq!(found, ["a.b.c", "q.r.s"]);
        // Without the prefix, the header holds no token.
        let p = parts("/x", &[("authorization", "Basic dXNlcg==")]);
        assert!(find(&TokenLocation::defaults()[0], &p).is_empty());
    }

    #[test]
    fn removal_keeps_the_rest() {
        let mut p = parts(
            "/x?a=1&access_token=q.r.s&b=2",
            &[("authorization", "Bearer a.b.c"), ("x-other", "1")],
        );
        for l in TokenLocation::defaults() {
            for t in find(&l, &p.clone()) {
                remove(&l, &t, &mut p);
            }
        }
        assert_eq!(p.uri.to_string(), "/x?a=1&b=2");
        assert!(p.headers.get("authorization").is_none());
        assert!(p.headers.get("x-other").is_some());
        let mut p = parts("/x?access_token=q.r.s", &[]);
        remove(
            &TokenLocation::Param("access_token".into()),
            "q.r.s",
            &mut p,
        );
        assert_eq!(p.uri.to_string(), "/x");
    }

    #[test]
    fn custom_header_prefix_and_cookie() {
        let l = TokenLocation::Header {
            name: hyper::header::HeaderName::from_static("x-jwt"),
            prefix: "Token ".into(),
        };
        let p = parts(
            "/",
            &[("x-jwt", "Token a.b.c"), ("cookie", "s=1; jwt=d.e.f")],
        );
        assert_eq!(find(&l, &p), ["a.b.c"]);
        assert_eq!(find(&TokenLocation::Cookie("jwt".into()), &p), ["d.e.f"]);
    }
}
