//! The simulated cluster: nodes and pods in network namespaces, their addresses and cgroups,
//! the agents of the nodes, and the teardown of all of it.
//!
//! Addresses (every test uses the same ones; namespaces keep tests apart):
//! - node `i` (from 1): `10.244.0.i/24`, `fd00:10:244::i/64`, on a bridge in a "fabric" netns;
//! - pod `j` (from 0) on node `i`: `10.244.i.(j+2)`, `fd00:10:244:i::(j+2)`, reached in one of
//!   two ways ([`Topology`]): on the node's bridge (`/24`, `/64`, gateway `.1`), or routed, each
//!   pod on a veth of its own with `/32` and `/128` routes on the node and no bridge.
//!
//! A node's `/24` holds 253 pods; the next ones (up to [`MAX_PODS_PER_NODE`], for benchmarks
//! with many workloads) take their IPv4 addresses from further `/24`s of the node,
//! `10.244.(i + 32k).0/24` for k = 1 to 7 ([`pod_ipv4`]): on a bridged node the bridge holds
//! each block's gateway `.1` as well, and every other node routes each block to the node.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::Context as _;

use crate::{
    agent::{Agent, AgentOptions},
    env, leftovers, netns,
    probe::{self, ProbeResult},
    server::EchoServer,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodId(pub usize);

/// How a node connects its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every pod's veth is a port of the node's bridge `br0` (`10.244.i.1/24`,
    /// `fd00:10:244:i::1/64`): the pods share one link, as with the bridge CNI plugin.
    Bridged,
    /// No bridge: every pod has a veth of its own to the node, which routes to it with a `/32`
    /// and a `/128` route (as Calico does). Each host-side veth holds `10.244.i.1/32` and
    /// `fe80::1/64`, the pod's gateways.
    Routed,
}

/// How a pod relates to the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodKind {
    /// Enrolled on its node (a workload of its agent) and a peer on every other node.
    Mesh,
    /// Not in the mesh: no identity, its node's agent does not enroll it.
    External,
}

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub kind: PodKind,
}

impl PodSpec {
    pub fn mesh(name: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            labels: vec![("app".into(), service_account.into())],
            kind: PodKind::Mesh,
        }
    }

    pub fn external(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            labels: vec![],
            kind: PodKind::External,
        }
    }
}

pub struct Pod {
    pub spec: PodSpec,
    pub node: NodeId,
    pub netns_name: String,
    /// The pod's veth on the node's side (in the node's netns); the pod's own is `eth0`.
    pub host_if: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn netns(&self) -> PathBuf {
        netns::path(&self.netns_name)
    }

    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }

    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), port)
    }

    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.spec.namespace, self.spec.service_account
        )
    }
}

pub struct Node {
    pub index: usize,
    pub topology: Topology,
    pub netns_name: String,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    pub pods: Vec<PodId>,
    pub agent: Option<Agent>,
}

impl Node {
    pub fn netns(&self) -> PathBuf {
        netns::path(&self.netns_name)
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, self.index as u8)
    }

    /// The agent's cgroup: below `cgroupRoot`, as a DaemonSet's pod is below the root the
    /// programs attach to (`deploy/configmap.yaml`), and never enrolled.
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("latch-agent")
    }
}

/// See [`Cluster::two_nodes`].
pub struct TwoNodes {
    pub cluster: Cluster,
    pub n1: NodeId,
    pub n2: NodeId,
    pub client: PodId,
    pub server: PodId,
}

impl TwoNodes {
    /// Start both nodes' agents with the same options.
    pub fn start_agents(mut self, options: AgentOptions) -> anyhow::Result<Self> {
        for node in [self.n1, self.n2] {
            self.cluster.start_agent(node, options.clone())?;
        }
        Ok(self)
    }
}

