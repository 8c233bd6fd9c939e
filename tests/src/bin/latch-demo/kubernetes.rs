//! Kubernetes mode: the agents run `--kubernetes` against the test API server on node 1's
//! address. The pods are made as kubelet makes them (node 1 with the systemd cgroup driver,
//! node 2 with cgroupfs), `prod` is enrolled by Istio ambient's namespace label, the policies are
//! AuthorizationPolicy objects, and a change is an object created, deleted or relabelled
//! through the API server. What only this mode shows: a pod labelled out of the mesh and back.

use std::time::Duration;

use anyhow::Context as _;
use latch::debug::api::Workload;
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec,
    agent::debug_json,
    eventually,
    kube_api::{
        Kind,
        fixtures::{self, Qos},
    },
    kube_cluster::{Driver, KubeCluster},
};
use serde_json::json;

use crate::story::{self, Cast, Demo, Mesh, N1, N2, Words};

/// How long a label change may take to show in `latch debug workloads`.
const WAIT: Duration = Duration::from_secs(20);

/// Two nodes driven by the test API server.
pub struct KubeMesh {
    k: KubeCluster,
}

impl KubeMesh {
    /// Two nodes, the API server, the namespaces `prod` (in the mesh) and `default` (not); no
    /// pods, no agents.
    pub fn new() -> anyhow::Result<Self> {
        let k = KubeCluster::new(&[Driver::Systemd, Driver::Cgroupfs])?;
        k.api.apply(&fixtures::namespace(
            "prod",
            &[("istio.io/dataplane-mode", "ambient")],
        ))?;
        k.api.apply(&fixtures::namespace("default", &[]))?;
        Ok(Self { k })
    }

    /// The `namespace/name` of the node agent's local workloads and of its peers, from
    /// `latch debug workloads --json`.
    fn workloads(&self, node: NodeId) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let all = debug_json(&self.k.cluster.debug_socket(node), &["workloads"])?;
        let all: Vec<Workload> =
            serde_json::from_value(all).context("reading latch debug workloads --json")?;
        let (local, peers): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| w.local);
        let names = |ws: Vec<Workload>| {
            let mut names: Vec<String> = ws
                .into_iter()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect();
            names.sort();
            names
        };
        Ok((names(local), names(peers)))
    }

    /// Each agent's workloads and peers, a line per node.
    fn membership(&self) -> anyhow::Result<Vec<String>> {
        let mut nodes = Vec::new();
        for node in [N1, N2] {
            let (local, peers) = self.workloads(node)?;
            nodes.push(format!(
                "node {} serves [{}], peers [{}]",
                node.0 + 1,
                local.join(", "),
                peers.join(", ")
            ));
        }
        Ok(nodes)
    }

    /// Whether `pod` is a workload of its node and a peer of the other (or, `in_mesh` false,
    /// neither), by both agents' `latch debug workloads`.
    fn enrolled(&self, pod: PodId, in_mesh: bool) -> bool {
        let p = self.k.cluster.pod(pod);
        let id = format!("{}/{}", p.spec.namespace, p.spec.name);
        [N1, N2].into_iter().all(|node| {
            self.workloads(node).is_ok_and(|(local, peers)| {
                let listed = if node == p.node { local } else { peers };
                listed.contains(&id) == in_mesh
            })
        })
    }
}

impl Mesh for KubeMesh {
    const WORDS: Words = Words {
        source: "agents in Kubernetes mode (--kubernetes): pods, namespaces and policies from the test API server on node 1's address,\n\
                 pods made as kubelet makes them (node 1: systemd cgroup driver, node 2: cgroupfs), prod labelled istio.io/dataplane-mode=ambient.",
        policies: "as objects created through the API server",
        added: "created through the API server (an AuthorizationPolicy object)",
        removed: "deleted through the API server",
        written: "the API server stored the object",
    };

    fn cluster(&self) -> &Cluster {
        &self.k.cluster
    }

    fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.k.cluster
    }

    fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId> {
        self.k.add_pod(node, spec, Qos::Burstable, &[])
    }

    fn install_policies(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.add_policy(yaml)
    }

    fn start_agents(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        for node in [N1, N2] {
            self.k.start_agent(node, options)?;
        }
        Ok(())
    }

    fn write_settings(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        for node in [N1, N2] {
            let yaml = self.k.cluster.node_config_yaml(node, options);
            self.k.agent(node).write_config(&yaml)?;
        }
        Ok(())
    }

    fn add_policy(&mut self, yaml: &str) -> anyhow::Result<()> {
        for object in story::documents(yaml)? {
            self.k.api.apply(&object)?;
        }
        Ok(())
    }

    fn remove_policy(&mut self, yaml: &str) -> anyhow::Result<()> {
        for object in story::documents(yaml)? {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| object["kind"] == k.kind())
                .with_context(|| format!("an object of unknown kind {}", object["kind"]))?;
            let (namespace, name) = story::namespace_and_name(&object)?;
            self.k.api.delete(kind, namespace, name)?;
        }
        Ok(())
    }

    fn more(demo: &mut Demo<Self>, cast: &Cast) -> anyhow::Result<()> {
        let ledger4 = demo.mesh.k.cluster.pod(cast.ledger).addr4(8080);
        demo.note("Kubernetes only: enrolment follows Istio ambient's labels; latch debug workloads --json on each node:");
        demo.note_membership()?;
        demo.note(
            "ledger-1 is labelled istio.io/dataplane-mode=none: it leaves the mesh on both nodes",
        );
        demo.relabel(cast.ledger, json!("none"), false)?;
        demo.note("out of the mesh, ledger's policies no longer apply: analytics reaches it in plaintext, untouched");
        demo.connect(cast.analytics, ledger4)?;
        demo.note("the label is removed: ledger-1 is enrolled again by its namespace's label");
        demo.relabel(cast.ledger, serde_json::Value::Null, true)?;
        demo.note("back in the mesh, ledger admits only frontend again, from the first connection");
        demo.connect(cast.analytics, ledger4)?;
        demo.connect(cast.frontend, ledger4)?;
        Ok(())
    }
}

impl Demo<KubeMesh> {
    /// Set (or with `null`, remove) the pod's `istio.io/dataplane-mode` label, wait until both
    /// agents applied it, and check that they agree about the pod.
    fn relabel(
        &mut self,
        pod: PodId,
        mode: serde_json::Value,
        in_mesh: bool,
    ) -> anyhow::Result<()> {
        self.timed(|mesh| {
            mesh.k
                .label_pod(pod, json!({"istio.io/dataplane-mode": mode}))
        })?;
        anyhow::ensure!(
            eventually(WAIT, || self.mesh.enrolled(pod, in_mesh)),
            "the agents do not show the pod {} the mesh: {:?}",
            if in_mesh { "in" } else { "out of" },
            self.mesh.membership()?
        );
        self.note_membership()
    }

    /// A note per node: its local workloads and its peers.
    fn note_membership(&mut self) -> anyhow::Result<()> {
        for line in self.mesh.membership()? {
            self.note(&format!("   {line}"));
        }
        Ok(())
    }
}
