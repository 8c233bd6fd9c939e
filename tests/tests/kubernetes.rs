//! Kubernetes mode end to end: two nodes (one per cgroup driver) whose agents run
//! `--kubernetes` against the test API server, pods made as kubelet makes them. The cluster's
//! objects drive enforcement: pods enrolled by Istio ambient's labels, policy objects added,
//! broken (the others stay in force) and removed, RequestAuthentications taken from the
//! cluster, a pod labelled out of the mesh and deleted,
//! an API outage while traffic flows, and the agent's role never exceeded.

use std::time::Duration;

use latch_tests::{
    AgentOptions, EchoServer, NodeId, PodId, PodSpec,
    agent::debug_json,
    eventually,
    kube_api::{
        Kind,
        fixtures::{self, Qos},
    },
    kube_cluster::{Driver, KubeCluster, Runtime},
};
use serde_json::{Value, json};

const PORT: u16 = 9000;
const WAIT: Duration = Duration::from_secs(30);

/// `latch debug ARGS --json` on the node's agent.
fn debug(k: &KubeCluster, node: NodeId, args: &[&str]) -> Value {
    debug_json(&k.cluster.debug_socket(node), args)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", log_tail(k, node)))
}

/// The `namespace/name` of the node agent's local workloads and of its peers.
fn workloads(k: &KubeCluster, node: NodeId) -> (Vec<String>, Vec<String>) {
    let all = debug(k, node, &["workloads"]);
    let mut local = Vec::new();
    let mut peers = Vec::new();
    for w in all.as_array().expect("a list") {
        let id = format!(
            "{}/{}",
            w["namespace"].as_str().unwrap_or(""),
            w["name"].as_str().unwrap_or("")
        );
        if w["local"] == json!(true) {
            local.push(id);
        } else {
            peers.push(id);
        }
    }
    (local, peers)
}

/// The end of the node agent's log, access lines left out.
fn log_tail(k: &KubeCluster, node: NodeId) -> String {
    let lines = k
        .cluster
        .node(node)
        .agent
        .as_ref()
        .map(|a| a.lines())
        .unwrap_or_default();
    let kept: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains("\"target\":\"access\"") || l.contains("\"event\":\"decision\""))
        .collect();
    let tail = kept[kept.len().saturating_sub(30)..]
        .iter()
        .map(|l| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    format!("--- node {} agent log ---\n{tail}", node.0 + 1)
}

