//! The local-mode config file (`latch agent --config FILE`): its types, loading and validation.
//!
//! Every mistake is reported as `<file>:<line>:<col>: <field path>: <why>`: type and syntax
//! errors by the YAML parser, field checks inside deserialization ([`fields`]), and checks across
//! fields afterwards ([`validate`]), whose line comes from [`locate`]. Unknown fields anywhere
//! are errors.

mod error;
mod fields;
pub(crate) mod locate;
pub(crate) mod report;
mod validate;

pub use error::ConfigError;
pub(crate) use error::clean_message as clean_yaml_message;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::policy::normalize::PathNormalization;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub node: Node,
    #[serde(deserialize_with = "fields::trust_domain")]
    pub trust_domain: String,
    #[serde(deserialize_with = "fields::absolute_path")]
    pub cgroup_root: PathBuf,
    #[serde(deserialize_with = "fields::absolute_path")]
    pub bpf_pin_dir: PathBuf,
    #[serde(default)]
    pub ports: Ports,
    #[serde(default)]
    pub dataplane: Dataplane,
    /// Latch addition: the mesh-wide mTLS mode used until PeerAuthentication policies exist.
    #[serde(default)]
    pub mtls: Mtls,
    /// Latch addition: limits on the tunnel server's TLS handshakes.
    #[serde(default)]
    pub tunnel: Tunnel,
    /// Per-request (L7) enforcement: Istio's `pathNormalization`, and Latch's header timeout.
    #[serde(default)]
    pub http: Http,
    /// Latch addition: how the keys of RequestAuthentication issuers are fetched.
    #[serde(default)]
    pub jwt: Jwt,
    #[serde(default)]
    pub certificates: Option<Certificates>,
    #[serde(
        default = "defaults::debug_socket",
        deserialize_with = "fields::absolute_path"
    )]
    pub debug_socket: PathBuf,
    #[serde(default = "defaults::metrics", deserialize_with = "fields::metrics")]
    pub metrics: Option<SocketAddr>,
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    #[serde(
        default = "defaults::root_namespace",
        deserialize_with = "fields::dns_label"
    )]
    pub root_namespace: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(deserialize_with = "fields::dns_subdomain")]
    pub name: String,
    pub address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    #[serde(default = "defaults::capture", deserialize_with = "fields::port")]
    pub capture: u16,
    #[serde(default = "defaults::inbound", deserialize_with = "fields::port")]
    pub inbound: u16,
    #[serde(default = "defaults::tunnel", deserialize_with = "fields::port")]
    pub tunnel: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            capture: defaults::capture(),
            inbound: defaults::inbound(),
            tunnel: defaults::tunnel(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Dataplane {
    #[serde(default)]
    pub mode: DataplaneMode,
    #[serde(
        default = "defaults::verdict_ttl",
        deserialize_with = "fields::verdict_ttl",
        serialize_with = "fields::serialize_duration"
    )]
    pub verdict_ttl: Duration,
    /// Tokio worker threads (fixed at start-up).
    #[serde(
        default = "defaults::worker_threads",
        deserialize_with = "fields::worker_threads"
    )]
    pub worker_threads: usize,
    /// How long the worker keeps polling for I/O after data-path activity; zero turns it off.
    #[serde(
        default = "defaults::busy_poll",
        deserialize_with = "fields::busy_poll",
        serialize_with = "fields::serialize_duration"
    )]
    pub busy_poll: Duration,
    /// Start busy-poll windows only while they pay (most recent idle stretches of the worker
    /// ended within the window); `false` polls after every activity.
    #[serde(default = "defaults::busy_poll_adaptive")]
    pub busy_poll_adaptive: bool,
}

impl Default for Dataplane {
    fn default() -> Self {
        Self {
            mode: DataplaneMode::default(),
            verdict_ttl: defaults::verdict_ttl(),
            worker_threads: defaults::worker_threads(),
            busy_poll: defaults::busy_poll(),
            busy_poll_adaptive: defaults::busy_poll_adaptive(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// First connection of a pair through the enforcer, repeats through the kernel cache.
    #[default]
    Fastpath,
    /// Every connection through the enforcer (every byte encrypted); nothing cached.
    Tunnel,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
    /// STRICT ports take the kernel fast path after their first connection: identity proven by
    /// mTLS then, bound to the source address afterwards, not encrypted (Cilium's mutual
    /// authentication). Off: every connection to a STRICT port is tunneled (Istio's STRICT).
    #[serde(default)]
    pub strict_fastpath: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Plaintext inbound connections are reset.
    Strict,
    /// Plaintext inbound connections are accepted (Istio's default).
    #[default]
    Permissive,
}

/// The tunnel server's defences against connections that never prove anything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tunnel {
    /// How long a client may take to complete TLS and the HTTP/2 preface.
    #[serde(
        default = "defaults::handshake_timeout",
        deserialize_with = "fields::handshake_timeout",
        serialize_with = "fields::serialize_duration"
    )]
    pub handshake_timeout: Duration,
    /// Handshakes in progress from one source address; connections beyond are closed at once.
    #[serde(
        default = "defaults::max_handshakes_per_source",
        deserialize_with = "fields::max_handshakes_per_source"
    )]
    pub max_handshakes_per_source: usize,
}

