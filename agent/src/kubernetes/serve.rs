//! `latch agent --kubernetes`: the client (in-cluster, or a kubeconfig for development), the
//! kubepods root found on disk, the readiness endpoint, and the runtime's event loop on a
//! [`KubeSource`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{
    discovery::KubepodsRoot,
    local::LocalPods,
    ready,
    source::{KubeSource, Readiness},
};
use crate::config::{Config, Node};

/// What `latch agent --kubernetes` is told on its command line.
pub struct Options {
    pub config_path: PathBuf,
    /// `None`: the in-cluster config (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's kubepods root, when it is not found on its own (a custom `--cgroup-root`).
    pub kubepods_root: Option<PathBuf>,
    /// Where `/ready` is served.
    pub ready: SocketAddr,
}

/// This node from the downward API, if set.
pub fn node_from_environment() -> anyhow::Result<Option<Node>> {
    Node::from_environment(
        std::env::var("NODE_NAME").ok(),
        std::env::var("HOST_IP").ok(),
    )
    .map_err(|e| anyhow::anyhow!("the downward API's environment: {e}"))
}

/// Remove everything the agent pinned for the Kubernetes-mode config at `path`.
pub fn uninstall(path: &Path) -> anyhow::Result<()> {
    let config = Config::load_for_kubernetes(path, node_from_environment()?)?;
    crate::datapath::uninstall(&config.bpf_pin_dir)?;
    Ok(())
}

/// Run the agent on the cluster's state until SIGTERM/SIGINT.
pub fn serve(options: Options) -> anyhow::Result<()> {
    // kube-rs builds its TLS from the process default: the agent's own provider (a second
    // install is refused, harmlessly).
    let _ = crate::tls::crypto_provider().install_default();
    let node = node_from_environment()?;
    let config = Config::load_for_kubernetes(&options.config_path, node.clone())?;
    let root = KubepodsRoot::detect(options.kubepods_root.as_deref())
        .context("finding kubelet's kubepods cgroup (give --kubepods-root if kubelet uses another --cgroup-root)")?;
    tracing::info!(kubepods = %root.path().display(), driver = ?root.driver(), "kubelet's pod cgroups");
    crate::runtime::block_on(config.dataplane.worker_threads, async {
        let client = client(options.kubeconfig.as_deref()).await?;
        let readiness = Readiness::default();
        let listener = tokio::net::TcpListener::bind(options.ready)
            .await
            .with_context(|| format!("binding the readiness endpoint {}", options.ready))?;
        let ready = tokio::spawn(ready::serve(listener, readiness.clone()));
        let source = KubeSource::new(
            &options.config_path,
            node,
            client,
            LocalPods::new(root),
            readiness,
        );
        let result = crate::runtime::event_loop::run(source, config).await;
        ready.abort();
        result
    })?
}

/// A client from `kubeconfig`, or from the pod's service account in the cluster.
async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "the in-cluster config (KUBERNETES_SERVICE_HOST and the service account's token); \
             outside a cluster, give --kubeconfig",
        )?,
    };
    Client::try_from(config).context("making the Kubernetes client")
}
