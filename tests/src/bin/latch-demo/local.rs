//! Local mode: each agent reads its workloads, peers and policies from files. The pods are
//! listed in every node's config file, the policies are YAML files in a directory both agents
//! watch, and a change is a file written, or removed, there.

use std::path::PathBuf;

use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, env::write_atomically};

use crate::story::{self, Mesh, N1, N2, Words};

/// Two nodes in network namespaces whose agents share a policy directory.
pub struct LocalMesh {
    cluster: Cluster,
    /// Where the policy files are, named in every agent's config.
    policies: PathBuf,
}

impl LocalMesh {
    /// Two nodes, no pods, no agents.
    pub fn new() -> anyhow::Result<Self> {
        let mut cluster = Cluster::new()?;
        cluster.add_node()?;
        cluster.add_node()?;
        let policies = cluster.dir().join("policies");
        std::fs::create_dir_all(&policies)?;
        Ok(Self { cluster, policies })
    }

    /// `options` with the policy directory added.
    fn with_policies(&self, options: &AgentOptions) -> AgentOptions {
        AgentOptions {
            extra_yaml: format!("policies: [{}]\n", self.policies.display()),
            ..options.clone()
        }
    }

    /// The file of the policies of `yaml`: named after the first one.
    fn file(&self, yaml: &str) -> anyhow::Result<PathBuf> {
        let documents = story::documents(yaml)?;
        let first = documents
            .first()
            .ok_or_else(|| anyhow::anyhow!("no policy in the YAML"))?;
        let (_, name) = story::namespace_and_name(first)?;
        Ok(self.policies.join(format!("{name}.yaml")))
    }
}

impl Mesh for LocalMesh {
    const WORDS: Words = Words {
        source: "agents in local mode: each node's config file lists its pods and peers and names a policy directory.",
        policies: "as files in the policy directory",
        added: "dropped into the policy directory",
        removed: "removed",
        written: "the file was written",
    };

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId> {
        self.cluster.add_pod(node, spec)
    }

    fn install_policies(&mut self, yaml: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.policies.join("prod.yaml"), yaml)?)
    }

    fn start_agents(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        let options = self.with_policies(options);
        for node in [N1, N2] {
            self.cluster.start_agent(node, options.clone())?;
        }
        Ok(())
    }

    fn write_settings(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        let options = self.with_policies(options);
        for node in [N1, N2] {
            let yaml = self.cluster.config_yaml(node, &options);
            self.cluster.agent(node).write_config(&yaml)?;
        }
        Ok(())
    }

    fn add_policy(&mut self, yaml: &str) -> anyhow::Result<()> {
        write_atomically(&self.file(yaml)?, yaml)
    }

    fn remove_policy(&mut self, yaml: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.file(yaml)?)?)
    }
}