/// The names of the policies in force on the node.
fn policies(k: &KubeCluster, node: NodeId) -> Vec<String> {
    debug(k, node, &["policies"])["policies"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// `prod` enrolled (Istio's namespace label), `prod/frontend` on node 1 and `prod/payment`
/// (`app: payment`, an echo server on [`PORT`]) on node 2, each node's cgroups in `drivers`'
/// layout; `before_agents` adds what else the test needs, then both agents start with `options`.
struct Mesh {
    k: KubeCluster,
    frontend: PodId,
    payment: PodId,
    _echo: EchoServer,
}

impl Mesh {
    fn start(
        drivers: [Driver; 2],
        qos: [Qos; 2],
        options: &AgentOptions,
        before_agents: impl FnOnce(&mut KubeCluster),
    ) -> Self {
        Self::start_on(
            drivers,
            [Runtime::Containerd; 2],
            qos,
            options,
            before_agents,
        )
    }

    /// [`Mesh::start`] with each node's container runtime.
    fn start_on(
        drivers: [Driver; 2],
        runtimes: [Runtime; 2],
        qos: [Qos; 2],
        options: &AgentOptions,
        before_agents: impl FnOnce(&mut KubeCluster),
    ) -> Self {
        let mut k = KubeCluster::new(&drivers).expect("cluster");
        for (node, runtime) in [N1, N2].into_iter().zip(runtimes) {
            k.set_runtime(node, runtime);
        }
        k.api
            .apply(&fixtures::namespace(
                "prod",
                &[("istio.io/dataplane-mode", "ambient")],
            ))
            .expect("namespace");
        let frontend = k
            .add_pod(
                N1,
                PodSpec::mesh("frontend", "prod", "frontend"),
                qos[0],
                &[],
            )
            .expect("frontend");
        let mut payment = PodSpec::mesh("payment", "prod", "payment");
        payment.labels = vec![("app".into(), "payment".into())];
        let payment = k.add_pod(N2, payment, qos[1], &[]).expect("payment");
        let echo = k.cluster.echo_server(payment, PORT).expect("echo server");
        before_agents(&mut k);
        for node in [N1, N2] {
            k.start_agent(node, options).expect("agent");
        }
        Self {
            k,
            frontend,
            payment,
            _echo: echo,
        }
    }

    /// Whether `payload` sent from frontend to payment comes back.
    fn echoes(&self, payload: &str) -> bool {
        let to = self.k.cluster.pod(self.payment).addr4(PORT);
        self.k
            .cluster
            .probe(self.frontend, to, Some(payload))
            .is_ok_and(|r| r.echo.as_deref() == Some(payload))
    }
}

const N1: NodeId = NodeId(0);
const N2: NodeId = NodeId(1);

#[test]
fn the_clusters_objects_drive_enforcement() {
    let mesh = Mesh::start(
        [Driver::Systemd, Driver::Cgroupfs],
        [Qos::Burstable, Qos::Guaranteed],
        &AgentOptions::strict(),
        |k| {
            k.api
                .apply(&fixtures::namespace("tools", &[]))
                .expect("namespace");
            // Not enrolled: neither it nor its namespace asks for the mesh.
            k.add_pod(
                N2,
                PodSpec::mesh("debugger", "tools", "default"),
                Qos::BestEffort,
                &[],
            )
            .expect("outsider");
        },
    );
    let (k, n1, n2, payment) = (&mesh.k, N1, N2, mesh.payment);

    // Enrolled from the labels, found in kubelet's cgroup layout (both drivers), peers across.
    assert_eq!(
        workloads(k, n1),
        (
            vec!["prod/frontend".to_owned()],
            vec!["prod/payment".to_owned()]
        )
    );
    assert_eq!(
        workloads(k, n2),
        (
            vec!["prod/payment".to_owned()],
            vec!["prod/frontend".to_owned()]
        )
    );
    let status = debug(k, n2, &["status"]);
    assert_eq!(status["source"]["ready"], json!(true), "{status}");
    assert_eq!(status["source"]["apiFailing"], json!(false), "{status}");

    assert!(
        mesh.echoes("first"),
        "frontend reaches payment over STRICT mTLS"
    );

    // A DENY object: enforced on the next connection.
    k.api
        .apply(&fixtures::authorization_policy(
            "prod",
            "deny-frontend",
            json!({
                "selector": {"matchLabels": {"app": "payment"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/frontend"]}}]}]
            }),
        ))
        .expect("policy");
    assert!(
        eventually(WAIT, || !mesh.echoes("second")),
        "the DENY object is enforced"
    );

    // A broken change to it and a broken new object: both refused and reported; the DENY's last
    // good version stays in force, and a good object sent after them is taken.
    k.api
        .apply(&fixtures::authorization_policy(
            "prod",
            "deny-frontend",
            json!({"selector": {"matchLabels": {"app": "payment"}}, "action": "DENY-ISH"}),
        ))
        .expect("policy");
    k.api
        .apply(&fixtures::authorization_policy(
            "prod",
            "broken",
            json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["eighty"]}}]}]}),
        ))
        .expect("policy");
    k.api
        .apply(&fixtures::authorization_policy(
            "prod",
            "audit-all",
            json!({"action": "AUDIT", "rules": [{}]}),
        ))
        .expect("policy");
    assert!(
        eventually(WAIT, || policies(k, n2).contains(&"audit-all".to_owned())),
        "the good object sent after the broken ones is in force"
    );
    let in_force = policies(k, n2);
    assert!(
        in_force.contains(&"deny-frontend".to_owned()),
        "{in_force:?}"
    );
    assert!(!in_force.contains(&"broken".to_owned()), "{in_force:?}");
    let refused = debug(k, n2, &["policies"])["refused"].clone();
    let refused: Vec<(String, bool, bool)> = refused
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["lastGoodKept"] == json!(true),
                r["deny"] == json!(true),
            )
        })
        .collect();
    assert_eq!(
        refused,
        vec![
            ("broken".to_owned(), false, false),
            ("deny-frontend".to_owned(), true, false)
        ]
    );
    assert!(
        !mesh.echoes("third"),
        "the DENY's last good version is enforced"
    );

    // Removing the DENY lets frontend through again.
    k.api
        .delete(Kind::AuthorizationPolicy, "prod", "deny-frontend")
        .expect("delete");
    assert!(
        eventually(WAIT, || mesh.echoes("fourth")),
        "allowed again once the DENY is gone\n{}\n{}",
        log_tail(k, n1),
        log_tail(k, n2)
    );

    // An API outage while traffic flows: the last known state stays enforced. A change made
    // meanwhile is missed, the history is compacted past it, and when the server answers again
    // the watches get 410 Gone, list anew and apply it: payment, labelled out of the mesh, is no
    // longer a workload of node 2 nor a peer of node 1.
    k.api.go_silent();
    assert!(
        mesh.echoes("fifth"),
        "enforcement goes on during the outage"
    );
    k.label_pod(payment, json!({"istio.io/dataplane-mode": "none"}))
        .expect("label");
    k.api.compact();
    k.api.resume();
    assert!(
        eventually(WAIT, || workloads(k, n2).0.is_empty()
            && workloads(k, n1).1.is_empty()),
        "payment left the mesh on both nodes: {:?} {:?}\n{}\n{}",
        workloads(k, n1),
        workloads(k, n2),
        log_tail(k, n1),
        log_tail(k, n2)
    );

    // Labelled back in: enrolled again, reached over mTLS again, at the first attempt (the
    // tunnel connection node 1 pooled to payment's old listener was told GOAWAY when payment
    // left, so it is not used for the new one). `latch debug reload` answers once every reload
    // before it is done, so both nodes have committed what they show.
    k.label_pod(payment, json!({"istio.io/dataplane-mode": null}))
        .expect("label");
    assert!(
        eventually(WAIT, || workloads(k, n2).0 == ["prod/payment"]
            && workloads(k, n1).1 == ["prod/payment"]),
        "payment is back in the mesh on both nodes"
    );
    for node in [n1, n2] {
        assert_eq!(debug(k, node, &["reload"])["ok"], json!(true));
    }
    assert!(
        mesh.echoes("sixth"),
        "frontend reaches payment again at once\n{}\n{}",
        log_tail(k, n1),
        log_tail(k, n2)
    );

    // An outage the agents see (the server answers 503): reported in `latch debug status`,
    // enforcement unchanged, cleared once the watches are back.
    let api_failing = |node: NodeId| debug(k, node, &["status"])["source"]["apiFailing"].clone();
    k.api.go_unavailable();
    assert!(
        eventually(WAIT, || api_failing(n1) == json!(true)
            && api_failing(n2) == json!(true)),
        "the outage is reported: {}\n{}\n{}",
        debug(k, n1, &["status"])["source"],
        debug(k, n2, &["status"])["source"],
        log_tail(k, n1)
    );
    let (ok, table) = latch_tests::agent::debug(&k.cluster.debug_socket(n1), &["status"])
        .expect("latch debug status");
    assert!(ok && table.contains("API FAILING"), "{table}");
    assert!(
        mesh.echoes("seventh"),
        "enforcement goes on while the API server fails"
    );
    k.api.resume();
    assert!(
        eventually(WAIT, || api_failing(n1) == json!(false)
            && api_failing(n2) == json!(false)),
        "the agents are back on the API server: {}\n{}",
        debug(k, n1, &["status"])["source"],
        debug(k, n2, &["status"])["source"]
    );

    // Deleted: frontend leaves node 1's agent.
    k.api.delete(Kind::Pod, "prod", "frontend").expect("delete");
    assert!(
        eventually(WAIT, || workloads(k, n1).0.is_empty()),
        "a deleted pod is no longer served: {:?}\n{}",
        workloads(k, n1),
        log_tail(k, n1)
    );

    let denied = k.api.denied();
    assert!(
        denied.is_empty(),
        "the agents asked for more than their role: {denied:?}"
    );
}