impl Default for Tunnel {
    fn default() -> Self {
        Self {
            handshake_timeout: defaults::handshake_timeout(),
            max_handshakes_per_source: defaults::max_handshakes_per_source(),
        }
    }
}

/// Per-request (L7) enforcement settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Http {
    /// How request paths are normalised before policy sees them and the application gets them.
    #[serde(default)]
    pub path_normalization: PathNormalization,
    /// Latch addition: how long a client has to send a complete request head.
    #[serde(
        default = "defaults::header_read_timeout",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub header_read_timeout: Duration,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            path_normalization: PathNormalization::default(),
            header_read_timeout: defaults::header_read_timeout(),
        }
    }
}

/// Fetching the JWKS of RequestAuthentication issuers (`jwksUri`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Jwt {
    /// PEM certificates trusted for JWKS servers beside the system's roots.
    #[serde(
        default,
        deserialize_with = "fields::optional_absolute_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwks_ca_file: Option<PathBuf>,
    /// How old fetched keys may get before a request makes the agent fetch them again (Istio's
    /// default refresh interval).
    #[serde(
        default = "defaults::jwks_refresh_interval",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub jwks_refresh_interval: Duration,
    /// How long one fetch may take (a rule's `timeout` overrides it).
    #[serde(
        default = "defaults::jwks_fetch_timeout",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub jwks_fetch_timeout: Duration,
    /// How long the last keys fetched are still used while fetches fail.
    #[serde(
        default = "defaults::jwks_max_stale",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub jwks_max_stale: Duration,
    /// The least time between two fetches of one URI started by requests (a token with an
    /// unknown `kid`, or a retry after a failure).
    #[serde(
        default = "defaults::jwks_refetch_min_interval",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub jwks_refetch_min_interval: Duration,
}

impl Default for Jwt {
    fn default() -> Self {
        Self {
            jwks_ca_file: None,
            jwks_refresh_interval: defaults::jwks_refresh_interval(),
            jwks_fetch_timeout: defaults::jwks_fetch_timeout(),
            jwks_max_stale: defaults::jwks_max_stale(),
            jwks_refetch_min_interval: defaults::jwks_refetch_min_interval(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Certificates {
    pub source: CertificateSource,
    #[serde(default, deserialize_with = "fields::optional_absolute_path")]
    pub ca_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "fields::optional_absolute_path")]
    pub ca_key: Option<PathBuf>,
    #[serde(default, deserialize_with = "fields::optional_absolute_path")]
    pub dir: Option<PathBuf>,
    #[serde(
        default = "defaults::certificate_ttl",
        deserialize_with = "fields::positive_duration",
        serialize_with = "fields::serialize_duration"
    )]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateSource {
    DevCa,
    Files,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    #[serde(deserialize_with = "fields::dns_subdomain")]
    pub name: String,
    #[serde(deserialize_with = "fields::dns_label")]
    pub namespace: String,
    #[serde(deserialize_with = "fields::dns_subdomain")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "fields::absolute_path")]
    pub cgroup: PathBuf,
    #[serde(deserialize_with = "fields::absolute_path")]
    pub netns: PathBuf,
    #[serde(deserialize_with = "fields::non_empty_ips")]
    pub ips: Vec<IpAddr>,
    /// This pod's data-plane mode; without it, the node's `dataplane.mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_mode: Option<DataplaneMode>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Peer {
    #[serde(deserialize_with = "fields::dns_subdomain")]
    pub name: String,
    #[serde(deserialize_with = "fields::dns_label")]
    pub namespace: String,
    #[serde(deserialize_with = "fields::dns_subdomain")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "fields::non_empty_ips")]
    pub ips: Vec<IpAddr>,
    pub node: IpAddr,
    /// The peer pod's data-plane mode; without it, this node's `dataplane.mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_mode: Option<DataplaneMode>,
}

mod defaults {
    use std::{net::SocketAddr, path::PathBuf, time::Duration};

