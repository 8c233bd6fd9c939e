//! The cluster's pods and namespaces, as the watches hold them, turned into what this node's
//! agent enforces: the enrolled pods on this node (still to be found in the cgroup tree and
//! given a network namespace) and the enrolled pods of other nodes (peers, reached through
//! their node's address). What cannot be used is reported, never fatal: a pod without a node
//! address yet, an address two pods claim, a bad data-plane mode label.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::enrol::{Enrolment, enrolment};
use crate::config::{DataplaneMode, Peer};

/// An enrolled pod of this node, before its cgroup and network namespace are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// `status.qosClass`: where kubelet puts the pod's cgroup.
    pub qos_class: Option<String>,
    /// `None`: the node's `dataplane.mode`.
    pub mode: Option<DataplaneMode>,
}

/// What the cluster asks of this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub local: Vec<LocalPod>,
    pub peers: Vec<Peer>,
    /// One line per pod that is enrolled but cannot be used as it is, naming it.
    pub problems: Vec<String>,
}

/// The enrolled pods of the cluster as seen from node `node_name`, in a stable order (by
/// namespace and name). An address claimed by two enrolled pods goes to neither.
pub fn desired<'a>(
    node_name: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> Desired {
    let namespaces: HashMap<&str, &Namespace> = namespaces
        .into_iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns)))
        .collect();
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    pods.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });

    let mut out = Desired::default();
    let mut enrolled = Vec::new();
    for pod in pods {
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            continue;
        };
        let Enrolment::Enrolled(e) = enrolment(pod, namespaces.get(namespace.as_str()).copied())
        else {
            continue;
        };
        if let Some(why) = &e.bad_mode {
            out.problems.push(format!(
                "pod {namespace}/{name}: {why}; the node's mode applies"
            ));
        }
        enrolled.push((pod, name, namespace, e));
    }

    let shared = shared_addresses(enrolled.iter().flat_map(|(_, _, _, e)| e.ips.iter()));
    for (pod, name, namespace, e) in enrolled {
        let mut ips = e.ips.clone();
        ips.retain(|ip| !shared.contains(&ip.to_canonical()));
        if ips.len() < e.ips.len() {
            out.problems.push(format!(
                "pod {namespace}/{name}: an address it has is claimed by another enrolled pod; \
                 neither is given it"
            ));
        }
        if ips.is_empty() {
            continue;
        }
        let spec = pod.spec.as_ref();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let on_node = spec.and_then(|s| s.node_name.as_deref());
        if on_node == Some(node_name) {
            out.local.push(LocalPod {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                name: name.clone(),
                namespace: namespace.clone(),
                service_account,
                labels,
                ips,
                qos_class: pod.status.as_ref().and_then(|s| s.qos_class.clone()),
                mode: e.mode,
            });
            continue;
        }
        let host_ip = pod.status.as_ref().and_then(|s| s.host_ip.as_deref());
        match host_ip.map(str::parse::<IpAddr>) {
            Some(Ok(node)) => out.peers.push(Peer {
                name: name.clone(),
                namespace: namespace.clone(),
                service_account,
                labels,
                ips,
                node,
                dataplane_mode: e.mode,
            }),
            Some(Err(_)) | None => out.problems.push(format!(
                "pod {namespace}/{name}: no usable status.hostIP ({host_ip:?}); not a peer yet"
            )),
        }
    }
    out
}

/// The addresses that occur more than once (IPv4-mapped IPv6 as IPv4), in canonical form.
fn shared_addresses<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> HashSet<IpAddr> {
    let mut seen = HashSet::new();
    let mut shared = HashSet::new();
    for ip in ips.map(IpAddr::to_canonical) {
        if !seen.insert(ip) {
            shared.insert(ip);
        }
    }
    shared
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{PodIP, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::kubernetes::enrol::DATAPLANE_MODE;

    fn namespace(name: &str, ambient: bool) -> Namespace {
        let labels = ambient.then(|| BTreeMap::from([(DATAPLANE_MODE.into(), "ambient".into())]));
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels,
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, host_ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(BTreeMap::from([("app".into(), name.into())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(format!("sa-{name}")),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                host_ip: host_ip.map(Into::into),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                qos_class: Some("Burstable".into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn local_pods_and_peers_are_split_by_node() {
        let pods = [
            pod(
                "prod",
                "frontend",
                "node-a",
                "10.244.1.2",
                Some("10.244.0.1"),
            ),
            pod(
                "prod",
                "payment",
                "node-b",
                "10.244.2.2",
                Some("10.244.0.2"),
            ),
            pod("dev", "tool", "node-a", "10.244.1.9", Some("10.244.0.1")),
        ];
        let namespaces = [namespace("prod", true), namespace("dev", false)];
        let d = desired("node-a", &pods, &namespaces);
        assert_eq!(
            d.local,
            vec![LocalPod {
                uid: "uid-frontend".into(),
                name: "frontend".into(),
                namespace: "prod".into(),
                service_account: "sa-frontend".into(),
                labels: BTreeMap::from([("app".into(), "frontend".into())]),
                ips: vec!["10.244.1.2".parse().expect("ip")],
                qos_class: Some("Burstable".into()),
                mode: None,
            }]
        );
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].name, "payment");
        assert_eq!(d.peers[0].node, "10.244.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(d.peers[0].service_account, "sa-payment");
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn a_peer_without_a_node_address_waits_and_is_reported() {
        let pods = [pod("prod", "payment", "node-b", "10.244.2.2", None)];
        let d = desired("node-a", &pods, &[namespace("prod", true)]);
        assert!(d.peers.is_empty());
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].contains("prod/payment"), "{:?}", d.problems);
    }

    #[test]
    fn an_address_two_pods_claim_goes_to_neither() {
        let pods = [
            pod("prod", "old", "node-b", "10.244.2.2", Some("10.244.0.2")),
            pod("prod", "new", "node-a", "10.244.2.2", Some("10.244.0.1")),
            pod("prod", "other", "node-b", "10.244.2.3", Some("10.244.0.2")),
        ];
        let d = desired("node-a", &pods, &[namespace("prod", true)]);
        assert!(d.local.is_empty());
        let peers: Vec<&str> = d.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(peers, ["other"]);
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
    }

    #[test]
    fn the_service_account_defaults_to_default() {
        let mut p = pod(
            "prod",
            "payment",
            "node-a",
            "10.244.1.2",
            Some("10.244.0.1"),
        );
        if let Some(spec) = p.spec.as_mut() {
            spec.service_account_name = None;
        }
        let d = desired("node-a", [&p], &[namespace("prod", true)]);
        assert_eq!(d.local[0].service_account, "default");
    }
}
