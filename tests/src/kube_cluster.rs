//! Kubernetes mode in the netns harness: a [`Cluster`] whose pods are made as kubelet makes
//! them (the Pod object first, then its cgroup in kubelet's layout, a container process in the
//! pod's network namespace, then the Pod's status with its IPs), the test API server
//! ([`KubeApiServer`]) listening on node 1's address so that every node's agent reaches it,
//! and agents started with `--kubernetes --kubeconfig`.

use std::{
    path::{Path, PathBuf},
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

/// The container runtime of a node: how it names container cgroups below a pod's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope` (systemd), `<id>` (cgroupfs).
    Containerd,
    /// `crio-<id>.scope` (systemd), `crio-<id>` (cgroupfs), and beside each container its
    /// `crio-conmon-<id>` monitor, a process on the node's network, never the pod's.
    CriO,
    /// `docker-<id>.scope` (systemd), `<id>` (cgroupfs).
    CriDockerd,
}

/// A pod's running container: its cgroup and its process.
struct Container {
    pod: PodId,
    cgroup: PathBuf,
    process: Child,
}

/// A cluster of nodes in network namespaces driven by a test API server.
pub struct KubeCluster {
    pub cluster: Cluster,
    pub api: KubeApiServer,
    kubeconfig: PathBuf,
    drivers: Vec<Driver>,
    runtimes: Vec<Runtime>,
    /// The processes kubelet's runtime would run: each pod's container (and CRI-O's monitors).
    containers: Vec<Container>,
    /// How many times each pod's container was restarted, by pod.
    restarts: Vec<(PodId, u32)>,
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
            runtimes: vec![Runtime::Containerd; drivers.len()],
            containers: Vec::new(),
            restarts: Vec::new(),
        })
    }

    /// Make the node's container runtime `runtime` (containerd by default), for the pods added
    /// after.
    pub fn set_runtime(&mut self, node: NodeId, runtime: Runtime) {
        self.runtimes[node.0] = runtime;
    }

    /// The cgroup of container `id` of a pod whose cgroup is `pod_cgroup`, on the node, and of
    /// its CRI-O monitor if the runtime has one.
    fn container_cgroups(
        &self,
        node: NodeId,
        pod_cgroup: &Path,
        id: &str,
    ) -> (PathBuf, Option<PathBuf>) {
        let systemd = self.drivers[node.0] == Driver::Systemd;
        let (name, monitor) = match (self.runtimes[node.0], systemd) {
            (Runtime::Containerd, true) => (format!("cri-containerd-{id}.scope"), None),
            (Runtime::CriO, true) => (
                format!("crio-{id}.scope"),
                Some(format!("crio-conmon-{id}.scope")),
            ),
            (Runtime::CriDockerd, true) => (format!("docker-{id}.scope"), None),
            (Runtime::CriO, false) => (format!("crio-{id}"), Some(format!("crio-conmon-{id}"))),
            (Runtime::Containerd | Runtime::CriDockerd, false) => (id.to_owned(), None),
        };
        (pod_cgroup.join(name), monitor.map(|m| pod_cgroup.join(m)))
    }

    /// Start a container of pod `pod` (on `node`) in `cgroup` (a process in the pod's network
    /// namespace), and its monitor in `monitor` (on the node's network), if any.
    fn start_container(
        &mut self,
        node: NodeId,
        pod: PodId,
        cgroup: &Path,
        monitor: Option<&Path>,
    ) -> anyhow::Result<()> {
        let netns_of_pod = self.cluster.pod(pod).netns();
        let netns_of_node = self.cluster.node(node).netns();
        let mut start = |cgroup: &Path, netns: &Path| -> anyhow::Result<()> {
            std::fs::create_dir_all(cgroup)
                .with_context(|| format!("creating {}", cgroup.display()))?;
            let mut sleep = Command::new("sleep");
            sleep
                .arg("infinity")
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            netns::enter(&mut sleep, netns, Some(cgroup))?;
            let process = sleep.spawn().context("starting a container process")?;
            self.containers.push(Container {
                pod,
                cgroup: cgroup.to_owned(),
                process,
            });
            Ok(())
        };
        // The monitor first: discovery meets it before the container and must pass it by.
        if let Some(monitor) = monitor {
            start(monitor, &netns_of_node)?;
        }
        start(cgroup, &netns_of_pod)
    }

    /// Restart the pod's container as kubelet does: a new container (new ID, new cgroup below
    /// the same pod cgroup, same network namespace) starts, the old one is killed and its
    /// cgroup removed, and the Pod's status gets the new container ID and restart count.
    /// Returns the new container's cgroup.
    pub fn restart_container(&mut self, pod: PodId) -> anyhow::Result<PathBuf> {
        let node = self.cluster.pod(pod).node;
        let old = self.cluster.pod(pod).cgroup.clone();
        let pod_cgroup = old
            .parent()
            .context("a container cgroup has a parent")?
            .to_owned();
        let count = match self.restarts.iter_mut().find(|(p, _)| *p == pod) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.restarts.push((pod, 1));
                1
            }
        };
        let spec = self.cluster.pod(pod).spec.clone();
        let full_id = fixtures::container_id(&spec.namespace, &spec.name, &format!("app-{count}"));
        let id = full_id.trim_start_matches("containerd://").to_owned();
        let (cgroup, monitor) = self.container_cgroups(node, &pod_cgroup, &id);
        self.start_container(node, pod, &cgroup, monitor.as_deref())?;
        // The old container (and its monitor) exits; its cgroups go.
        let (old_ones, kept): (Vec<Container>, Vec<Container>) =
            std::mem::take(&mut self.containers)
                .into_iter()
                .partition(|c| {
                    c.pod == pod && c.cgroup != cgroup && Some(&c.cgroup) != monitor.as_ref()
                });
        self.containers = kept;
        for mut c in old_ones {
            let _ = c.process.kill();
            let _ = c.process.wait();
            std::fs::remove_dir(&c.cgroup)
                .with_context(|| format!("removing {}", c.cgroup.display()))?;
        }
        self.api
            .modify::<k8s_openapi::api::core::v1::Pod>(&spec.namespace, &spec.name, |p| {
                for status in p
                    .status
                    .iter_mut()
                    .flat_map(|s| s.container_statuses.iter_mut().flatten())
                {
                    status.container_id = Some(full_id.clone());
                    status.restart_count = count as i32;
                }
            })?;
        self.cluster.set_pod_cgroup(pod, cgroup.clone());
        Ok(cgroup)
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
        let pod_cgroup = self.pod_cgroup(node, &uid, qos);
        let (cgroup, monitor) = self.container_cgroups(node, &pod_cgroup, container_id);
        let id = self
            .cluster
            .add_pod_in(node, spec.clone(), cgroup.clone())?;
        self.start_container(node, id, &cgroup, monitor.as_deref())?;
        let pod = self.cluster.pod(id);
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
        for c in &mut self.containers {
            let _ = c.process.kill();
            let _ = c.process.wait();
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
