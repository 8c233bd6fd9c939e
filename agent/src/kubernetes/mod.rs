//! Kubernetes mode: the cluster's own objects as a source of desired state. [`enrol`] decides
//! which pods Latch enforces for (Istio ambient's labels); [`desired`] turns the watched pods
//! and namespaces into this node's local pods and peers; [`policies`] keeps each Istio policy
//! object's last good version; [`discovery`] finds a local pod's cgroup and network namespace
//! and [`local`] remembers what it found; [`watch`] runs the watches; [`source`] is the
//! runtime's [`crate::runtime::source::Source`] made of them; [`ready`] serves `/ready`;
//! [`serve`] is `latch agent --kubernetes`. docs/kubernetes.md has the mapping.

pub mod desired;
pub mod discovery;
pub mod enrol;
pub mod local;
pub mod policies;
pub mod ready;
pub mod serve;
pub mod source;
pub mod watch;
