//! Source-address spoofing against the kernel fast path, on two netns nodes with real agents.
//!
//! The inbound check on node 2 admits a SYN by the identity of its source address when a fresh
//! inbound allow is cached for that identity. Another pod on node 1 that sends with frontend's
//! address must therefore get nowhere: its packets are dropped on node 1 (node 2 admits nothing),
//! whether it is enrolled or not, on a bridge or on a routed veth. On a shared bridge it must not
//! take frontend's traffic either, by announcing frontend's addresses (gratuitous ARP, unsolicited
//! neighbour advertisements, needing only `CAP_NET_RAW`), the gateway's, or frontend's MAC.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use latch::datapath::{
    KernelMaps, antispoof::read_binding, install::programs_on_interface, maps::ip_key,
};
use latch_common::{Counter, DIRECTION_INBOUND, InterfaceInfo, SourceBinding, VerdictKey};
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, PodSpec, Topology, TwoNodes, eventually, l2, netns, probe,
};

const PORT: u16 = 8080;
/// How long a spoofed connection waits for an answer that never comes. A bound on the wait,
/// not a threshold: a slow machine refuses the connection all the same.
const GIVE_UP: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attacker {
    /// A pod the node's agent does not know (its interface appears after the agent started).
    Unenrolled,
    /// Another enrolled pod of node 1 (`prod/mallory`).
    Enrolled,
}

struct Scene {
    cluster: Cluster,
    n1: NodeId,
    n2: NodeId,
    frontend: PodId,
    payment: PodId,
    attacker: PodId,
    _echo: latch_tests::EchoServer,
}

fn maps(cluster: &Cluster, node: NodeId) -> KernelMaps {
    KernelMaps::open_pinned(&cluster.node(node).pin_dir).expect("pinned maps")
}

fn counter(cluster: &Cluster, node: NodeId, counter: Counter) -> u64 {
    maps(cluster, node).counter(counter).expect("counters")
}

/// The anti-spoofing drops, by the counter's name (0 on an agent that has no such counter).
fn spoof_drops(cluster: &Cluster, node: NodeId) -> u64 {
    maps(cluster, node)
        .counters()
        .expect("counters")
        .iter()
        .find(|(c, _)| c.name() == "spoof_dropped")
        .map_or(0, |(_, v)| *v)
}

/// frontend on node 1, payment on node 2 (with an echo server), agents on both, `mallory` on
/// node 1, and frontend's first connections to payment (IPv4 and IPv6) made, so that node 2 has
/// an inbound allow cached for (frontend, payment, port).
fn scene(topology: Topology, attacker: Attacker) -> Scene {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client: frontend,
        server: payment,
    } = Cluster::frontend_payment_in(topology).expect("cluster");
    let enrolled = (attacker == Attacker::Enrolled).then(|| {
        cluster
            .add_pod(n1, PodSpec::mesh("mallory", "prod", "mallory"))
            .expect("pod")
    });
    for node in [n1, n2] {
        cluster
            .start_agent(node, AgentOptions::default())
            .expect("agent");
    }
    let attacker = match enrolled {
        Some(pod) => pod,
        None => {
            let mark = cluster.agent(n1).mark();
            let pod = cluster
                .add_pod(n1, PodSpec::external("mallory"))
                .expect("pod");
            let host_if = format!("\\\"{}\\\"", cluster.pod(pod).host_if);
            cluster
                .agent(n1)
                .wait_for_line_after(mark, WAIT, |l| {
                    l.contains("anti-spoofing check on interfaces") && l.contains(&host_if)
                })
                .expect("the agent guards the new pod's interface");
            pod
        }
    };
    let echo = cluster.echo_server(payment, PORT).expect("echo server");
    for to in [
        cluster.pod(payment).addr4(PORT),
        cluster.pod(payment).addr6(PORT),
    ] {
        let r = cluster.probe(frontend, to, Some("hello")).expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some("hello"), "{r:?}");
    }
    let id =
        |p: PodId| latch::identity::IdentityKey::of(&cluster.pod(p).spiffe_id("cluster.local")).0;
    let key = VerdictKey::new(id(frontend), id(payment), PORT, DIRECTION_INBOUND);
    assert!(
        maps(&cluster, n2)
            .verdict(&key)
            .expect("verdict")
            .is_some_and(|v| v.is_allow()),
        "node 2 caches the inbound allow the attack would ride"
    );
    Scene {
        cluster,
        n1,
        n2,
        frontend,
        payment,
        attacker,
        _echo: echo,
    }
}

