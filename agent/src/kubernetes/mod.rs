//! Kubernetes mode: the cluster's own objects as a source of desired state. [`enrol`] decides
//! which pods Latch enforces for (Istio ambient's labels); [`desired`] turns the watched pods
//! and namespaces into this node's local pods and peers; [`policies`] keeps each Istio policy
//! object's last good version; [`discovery`] finds a local pod's cgroup and network namespace.
//! docs/kubernetes.md has the mapping.

pub mod desired;
pub mod discovery;
pub mod enrol;
pub mod policies;
