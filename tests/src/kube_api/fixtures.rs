//! Objects as a real cluster holds them: Pods as the scheduler and kubelet leave them once
//! running (node, service account, IPs, phase, QoS class and the resources that give it,
//! conditions, container statuses with `containerd://` IDs), Namespaces with labels, and Istio's
//! security kinds as JSON.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStatus, HostIP, Namespace, Pod,
        PodCondition, PodIP, PodSpec, PodStatus, ResourceRequirements,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
    jiff::Timestamp,
};
use serde_json::{Value, json};

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(to_map(labels)),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A container ID as the kubelet reports it with containerd: `containerd://` and 64 hex digits,
/// derived from the pod and container names (the same names always give the same ID).
pub fn container_id(namespace: &str, pod: &str, container: &str) -> String {
    let mut hex = String::with_capacity(64);
    for round in 0u8..4 {
        let mut h = DefaultHasher::new();
        (namespace, pod, container, round).hash(&mut h);
        hex.push_str(&format!("{:016x}", h.finish()));
    }
    format!("containerd://{hex}")
}

/// A Pod's QoS class; the builder gives its containers the resources that make it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

/// A Pod, built as the kubelet fills it: `pod("prod", "web-1").node("node-a").ip("10.244.1.2")
/// .build()` is a Running pod on node-a with service account `default`, BestEffort, one
/// container `app` with a `containerd://` ID, Ready.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    namespace: String,
    name: String,
    node: Option<String>,
    service_account: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    ips: Vec<String>,
    host_ip: Option<String>,
    phase: String,
    qos: Qos,
    containers: Vec<String>,
    host_network: bool,
}

/// Start a Pod `namespace/name` (see [`PodBuilder`]).
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        node: None,
        service_account: "default".to_owned(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        ips: Vec::new(),
        host_ip: None,
        phase: "Running".to_owned(),
        qos: Qos::BestEffort,
        containers: vec!["app".to_owned()],
        host_network: false,
    }
}

impl PodBuilder {
    /// Scheduled to `node` (`spec.nodeName`).
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// One of the pod's IPs (`status.podIPs`; the first is also `status.podIP`).
    pub fn ip(mut self, ip: &str) -> Self {
        self.ips.push(ip.to_owned());
        self
    }

    /// The node's address (`status.hostIP`, `status.hostIPs`).
    pub fn host_ip(mut self, ip: &str) -> Self {
        self.host_ip = Some(ip.to_owned());
        self
    }