/// The attacker's gateway for `ip`'s family and the MAC behind it, as a permanent neighbour
/// entry in the attacker's namespace: its packets then leave at once, with no neighbour
/// discovery that would carry the spoofed address first.
fn pin_gateway(scene: &Scene, v6: bool) {
    let c = &scene.cluster;
    let attacker = c.pod(scene.attacker);
    let node = c.node(scene.n1);
    let (gateway, gateway_if) = match (node.topology, v6) {
        (Topology::Bridged, false) => (format!("10.244.{}.1", node.index), "br0"),
        (Topology::Bridged, true) => (format!("fd00:10:244:{}::1", node.index), "br0"),
        (Topology::Routed, false) => (
            format!("10.244.{}.1", node.index),
            attacker.host_if.as_str(),
        ),
        (Topology::Routed, true) => ("fe80::1".to_owned(), attacker.host_if.as_str()),
    };
    let mac = l2::show(Some(l2::mac(&node.netns_name, gateway_if).expect("mac")));
    netns::ip(
        &attacker.netns_name,
        &[
            "neigh",
            "replace",
            &gateway,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .expect("neighbour entry");
}

/// The attacker takes `stolen` (the address of `victim`, with its prefix length) on its
/// interface and connects to `to` from it, from outside every cgroup (no connect hook redirects
/// it): the connection fails, `admitting` (the destination's node) admits nothing by the
/// victim's cached verdict, and node 1 has dropped the spoofed packets.
fn steal_and_connect(
    scene: &Scene,
    (stolen, prefix, victim): (IpAddr, &str, &str),
    to: SocketAddr,
    admitting: NodeId,
) {
    let c = &scene.cluster;
    let attacker = c.pod(scene.attacker);
    netns::ip(
        &attacker.netns_name,
        &[
            "addr",
            "add",
            &format!("{stolen}/{prefix}"),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap_or_else(|e| panic!("taking {victim}'s address: {e:#}"));
    let admitted = counter(c, admitting, Counter::InboundAdmitted);
    let drops = spoof_drops(c, scene.n1);
    let r = probe::connect_from(&attacker.netns(), None, stolen, to, GIVE_UP).expect("probe");
    assert!(
        !r.ok,
        "a connection from {victim}'s address by another pod: {r:?}"
    );
    assert_eq!(
        counter(c, admitting, Counter::InboundAdmitted),
        admitted,
        "a spoofed SYN was admitted by {victim}'s cached verdict"
    );
    assert!(
        spoof_drops(c, scene.n1) > drops,
        "node 1 must drop the spoofed packets"
    );
}

/// The attacker puts frontend's address of one family on its interface and connects to payment
/// from it, from outside every cgroup (so no connect hook redirects it): node 2 must admit
/// nothing, node 1 must have dropped it, and frontend's own connection still takes the fast path.
fn spoofed_connection_is_refused(scene: &Scene, v6: bool) {
    let c = &scene.cluster;
    let frontend = c.pod(scene.frontend);
    let (stolen, to, prefix): (IpAddr, SocketAddr, &str) = if v6 {
        (
            frontend.ipv6.into(),
            c.pod(scene.payment).addr6(PORT),
            "128",
        )
    } else {
        (frontend.ipv4.into(), c.pod(scene.payment).addr4(PORT), "32")
    };
    pin_gateway(scene, v6);
    steal_and_connect(scene, (stolen, prefix, "frontend"), to, scene.n2);

    // frontend itself is unaffected (the attacker still holds the address).
    let fast = counter(c, scene.n1, Counter::FastpathAllowed);
    let admitted = counter(c, scene.n2, Counter::InboundAdmitted);
    let r = c.probe(scene.frontend, to, Some("mine")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("mine"), "{r:?}");
    assert_eq!(counter(c, scene.n1, Counter::FastpathAllowed), fast + 1);
    assert_eq!(counter(c, scene.n2, Counter::InboundAdmitted), admitted + 1);
}

#[test]
fn an_unenrolled_pod_cannot_ride_frontends_verdict_ipv4() {
    let scene = scene(Topology::Bridged, Attacker::Unenrolled);
    spoofed_connection_is_refused(&scene, false);
}

#[test]
fn an_unenrolled_pod_cannot_ride_frontends_verdict_ipv6() {
    let scene = scene(Topology::Bridged, Attacker::Unenrolled);
    spoofed_connection_is_refused(&scene, true);
}

#[test]
fn an_enrolled_pod_cannot_ride_frontends_verdict() {
    let scene = scene(Topology::Bridged, Attacker::Enrolled);
    spoofed_connection_is_refused(&scene, false);
    spoofed_connection_is_refused(&scene, true);
}

#[test]
fn a_routed_pod_cannot_ride_frontends_verdict() {
    for attacker in [Attacker::Unenrolled, Attacker::Enrolled] {
        let scene = scene(Topology::Routed, attacker);
        spoofed_connection_is_refused(&scene, false);
        spoofed_connection_is_refused(&scene, true);
    }
}

/// The other way round: the attacker on node 1 takes payment's address (a pod on node 2) and
/// connects to frontend, which has payment's verdict cached on node 1. Node 1 must drop it (the
/// route back to payment does not leave through the attacker's interface) and admit nothing.
fn remote_address_is_refused(scene: &Scene, v6: bool) {
    let c = &scene.cluster;
    let frontend = c.pod(scene.frontend);
    let payment = c.pod(scene.payment);
    let attacker = c.pod(scene.attacker);
    let (stolen, to, prefix): (IpAddr, SocketAddr, &str) = if v6 {
        (payment.ipv6.into(), frontend.addr6(PORT), "128")
    } else {
        (payment.ipv4.into(), frontend.addr4(PORT), "32")
    };
    // The next hop towards frontend, resolved ahead (so that no neighbour discovery carries
    // payment's address first): frontend itself on a bridge, the gateway on a routed node.
    match c.node(scene.n1).topology {
        Topology::Bridged => {
            let mac = l2::show(Some(l2::mac(&frontend.netns_name, "eth0").expect("mac")));
            netns::ip(
                &attacker.netns_name,
                &[
                    "neigh",
                    "replace",
                    &to.ip().to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )
            .expect("neighbour entry");
        }
        Topology::Routed => pin_gateway(scene, v6),
    }
    steal_and_connect(scene, (stolen, prefix, "payment"), to, scene.n1);

    let admitted = counter(c, scene.n1, Counter::InboundAdmitted);
    let r = c.probe(scene.payment, to, Some("mine")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("mine"), "{r:?}");
    assert_eq!(counter(c, scene.n1, Counter::InboundAdmitted), admitted + 1);
}

#[test]
fn a_pod_cannot_ride_a_remote_pods_verdict() {
    for topology in [Topology::Bridged, Topology::Routed] {
        let scene = scene(topology, Attacker::Unenrolled);
        let _frontend_echo = scene
            .cluster
            .echo_server(scene.frontend, PORT)
            .expect("echo server");
        for to in [
            scene.cluster.pod(scene.frontend).addr4(PORT),
            scene.cluster.pod(scene.frontend).addr6(PORT),
        ] {
            let r = scene
                .cluster
                .probe(scene.payment, to, Some("hello"))
                .expect("probe");
            assert!(r.ok && r.echo.as_deref() == Some("hello"), "{r:?}");
        }
        remote_address_is_refused(&scene, false);
        remote_address_is_refused(&scene, true);
    }
}

#[test]
fn routed_pods_connect_through_the_tunnel_then_the_fast_path() {
    let TwoNodes {
        cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment_in(Topology::Routed)
        .and_then(|t| t.start_agents(AgentOptions::default()))
        .expect("cluster");
    let echo = cluster.echo_server(server, PORT).expect("echo");
    for (i, to) in [
        cluster.pod(server).addr4(PORT),
        cluster.pod(server).addr6(PORT),
    ]
    .into_iter()
    .enumerate()
    {
        let client_ip = cluster.pod(client).ips()[i];
        // Verdicts are per pair and port, not per family: start each family afresh.
        for node in [n1, n2] {
            maps(&cluster, node)
                .remove_verdicts_where(|_, _| true)
                .expect("flush");
        }
        let redirected = counter(&cluster, n1, Counter::Redirected);
        let r = cluster.probe(client, to, Some("first")).expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some("first"), "{r:?}");
        assert_eq!(
            counter(&cluster, n1, Counter::Redirected),
            redirected + 1,
            "the first connection crosses the tunnel"
        );
        assert_eq!(echo.peers().last().map(|p| p.ip()), Some(client_ip));

        let fast = counter(&cluster, n1, Counter::FastpathAllowed);
        let admitted = counter(&cluster, n2, Counter::InboundAdmitted);
        let r = cluster.probe(client, to, Some("again")).expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some("again"), "{r:?}");
        assert_eq!(counter(&cluster, n1, Counter::FastpathAllowed), fast + 1);
        assert_eq!(
            counter(&cluster, n2, Counter::InboundAdmitted),
            admitted + 1
        );
        assert_eq!(echo.peers().last().map(|p| p.ip()), Some(client_ip));
    }
    assert_eq!(
        spoof_drops(&cluster, n1) + spoof_drops(&cluster, n2),
        0,
        "legitimate traffic is never dropped"
    );
}

/// Send `frames` from the attacker and wait until node 1 dropped `expected` more packets or
/// `changed` says the attack landed; then the caller checks what the attack would have changed.
fn announce(scene: &Scene, frames: Vec<Vec<u8>>, expected: u64, changed: impl Fn() -> bool) {
    let c = &scene.cluster;
    let drops = spoof_drops(c, scene.n1);
    l2::send_frames(&c.pod(scene.attacker).netns(), "eth0", frames).expect("sending frames");
    assert!(
        eventually(WAIT, || spoof_drops(c, scene.n1) >= drops + expected
            || changed()),
        "neither dropped nor taken"
    );
}

fn frontend_still_works(scene: &Scene) {
    for to in [
        scene.cluster.pod(scene.payment).addr4(PORT),
        scene.cluster.pod(scene.payment).addr6(PORT),
    ] {
        let r = scene
            .cluster
            .probe(scene.frontend, to, Some("still"))
            .expect("probe");
        assert!(r.ok && r.echo.as_deref() == Some("still"), "{r:?}");
    }
}

#[test]
fn announcing_frontends_addresses_does_not_take_its_traffic() {
    let scene = scene(Topology::Bridged, Attacker::Unenrolled);
    let c = &scene.cluster;
    let node_ns = &c.node(scene.n1).netns_name;
    let frontend = c.pod(scene.frontend);
    let attacker = c.pod(scene.attacker);
    let frontend_mac = l2::mac(&frontend.netns_name, "eth0").expect("mac");
    let attacker_mac = l2::mac(&attacker.netns_name, "eth0").expect("mac");
    for ip in frontend.ips() {
        assert_eq!(
            l2::neighbour(node_ns, ip).expect("neighbour"),
            Some(frontend_mac),
            "node 1 knows frontend's {ip} from its traffic"
        );
    }
    let node_sees = |ip: IpAddr| l2::neighbour(node_ns, ip).expect("neighbour");

    // Gratuitous ARP, request and reply.
    announce(
        &scene,
        l2::gratuitous_arp(attacker_mac, frontend.ipv4),
        2,
        || node_sees(frontend.ipv4.into()) != Some(frontend_mac),
    );
    assert_eq!(
        node_sees(frontend.ipv4.into()),
        Some(frontend_mac),
        "a gratuitous ARP moved frontend's IPv4 address to {}",
        l2::show(node_sees(frontend.ipv4.into()))
    );

    // An unsolicited neighbour advertisement, from the attacker's own link-local address.
    let from = l2::link_local(&attacker.netns_name, "eth0").expect("link-local");
    announce(
        &scene,
        vec![l2::unsolicited_na(attacker_mac, from, frontend.ipv6)],
        1,
        || node_sees(frontend.ipv6.into()) != Some(frontend_mac),
    );
    assert_eq!(
        node_sees(frontend.ipv6.into()),
        Some(frontend_mac),
        "a neighbour advertisement moved frontend's IPv6 address to {}",
        l2::show(node_sees(frontend.ipv6.into()))
    );
    frontend_still_works(&scene);
}

#[test]
fn announcing_the_gateway_does_not_take_frontends_traffic() {
    let scene = scene(Topology::Bridged, Attacker::Unenrolled);
    let c = &scene.cluster;
    let node = c.node(scene.n1);
    let frontend = c.pod(scene.frontend);
    let attacker = c.pod(scene.attacker);
    let gateway_mac = l2::mac(&node.netns_name, "br0").expect("mac");
    let attacker_mac = l2::mac(&attacker.netns_name, "eth0").expect("mac");
    let gateway4: std::net::Ipv4Addr = format!("10.244.{}.1", node.index).parse().expect("ip");
    let gateway6: std::net::Ipv6Addr = format!("fd00:10:244:{}::1", node.index)
        .parse()
        .expect("ip");
    let frontend_sees = |ip: IpAddr| l2::neighbour(&frontend.netns_name, ip).expect("neighbour");
    for ip in [IpAddr::from(gateway4), gateway6.into()] {
        assert_eq!(
            frontend_sees(ip),
            Some(gateway_mac),
            "frontend knows its gateway"
        );
    }

    let from = l2::link_local(&attacker.netns_name, "eth0").expect("link-local");
    let mut frames = l2::gratuitous_arp(attacker_mac, gateway4);
    frames.push(l2::unsolicited_na(attacker_mac, from, gateway6));
    announce(&scene, frames, 3, || {
        frontend_sees(gateway4.into()) != Some(gateway_mac)
            || frontend_sees(gateway6.into()) != Some(gateway_mac)
    });
    for ip in [IpAddr::from(gateway4), gateway6.into()] {
        assert_eq!(
            frontend_sees(ip),
            Some(gateway_mac),
            "frontend's gateway {ip} moved to {}",
            l2::show(frontend_sees(ip))
        );
    }
    frontend_still_works(&scene);
}

#[test]
fn frontends_mac_stays_on_frontends_port() {
    let scene = scene(Topology::Bridged, Attacker::Unenrolled);
    let c = &scene.cluster;
    let node = c.node(scene.n1);
    let frontend = c.pod(scene.frontend);
    let attacker = c.pod(scene.attacker);
    let frontend_mac = l2::mac(&frontend.netns_name, "eth0").expect("mac");
    let attacker_mac = l2::mac(&attacker.netns_name, "eth0").expect("mac");
    let port = || l2::fdb_port(&node.netns_name, frontend_mac).expect("fdb");
    assert_eq!(port().as_deref(), Some(frontend.host_if.as_str()));

    // An innocent ARP request for the gateway, in a frame from frontend's MAC.
    let gateway = format!("10.244.{}.1", node.index).parse().expect("ip");
    let frame = l2::arp(
        frontend_mac,
        l2::ARP_REQUEST,
        attacker_mac,
        attacker.ipv4,
        gateway,
    );
    announce(&scene, vec![frame], 1, || {
        port().as_deref() != Some(frontend.host_if.as_str())
    });
    assert_eq!(
        port().as_deref(),
        Some(frontend.host_if.as_str()),
        "the bridge learned frontend's MAC on the attacker's port"
    );
    frontend_still_works(&scene);
}

/// What node 1's anti-spoofing maps say of `ip` and of `pod`'s port (with the port's index).
fn binding(
    scene: &Scene,
    ip: IpAddr,
    pod: PodId,
) -> (Option<SourceBinding>, Option<InterfaceInfo>, u32) {
    let c = &scene.cluster;
    let node = c.node(scene.n1);
    let port = c.pod(pod).host_if.clone();
    let ifindex = netns::in_netns(&node.netns(), move || {
        Ok(nix::net::if_::if_nametoindex(port.as_str())?)
    })
    .expect("port index");
    let (source, info) = read_binding(&node.pin_dir, ip, ifindex).expect("anti-spoofing maps");
    (source, info, ifindex)
}

/// A pod's port carries a copy of the pod's own bindings, so that its own packets pass after one
/// lookup. When the pod's address is handed to another pod (an IP reused while the old pod's
/// interface still exists), the copy must go with the binding: the old pod, still holding the
/// address, is refused as any other pod would be.
#[test]
fn an_address_handed_to_another_pod_is_refused_at_its_old_port() {
    let mut scene = scene(Topology::Bridged, Attacker::Enrolled);
    let c = &scene.cluster;
    let address = IpAddr::from(c.pod(scene.attacker).ipv4);
    let (mallory_ns, frontend_ns) = (c.pod(scene.attacker).netns(), c.pod(scene.frontend));
    let frontend_ns_name = frontend_ns.netns_name.clone();
    let frontend_ips = format!("ips: [{}, ", frontend_ns.ipv4);
    let to = c.pod(scene.payment).addr4(PORT);
    let (_, port, _) = binding(&scene, address, scene.attacker);
    let port = port.expect("mallory's port is in LATCH_INTERFACES");
    assert!(
        port.own[..usize::from(port.own_count)].contains(&ip_key(address)),
        "mallory's port carries a copy of its address: {port:?}"
    );
    pin_gateway(&scene, false);
    let drops = spoof_drops(c, scene.n1);
    probe::connect_from(&mallory_ns, None, address, to, GIVE_UP).expect("probe");
    assert_eq!(
        spoof_drops(c, scene.n1),
        drops,
        "mallory's own address is not a spoof"
    );

    // The address goes to frontend (which takes it on its interface) and mallory leaves the
    // node's workloads; mallory keeps its interface and the address on it.
    netns::ip(
        &frontend_ns_name,
        &[
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .expect("frontend takes the address");
    let handed: String = c
        .config_yaml(scene.n1, &AgentOptions::default())
        .lines()
        .filter(|l| !l.contains("name: mallory,"))
        .map(|l| l.replace(&frontend_ips, &format!("{frontend_ips}{address}, ")) + "\n")
        .collect();
    assert!(
        handed.contains(&format!("{frontend_ips}{address}, ")),
        "{handed}"
    );
    let marks = scene.cluster.marks(&[scene.n1]);
    scene
        .cluster
        .agent(scene.n1)
        .write_config(&handed)
        .expect("write");
    scene
        .cluster
        .wait_reloaded(&[scene.n1], &marks)
        .expect("reloaded");
    let (_, _, frontends_port) = binding(&scene, address, scene.frontend);
    // The copies that change are cleared before the bindings change: once the address is
    // bound to frontend's port, mallory's port no longer carries it.
    assert!(
        eventually(WAIT, || binding(&scene, address, scene.attacker)
            .0
            .is_some_and(|b| b.ifindex == frontends_port)),
        "the address is bound to frontend's port"
    );
    let (_, port, _) = binding(&scene, address, scene.attacker);
    let port = port.expect("mallory's port is still guarded");
    assert!(
        !port.own[..usize::from(port.own_count)].contains(&ip_key(address)),
        "mallory's port keeps a copy of the address: {port:?}"
    );

    let c = &scene.cluster;
    let drops = spoof_drops(c, scene.n1);
    let r = probe::connect_from(&mallory_ns, None, address, to, GIVE_UP).expect("probe");
    assert!(
        !r.ok,
        "mallory connected from an address no longer its own: {r:?}"
    );
    assert!(
        spoof_drops(c, scene.n1) > drops,
        "node 1 must drop packets from an address handed to another pod"
    );
}

/// The programs at the TCX ingress of each of node 1's guarded interfaces (its link and its
/// pods' veths; the bridge is not guarded, its ports are).
fn tcx_programs(cluster: &Cluster, node: NodeId) -> Vec<(String, usize)> {
    let mut names = vec!["fab0".to_owned()];
    names.extend(
        cluster
            .node(node)
            .pods
            .iter()
            .map(|p| cluster.pod(*p).host_if.clone()),
    );
    netns::in_netns(&cluster.node(node).netns(), move || {
        names
            .into_iter()
            .map(|name| -> anyhow::Result<(String, usize)> {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str())?;
                let count = programs_on_interface(ifindex)?.len();
                Ok((name, count))
            })
            .collect()
    })
    .expect("querying TCX programs")
}

fn all(cluster: &Cluster, node: NodeId, count: usize) -> bool {
    tcx_programs(cluster, node).iter().all(|(_, n)| *n == count)
}

#[test]
fn the_check_outlives_the_agent_and_uninstall_removes_it() {
    let mut scene = scene(Topology::Bridged, Attacker::Unenrolled);
    let n1 = scene.n1;
    assert!(
        all(&scene.cluster, n1, 1),
        "one check per interface: {:?}",
        tcx_programs(&scene.cluster, n1)
    );

    // Agent down: the pinned links keep dropping.
    scene.cluster.agent(n1).kill9();
    spoofed_connection_is_refused(&scene, false);

    // Restarted: every link adopted, none attached twice.
    scene.cluster.agent(n1).restart().expect("restart");
    assert!(
        scene
            .cluster
            .agent(n1)
            .lines()
            .iter()
            .any(|l| l.contains("anti-spoofing check on interfaces") && l.contains("readopted")),
        "{}",
        scene.cluster.agent(n1).log_tail(20)
    );
    assert!(
        all(&scene.cluster, n1, 1),
        "{:?}",
        tcx_programs(&scene.cluster, n1)
    );
    spoofed_connection_is_refused(&scene, true);

    let status = scene.cluster.agent(n1).terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
    scene.cluster.agent(n1).uninstall().expect("uninstall");
    assert!(
        all(&scene.cluster, n1, 0),
        "uninstall detaches the check: {:?}",
        tcx_programs(&scene.cluster, n1)
    );
    assert!(!Path::new(&scene.cluster.node(n1).pin_dir).exists());
}

/// A CNI may make a pod's veth pair on the node and move one end into the pod (Calico does). A
/// TCX link goes along with a moved interface, where the node's check would judge the pod's
/// incoming traffic by the node's interface indexes: a pair with both ends on the node gets no
/// check, even if the agent is down when one end moves, and the end that stays is guarded once
/// its peer is in the pod. (An interface moved away with its check while the agent runs loses it
/// at the next resync.)
#[test]
fn a_veth_pair_made_on_the_node_is_guarded_on_the_nodes_end_only() {
    let TwoNodes {
        mut cluster, n1, ..
    } = Cluster::frontend_payment()
        .and_then(|t| t.start_agents(AgentOptions::default()))
        .expect("cluster");
    let node_ns = cluster.node(n1).netns_name.clone();
    let pod_netns = cluster.pod(PodId(0)).netns();
    let programs = |netns: &Path, name: &'static str| {
        netns::in_netns(netns, move || {
            let ifindex = nix::net::if_::if_nametoindex(name)?;
            Ok(programs_on_interface(ifindex)?.len())
        })
        .expect("query")
    };

    // A pair within the node while the agent runs: neither end is guarded.
    let mark = cluster.agent(n1).mark();
    netns::ip(
        &node_ns,
        &[
            "link", "add", "cni0a", "type", "veth", "peer", "name", "cni0b",
        ],
    )
    .expect("veth");
    // An interface made after it is guarded by a resync that has seen the pair.
    let pod = cluster.pod(PodId(0)).netns_name.clone();
    netns::ip(
        &node_ns,
        &[
            "link", "add", "marker0", "type", "veth", "peer", "name", "marker1", "netns", &pod,
        ],
    )
    .expect("veth to the pod");
    cluster
        .agent(n1)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("anti-spoofing check on interfaces") && l.contains("marker0")
        })
        .expect("a resync after the pair appeared");
    let node = cluster.node(n1).netns();
    assert_eq!(programs(&node, "cni0a"), 0);
    assert_eq!(programs(&node, "cni0b"), 0);

    // One end moves into the pod while the agent is down: it carries nothing along.
    cluster.agent(n1).kill9();
    netns::ip(&node_ns, &["link", "set", "cni0b", "netns", &pod]).expect("move");
    assert_eq!(
        programs(&pod_netns, "cni0b"),
        0,
        "the moved end carries a check"
    );

    // Back up, the agent guards the end that stayed, now a pod's host side.
    let mark = cluster.agent(n1).mark();
    cluster.agent(n1).restart().expect("restart");
    cluster
        .agent(n1)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("anti-spoofing check on interfaces") && l.contains("cni0a")
        })
        .expect("the node's end is guarded");
    assert_eq!(programs(&node, "cni0a"), 1);
    assert_eq!(programs(&pod_netns, "cni0b"), 0);
}
