//! The harness for Latch's kernel-level tests, demo and benchmarks: a simulated cluster in
//! network namespaces. A "node" is a netns running a real `latch agent`, in a cgroup of its own
//! under the node's `cgroupRoot` (as a DaemonSet's pod is under the root the programs attach to,
//! so they see the agent's sockets too); a "pod" is a netns plus a cgroup under its node's
//! `cgroupRoot`. Everything a test creates has a unique name and is torn down on drop, even after
//! a panic.
//!
//! - [`env`]: what the tests need from the machine, and where the binaries are.
//! - [`netns`]: creating namespaces, running code and processes inside them.
//! - [`cluster`]: the topology (nodes, pods, addresses, cgroups) and its cleanup.
//! - [`agent`]: a `latch agent` process: config, start, readiness, logs, kill, restart.
//! - [`probe`]: connecting from inside a pod with `latch-probe` and reading what happened.
//! - [`server`]: echo servers inside pods that record who connected.
//! - [`sniffer`]: packet captures on the links between nodes.
//! - [`hbone`]: a `CONNECT` of the test's choosing through a real tunnel.
//! - [`jwks`]: JWT signing keys and a JWKS server over HTTPS, for RequestAuthentication.
//! - [`python_peer`]: an HBONE server or client on Python's `ssl` and PyPI's `h2`, not Latch's
//!   code, for the interop tests.
//! - [`kube_api`]: a Kubernetes API server (lists, watches, discovery, RBAC from
//!   `deploy/rbac.yaml`) with real objects, for the agent's Kubernetes mode.
//! - [`l2`]: raw frames sent from inside a pod (gratuitous ARP, neighbour advertisements, a
//!   chosen source MAC) and what a namespace's neighbour table and bridge learned.
//! - [`syn_flood`]: SYNs from a raw socket inside a pod, that never complete a handshake.
//! - [`nginx`]: an nginx mTLS stream-proxy pair, the benchmarks' point of comparison.
//! - [`policy_bench`]: decision cost and revocation time of the agent's policy code.
//! - [`leftovers`]: what a process's clusters left when it died before their teardown, found by
//!   name and removed, by its guardian or by the next cluster made once the process's claim on
//!   it is released.
//! - [`guardian`]: the demo's and the benchmarks' work in a child process, cleaned up after
//!   however it ends (Ctrl-C, SIGTERM, SIGKILL).

pub mod agent;
pub mod cluster;
pub mod env;
pub mod guardian;
pub mod hbone;
pub mod jwks;
pub mod kube_api;
pub mod kube_cluster;
pub mod l2;
pub mod leftovers;
pub mod metrics;
pub mod netns;
pub mod nginx;
pub mod policy_bench;
pub mod probe;
pub mod python_peer;
pub mod server;
pub mod sniffer;
pub mod syn_flood;

pub use agent::{Agent, AgentOptions};
pub use cluster::{
    Cluster, NodeId, OpenPipe, PodId, PodKind, PodSpec, Topology, TwoNodes, eventually,
};
pub use probe::ProbeResult;
pub use server::EchoServer;
