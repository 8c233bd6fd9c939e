//! The YAML shape of a `PolicyTest` document (`test.latch.dev/v1`) as users write it, before
//! any checking ([`super::suite`] resolves names and addresses). Unknown fields are errors.
//! Every field is described in `docs/policy-testing.md`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Deserializer, de};

use crate::policy::{MtlsMode, normalize::PathNormalization};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTestDoc {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Names the suite in reports; the file name when absent.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// Policy files and directories, relative to the test file; its directory when absent.
    #[serde(default)]
    pub policies: Option<Vec<PathBuf>>,
    /// As the agent's config `trustDomain` (default `cluster.local`).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// As the agent's config `rootNamespace` (default `istio-system`).
    #[serde(default)]
    pub root_namespace: Option<String>,
    /// As the agent's config `mtls.mode`: the mode where no PeerAuthentication applies
    /// (default `PERMISSIVE`).
    #[serde(default)]
    pub mtls_mode: Option<MtlsMode>,
    /// As the agent's config `http.pathNormalization` (default `BASE`).
    #[serde(default)]
    pub path_normalization: Option<PathNormalization>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// `default` when absent, as in Kubernetes.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// At least one: the first is the workload's address as a source and a destination.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Case {
    pub name: String,
    /// A workload name, a SPIFFE ID, or `plaintext`.
    pub from: String,
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    /// `WORKLOAD:PORT` or `IP:PORT` (`[IPv6]:PORT`).
    pub to: String,
    /// Without it the case is a connection that carries no HTTP.
    #[serde(default)]
    pub request: Option<Request>,
    pub expect: Expect,
    /// `NAMESPACE/NAME` of the deciding policy, or `default`.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// The index of the deciding rule in the deciding policy's `spec.rules`.
    #[serde(default)]
    pub rule: Option<usize>,
    /// The shadow decision with the `istio.io/dry-run` policies enforced.
    #[serde(default)]
    pub expect_dry_run: Option<Expect>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `GET` when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// `/` when absent; normalised as the agent does.
    #[serde(default)]
    pub path: Option<String>,
    /// The `Host` header; a port is ignored, as the agent does.
    #[serde(default)]
    pub host: Option<String>,
    /// Header name to one value or a list of values.
    #[serde(default)]
    pub headers: BTreeMap<String, Strings>,
    /// The claims of a JWT the request carries, as verified by RequestAuthentication.
    #[serde(default)]
    pub jwt: Option<Jwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub iss: String,
    pub sub: String,
    #[serde(default)]
    pub aud: Option<Strings>,
    #[serde(default)]
    pub azp: Option<String>,
    /// Any further claims of the payload.
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// One string or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Strings(pub Vec<String>);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Strings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_owned()]))
            }
            // Unquoted numbers and booleans are header values too (`x-retries: 3`).
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_string()]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Strings, E> {
                Ok(Strings(vec![v.to_string()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strings, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(Strings(all))
            }
        }
        d.deserialize_any(Visitor)
    }
}
