//! Pod → cgroup and pod → network namespace, for Kubernetes mode. Inputs are plain values (the
//! pod's UID, QoS class and IPs), so the watcher calls this without it knowing kube-rs.
//!
//! - [`cgroup`]: kubelet's kubepods root, found on disk: a configured path, or `kubepods.slice`
//!   / `kubepods` at the top of a cgroup2 mount, or one level down (a `--cgroup-root`, as kind's
//!   `kubelet.slice/kubelet-kubepods.slice`); its name gives the driver. The mount is the first
//!   cgroup2 mount in `/proc/mounts` *under which that root exists*, not simply the first one: a
//!   container sees its own cgroup namespace at `/sys/fs/cgroup` and the host's hierarchy where
//!   it was mounted for it, and hybrid hosts list several. Pod cgroups per QoS class, systemd
//!   (`<stem>` the root's name without `.slice`, `<uid_>` the UID with `_` for `-`):
//!   `<root>/<stem>-burstable.slice/<stem>-burstable-pod<uid_>.slice`, the same with
//!   `besteffort`, Guaranteed `<root>/<stem>-pod<uid_>.slice`; cgroupfs:
//!   `<root>/burstable/pod<uid>`, `<root>/besteffort/pod<uid>`, `<root>/pod<uid>`. Container
//!   cgroups below a pod cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope` (never
//!   `crio-conmon-<id>.scope`), `docker-<id>.scope` (cri-dockerd), cgroupfs's bare `<id>` and
//!   `crio-<id>`.
//! - [`netns`]: a process of a container cgroup (the pod cgroup itself holds none under cgroup
//!   v2), its netns accepted only when it holds one of the pod's IPs, and returned as an open
//!   descriptor with its identity (inode, device): `/proc/PID/ns/net` names another namespace,
//!   or none, once that process exits, while the descriptor keeps the namespace.
//! - [`error`]: why not (yet); the caller retries what [`DiscoveryError::is_retryable`].

pub mod cgroup;
pub mod error;
pub mod netns;

pub use cgroup::{
    CgroupDriver, ContainerCgroup, KubepodsRoot, PodCgroup, QosClass, Runtime, cgroup2_mounts,
    choose_mount, list_containers,
};
pub use error::DiscoveryError;
pub use netns::{NetnsId, PodNetns, addresses, pod_netns};

#[cfg(test)]
mod tests;
