//! The agent's life cycle around the kernel state: a `kill -9` leaves enforcement in place (fast
//! path works, connections that need the agent fail at once), a restarted agent adopts the pins
//! without attaching anything twice and keeps the cache, `--uninstall` removes everything, and
//! the redirect bookkeeping maps do not leak. An agent started over the pins of another build
//! replaces the maps laid out differently and adopts the rest.

use std::time::Duration;

use latch::{
    datapath::{
        KernelMaps,
        install::{programs_on_cgroup, programs_on_netns},
        layout,
        syscall::{self, AttachType, map_type},
    },
    identity::IdentityKey,
};
use latch_common::{Counter, DIRECTION_OUTBOUND, VerdictKey, map_names};
use latch_tests::{AgentOptions, Cluster, NodeId, PodId, PodSpec, TwoNodes, eventually};

const PORT: u16 = 7070;

fn setup() -> (Cluster, NodeId, PodId, PodId) {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let other = cluster
        .add_pod(n2, PodSpec::mesh("ledger", "prod", "ledger"))
        .expect("pod");
    assert_eq!(other, PodId(2));
    for node in [n1, n2] {
        cluster
            .start_agent(node, AgentOptions::default())
            .expect("agent");
    }
    (cluster, n1, client, server)
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("maps")
}

const HOOKS: [AttachType; 5] = [
    AttachType::Connect4,
    AttachType::Connect6,
    AttachType::Getpeername4,
    AttachType::Getpeername6,
    AttachType::SockOps,
];

fn attached_counts(cluster: &Cluster, node: NodeId) -> Vec<usize> {
    let root = &cluster.node(node).cgroup_root;
    HOOKS
        .iter()
        .map(|&hook| programs_on_cgroup(root, hook).expect("query").len())
        .collect()
}

#[test]
fn kill_9_keeps_enforcing_and_a_restart_adopts_the_pins() {
    let (mut cluster, n1, client, server) = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let _other = cluster.echo_server(PodId(2), PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    assert!(cluster.probe(client, to, Some("warm")).expect("probe").ok);
    assert_eq!(attached_counts(&cluster, n1), vec![1; 5]);
    let verdicts_before = maps(&cluster, n1).verdicts().expect("verdicts");
    assert_eq!(verdicts_before.len(), 1);

    cluster.agent(n1).kill9();

    // The cached pair keeps working through the kernel alone.
    let fast = maps(&cluster, n1)
        .counter(Counter::FastpathAllowed)
        .expect("counter");
    let r = cluster.probe(client, to, Some("still")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("still"), "{r:?}");
    assert_eq!(
        maps(&cluster, n1)
            .counter(Counter::FastpathAllowed)
            .expect("counter"),
        fast + 1
    );
    // A pair that needs the agent is refused at once (ECONNREFUSED, where a hang would be the
    // probe's timeout): fail closed.
    let r = cluster
        .probe(client, cluster.pod(PodId(2)).addr4(PORT), Some("new"))
        .expect("probe");
    assert!(!r.ok && r.refused(), "{r:?}");

    // Restart: pins adopted, nothing attached twice, the cache is still there.
    cluster.agent(n1).restart().expect("restart");
    let adopted = cluster
        .agent(n1)
        .lines()
        .iter()
        .filter(|l| l.contains("\"adopted\":true"))
        .count();
    assert_eq!(
        adopted,
        5,
        "every cgroup program must be adopted:\n{}",
        cluster.agent(n1).log_tail(20)
    );
    assert_eq!(
        attached_counts(&cluster, n1),
        vec![1; 5],
        "no program may be attached twice"
    );
    let pod_netns = cluster.pod(client).netns();
    assert_eq!(
        programs_on_netns(&pod_netns).expect("query").len(),
        1,
        "one inbound check per pod"
    );
    assert_eq!(
        maps(&cluster, n1).verdicts().expect("verdicts"),
        verdicts_before,
        "the cache survives"
    );
    let r = cluster
        .probe(client, cluster.pod(PodId(2)).addr4(PORT), Some("back"))
        .expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("back"), "{r:?}");

    // SIGTERM also leaves everything pinned; --uninstall removes it.
    let status = cluster.agent(n1).terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
    assert_eq!(attached_counts(&cluster, n1), vec![1; 5]);
    cluster.agent(n1).uninstall().expect("uninstall");
    assert_eq!(
        attached_counts(&cluster, n1),
        vec![0; 5],
        "uninstall detaches everything"
    );
    assert!(programs_on_netns(&pod_netns).expect("query").is_empty());
    assert!(
        !cluster.node(n1).pin_dir.exists(),
        "uninstall removes the pins"
    );
    let r = cluster
        .probe(client, cluster.pod(PodId(2)).addr4(PORT), Some("plain"))
        .expect("probe");
    assert!(
        r.ok && r.echo.as_deref() == Some("plain"),
        "uninstalled: traffic flows untouched: {r:?}"
    );
}

