//! One HTTP/1.1 request made ready for policy and for the application, so that the two can never
//! read it differently: the host is the one `Host` header, or the authority of an absolute-form
//! target (RFC 9112 §3.2.2; it then replaces the `Host` header); the path is normalised
//! ([`normalize_path`]) and written back into the request target, in origin form, with the query
//! string untouched. A request that cannot be made so is a bad request (`400`): two `Host`
//! headers, none in HTTP/1.1, an invalid one, or a path the normalisation refuses.

use hyper::{
    Method, Request, Uri, Version,
    header::{HOST, HeaderValue},
    http::uri::Authority,
};

use crate::{
    conn::RequestHead,
    policy::normalize::{PathError, PathNormalization, normalize_path},
};

/// Why a request is answered with `400 Bad Request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("{0} Host header fields; a request has exactly one (RFC 9112 §3.2)")]
    DuplicateHost(usize),
    #[error("no Host header field in an HTTP/1.1 request (RFC 9112 §3.2)")]
    MissingHost,
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    #[error("path: {0}")]
    Path(#[from] PathError),
    #[error("the normalised request target {0:?} is not a valid target")]
    Target(String),
}

/// Check `req`'s host, normalise its path with `mode` and rewrite its target and `Host` header
/// into what the application will receive; returns what policy judges.
pub fn prepare<B>(
    req: &mut Request<B>,
    mode: PathNormalization,
) -> Result<RequestHead, BadRequest> {
    let host = host(req)?;
    let method = req.method().as_str().to_owned();
    let uri = req.uri();
    let path = if req.method() == Method::CONNECT {
        // Authority form: no path; left as it was.
        "/".to_owned()
    } else if uri.path() == "*" && uri.authority().is_none() {
        // Asterisk form (`OPTIONS *`): not a path to normalise.
        "*".to_owned()
    } else {
        let path = normalize_path(uri.path(), mode)?;
        if path != uri.path() || uri.authority().is_some() {
            let target = match uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            *req.uri_mut() =
                Uri::try_from(target.as_str()).map_err(|_| BadRequest::Target(target.clone()))?;
        }
        path
    };
    Ok(RequestHead {
        method,
        path,
        host: strip_port(&host).to_owned(),
        headers: req.headers().clone(),
        auth: None,
    })
}

/// The request's host, with `Host` set to the target's authority if it has one.
fn host<B>(req: &mut Request<B>) -> Result<String, BadRequest> {
    let fields = req.headers().get_all(HOST).iter().count();
    if fields > 1 {
        return Err(BadRequest::DuplicateHost(fields));
    }
    if let Some(authority) = req.uri().authority() {
        let authority = authority.as_str().to_owned();
        check_host(&authority)?;
        let value = HeaderValue::from_str(&authority)
            .map_err(|_| BadRequest::InvalidHost(authority.clone()))?;
        req.headers_mut().insert(HOST, value);
        return Ok(authority);
    }
    match req.headers().get(HOST) {
        Some(value) => {
            let host = value.to_str().map_err(|_| {
                BadRequest::InvalidHost(String::from_utf8_lossy(value.as_bytes()).into_owned())
            })?;
            // An empty Host is allowed: the target has no authority (RFC 9112 §3.2).
            if !host.is_empty() {
                check_host(host)?;
            }
            Ok(host.to_owned())
        }
        None if req.version() >= Version::HTTP_11 => Err(BadRequest::MissingHost),
        None => Ok(String::new()),
    }
}

/// `uri-host [":" port]`: no user information (`user@host` would name two hosts).
fn check_host(host: &str) -> Result<(), BadRequest> {
    let bad = || BadRequest::InvalidHost(host.to_owned());
    let authority: Authority = host.parse().map_err(|_| bad())?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad());
    }
    Ok(())
}

