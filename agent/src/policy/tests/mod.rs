//! Policy tests: a table of Istio semantics ([`table`]), loading errors ([`errors`]) and the
//! engine against the reference evaluator ([`props`]). Shared helpers live here.

mod errors;
mod objects;
mod props;
mod request_authn;
mod table;

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use super::{Connection, HttpRequest, PolicySet};

/// Expands the compact policy notation: each document starts with `AP ns/name` (`APD ns/name`:
/// with the `istio.io/dry-run: "true"` annotation) or `PA ns/name`, followed by the lines of
/// its `spec` (none for `spec: {}`).
pub(super) fn expand(compact: &str) -> String {
    let mut docs = Vec::new();
    for line in compact.lines() {
        let head = line.trim_start();
        let kind = if let Some(rest) = head.strip_prefix("AP ") {
            Some(("AuthorizationPolicy", rest, ""))
        } else if let Some(rest) = head.strip_prefix("APD ") {
            Some((
                "AuthorizationPolicy",
                rest,
                "  annotations: {istio.io/dry-run: \"true\"}\n",
            ))
        } else {
            head.strip_prefix("PA ")
                .map(|rest| ("PeerAuthentication", rest, ""))
        };
        match kind {
            Some((kind, rest, annotations)) => {
                let (ns, name) = rest.trim().split_once('/').expect("ns/name");
                docs.push((
                    format!(
                        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\n{annotations}"
                    ),
                    String::new(),
                ));
            }
            None if line.trim().is_empty() => {}
            None => {
                let doc = docs.last_mut().expect("a header first");
                doc.1.push_str("  ");
                doc.1.push_str(line.trim_start_matches("    "));
                doc.1.push('\n');
            }
        }
    }
    docs.into_iter()
        .map(|(head, spec)| {
            if spec.is_empty() {
                format!("{head}spec: {{}}\n")
            } else {
                format!("{head}spec:\n{spec}")
            }
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

pub(super) fn set(compact: &str) -> PolicySet {
    let text = expand(compact);
    match PolicySet::from_yaml(&[(Path::new("test.yaml"), &text)], "istio-system") {
        Ok(set) => set,
        Err(errors) => panic!("{text}\n{errors:#?}"),
    }
}

/// A request in compact notation: `ns=prod l:app=pay from=prod/fe|plain sip=IP dip=IP
/// port=80 m=GET p=/x h=host hdr:NAME=VALUE jwt=ISS/SUB aud=A azp=P claim:NAME=V1,V2`
/// (`claim:a.b=V` nests; several values make a list). Any of the last six make it HTTP.
pub(super) struct Req {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub principal: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub port: u16,
    pub http: Option<(String, String, String)>,
    pub headers: hyper::HeaderMap,
    pub auth: Option<super::RequestAuth>,
}

impl Req {
    pub(super) fn parse(spec: &str) -> Self {
        let mut req = Req {
            namespace: "prod".into(),
            labels: BTreeMap::new(),
            principal: Some("spiffe://cluster.local/ns/prod/sa/frontend".into()),
            source_ip: Some("10.1.2.3".parse().unwrap()),
            destination_ip: "10.9.0.1".parse().unwrap(),
            port: 80,
            http: None,
            headers: hyper::HeaderMap::new(),
            auth: None,
        };
        let (mut m, mut p, mut h) = (None, None, None);
        fn auth(req: &mut Req) -> &mut super::RequestAuth {
            req.auth.get_or_insert_with(|| super::RequestAuth {
                principal: String::new(),
                audiences: Vec::new(),
                presenter: None,
                claims: serde_json::Map::new(),
            })
        }
        for token in spec.split_whitespace() {
            let (k, v) = token.split_once('=').expect("key=value");
            match k {
                "ns" => req.namespace = v.into(),
                "from" if v == "plain" => req.principal = None,
                "from" => {
                    let (ns, sa) = v.split_once('/').expect("ns/sa");
                    req.principal = Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
                }
                "id" => req.principal = Some(v.into()),
                "sip" if v == "none" => req.source_ip = None,
                "sip" => req.source_ip = Some(v.parse().unwrap()),
                "dip" => req.destination_ip = v.parse().unwrap(),
                "port" => req.port = v.parse().unwrap(),
                "m" => m = Some(v.to_owned()),
                "p" => p = Some(v.to_owned()),
                "h" => h = Some(v.to_owned()),
                "jwt" => auth(&mut req).principal = v.into(),
                "aud" => auth(&mut req).audiences.push(v.into()),
                "azp" => auth(&mut req).presenter = Some(v.into()),
                hdr if hdr.starts_with("hdr:") => {
                    let name = hyper::header::HeaderName::from_bytes(&hdr.as_bytes()[4..])
                        .expect("a header name");
                    req.headers.append(name, v.parse().expect("a header value"));
                }
                claim if claim.starts_with("claim:") => {
                    let values: Vec<serde_json::Value> = v.split(',').map(Into::into).collect();
                    let value = if values.len() == 1 {
                        values[0].clone()
                    } else {
                        serde_json::Value::Array(values)
                    };
                    let mut names: Vec<&str> = claim[6..].split('.').collect();
                    let last = names.pop().expect("a claim name");
                    let mut map = &mut auth(&mut req).claims;
                    for name in names {
                        map = map
                            .entry(name)
                            .or_insert_with(|| serde_json::Value::Object(Default::default()))
                            .as_object_mut()
                            .expect("an object claim");
                    }
                    map.insert(last.into(), value);
                }
                label => {
                    let key = label.strip_prefix("l:").expect("a label l:key=value");
                    req.labels.insert(key.into(), v.into());
                }
            }
        }
        if m.is_some()
            || p.is_some()
            || h.is_some()
            || !req.headers.is_empty()
            || req.auth.is_some()
        {
            req.http = Some((
                m.unwrap_or_else(|| "GET".into()),
                p.unwrap_or_else(|| "/".into()),
                h.unwrap_or_else(|| "svc.prod".into()),
            ));
        }
        req
    }

    pub(super) fn connection(&self) -> Connection<'_> {
        Connection {
            source_principal: self.principal.as_deref(),
            source_ip: self.source_ip,
            destination_ip: self.destination_ip,
            destination_port: self.port,
        }
    }

    pub(super) fn request(&self) -> Option<HttpRequest<'_>> {
        self.http.as_ref().map(|(method, path, host)| HttpRequest {
            method,
            path,
            host,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        })
    }
}