pub struct Cluster {
    pub prefix: String,
    pub trust_domain: String,
    cgroup_base: PathBuf,
    dir: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    created_netns: Vec<String>,
    /// Dropped after the teardown, so a sweep never takes this cluster's state for abandoned.
    _claim: std::sync::Arc<leftovers::Claim>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// An empty cluster with a name unique to this process and test.
    pub fn new() -> anyhow::Result<Self> {
        env::require_kernel_features()?;
        let claim = leftovers::claim()?;
        // What runs that ended without their teardown left (a `cargo test` killed, say).
        leftovers::sweep_abandoned();
        let prefix = format!(
            "lt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup_base = env::cgroup2_mount()?.join(&prefix);
        std::fs::create_dir_all(&cgroup_base)
            .with_context(|| format!("creating {}", cgroup_base.display()))?;
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = Self {
            fabric: format!("{prefix}-fab"),
            prefix,
            trust_domain: "cluster.local".into(),
            cgroup_base,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            created_netns: Vec::new(),
            _claim: claim,
        };
        cluster.other_ca("ca")?;
        cluster.make_netns(&cluster.fabric.clone())?;
        netns::ip(
            &cluster.fabric,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        netns::ip(&cluster.fabric, &["link", "set", "br0", "up"])?;
        Ok(cluster)
    }

    fn make_netns(&mut self, name: &str) -> anyhow::Result<()> {
        netns::create(name)?;
        self.created_netns.push(name.to_owned());
        Ok(())
    }

    /// The topology most tests use: two nodes, `client` on node 1 and `server` on node 2, no
    /// agents yet.
    pub fn two_nodes(client: PodSpec, server: PodSpec) -> anyhow::Result<TwoNodes> {
        Self::two_nodes_in(Topology::Bridged, client, server)
    }

    /// [`Cluster::two_nodes`] with both nodes connecting their pods as `topology` says.
    pub fn two_nodes_in(
        topology: Topology,
        client: PodSpec,
        server: PodSpec,
    ) -> anyhow::Result<TwoNodes> {
        let mut cluster = Cluster::new()?;
        let n1 = cluster.add_node_with(topology)?;
        let n2 = cluster.add_node_with(topology)?;
        let client = cluster.add_pod(n1, client)?;
        let server = cluster.add_pod(n2, server)?;
        Ok(TwoNodes {
            cluster,
            n1,
            n2,
            client,
            server,
        })
    }

    /// [`Cluster::two_nodes`] with `prod/frontend` on node 1 and `prod/payment` on node 2.
    pub fn frontend_payment() -> anyhow::Result<TwoNodes> {
        Self::frontend_payment_in(Topology::Bridged)
    }

    /// [`Cluster::frontend_payment`] on nodes of the given topology.
    pub fn frontend_payment_in(topology: Topology) -> anyhow::Result<TwoNodes> {
        Self::two_nodes_in(
            topology,
            PodSpec::mesh("frontend", "prod", "frontend"),
            PodSpec::mesh("payment", "prod", "payment"),
        )
    }

    /// Add a node with a bridge for its pods (no agent yet) connected to every other node.
    pub fn add_node(&mut self) -> anyhow::Result<NodeId> {
        self.add_node_with(Topology::Bridged)
    }

    /// Add a node (no agent yet) connected to every other node, connecting its pods as
    /// `topology` says.
    pub fn add_node_with(&mut self, topology: Topology) -> anyhow::Result<NodeId> {
        let index = self.nodes.len() + 1;
        let name = format!("{}-n{index}", self.prefix);
        self.make_netns(&name)?;
        let ns = name.as_str();
        netns::ip(
            &self.fabric,
            &[
                "link",
                "add",
                &format!("n{index}"),
                "type",
                "veth",
                "peer",
                "name",
                "fab0",
                "netns",
                ns,
            ],
        )?;
        netns::ip(
            &self.fabric,
            &["link", "set", &format!("n{index}"), "master", "br0", "up"],
        )?;
        netns::ip(
            ns,
            &[
                "addr",
                "add",
                &format!("10.244.0.{index}/24"),
                "dev",
                "fab0",
            ],
        )?;
        netns::ip(
            ns,
            &[
                "addr",
                "add",
                &format!("fd00:10:244::{index}/64"),
                "dev",
                "fab0",
                "nodad",
            ],
        )?;
        netns::ip(ns, &["link", "set", "fab0", "up"])?;
        if topology == Topology::Bridged {
            netns::ip(
                ns,
                &[
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                ],
            )?;
            netns::ip(
                ns,
                &["addr", "add", &format!("10.244.{index}.1/24"), "dev", "br0"],
            )?;
            netns::ip(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("fd00:10:244:{index}::1/64"),
                    "dev",
                    "br0",
                    "nodad",
                ],
            )?;
            netns::ip(ns, &["link", "set", "br0", "up"])?;
        }
        let path = netns::path(ns);
        netns::sysctl(&path, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(&path, "net/ipv6/conf/all/forwarding", "1")?;
        // Routes both ways with every existing node.
        for other in &self.nodes {
            let j = other.index;
            netns::ip(
                ns,
                &[
                    "route",
                    "add",
                    &format!("10.244.{j}.0/24"),
                    "via",
                    &format!("10.244.0.{j}"),
                ],
            )?;
            netns::ip(
                ns,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:10:244:{j}::/64"),
                    "via",
                    &format!("fd00:10:244::{j}"),
                ],
            )?;
            netns::ip(
                &other.netns_name,
                &[
                    "route",
                    "add",
                    &format!("10.244.{index}.0/24"),
                    "via",
                    &format!("10.244.0.{index}"),
                ],
            )?;
            netns::ip(
                &other.netns_name,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:10:244:{index}::/64"),
                    "via",
                    &format!("fd00:10:244::{index}"),
                ],
            )?;
            // The other node's further blocks of pods, if it has that many.
            for block in 1..other.pods.len().div_ceil(POD_BLOCK) {
                netns::ip(
                    ns,
                    &[
                        "route",
                        "add",
                        &format!("10.244.{}.0/24", j + 32 * block),
                        "via",
                        &format!("10.244.0.{j}"),
                    ],
                )?;
            }
        }
        let cgroup_root = self.cgroup_base.join(format!("node{index}"));
        std::fs::create_dir_all(&cgroup_root)
            .with_context(|| format!("creating {}", cgroup_root.display()))?;
        let dir = self.dir.join(format!("node{index}"));
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(Node {
            index,
            topology,
            netns_name: name,
            cgroup_root,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{index}", self.prefix)),
            dir,
            pods: Vec::new(),
            agent: None,
        });
        Ok(NodeId(index - 1))
    }

