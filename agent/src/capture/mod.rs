//! Per-pod listeners inside each pod's network namespace, and what happens to the connections
//! they accept.
//!
//! - [`netns`]: a worker thread that lives in a pod's netns and makes sockets there.
//! - [`listeners`]: the capture (15001, loopback) and inbound (15006) listeners of one pod.
//! - [`outbound`]: a redirected connection: find its original destination, forward it, cache the
//!   pair's allow.
//! - [`inbound`]: a steered inbound connection: apply the mesh-wide mTLS mode.

pub mod inbound;
pub mod listeners;
pub mod netns;
pub mod outbound;

pub use listeners::PodListeners;
pub use netns::NetnsWorker;
