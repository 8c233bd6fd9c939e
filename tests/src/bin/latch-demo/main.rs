//! `cargo xtask demo [--kubernetes]`: a two-node cluster in network namespaces with real
//! agents, real kernel programs and an embedded set of Istio policies. It makes a handful of
//! connections and HTTP requests and prints, for each, the path it took (read from the kernel
//! counters) and what the client saw (a JWT-gated request among them, its policies tested first
//! with `latch policy test`); then it changes a policy and shows the cached verdict
//! revoked; then it cleans everything up.
//!
//! - [`story`]: the story and its table, the same in both modes.
//! - [`local`]: agents in local mode, pods and policies in files.
//! - [`kubernetes`]: agents in Kubernetes mode, pods and policies as objects of the test API
//!   server, and a pod labelled out of the mesh and back.

use clap::Parser;

mod kubernetes;
mod local;
mod story;

#[derive(Parser)]
#[command(
    name = "latch-demo",
    about = "Latch's demo (run by `cargo xtask demo`)"
)]
struct Cli {
    /// Agents in Kubernetes mode, the cluster's objects made through a test API server.
    #[arg(long)]
    kubernetes: bool,
}

fn main() -> anyhow::Result<()> {
    // A demo stopped with Ctrl-C must not leave its cluster behind (`latch_tests::guardian`).
    latch_tests::guardian::run_guarded("latch-demo");
    if Cli::parse().kubernetes {
        story::tell(kubernetes::KubeMesh::new()?)
    } else {
        story::tell(local::LocalMesh::new()?)
    }
}