/// An agent killed while the cluster changes: its kernel verdicts outlive it, and at start-up
/// (after the first full list) it revokes the pairs that changed while it was down.
#[test]
fn request_authentications_come_from_the_cluster() {
    let mesh = Mesh::start(
        [Driver::Cgroupfs, Driver::Systemd],
        [Qos::Burstable, Qos::Burstable],
        &AgentOptions::default(),
        |_| {},
    );
    let (k, n2) = (&mesh.k, N2);
    let key = latch_tests::jwks::SigningKey::generate("k1").expect("key");
    k.api
        .apply(&fixtures::request_authentication(
            "prod",
            "jwt",
            json!({
                "selector": {"matchLabels": {"app": "payment"}},
                "jwtRules": [{"issuer": "https://issuer.test", "jwks": latch_tests::jwks::document(&[&key])}]
            }),
        ))
        .expect("request authentication");
    k.api
        .apply(&fixtures::request_authentication(
            "prod",
            "no-issuer",
            json!({"jwtRules": [{"jwksUri": "https://issuer.test/jwks"}]}),
        ))
        .expect("request authentication");
    let in_force = |k: &KubeCluster| {
        debug(k, n2, &["policies"])["policies"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|p| p["kind"] == json!("RequestAuthentication"))
            .map(|p| p["name"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(WAIT, || in_force(k) == ["jwt"]),
        "the RequestAuthentication is in force: {:?}\n{}",
        in_force(k),
        log_tail(k, n2)
    );
    assert!(
        eventually(WAIT, || {
            debug(k, n2, &["policies"])["refused"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["name"] == json!("no-issuer")))
        }),
        "the RequestAuthentication without an issuer is refused and reported"
    );
    k.api
        .delete(Kind::RequestAuthentication, "prod", "jwt")
        .expect("delete");
    assert!(
        eventually(WAIT, || in_force(k).is_empty()),
        "a deleted RequestAuthentication is no longer in force"
    );
}

#[test]
fn a_restarted_agent_revokes_what_changed_while_it_was_down() {
    // PERMISSIVE fast path: an allowed pair is cached in the kernel on both nodes.
    let mut mesh = Mesh::start(
        [Driver::Systemd, Driver::Systemd],
        [Qos::BestEffort, Qos::Burstable],
        &AgentOptions::default(),
        |_| {},
    );
    let frontend_id = "spiffe://cluster.local/ns/prod/sa/frontend";
    let cached_allow = |k: &KubeCluster| {
        debug(k, N1, &["verdicts"])["verdicts"]
            .as_array()
            .expect("a list")
            .iter()
            .any(|v| v["source"] == json!(frontend_id) && v["decision"] == json!("allow"))
    };
    assert!(mesh.echoes("first"), "allowed");
    assert!(
        eventually(WAIT, || cached_allow(&mesh.k)),
        "node 1 caches the allowed pair"
    );

    mesh.k.agent(N1).kill9();
    mesh.k
        .api
        .apply(&fixtures::authorization_policy(
            "prod",
            "deny-all",
            json!({"action": "DENY", "rules": [{}]}),
        ))
        .expect("policy");
    assert!(
        eventually(WAIT, || policies(&mesh.k, N2)
            .contains(&"deny-all".to_owned())),
        "node 2 applied the DENY"
    );
    assert!(
        cached_allow_pinned(&mesh.k),
        "node 1's cached allow outlived its agent"
    );
    mesh.k.agent(N1).restart().expect("restart");
    assert!(
        !cached_allow(&mesh.k),
        "node 1 revoked at start-up what the cluster no longer allows"
    );
    assert!(!mesh.echoes("second"), "denied");
}

/// Whether node 1's pinned verdict map still holds an entry (read without its agent).
fn cached_allow_pinned(k: &KubeCluster) -> bool {
    let pin_dir = &k.cluster.node(N1).pin_dir;
    latch::datapath::KernelMaps::open_pinned(pin_dir)
        .and_then(|maps| maps.verdicts())
        .is_ok_and(|verdicts| !verdicts.is_empty())
}

/// `latch.dev/dataplane-mode: tunnel` on one pod of a `fastpath` node: every connection to it
/// is tunneled and nothing of its pairs is cached, on either node; without the label, its pairs
/// take the fast path again.
#[test]
fn a_pods_dataplane_mode_label_keeps_its_pairs_off_the_fast_path() {
    let mesh = Mesh::start(
        [Driver::Cgroupfs, Driver::Systemd],
        [Qos::Guaranteed, Qos::BestEffort],
        &AgentOptions::default(),
        |_| {},
    );
    let k = &mesh.k;
    let cached = |node: NodeId| debug(k, node, &["verdicts"])["total"].as_u64().unwrap_or(0);
    k.label_pod(mesh.payment, json!({"latch.dev/dataplane-mode": "tunnel"}))
        .expect("label");
    for node in [N1, N2] {
        assert!(
            eventually(WAIT, || debug(k, node, &["workloads"])
                .as_array()
                .is_some_and(|all| all
                    .iter()
                    .any(|w| w["name"] == json!("payment")))),
            "payment is known"
        );
        // Answers once every reload before it is done: the label is in force.
        assert_eq!(debug(k, node, &["reload"])["ok"], json!(true));
    }
    // The label's reload may still come after the one `reload` waited for (its watch event can
    // arrive later): wait for the state where connections flow and nothing is cached.
    for payload in ["first", "second", "third"] {
        assert!(
            eventually(WAIT, || mesh.echoes(payload)
                && cached(N1) == 0
                && cached(N2) == 0),
            "{payload}: connections flow and nothing of a tunnel pod's pairs is cached ({} {})",
            cached(N1),
            cached(N2)
        );
    }

    k.label_pod(mesh.payment, json!({"latch.dev/dataplane-mode": null}))
        .expect("label");
    for node in [N1, N2] {
        assert_eq!(debug(k, node, &["reload"])["ok"], json!(true));
    }
    assert!(
        eventually(WAIT, || mesh.echoes("again")
            && cached(N1) > 0
            && cached(N2) > 0),
        "without the label the pair is cached again: {} {}",
        cached(N1),
        cached(N2)
    );
}

/// A pod whose address changes (its status and its interface): the agents serve it at the new
/// address, found again in the same namespace, and its peers reach it there over mTLS.
#[test]
fn a_pod_given_a_new_address_is_served_at_it() {
    let mesh = Mesh::start(
        [Driver::Systemd, Driver::Cgroupfs],
        [Qos::Burstable, Qos::Burstable],
        &AgentOptions::strict(),
        |_| {},
    );
    let k = &mesh.k;
    assert!(mesh.echoes("before"), "reached at its first address");
    let pod = k.cluster.pod(mesh.payment);
    let (old, new) = (pod.ipv4, std::net::Ipv4Addr::new(10, 244, 2, 50));
    // The new address becomes the interface's primary one when the old goes (without this,
    // deleting a primary address deletes the secondaries of its subnet with it).
    latch_tests::netns::sysctl(&pod.netns(), "net/ipv4/conf/eth0/promote_secondaries", "1")
        .expect("sysctl");
    latch_tests::netns::ip(
        &pod.netns_name,
        &["addr", "add", &format!("{new}/24"), "dev", "eth0"],
    )
    .expect("the new address");
    latch_tests::netns::ip(
        &pod.netns_name,
        &["addr", "del", &format!("{old}/24"), "dev", "eth0"],
    )
    .expect("the old address goes");
    k.api
        .modify::<k8s_openapi::api::core::v1::Pod>("prod", "payment", |p| {
            if let Some(status) = p.status.as_mut() {
                status.pod_ip = Some(new.to_string());
                status.pod_ips = Some(vec![
                    k8s_openapi::api::core::v1::PodIP {
                        ip: new.to_string(),
                    },
                    k8s_openapi::api::core::v1::PodIP {
                        ip: pod.ipv6.to_string(),
                    },
                ]);
            }
        })
        .expect("status");
    let has_new = |node: NodeId| {
        debug(k, node, &["workloads"])
            .as_array()
            .is_some_and(|all| {
                all.iter().any(|w| {
                    w["name"] == json!("payment")
                        && w["ips"]
                            .as_array()
                            .is_some_and(|ips| ips.contains(&json!(new.to_string())))
                })
            })
    };
    assert!(
        eventually(WAIT, || has_new(N1) && has_new(N2)),
        "both nodes know the new address\n{}",
        log_tail(k, N2)
    );
    for node in [N1, N2] {
        assert_eq!(debug(k, node, &["reload"])["ok"], json!(true));
    }
    let to = std::net::SocketAddr::new(new.into(), PORT);
    let r = k
        .cluster
        .probe(mesh.frontend, to, Some("after"))
        .expect("probe");
    assert_eq!(
        r.echo.as_deref(),
        Some("after"),
        "reached at its new address: {r:?}\n{}\n{}",
        log_tail(k, N1),
        log_tail(k, N2)
    );
    let node2 = k.cluster.node(N2).agent.as_ref().expect("node 2's agent");
    let destination = format!("\"destination_address\":\"{new}:{PORT}\"");
    node2
        .wait_for_line_after(0, WAIT, |l| {
            l.contains("\"decision\":\"ALLOW\"")
                && l.contains(&destination)
                && l.contains("\"encrypted\":true")
        })
        .expect("over the tunnel, decided by node 2's agent");
}

/// Pods of CRI-O (its `crio-conmon` monitors beside the containers, on the node's network) and
/// cri-dockerd are found under either driver, and a restarted container (a new cgroup below
/// the same pod cgroup, the same network namespace) stays enforced: under STRICT, a connection
/// from it reaches its peer only if it is captured and carried over mTLS.
#[test]
fn other_runtimes_and_restarted_containers_stay_enforced() {
    let mut mesh = Mesh::start_on(
        [Driver::Systemd, Driver::Cgroupfs],
        [Runtime::CriO, Runtime::CriDockerd],
        [Qos::Burstable, Qos::Guaranteed],
        &AgentOptions::strict(),
        |_| {},
    );
    assert!(
        mesh.echoes("before"),
        "CRI-O and cri-dockerd pods are served"
    );

    let new = mesh.k.restart_container(mesh.frontend).expect("restart");
    assert!(new.to_string_lossy().contains("crio-"), "{}", new.display());
    assert!(
        mesh.echoes("after a restart"),
        "the restarted container's connections are captured and carried over mTLS"
    );
    mesh.k.restart_container(mesh.payment).expect("restart");
    assert!(mesh.echoes("after the peer's restart"));
    assert_eq!(
        workloads(&mesh.k, N1),
        (
            vec!["prod/frontend".to_owned()],
            vec!["prod/payment".to_owned()]
        ),
        "nothing was re-enrolled"
    );
}
