//! Istio's standard labels of the TCP metrics for one connection, tunneled or fast path: both
//! principals, both workloads and their namespaces, the destination service and port, whether
//! the bytes cross in mutual TLS, and the path the connection took.
//!
//! Workload names follow Istio's canonical-name rule as far as Latch knows a pod: the
//! `app.kubernetes.io/name` label, else the `app` label, else the pod's own name. Anything not
//! known to this node's registry is `unknown`, as in Istio. Latch does not watch Services, so
//! `destination_service` is `unknown` for now.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Labels, Reporter};
use crate::{
    conn::{ConnInfo, Direction, Via},
    identity::Registry,
};

/// Istio's value for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";
/// `connection_security_policy` of a connection whose bytes cross in mutual TLS.
pub const MUTUAL_TLS: &str = "mutual_tls";
/// `connection_security_policy` of a connection whose bytes cross in the clear.
pub const NONE: &str = "none";

/// The pod labels that name a workload, most specific first.
const NAME_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// A workload as Istio's `*_workload` and `*_workload_namespace` labels name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadName {
    pub workload: String,
    pub namespace: String,
}

impl WorkloadName {
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.to_owned(),
            namespace: UNKNOWN.to_owned(),
        }
    }

    /// The workload name of pod `name` in `namespace` with `labels`: `app.kubernetes.io/name`,
    /// else `app`, else the pod's name.
    pub fn of(name: &str, namespace: &str, labels: &BTreeMap<String, String>) -> Self {
        let workload = NAME_LABELS
            .iter()
            .find_map(|key| labels.get(*key).filter(|v| !v.is_empty()))
            .map_or(name, String::as_str);
        Self {
            workload: workload.to_owned(),
            namespace: namespace.to_owned(),
        }
    }
}

/// The workload of the pod (local or peer) that has address `ip`.
pub fn by_ip(registry: Option<&Registry>, ip: IpAddr) -> WorkloadName {
    registry
        .and_then(|r| r.endpoint(&ip))
        .map_or_else(WorkloadName::unknown, |e| {
            WorkloadName::of(&e.name, &e.namespace, &e.labels)
        })
}

/// The workload of the local pod `namespace/name`.
fn by_local_id(registry: Option<&Registry>, id: &str) -> WorkloadName {
    registry
        .and_then(|r| r.workload(id))
        .map_or_else(WorkloadName::unknown, |w| {
            WorkloadName::of(&w.name, &w.namespace, &w.labels)
        })
}

/// `connection_security_policy`: mutual TLS only where an identity was proven on this very
/// connection's bytes (a tunnel, or HTTP through it).
pub fn security_policy(path: Via, source_proven: bool) -> &'static str {
    match path {
        Via::Tunnel | Via::Http if source_proven => MUTUAL_TLS,
        _ => NONE,
    }
}

/// Which side reports a connection this node is on.
pub fn reporter(direction: Direction) -> Reporter {
    match direction {
        Direction::Outbound => Reporter::Source,
        Direction::Inbound => Reporter::Destination,
    }
}