    /// `status.phase` (Running by default; `Pending` leaves out IPs and container statuses).
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// The containers' names (`app` by default).
    pub fn containers(mut self, names: &[&str]) -> Self {
        self.containers = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    pub fn build(self) -> Pod {
        let now = Time(Timestamp::now());
        let resources = match self.qos {
            Qos::BestEffort => None,
            Qos::Burstable => Some(ResourceRequirements {
                requests: Some(
                    [("cpu", "100m"), ("memory", "64Mi")]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
                        .collect(),
                ),
                ..ResourceRequirements::default()
            }),
            Qos::Guaranteed => {
                let both: BTreeMap<String, Quantity> = [("cpu", "100m"), ("memory", "64Mi")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
                    .collect();
                Some(ResourceRequirements {
                    requests: Some(both.clone()),
                    limits: Some(both),
                    ..ResourceRequirements::default()
                })
            }
        };
        let containers = self
            .containers
            .iter()
            .map(|c| Container {
                name: c.clone(),
                image: Some(format!("registry.example/{c}:1.0")),
                image_pull_policy: Some("IfNotPresent".to_owned()),
                resources: resources.clone(),
                termination_message_path: Some("/dev/termination-log".to_owned()),
                termination_message_policy: Some("File".to_owned()),
                ..Container::default()
            })
            .collect();
        let running = self.phase == "Running";
        let scheduled = self.node.is_some();
        let condition = |ty: &str, status: bool| PodCondition {
            type_: ty.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            last_transition_time: Some(now.clone()),
            ..PodCondition::default()
        };
        let conditions = if scheduled {
            vec![
                condition("PodReadyToStartContainers", running),
                condition("Initialized", true),
                condition("Ready", running),
                condition("ContainersReady", running),
                condition("PodScheduled", true),
            ]
        } else {
            vec![condition("PodScheduled", false)]
        };
        let container_statuses = (scheduled && self.phase != "Pending").then(|| {
            self.containers
                .iter()
                .map(|c| ContainerStatus {
                    name: c.clone(),
                    image: format!("registry.example/{c}:1.0"),
                    image_id: format!(
                        "registry.example/{c}@sha256:{}",
                        &container_id("image", c, c)["containerd://".len()..]
                    ),
                    container_id: Some(container_id(&self.namespace, &self.name, c)),
                    ready: running,
                    started: Some(running),
                    restart_count: 0,
                    state: Some(ContainerState {
                        running: running.then(|| ContainerStateRunning {
                            started_at: Some(now.clone()),
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                })
                .collect()
        });
        let with_ips = scheduled && self.phase != "Pending";
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: (!self.labels.is_empty()).then_some(self.labels),
                annotations: (!self.annotations.is_empty()).then_some(self.annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: self.node,
                service_account_name: Some(self.service_account.clone()),
                service_account: Some(self.service_account),
                containers,
                restart_policy: Some("Always".to_owned()),
                dns_policy: Some("ClusterFirst".to_owned()),
                scheduler_name: Some("default-scheduler".to_owned()),
                termination_grace_period_seconds: Some(30),
                enable_service_links: Some(true),
                host_network: self.host_network.then_some(true),
                priority: Some(0),
                preemption_policy: Some("PreemptLowerPriority".to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(self.phase),
                conditions: Some(conditions),
                host_ip: self.host_ip.clone().filter(|_| with_ips),
                host_ips: self
                    .host_ip
                    .filter(|_| with_ips)
                    .map(|ip| vec![HostIP { ip }]),
                pod_ip: self.ips.first().cloned().filter(|_| with_ips),
                pod_ips: (with_ips && !self.ips.is_empty())
                    .then(|| self.ips.into_iter().map(|ip| PodIP { ip }).collect()),
                qos_class: Some(self.qos.as_str().to_owned()),
                start_time: scheduled.then_some(now),
                container_statuses,
                ..PodStatus::default()
            }),
        }
    }
}

fn istio(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// An `AuthorizationPolicy` (`security.istio.io/v1`) with `spec`.
pub fn authorization_policy(namespace: &str, name: &str, spec: Value) -> Value {
    istio("AuthorizationPolicy", namespace, name, spec)
}

/// A `PeerAuthentication` (`security.istio.io/v1`) with `spec`.
pub fn peer_authentication(namespace: &str, name: &str, spec: Value) -> Value {
    istio("PeerAuthentication", namespace, name, spec)
}

/// A `RequestAuthentication` (`security.istio.io/v1`) with `spec`.
pub fn request_authentication(namespace: &str, name: &str, spec: Value) -> Value {
    istio("RequestAuthentication", namespace, name, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_pod_as_the_kubelet_reports_it() {
        let p = pod("prod", "web-1")
            .node("node-a")
            .service_account("web")
            .label("app", "web")
            .ip("10.244.1.2")
            .ip("fd00::2")
            .host_ip("10.244.0.1")
            .qos(Qos::Burstable)
            .build();
        let v = serde_json::to_value(&p).expect("serializes");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["spec"]["nodeName"], "node-a");
        assert_eq!(v["spec"]["serviceAccountName"], "web");
        assert_eq!(v["status"]["podIP"], "10.244.1.2");
        assert_eq!(v["status"]["podIPs"][1]["ip"], "fd00::2");
        assert_eq!(v["status"]["hostIP"], "10.244.0.1");
        assert_eq!(v["status"]["qosClass"], "Burstable");
        assert_eq!(v["status"]["phase"], "Running");
        let id = v["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .expect("container ID");
        let hex = id.strip_prefix("containerd://").expect("containerd");
        assert_eq!(hex.len(), 64);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, container_id("prod", "web-1", "app"));
        assert_ne!(id, container_id("prod", "web-2", "app"));
    }
}
