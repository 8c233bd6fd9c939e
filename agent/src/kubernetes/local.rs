//! This node's enrolled pods made into workloads: each pod's pod-level cgroup and network
//! namespace found on disk ([`super::discovery`]) and remembered per pod UID, so that a pod is
//! looked for once, and again only when its addresses change. The namespace is held open and
//! named `/proc/self/fd/<fd>`: the path stays the pod's for as long as the agent holds it,
//! whatever happens to the process it was found through. A pod that is not there yet (no
//! cgroup, no container, no process, its netns not holding its IP yet) waits and is retried.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use super::{
    desired::LocalPod,
    discovery::{DiscoveryError, KubepodsRoot, PodNetns, QosClass, pod_netns},
};
use crate::config::Workload;

/// A pod found on disk.
struct Found {
    ips: Vec<IpAddr>,
    cgroup: PathBuf,
    netns: PodNetns,
}

impl Found {
    /// The path the rest of the agent opens the pod's namespace by.
    fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.netns.netns.as_raw_fd()))
    }
}

/// What [`LocalPods::workloads`] made of the enrolled local pods.
#[derive(Debug, Default)]
pub struct LocalWorkloads {
    pub workloads: Vec<Workload>,
    /// Pods not found on disk yet (retryable), each named with why.
    pub waiting: Vec<String>,
    /// Pods that cannot be found for a reason a retry will not change, each named with why.
    pub failed: Vec<String>,
}

/// The enrolled pods of this node found on disk so far.
pub struct LocalPods {
    root: KubepodsRoot,
    found: HashMap<String, Found>,
    /// Pods that left in the last call: their namespaces stay open until the next one, so the
    /// paths of the state in force until then never name another file.
    retired: Vec<Found>,
}

impl LocalPods {
    pub fn new(root: KubepodsRoot) -> Self {
        Self {
            root,
            found: HashMap::new(),
            retired: Vec::new(),
        }
    }

    /// The kubepods root pods are looked for under.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The workloads of `pods`, finding the pods not found yet (blocking: reads the cgroup tree
    /// and enters namespaces).
    pub fn workloads(&mut self, pods: &[LocalPod]) -> LocalWorkloads {
        self.retired.clear();
        let wanted: HashMap<&str, &LocalPod> = pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        let gone: Vec<String> = self
            .found
            .iter()
            .filter(|(uid, found)| {
                wanted
                    .get(uid.as_str())
                    .is_none_or(|pod| pod.ips != found.ips)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(found) = self.found.remove(&uid) {
                self.retired.push(found);
            }
        }

        let mut out = LocalWorkloads::default();
        for pod in pods {
            let name = format!("{}/{}", pod.namespace, pod.name);
            if !self.found.contains_key(&pod.uid) {
                match self.find(pod) {
                    Ok(found) => {
                        tracing::info!(
                            pod = name,
                            uid = pod.uid,
                            cgroup = %found.cgroup.display(),
                            pid = found.netns.pid,
                            "found the pod's cgroup and network namespace"
                        );
                        self.found.insert(pod.uid.clone(), found);
                    }
                    Err(e) if e.is_retryable() => {
                        out.waiting.push(format!("pod {name}: {e}"));
                        continue;
                    }
                    Err(e) => {
                        out.failed.push(format!("pod {name}: {e}"));
                        continue;
                    }
                }
            }
            let Some(found) = self.found.get(&pod.uid) else {
                continue;
            };
            out.workloads.push(Workload {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                labels: pod.labels.clone(),
                cgroup: found.cgroup.clone(),
                netns: found.netns_path(),
                ips: pod.ips.clone(),
                dataplane_mode: pod.mode,
            });
        }
        out
    }

    fn find(&self, pod: &LocalPod) -> Result<Found, DiscoveryError> {
        let qos = pod
            .qos_class
            .as_deref()
            .and_then(QosClass::from_api)
            .unwrap_or(QosClass::BestEffort);
        let cgroup = self.root.pod_cgroup(&pod.uid, qos)?;
        let netns = pod_netns(&cgroup, &pod.ips)?;
        Ok(Found {
            ips: pod.ips.clone(),
            cgroup: cgroup.path,
            netns,
        })
    }
}