/// The labels of a connection the agent carries, reported by the side this node is.
pub fn of_connection(registry: Option<&Registry>, info: &ConnInfo) -> Labels {
    let local = by_local_id(registry, &info.workload);
    let (source, destination) = match info.direction {
        Direction::Outbound => (local, by_ip(registry, info.destination_address.ip())),
        Direction::Inbound => (
            info.source_ip
                .map_or_else(WorkloadName::unknown, |ip| by_ip(registry, ip)),
            local,
        ),
    };
    Labels {
        reporter: reporter(info.direction),
        source_workload: source.workload,
        source_workload_namespace: source.namespace,
        source_principal: info
            .source
            .as_ref()
            .map_or_else(|| UNKNOWN.to_owned(), ToString::to_string),
        destination_workload: destination.workload,
        destination_workload_namespace: destination.namespace,
        destination_principal: info.destination.to_string(),
        destination_service: UNKNOWN.to_owned(),
        destination_port: info.destination_address.port(),
        connection_security_policy: security_policy(info.path, info.source.is_some()),
        path: info.path.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, identity::SpiffeId};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn workload_name_prefers_the_kubernetes_name_label_then_app_then_the_pod_name() {
        let both = labels(&[("app.kubernetes.io/name", "payments"), ("app", "pay")]);
        assert_eq!(
            WorkloadName::of("pay-7d9f", "prod", &both).workload,
            "payments"
        );
        let app = labels(&[("app", "pay")]);
        assert_eq!(WorkloadName::of("pay-7d9f", "prod", &app).workload, "pay");
        let empty_name = labels(&[("app.kubernetes.io/name", ""), ("app", "pay")]);
        assert_eq!(
            WorkloadName::of("pay-7d9f", "prod", &empty_name).workload,
            "pay"
        );
        let none = WorkloadName::of("pay-7d9f", "prod", &BTreeMap::new());
        assert_eq!(none.workload, "pay-7d9f");
        assert_eq!(none.namespace, "prod");
    }

    #[test]
    fn security_policy_is_mutual_tls_only_for_proven_sources_through_the_tunnel() {
        assert_eq!(security_policy(Via::Tunnel, true), MUTUAL_TLS);
        assert_eq!(security_policy(Via::Http, true), MUTUAL_TLS);
        assert_eq!(security_policy(Via::Http, false), NONE);
        assert_eq!(security_policy(Via::Plaintext, false), NONE);
        assert_eq!(security_policy(Via::Fastpath, true), NONE);
    }

    const CONFIG: &str = r#"
node: { name: node-a, address: 10.244.0.1 }
trustDomain: cluster.local
cgroupRoot: /sys/fs/cgroup/latch-test
bpfPinDir: /sys/fs/bpf/latch-test
certificates: { source: dev-ca, caCert: /tmp/ca.pem, caKey: /tmp/ca-key.pem }
debugSocket: /tmp/latch.sock
workloads:
  - { name: frontend-1, namespace: prod, serviceAccount: frontend, labels: { app: frontend },
      cgroup: /sys/fs/cgroup/latch-test/frontend-1, netns: /run/netns/frontend-1, ips: [10.244.1.2] }
peers:
  - { name: payment-1, namespace: pay, serviceAccount: payment, labels: { app.kubernetes.io/name: payment-service },
      ips: [10.244.2.2], node: 10.244.0.2 }
"#;

    fn registry() -> Registry {
        let config = Config::from_yaml(std::path::Path::new("test.yaml"), CONFIG).expect("config");
        Registry::from_config(&config).expect("registry")
    }

    #[test]
    fn an_outbound_tunneled_connection_names_both_workloads() {
        let registry = registry();
        let info = ConnInfo {
            source: Some(SpiffeId::valid(
                "spiffe://cluster.local/ns/prod/sa/frontend",
            )),
            destination: SpiffeId::valid("spiffe://cluster.local/ns/pay/sa/payment"),
            destination_address: "10.244.2.2:8080".parse().expect("addr"),
            source_ip: None,
            direction: Direction::Outbound,
            path: Via::Tunnel,
            workload: "prod/frontend-1".into(),
        };
        let l = of_connection(Some(&registry), &info);
        assert_eq!(l.reporter, Reporter::Source);
        assert_eq!(
            (
                l.source_workload.as_str(),
                l.source_workload_namespace.as_str()
            ),
            ("frontend", "prod")
        );
        assert_eq!(
            (
                l.destination_workload.as_str(),
                l.destination_workload_namespace.as_str()
            ),
            ("payment-service", "pay")
        );
        assert_eq!(l.destination_service, UNKNOWN);
        assert_eq!(l.connection_security_policy, MUTUAL_TLS);
        assert_eq!(l.path, "tunnel");
        assert_eq!(l.destination_port, 8080);
    }

    #[test]
    fn an_inbound_plaintext_connection_from_an_unknown_address_is_unknown_and_not_mutual_tls() {
        let registry = registry();
        let info = ConnInfo {
            source: None,
            destination: SpiffeId::valid("spiffe://cluster.local/ns/prod/sa/frontend"),
            destination_address: "10.244.1.2:80".parse().expect("addr"),
            source_ip: Some("10.244.9.9".parse().expect("ip")),
            direction: Direction::Inbound,
            path: Via::Plaintext,
            workload: "prod/frontend-1".into(),
        };
        let l = of_connection(Some(&registry), &info);
        assert_eq!(l.reporter, Reporter::Destination);
        assert_eq!(l.source_workload, UNKNOWN);
        assert_eq!(l.source_workload_namespace, UNKNOWN);
        assert_eq!(l.source_principal, UNKNOWN);
        assert_eq!(l.destination_workload, "frontend");
        assert_eq!(l.connection_security_policy, NONE);
        assert_eq!(l.path, "plaintext");
    }
}