    pub fn capture() -> u16 {
        15001
    }
    pub fn inbound() -> u16 {
        15006
    }
    pub fn tunnel() -> u16 {
        15008
    }
    pub fn verdict_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub fn worker_threads() -> usize {
        1
    }
    pub fn busy_poll() -> Duration {
        Duration::from_micros(500)
    }
    pub fn busy_poll_adaptive() -> bool {
        true
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_handshakes_per_source() -> usize {
        64
    }
    /// nginx's `client_header_timeout`; hyper's own default is 30 s, Envoy has none.
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    /// Istio's JWKS refresh interval (`PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
    pub fn jwks_refresh_interval() -> Duration {
        Duration::from_secs(20 * 60)
    }
    /// Istio's default `jwtRules[].timeout`.
    pub fn jwks_fetch_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn jwks_max_stale() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn jwks_refetch_min_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn certificate_ttl() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn debug_socket() -> PathBuf {
        PathBuf::from("/run/latch/debug.sock")
    }
    pub fn metrics() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 15020)))
    }
    pub fn root_namespace() -> String {
        "istio-system".to_owned()
    }
}

impl Config {
    /// Read and validate the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }

    /// Parse and validate `text`; `origin` names the file in messages.
    pub fn from_yaml(origin: &Path, text: &str) -> Result<Config, ConfigError> {
        refuse_empty(origin, text)?;
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError::from_parse(origin, text, e))?;
        validate::check(&config).map_err(|problem| ConfigError::invalid(origin, text, problem))?;
        Ok(config)
    }

    /// Read and validate the node-level config of Kubernetes mode (`latch agent --kubernetes`).
    pub fn load_for_kubernetes(path: &Path, node: Option<Node>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::kubernetes_from_yaml(path, &text, node)
    }

    /// The node-level config of Kubernetes mode: workloads, peers and policies come from the
    /// API server, so the file must not list them; `node` is the file's, else `node` (from the
    /// downward API's `NODE_NAME` and `HOST_IP`).
    pub fn kubernetes_from_yaml(
        origin: &Path,
        text: &str,
        node: Option<Node>,
    ) -> Result<Config, ConfigError> {
        refuse_empty(origin, text)?;
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let mut value: serde_yaml_ng::Mapping = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError::from_parse(origin, text, e))?;
        for key in ["workloads", "peers", "policies"] {
            if value.contains_key(key) {
                return Err(ConfigError::invalid(
                    origin,
                    text,
                    report::problem(
                        key,
                        "in Kubernetes mode this comes from the API server; remove it from the \
                         config file",
                    ),
                ));
            }
        }
        if !value.contains_key("node") {
            let Some(node) = node else {
                return Err(ConfigError::invalid(
                    origin,
                    text,
                    report::problem(
                        "node",
                        "not set: give node: in the file, or NODE_NAME and HOST_IP in the \
                         environment (the DaemonSet sets them from the downward API)",
                    ),
                ));
            };
            let node = serde_yaml_ng::to_value(&node).map_err(|e| ConfigError::Invalid {
                file: origin.to_owned(),
                line: None,
                column: None,
                path: "node".to_owned(),
                message: e.to_string(),
            })?;
            value.insert("node".into(), node);
        }
        let config: Config = serde_path_to_error::deserialize(serde_yaml_ng::Value::Mapping(value))
            .map_err(|e| ConfigError::from_parse(origin, text, e))?;
        validate::check(&config).map_err(|problem| ConfigError::invalid(origin, text, problem))?;
        Ok(config)
    }
}

/// A file with nothing but comments and blank lines is a mistake, not a config.
fn refuse_empty(origin: &Path, text: &str) -> Result<(), ConfigError> {
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim_start().starts_with('#') || l.trim().is_empty())
    {
        return Err(ConfigError::Empty {
            file: origin.to_owned(),
        });
    }
    Ok(())
}

impl Node {
    /// This node from the downward API's values (`NODE_NAME`, `HOST_IP`): `None` when neither
    /// is set; an error naming the variable when one is missing or does not parse.
    pub fn from_environment(
        name: Option<String>,
        address: Option<String>,
    ) -> Result<Option<Node>, String> {
        match (name, address) {
            (None, None) => Ok(None),
            (Some(name), Some(address)) => {
                if name.is_empty() {
                    return Err("NODE_NAME is empty".to_owned());
                }
                let address = address
                    .parse()
                    .map_err(|e| format!("HOST_IP {address:?} is not an IP address: {e}"))?;
                Ok(Some(Node { name, address }))
            }
            (Some(_), None) => Err("NODE_NAME is set but HOST_IP is not".to_owned()),
            (None, Some(_)) => Err("HOST_IP is set but NODE_NAME is not".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests;