    /// Add a pod on `node`, its cgroup `<cgroupRoot>/<name>`.
    pub fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId> {
        let cgroup = self.nodes[node.0].cgroup_root.join(&spec.name);
        self.add_pod_in(node, spec, cgroup)
    }

    /// Add a pod on `node` whose processes run in `cgroup` (made with its parents if missing).
    pub fn add_pod_in(
        &mut self,
        node: NodeId,
        spec: PodSpec,
        cgroup: PathBuf,
    ) -> anyhow::Result<PodId> {
        let n = &self.nodes[node.0];
        let index = n.index;
        let slot = n.pods.len() + 2;
        let node_ns = n.netns_name.clone();
        let topology = n.topology;
        let name = format!("{}-n{index}-{}", self.prefix, spec.name);
        self.make_netns(&name)?;
        let host_if = format!("p{slot}");
        netns::ip(
            &node_ns,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
        )?;
        let ipv4 = pod_ipv4(index, slot)?;
        let ipv6: Ipv6Addr = format!("fd00:10:244:{index}::{slot:x}").parse()?;
        let block = ipv4.octets()[2];
        if ipv4.octets()[3] == 2 && usize::from(block) != index {
            // The first pod of a further block: its gateway on the bridge, and a route to it on
            // every other node.
            if topology == Topology::Bridged {
                netns::ip(
                    &node_ns,
                    &["addr", "add", &format!("10.244.{block}.1/24"), "dev", "br0"],
                )?;
            }
            for other in self.nodes.iter().filter(|o| o.index != index) {
                netns::ip(
                    &other.netns_name,
                    &[
                        "route",
                        "add",
                        &format!("10.244.{block}.0/24"),
                        "via",
                        &format!("10.244.0.{index}"),
                    ],
                )?;
            }
        }
        match topology {
            Topology::Bridged => {
                netns::ip(&node_ns, &["link", "set", &host_if, "master", "br0", "up"])?;
                connect_bridged_pod(&name, index, ipv4, ipv6)?;
            }
            Topology::Routed => connect_routed_pod(&node_ns, &host_if, &name, index, ipv4, ipv6)?,
        }
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating {}", cgroup.display()))?;
        let id = PodId(self.pods.len());
        self.pods.push(Pod {
            spec,
            node,
            netns_name: name,
            host_if,
            cgroup,
            ipv4,
            ipv6,
        });
        self.nodes[node.0].pods.push(id);
        Ok(id)
    }