#[test]
fn redirect_bookkeeping_is_removed_when_sockets_close() {
    let (cluster, n1, client, server) = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let _other = cluster.echo_server(PodId(2), PORT).expect("echo");
    for pod in [server, PodId(2)] {
        for addr in [cluster.pod(pod).addr4(PORT), cluster.pod(pod).addr6(PORT)] {
            // Every first connection of a pair per family is redirected; expire the cache in
            // between by flushing it so each goes through the agent.
            maps(&cluster, n1)
                .remove_verdicts_where(|_, _| true)
                .expect("flush");
            let r = cluster.probe(client, addr, Some("x")).expect("probe");
            assert!(r.ok && r.echo.as_deref() == Some("x"), "{r:?}");
        }
    }
    assert_eq!(
        maps(&cluster, n1)
            .counter(Counter::Redirected)
            .expect("counter"),
        4
    );
    assert!(
        eventually(Duration::from_secs(10), || maps(&cluster, n1)
            .redirect_entries()
            .expect("entries")
            == (0, 0)),
        "redirect entries left behind: {:?}",
        maps(&cluster, n1).redirect_entries()
    );
}

#[test]
fn the_verdict_map_holds_a_million_entries() {
    let (cluster, n1, client, server) = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    assert!(cluster.probe(client, to, Some("warm")).expect("probe").ok);
    let mut m = maps(&cluster, n1);
    let value = m.verdicts().expect("verdicts")[0].value;
    for i in 0..1_000_000u64 {
        let id = |n: u64| {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            latch_common::Identity::new(bytes)
        };
        let key =
            latch_common::VerdictKey::new(id(i + 1_000_000), id(i), (i % 60_000) as u16 + 1, 0);
        m.insert_verdict(key, value).expect("insert");
    }
    // Everything is still there (LRU has not evicted: the map is larger than a million).
    let all = m.verdicts().expect("verdicts");
    assert_eq!(all.len(), 1_000_001);
    // The real pair, inserted first, still takes the fast path among a million others.
    let fast = m.counter(Counter::FastpathAllowed).expect("counter");
    let r = cluster.probe(client, to, Some("needle")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("needle"), "{r:?}");
    assert_eq!(
        m.counter(Counter::FastpathAllowed).expect("counter"),
        fast + 1
    );

    // The debug API pages through all of them, and finds the real pair among them.
    let socket = cluster.debug_socket(n1);
    let debug_json = |socket: &std::path::Path, args: &[&str]| {
        latch_tests::agent::debug_json(socket, args).expect("latch debug")
    };
    let page = debug_json(
        &socket,
        &["verdicts", "--offset", "999995", "--limit", "10"],
    );
    assert_eq!(page["total"], 1_000_001, "{page}");
    assert_eq!(page["verdicts"].as_array().map(Vec::len), Some(6), "{page}");
    let frontend = cluster.pod(client).spiffe_id("cluster.local");
    let page = debug_json(&socket, &["verdicts", "--identity", &frontend]);
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["verdicts"][0]["port"], PORT, "{page}");
}

