//! Kubernetes mode in the netns harness: a [`Cluster`] whose pods are made as kubelet makes
//! them (the Pod object first, then its cgroup in kubelet's layout, a container process in the
//! pod's network namespace, then the Pod's status with its IPs), the test API server
//! ([`KubeApiServer`]) listening on node 1's address so that every node's agent reaches it,
//! and agents started with `--kubernetes --kubeconfig`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    agent::{Agent, AgentOptions},
    cluster::{Cluster, NodeId, PodId, PodSpec},
    kube_api::{
        Kind, KubeApiServer,
        fixtures::{self, Qos},
    },
    netns,
};

/// kubelet's cgroup driver on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// A cluster of nodes in network namespaces driven by a test API server.
pub struct KubeCluster {
    pub cluster: Cluster,
    pub api: KubeApiServer,
    kubeconfig: PathBuf,
    drivers: Vec<Driver>,
    /// Each pod's container process (what kubelet's runtime would run), by pod.
    containers: Vec<(PodId, Child)>,
}

impl KubeCluster {
    /// Nodes with the given cgroup drivers (node 1 first), no pods, no agents; the API server
    /// listens on node 1's address.
    pub fn new(drivers: &[Driver]) -> anyhow::Result<Self> {
        let mut cluster = Cluster::new()?;
        for _ in drivers {
            cluster.add_node()?;
        }
        let first = cluster.node(NodeId(0));
        let address = first.ipv4();
        let listener = netns::in_netns(&first.netns(), move || {
            Ok(std::net::TcpListener::bind((address, 0))?)
        })
        .context("binding the API server on node 1's address")?;
        let api = KubeApiServer::start(listener)?;
        let kubeconfig = cluster.dir().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&api.url()))
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        Ok(Self {
            cluster,
            api,
            kubeconfig,
            drivers: drivers.to_vec(),
            containers: Vec::new(),
        })
    }

    /// The node's name in the cluster (its Pods' `spec.nodeName`).
    pub fn node_name(&self, node: NodeId) -> String {
        format!("node{}", self.cluster.node(node).index)
    }

    /// kubelet's kubepods root on the node.
    pub fn kubepods_root(&self, node: NodeId) -> PathBuf {
        let root = &self.cluster.node(node).cgroup_root;
        match self.drivers[node.0] {
            Driver::Systemd => root.join("kubepods.slice"),
            Driver::Cgroupfs => root.join("kubepods"),
        }
    }

    /// Where kubelet puts the cgroup of pod `uid` of class `qos` on the node.
    pub fn pod_cgroup(&self, node: NodeId, uid: &str, qos: Qos) -> PathBuf {
        let root = self.kubepods_root(node);
        let level = match qos {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        };
        match self.drivers[node.0] {
            Driver::Systemd => {
                let uid = uid.replace('-', "_");
                match level {
                    None => root.join(format!("kubepods-pod{uid}.slice")),
                    Some(l) => root
                        .join(format!("kubepods-{l}.slice"))
                        .join(format!("kubepods-{l}-pod{uid}.slice")),
                }
            }
            Driver::Cgroupfs => match level {
                None => root.join(format!("pod{uid}")),
                Some(l) => root.join(l).join(format!("pod{uid}")),
            },
        }
    }

    /// A pod as kubelet starts one: the Pod object (`labels` besides `spec`'s), its cgroup
    /// and network namespace with a container process in them, then its status with its IPs.
    pub fn add_pod(
        &mut self,
        node: NodeId,
        spec: PodSpec,
        qos: Qos,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<PodId> {
        let pending = self.pod_object(node, &spec, qos, labels).phase("Pending");
        let created = self.api.apply(&pending.build())?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the API server gave the pod no uid")?
            .to_owned();
        let container_id = fixtures::container_id(&spec.namespace, &spec.name, "app");
        let container_id = container_id.trim_start_matches("containerd://");
        let scope = match self.drivers[node.0] {
            Driver::Systemd => format!("cri-containerd-{container_id}.scope"),
            Driver::Cgroupfs => container_id.to_owned(),
        };
        let cgroup = self.pod_cgroup(node, &uid, qos).join(scope);
        let id = self
            .cluster
            .add_pod_in(node, spec.clone(), cgroup.clone())?;
        let pod = self.cluster.pod(id);
        let mut sleep = Command::new("sleep");
        sleep
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        netns::enter(&mut sleep, &pod.netns(), Some(&cgroup))?;
        let child = sleep.spawn().context("starting the pod's container")?;
        self.containers.push((id, child));
        let [ipv4, ipv6] = pod.ips();
        let running = self
            .pod_object(node, &spec, qos, labels)
            .ip(&ipv4.to_string())
            .ip(&ipv6.to_string())
            .host_ip(&self.cluster.node(node).ipv4().to_string());
        let now = self.api.apply(&running.build())?;
        anyhow::ensure!(
            now["metadata"]["uid"] == created["metadata"]["uid"],
            "the pod's uid changed on update"
        );
        Ok(id)
    }

    fn pod_object(
        &self,
        node: NodeId,
        spec: &PodSpec,
        qos: Qos,
        labels: &[(&str, &str)],
    ) -> fixtures::PodBuilder {
        let mut pod = fixtures::pod(&spec.namespace, &spec.name)
            .node(&self.node_name(node))
            .service_account(&spec.service_account)
            .qos(qos);
        for (k, v) in &spec.labels {
            pod = pod.label(k, v);
        }
        for (k, v) in labels {
            pod = pod.label(k, v);
        }
        pod
    }

    /// Merge `labels` into the pod's (a `null` value removes one).
    pub fn label_pod(&self, pod: PodId, labels: Value) -> anyhow::Result<()> {
        let p = self.cluster.pod(pod);
        self.api.merge_patch(
            Kind::Pod,
            &p.spec.namespace,
            &p.spec.name,
            &serde_json::json!({"metadata": {"labels": labels}}),
        )?;
        Ok(())
    }

    /// Start the node's agent in Kubernetes mode (the node settings of `options`, no workloads,
    /// peers or policies); returns once it is ready.
    pub fn start_agent(&mut self, node: NodeId, options: &AgentOptions) -> anyhow::Result<()> {
        let yaml = self.cluster.node_config_yaml(node, options);
        let args = vec![
            "--kubernetes".to_owned(),
            "--kubeconfig".to_owned(),
            self.kubeconfig.display().to_string(),
            "--kubepods-root".to_owned(),
            self.kubepods_root(node).display().to_string(),
        ];
        self.cluster.start_agent_with(node, &yaml, &args)?;
        Ok(())
    }

    pub fn agent(&mut self, node: NodeId) -> &mut Agent {
        self.cluster.agent(node)
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.containers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A kubeconfig for the plain-HTTP test server (it authorizes every request as the agent's
/// ServiceAccount, so no credentials).
fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{ server: \"{server}\" }}
users:
- name: latch
  user: {{}}
contexts:
- name: test
  context: {{ cluster: test, user: latch }}
current-context: test
"
    )
}
