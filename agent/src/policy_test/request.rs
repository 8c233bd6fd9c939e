//! A case's HTTP request as the destination agent judges it: the path without its query string
//! and normalised with the suite's `pathNormalization`, the host without its port, the header
//! fields (the `Host` header included), and the JWT's claims as RequestAuthentication would have
//! verified them ([`RequestAuth`]).

use hyper::header::{HOST, HeaderMap, HeaderName, HeaderValue};

use super::{document::Doc, error::TestFileError, model};
use crate::{
    policy::{
        RequestAuth,
        normalize::{PathNormalization, normalize_path},
    },
    tunnel::request_head::strip_port,
};

/// An HTTP request as the destination agent judges it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// As written in the test.
    pub given_path: String,
    /// Without the query string, normalised.
    pub path: String,
    /// Without a port.
    pub host: String,
    pub headers: HeaderMap,
    pub auth: Option<RequestAuth>,
}

/// Check and build `spec.cases[i].request`; every problem is reported at its field.
pub fn build(
    doc: &Doc,
    i: usize,
    raw: &model::Request,
    normalization: PathNormalization,
) -> Result<Request, Vec<TestFileError>> {
    let at = |field: &str| format!("spec.cases[{i}].request.{field}");
    let mut errors = Vec::new();
    let given_path = raw.path.clone().unwrap_or_else(|| "/".to_owned());
    // As the enforcement point: the query string is never part of the judged path.
    let bare = given_path
        .split_once('?')
        .map_or(given_path.as_str(), |(p, _)| p);
    let path = normalize_path(bare, normalization)
        .map_err(|e| {
            errors.push(doc.error(
                &at("path"),
                format!(
                    "{given_path:?}: {e} (the agent answers such a request with 400 Bad \
                     Request before any policy)"
                ),
            ));
        })
        .unwrap_or_default();
    let host = raw.host.clone().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (name, values) in &raw.headers {
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            errors.push(doc.error(
                &at(&format!("headers.{name}")),
                format!("{name:?} is not a valid header name"),
            ));
            continue;
        };
        for value in &values.0 {
            match HeaderValue::from_str(value) {
                Ok(v) => {
                    headers.append(header.clone(), v);
                }
                Err(_) => errors.push(doc.error(
                    &at(&format!("headers.{name}")),
                    format!("{value:?} is not a valid header value"),
                )),
            }
        }
    }
    // The request as received carries its Host header.
    if !host.is_empty() && !headers.contains_key(HOST) {
        match HeaderValue::from_str(&host) {
            Ok(v) => {
                headers.insert(HOST, v);
            }
            Err(_) => {
                errors.push(doc.error(&at("host"), format!("{host:?} is not a valid Host header")))
            }
        }
    }
    let auth = match &raw.jwt {
        None => None,
        Some(jwt) => match request_auth(jwt) {
            Ok(auth) => Some(auth),
            Err((field, why)) => {
                errors.push(doc.error(&at(&format!("jwt.{field}")), why));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Request {
        method: raw.method.clone().unwrap_or_else(|| "GET".to_owned()),
        given_path,
        path,
        host: strip_port(&host).to_owned(),
        headers,
        auth,
    })
}

/// What RequestAuthentication would have verified: the principal `iss/sub`, the audiences,
/// the presenter, and every claim of the payload (the named ones included). An error names the
/// `jwt` field.
fn request_auth(jwt: &model::Jwt) -> Result<RequestAuth, (&'static str, String)> {
    if jwt.iss.is_empty() {
        return Err(("iss", "must not be empty".to_owned()));
    }
    if jwt.sub.is_empty() {
        return Err(("sub", "must not be empty".to_owned()));
    }
    let audiences = jwt.aud.clone().unwrap_or_default().0;
    let mut claims = jwt.claims.clone();
    let mut named = vec![
        ("iss", serde_json::Value::from(jwt.iss.clone())),
        ("sub", serde_json::Value::from(jwt.sub.clone())),
    ];
    match audiences.as_slice() {
        [] => {}
        [one] => named.push(("aud", serde_json::Value::from(one.clone()))),
        many => named.push(("aud", serde_json::Value::from(many.to_vec()))),
    }
    if let Some(azp) = &jwt.azp {
        named.push(("azp", serde_json::Value::from(azp.clone())));
    }
    for (name, value) in named {
        if claims.contains_key(name) {
            return Err((
                "claims",
                format!("{name:?} is given as jwt.{name}: leave it out of claims"),
            ));
        }
        claims.insert(name.to_owned(), value);
    }
    Ok(RequestAuth {
        principal: format!("{}/{}", jwt.iss, jwt.sub),
        audiences,
        presenter: jwt.azp.clone(),
        claims,
    })
}