/// An upgraded agent starts over the pins an earlier build left: the maps whose layout differs
/// from this build's (the 8-byte identities of earlier builds in the verdict key and in the
/// workload and endpoint values; a deliveries map of another type with the right sizes) are
/// replaced, never adopted, and the others are adopted. The new agent then judges a connection,
/// caches it under 128-bit identity keys, and the programs serve the repeat from the new map.
#[test]
fn maps_pinned_with_another_layout_are_replaced_and_the_others_adopted() {
    let (mut cluster, n1, client, server) = setup();
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let status = cluster.agent(n1).terminate().expect("terminate");
    assert!(status.success(), "{status:?}");

    let maps_dir = cluster.node(n1).pin_dir.join("maps");
    let expected = layout::expected().expect("layouts");
    let pinned = |name: &str| {
        layout::pinned(&maps_dir.join(name))
            .expect("reading the pin")
            .unwrap_or_else(|| panic!("{name} is not pinned"))
    };
    let deliveries = expected[map_names::DELIVERIES];
    assert_eq!(deliveries.map_type, map_type::LRU_HASH);
    let foreign = [
        (map_names::VERDICTS, map_type::LRU_HASH, 24, 16),
        (map_names::WORKLOADS, map_type::HASH, 8, 16),
        (map_names::ENDPOINTS, map_type::HASH, 16, 16),
        (
            map_names::DELIVERIES,
            map_type::HASH,
            deliveries.key_size,
            deliveries.value_size,
        ),
    ];
    let mut planted = Vec::new();
    for (name, kind, key_size, value_size) in foreign {
        let path = maps_dir.join(name);
        std::fs::remove_file(&path).expect("unpinning");
        let map = syscall::map_create(kind, key_size, value_size, expected[name].max_entries)
            .expect("creating a map of another layout");
        syscall::obj_pin(&map, &path).expect("pinning it");
        let old = pinned(name);
        assert_ne!(old.layout, expected[name], "{name}");
        planted.push((name, old.id));
    }
    let kept: Vec<(&str, u32)> = map_names::ALL
        .into_iter()
        .filter(|name| !planted.iter().any(|(p, _)| p == name))
        .map(|name| (name, pinned(name).id))
        .collect();
    assert_eq!(kept.len(), map_names::ALL.len() - planted.len());

    cluster
        .agent(n1)
        .restart()
        .expect("the agent starts over foreign pins");
    for (name, old_id) in &planted {
        let now = pinned(name);
        assert_ne!(now.id, *old_id, "{name} was adopted");
        assert_eq!(now.layout, expected[name], "{name}");
    }
    for (name, id) in &kept {
        assert_eq!(pinned(name).id, *id, "{name} was not adopted");
    }

    let to = cluster.pod(server).addr4(PORT);
    let counter = |c: Counter| maps(&cluster, n1).counter(c).expect("counter");
    let redirected = counter(Counter::Redirected);
    let r = cluster.probe(client, to, Some("judged")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("judged"), "{r:?}");
    assert_eq!(counter(Counter::Redirected), redirected + 1);
    let id = |p: PodId| IdentityKey::of(&cluster.pod(p).spiffe_id("cluster.local")).0;
    let key = VerdictKey::new(id(client), id(server), PORT, DIRECTION_OUTBOUND);
    let cached = maps(&cluster, n1).verdicts().expect("verdicts");
    assert!(
        cached.iter().any(|v| v.key == key && v.is_allow()),
        "{cached:?}"
    );
    let fast = counter(Counter::FastpathAllowed);
    let r = cluster.probe(client, to, Some("cached")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("cached"), "{r:?}");
    assert_eq!(counter(Counter::FastpathAllowed), fast + 1);
}