/// `host` without its port: `payment:8080` is `payment`, `[fd00::1]:80` is `[fd00::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::get(target);
        for h in hosts {
            builder = builder.header(HOST, *h);
        }
        builder.body(()).expect("request")
    }

    fn forwarded(req: &Request<()>) -> (String, Vec<String>) {
        let hosts = req
            .headers()
            .get_all(HOST)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect();
        (req.uri().to_string(), hosts)
    }

    #[test]
    fn origin_form_is_normalised_and_its_query_kept() {
        let mut req = request("/a/./b/../%61dmin?x=/../y&z=%61", &["payment:8080"]);
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!(
            (head.method.as_str(), head.path.as_str(), head.host.as_str()),
            ("GET", "/a/admin", "payment")
        );
        assert_eq!(
            head.headers,
            *req.headers(),
            "policy sees the headers forwarded"
        );
        assert_eq!(
            forwarded(&req),
            ("/a/admin?x=/../y&z=%61".into(), vec!["payment:8080".into()])
        );
    }

    #[test]
    fn a_target_that_starts_with_two_slashes_stays_a_path() {
        let mut req = request("//a/./b?q", &["payment"]);
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!(head.path, "//a/b");
        assert_eq!(forwarded(&req).0, "//a/b?q");
        assert_eq!(req.uri().authority(), None);
        let mut req = request("http://payment//x/../y", &[]);
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!((head.host.as_str(), head.path.as_str()), ("payment", "//y"));
        assert_eq!(req.uri().path(), "//y");
        assert_eq!(req.uri().authority(), None);
    }

    #[test]
    fn none_leaves_the_target_alone() {
        let mut req = request("/x/../admin", &["payment"]);
        let head = prepare(&mut req, PathNormalization::None).expect("valid");
        assert_eq!(head.path, "/x/../admin");
        assert_eq!(forwarded(&req).0, "/x/../admin");
    }

    #[test]
    fn absolute_form_names_the_host_and_is_forwarded_in_origin_form() {
        let mut req = request("http://internal.example:8080/a/../b?q", &["payment"]);
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!(head.host, "internal.example");
        assert_eq!(head.path, "/b");
        assert_eq!(
            forwarded(&req),
            ("/b?q".into(), vec!["internal.example:8080".into()])
        );
        // Without a Host header too, and without a path.
        let mut req = request("http://internal.example", &[]);
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!(
            (head.host.as_str(), head.path.as_str()),
            ("internal.example", "/")
        );
        assert_eq!(
            forwarded(&req),
            ("/".into(), vec!["internal.example".into()])
        );
    }

    #[test]
    fn bad_requests() {
        let mut req = request("/ok", &["payment", "internal.example"]);
        assert_eq!(
            prepare(&mut req, PathNormalization::Base),
            Err(BadRequest::DuplicateHost(2))
        );
        let mut req = request("http://payment/ok", &["a", "b"]);
        assert_eq!(
            prepare(&mut req, PathNormalization::Base),
            Err(BadRequest::DuplicateHost(2))
        );
        let mut req = request("/ok", &[]);
        assert_eq!(
            prepare(&mut req, PathNormalization::Base),
            Err(BadRequest::MissingHost)
        );
        for host in ["user@internal.example", "a b", "payment:80:80", ":80"] {
            let mut req = request("/ok", &[host]);
            assert_eq!(
                prepare(&mut req, PathNormalization::Base),
                Err(BadRequest::InvalidHost(host.into())),
                "{host:?}"
            );
        }
        let mut req = request("http://user@internal.example/ok", &["payment"]);
        assert!(matches!(
            prepare(&mut req, PathNormalization::Base),
            Err(BadRequest::InvalidHost(_))
        ));
        let mut req = request("/%zz", &["payment"]);
        let err = prepare(&mut req, PathNormalization::Base).expect_err("bad escape");
        assert!(matches!(
            err,
            BadRequest::Path(PathError::InvalidEscape { .. })
        ));
        assert!(
            err.to_string()
                .starts_with("path: invalid percent escape \"%zz\""),
            "{err}"
        );
    }

    #[test]
    fn http_1_0_may_omit_the_host_and_asterisk_form_is_kept() {
        let mut req = request("/a/../b", &[]);
        *req.version_mut() = Version::HTTP_10;
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!((head.host.as_str(), head.path.as_str()), ("", "/b"));
        let mut req = Request::options("*")
            .header(HOST, "payment")
            .body(())
            .expect("request");
        let head = prepare(&mut req, PathNormalization::Base).expect("valid");
        assert_eq!(head.path, "*");
        assert_eq!(req.uri().to_string(), "*");
    }

    #[test]
    fn host_without_port() {
        assert_eq!(strip_port("payment:8080"), "payment");
        assert_eq!(strip_port("payment"), "payment");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("[fd00::1]"), "[fd00::1]");
    }
}
