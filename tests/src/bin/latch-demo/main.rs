//! `cargo xtask demo`: a two-node cluster in network namespaces with real agents, real kernel
//! programs and an embedded set of Istio policies. It makes a handful of connections and HTTP
//! requests and prints, for each, the path it took (read from the kernel counters) and what the
//! client saw; then it changes a policy and shows the cached verdict revoked; then it cleans
//! everything up.
//!
//! - [`story`]: the story and its table, whichever way the cluster is made.
//! - [`local`]: agents in local mode, pods and policies in files.

mod local;
mod story;

fn main() -> anyhow::Result<()> {
    story::tell(local::LocalMesh::new()?)
}