    pub fn pod(&self, id: PodId) -> &Pod {
        &self.pods[id.0]
    }

    /// The pod's processes run in `cgroup` from now on (a restarted container's).
    pub fn set_pod_cgroup(&mut self, id: PodId, cgroup: PathBuf) {
        self.pods[id.0].cgroup = cgroup;
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn agent(&mut self, id: NodeId) -> &mut Agent {
        self.nodes[id.0]
            .agent
            .as_mut()
            .expect("the node's agent was started")
    }

    /// The node's config file text for `options`: its mesh pods as workloads, every other mesh
    /// pod as a peer.
    pub fn config_yaml(&self, id: NodeId, options: &AgentOptions) -> String {
        let mut y = self.node_config_yaml(id, options);
        y.push_str(&self.workloads_yaml(id));
        y.push_str(&options.extra_yaml);
        y
    }

    /// The node-level settings of the node's config for `options` (no workloads, peers or
    /// policies: Kubernetes mode's config file).
    pub fn node_config_yaml(&self, id: NodeId, options: &AgentOptions) -> String {
        let node = &self.nodes[id.0];
        let mut y = String::new();
        y.push_str(&format!(
            "node: {{ name: node{}, address: {} }}\n",
            node.index,
            node.ipv4()
        ));
        y.push_str(&format!("trustDomain: {}\n", self.trust_domain));
        y.push_str(&format!("cgroupRoot: {}\n", node.cgroup_root.display()));
        y.push_str(&format!("bpfPinDir: {}\n", node.pin_dir.display()));
        y.push_str("ports: { capture: 15001, inbound: 15006, tunnel: 15008 }\n");
        let busy_poll = options
            .busy_poll
            .as_ref()
            .map(|d| format!(", busyPoll: {d}"))
            .unwrap_or_default();
        let adaptive = options
            .busy_poll_adaptive
            .map(|a| format!(", busyPollAdaptive: {a}"))
            .unwrap_or_default();
        let workers = options
            .worker_threads
            .map(|n| format!(", workerThreads: {n}"))
            .unwrap_or_default();
        y.push_str(&format!(
            "dataplane: {{ mode: {}, verdictTtl: {}{busy_poll}{adaptive}{workers} }}\n",
            options.dataplane_mode, options.verdict_ttl
        ));
        y.push_str(&format!(
            "mtls: {{ mode: {}, strictFastpath: {} }}\n",
            options.mtls_mode, options.strict_fastpath
        ));
        y.push_str(&format!(
            "debugSocket: {}\n",
            node.dir.join("debug.sock").display()
        ));
        y.push_str(&format!("metrics: {}\n", options.metrics));
        let ca = options.ca_dir.clone().unwrap_or_else(|| self.ca_dir());
        match &options.cert_files {
            Some(dir) => y.push_str(&format!(
                "certificates: {{ source: files, dir: {} }}\n",
                dir.display()
            )),
            None => y.push_str(&format!(
                "certificates: {{ source: dev-ca, caCert: {}, caKey: {}, ttl: {} }}\n",
                ca.join("ca.pem").display(),
                ca.join("ca-key.pem").display(),
                options.cert_ttl
            )),
        }
        y
    }

    /// The node's mesh pods as `workloads`, every other mesh pod as `peers`.
    fn workloads_yaml(&self, id: NodeId) -> String {
        let mut y = String::new();
        let labels = |p: &Pod| {
            p.spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        y.push_str("workloads:\n");
        for pod in self
            .pods
            .iter()
            .filter(|p| p.node == id && p.spec.kind == PodKind::Mesh)
        {
            y.push_str(&format!(
                "  - {{ name: {}, namespace: {}, serviceAccount: {}, labels: {{ {} }}, cgroup: {}, netns: {}, ips: [{}, \"{}\"] }}\n",
                pod.spec.name, pod.spec.namespace, pod.spec.service_account, labels(pod),
                pod.cgroup.display(), pod.netns().display(), pod.ipv4, pod.ipv6
            ));
        }
        y.push_str("peers:\n");
        for pod in self
            .pods
            .iter()
            .filter(|p| p.node != id && p.spec.kind == PodKind::Mesh)
        {
            y.push_str(&format!(
                "  - {{ name: {}, namespace: {}, serviceAccount: {}, labels: {{ {} }}, ips: [{}, \"{}\"], node: {} }}\n",
                pod.spec.name, pod.spec.namespace, pod.spec.service_account, labels(pod),
                pod.ipv4, pod.ipv6, self.nodes[pod.node.0].ipv4()
            ));
        }
        y
    }

    /// Write the node's config and start its agent; returns when it is ready.
    pub fn start_agent(&mut self, id: NodeId, options: AgentOptions) -> anyhow::Result<&mut Agent> {
        let yaml = self.config_yaml(id, &options);
        let node = &mut self.nodes[id.0];
        let bin = match options.bin {
            Some(bin) => bin,
            None => crate::env::latch_bin()?,
        };
        let agent =
            Agent::start_binary(bin, &node.netns(), &node.agent_cgroup(), &node.dir, &yaml)?;
        node.agent = Some(agent);
        Ok(node.agent.as_mut().expect("just set"))
    }

    /// Start the node's agent on the config `yaml` with `args` after `agent --config FILE`;
    /// returns when it is ready.
    pub fn start_agent_with(
        &mut self,
        id: NodeId,
        yaml: &str,
        args: &[String],
    ) -> anyhow::Result<&mut Agent> {
        let node = &mut self.nodes[id.0];
        let agent = Agent::start_with_args(
            crate::env::latch_bin()?,
            &node.netns(),
            &node.agent_cgroup(),
            &node.dir,
            yaml,
            args,
        )?;
        node.agent = Some(agent);
        Ok(node.agent.as_mut().expect("just set"))
    }

    /// Run `latch-probe connect` inside a pod (its netns and, for mesh pods, its cgroup).
    pub fn probe(
        &self,
        from: PodId,
        to: SocketAddr,
        send: Option<&str>,
    ) -> anyhow::Result<ProbeResult> {
        let pod = self.pod(from);
        probe::connect(&pod.netns(), Some(&pod.cgroup), to, send)
    }

    /// [`Self::probe`] by TCP Fast Open: `sendto(MSG_FASTOPEN)` carries `send`, with no
    /// `connect()` call (`latch-probe connect --fast-open`).
    pub fn probe_fast_open(
        &self,
        from: PodId,
        to: SocketAddr,
        send: &str,
    ) -> anyhow::Result<ProbeResult> {
        let pod = self.pod(from);
        probe::connect_fast_open(&pod.netns(), Some(&pod.cgroup), to, send)
    }

    /// The same from a socket whose first `connect()`, to `first`, failed before any SYN
    /// (`latch-probe connect --fail-first`).
    pub fn probe_after_failure(
        &self,
        from: PodId,
        first: SocketAddr,
        to: SocketAddr,
        send: &str,
    ) -> anyhow::Result<ProbeResult> {
        let pod = self.pod(from);
        probe::connect_after_failure(&pod.netns(), Some(&pod.cgroup), first, to, send)
    }

    /// The same, from inside the pod's netns but outside every cgroup below `cgroupRoot`.
    pub fn probe_unenrolled(
        &self,
        from: PodId,
        to: SocketAddr,
        send: Option<&str>,
    ) -> anyhow::Result<ProbeResult> {
        probe::connect(&self.pod(from).netns(), None, to, send)
    }

    /// The directory of the cluster's development CA (`ca.pem`, `ca-key.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// A new development CA (`latch ca init`) in the cluster's directory: the cluster's own
    /// (`ca`), or another one for agents that must not trust each other.
    pub fn other_ca(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(name);
        let out = std::process::Command::new(env::latch_bin()?)
            .args(["ca", "init"])
            .arg(&dir)
            .output()
            .context("running latch ca init")?;
        if !out.status.success() {
            anyhow::bail!(
                "latch ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(dir)
    }

    /// A `latch-probe` command that runs inside the pod (its netns and cgroup).
    pub fn probe_command(
        &self,
        pod: PodId,
        args: &[&str],
    ) -> anyhow::Result<std::process::Command> {
        let p = self.pod(pod);
        let mut cmd = std::process::Command::new(env::probe_bin()?);
        cmd.args(args);
        netns::enter(&mut cmd, &p.netns(), Some(&p.cgroup))?;
        Ok(cmd)
    }

    /// An echo server on `port` (IPv4 and IPv6) inside the pod's netns.
    pub fn echo_server(&self, pod: PodId, port: u16) -> anyhow::Result<EchoServer> {
        EchoServer::start(&self.pod(pod).netns(), port)
    }

    /// A server run inside the pod, in its netns and cgroup (`latch-probe serve`), answering
    /// each connection with what it read, `repeat` times over.
    pub fn pod_server(
        &self,
        pod: PodId,
        port: u16,
        repeat: usize,
    ) -> anyhow::Result<crate::server::PodServer> {
        self.probe_server(pod, port, &["--repeat", &repeat.to_string()])
    }

    /// [`Self::pod_server`] (answering once) whose handshakes complete only when the client's
    /// first data arrives (`latch-probe serve --defer-accept`), or after `secs`.
    pub fn pod_deferring_server(
        &self,
        pod: PodId,
        port: u16,
        secs: u32,
    ) -> anyhow::Result<crate::server::PodServer> {
        self.probe_server(pod, port, &["--defer-accept", &secs.to_string()])
    }

    /// [`Self::pod_server`] (answering once) whose listener, and so every socket it accepts,
    /// carries `SO_MARK` `mark` (`latch-probe serve --mark`).
    pub fn pod_marking_server(
        &self,
        pod: PodId,
        port: u16,
        mark: u32,
    ) -> anyhow::Result<crate::server::PodServer> {
        self.probe_server(pod, port, &["--mark", &mark.to_string()])
    }

    /// A server run inside the pod, in its netns and cgroup (`latch-probe serve --sink`),
    /// answering each connection with as many bytes as it read until the half-close, without
    /// keeping them (the benchmarks' server: its clients count what comes back).
    pub fn pod_sink_server(
        &self,
        pod: PodId,
        port: u16,
    ) -> anyhow::Result<crate::server::PodServer> {
        self.probe_server(pod, port, &["--sink"])
    }

    /// A server run inside the pod, in its netns and cgroup (`latch-probe serve --stream`),
    /// writing back what it reads as it reads it, a thread per connection.
    pub fn pod_stream_server(
        &self,
        pod: PodId,
        port: u16,
    ) -> anyhow::Result<crate::server::PodServer> {
        self.probe_server(pod, port, &["--stream"])
    }

    /// `latch-probe serve --port PORT` with `answer`'s options, started in the pod.
    fn probe_server(
        &self,
        pod: PodId,
        port: u16,
        answer: &[&str],
    ) -> anyhow::Result<crate::server::PodServer> {
        let port = port.to_string();
        let mut args = vec!["serve", "--port", &port];
        args.extend_from_slice(answer);
        let command = self.probe_command(pod, &args)?;
        crate::server::PodServer::start(command)
    }

    /// The node agent's debug socket.
    pub fn debug_socket(&self, node: NodeId) -> PathBuf {
        self.node(node).dir.join("debug.sock")
    }

    /// An HTTP server on `port` inside the pod's netns (see [`EchoServer::start_http`]).
    pub fn http_server(&self, pod: PodId, port: u16) -> anyhow::Result<EchoServer> {
        EchoServer::start_http(&self.pod(pod).netns(), port)
    }

    /// The cluster's own directory (removed at teardown), for files a test shares between
    /// nodes, such as policies.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection from `from` to `to` that stays open (`latch-probe pipe`): `first` is sent,
    /// then this waits until the agent of `admitting` logged its ALLOW decision for the
    /// destination.
    pub fn open_pipe(
        &mut self,
        from: PodId,
        to: SocketAddr,
        first: &[u8],
        admitting: NodeId,
    ) -> anyhow::Result<OpenPipe> {
        let mark = self.agent(admitting).mark();
        let pipe = self.start_pipe(from, to, first)?;
        let destination = format!("\"destination_address\":\"{to}\"");
        self.agent(admitting)
            .wait_for_line_after(mark, std::time::Duration::from_secs(20), |l| {
                // The decision, not an earlier connection's closing line.
                l.contains("\"event\":\"decision\"")
                    && l.contains("\"decision\":\"ALLOW\"")
                    && l.contains(&destination)
            })
            .context("the connection was not admitted")?;
        Ok(pipe)
    }

    /// A connection from `from` to `to` that stays open (`latch-probe pipe`), `first` sent;
    /// returns at once (for a connection no agent sees: the kernel's fast path).
    pub fn start_pipe(
        &self,
        from: PodId,
        to: SocketAddr,
        first: &[u8],
    ) -> anyhow::Result<OpenPipe> {
        use std::io::Write as _;
        let mut child = self
            .probe_command(from, &["pipe", "--to", &to.to_string()])?
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting latch-probe pipe")?;
        let mut stdin = child.stdin.take().context("probe stdin")?;
        stdin.write_all(first)?;
        stdin.flush()?;
        Ok(OpenPipe { child, stdin })
    }

    /// Where each of `nodes`' logs is now (to wait for something after it).
    pub fn marks(&mut self, nodes: &[NodeId]) -> Vec<usize> {
        nodes.iter().map(|n| self.agent(*n).mark()).collect()
    }

    /// Wait until each of `nodes`' agents logged `config reloaded` after its mark.
    pub fn wait_reloaded(&mut self, nodes: &[NodeId], marks: &[usize]) -> anyhow::Result<()> {
        for (node, mark) in nodes.iter().zip(marks) {
            self.agent(*node)
                .wait_for_line_after(*mark, std::time::Duration::from_secs(20), |l| {
                    l.contains("\"message\":\"config reloaded\"")
                })
                .with_context(|| format!("node {} did not reload", node.0 + 1))?;
        }
        Ok(())
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (NodeId(i), n))
    }

    fn teardown(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut agent) = node.agent.take() {
                agent.kill9();
            }
            if node.pin_dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&node.pin_dir)
            {
                eprintln!("cleanup: removing {}: {e}", node.pin_dir.display());
            }
        }
        kill_cgroup_tree(&self.cgroup_base);
        remove_cgroup_tree(&self.cgroup_base);
        for ns in self.created_netns.drain(..).rev() {
            if let Err(e) = netns::delete(&ns) {
                eprintln!("cleanup: {e:#}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: removing {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Pods in one `/24` of a node.
const POD_BLOCK: usize = 253;

/// The further `/24` blocks a node's pods may take after its own (block 0).
const OVERFLOW_BLOCKS: std::ops::RangeInclusive<usize> = 1..=7;

/// Most pods on one node: eight blocks of [`POD_BLOCK`].
pub const MAX_PODS_PER_NODE: usize = POD_BLOCK * 8;

/// The IPv4 address of the pod in `slot` (from 2) on node `node`: `10.244.node.slot` for the
/// first 253, then `10.244.(node + 32k).x` in the k-th further block (nodes 1 to 31 only, of a
/// cluster of at most 32 nodes, whose own blocks these would otherwise be).
pub fn pod_ipv4(node: usize, slot: usize) -> anyhow::Result<Ipv4Addr> {
    let (block, host) = ((slot - 2) / POD_BLOCK, (slot - 2) % POD_BLOCK + 2);
    if block > *OVERFLOW_BLOCKS.end() || (block > 0 && node > 31) || node > 255 {
        anyhow::bail!(
            "no address for pod {} on node {node}: at most {POD_BLOCK} pods per node, \
             {MAX_PODS_PER_NODE} on nodes 1 to 31",
            slot - 1
        );
    }
    Ok(Ipv4Addr::new(
        10,
        244,
        (node + 32 * block) as u8,
        host as u8,
    ))
}

/// A pod on its node's bridge: `/24` and `/64` on the shared link, the bridge (its block's
/// gateway) as its gateway.
fn connect_bridged_pod(
    pod_ns: &str,
    node: usize,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> anyhow::Result<()> {
    let block = ipv4.octets()[2];
    netns::ip(
        pod_ns,
        &["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"],
    )?;
    netns::ip(
        pod_ns,
        &["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"],
    )?;
    netns::ip(pod_ns, &["link", "set", "eth0", "up"])?;
    netns::ip(
        pod_ns,
        &[
            "route",
            "add",
            "default",
            "via",
            &format!("10.244.{block}.1"),
        ],
    )?;
    netns::ip(
        pod_ns,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:10:244:{node}::1"),
        ],
    )
}

/// A routed pod: `/32` and `/128` on its own veth; the node's side holds the gateways
/// (`10.244.i.1/32`, `fe80::1`) and routes the pod's addresses to it.
fn connect_routed_pod(
    node_ns: &str,
    host_if: &str,
    pod_ns: &str,
    node: usize,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> anyhow::Result<()> {
    let gateway4 = format!("10.244.{node}.1");
    netns::ip(
        node_ns,
        &["addr", "add", &format!("{gateway4}/32"), "dev", host_if],
    )?;
    netns::ip(
        node_ns,
        &["addr", "add", "fe80::1/64", "dev", host_if, "nodad"],
    )?;
    netns::ip(node_ns, &["link", "set", host_if, "up"])?;
    netns::ip(
        pod_ns,
        &["addr", "add", &format!("{ipv4}/32"), "dev", "eth0"],
    )?;
    netns::ip(
        pod_ns,
        &[
            "addr",
            "add",
            &format!("{ipv6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    netns::ip(pod_ns, &["link", "set", "eth0", "up"])?;
    netns::ip(
        pod_ns,
        &["route", "add", &gateway4, "dev", "eth0", "scope", "link"],
    )?;
    netns::ip(
        pod_ns,
        &["route", "add", "default", "via", &gateway4, "dev", "eth0"],
    )?;
    netns::ip(
        pod_ns,
        &[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ],
    )?;
    netns::ip(
        node_ns,
        &["route", "add", &format!("{ipv4}/32"), "dev", host_if],
    )?;
    netns::ip(
        node_ns,
        &["-6", "route", "add", &format!("{ipv6}/128"), "dev", host_if],
    )
}

/// SIGKILL every process in `cgroup` and below (`cgroup.kill` where the kernel has it).
pub(crate) fn kill_cgroup_tree(cgroup: &Path) {
    let kill = cgroup.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
        return;
    }
    if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                kill_cgroup_tree(&e.path());
            }
        }
    }
}

/// rmdir bottom-up; a cgroup with processes that are still exiting is retried briefly (the
/// kernel offers no event for "cgroup empty" that is simpler than this bounded retry).
pub(crate) fn remove_cgroup_tree(cgroup: &Path) {
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    eprintln!("cleanup: could not remove cgroup {}", cgroup.display());
}

/// A connection held open by [`Cluster::open_pipe`].
pub struct OpenPipe {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl OpenPipe {
    /// Send `rest`, half-close, and read what came back (the probe's JSON line).
    pub fn finish(mut self, rest: &[u8]) -> anyhow::Result<ProbeResult> {
        use std::io::Write as _;
        // The agent may have closed the connection: a failed write is part of the result.
        let _ = self.stdin.write_all(rest);
        drop(self.stdin);
        let out = self.child.wait_with_output().context("latch-probe pipe")?;
        serde_json::from_slice(&out.stdout).context("parsing latch-probe pipe output")
    }
}

/// Wait for kernel state that offers no notification (a map entry going away after a socket
/// closes): check `cond` until it holds or `timeout` passes. Returns whether it held.
pub fn eventually(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_beyond_a_nodes_first_block_take_its_further_blocks() {
        let ip = |node, slot| pod_ipv4(node, slot).map(|a| a.to_string()).ok();
        assert_eq!(ip(1, 2).as_deref(), Some("10.244.1.2"));
        assert_eq!(ip(2, 254).as_deref(), Some("10.244.2.254"));
        assert_eq!(ip(1, 255).as_deref(), Some("10.244.33.2"));
        assert_eq!(ip(1, 1001).as_deref(), Some("10.244.97.242"));
        assert_eq!(
            ip(31, MAX_PODS_PER_NODE + 1).as_deref(),
            Some("10.244.255.254")
        );
        assert_eq!(ip(1, MAX_PODS_PER_NODE + 2), None);
        assert_eq!(ip(32, 255), None);
    }
}
