//! Kubernetes mode (docs/DESIGN §8): what the agent needs from the node to enrol the pods the
//! Kubernetes API tells it about. [`discovery`] finds a local pod's cgroup and network namespace
//! from plain values (its UID, QoS class and IPs); the watcher that supplies them lives elsewhere.

pub mod discovery;
