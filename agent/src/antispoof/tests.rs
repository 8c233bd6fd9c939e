//! The wanted state of the anti-spoofing maps for a bridged and a routed node.

use super::*;
use crate::datapath::maps::ip_key;

const FRONTEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];

fn link(index: u32, name: &str, kind: Kind) -> Link {
    Link {
        index,
        name: name.into(),
        kind,
        ethernet: true,
        loopback: false,
        master: None,
        peer: None,
        peer_netns: None,
        mac: Some([2, 0, 0, 0, 0, index as u8]),
    }
}

fn veth(index: u32, name: &str, master: Option<u32>, peer: u32, netns: i32) -> Link {
    Link {
        master,
        peer: Some(peer),
        peer_netns: Some(netns),
        ..link(index, name, Kind::Veth)
    }
}

fn loopback() -> Link {
    Link {
        ethernet: false,
        loopback: true,
        ..link(1, "lo", Kind::Other)
    }
}

fn address(index: u32, ip: &str) -> Address {
    Address {
        index,
        ip: ip.parse().expect("literal"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// `frontend`, whose eth0 (index 2 in its namespace, id 0 in the agent's) holds both its
/// addresses and is the peer of the agent's interface 4.
fn frontend(sides: bool) -> Resolved {
    let pod = PodAddresses {
        workload: "prod/frontend".into(),
        netns: "/run/netns/frontend".into(),
        ips: vec![ip("10.244.1.2"), ip("fd00:10:244:1::2")],
    };
    let side = sides.then_some(PodSide {
        ifindex: 2,
        peer: 4,
        mac: FRONTEND_MAC,
    });
    Resolved {
        sides: pod.ips.iter().map(|ip| (*ip, side)).collect(),
        pod,
        netns_id: 0,
    }
}

#[test]
fn bridged_node() {
    // lo, the node's link, a bridge, frontend's port and an unenrolled pod's port (both pods
    // have their eth0 at index 2, in namespaces 0 and 1).
    let links = [
        loopback(),
        // The node's link is a veth too (as in the test cluster), to namespace 7.
        veth(2, "fab0", None, 9, 7),
        link(3, "br0", Kind::Bridge),
        veth(4, "p2", Some(3), 2, 0),
        veth(5, "p3", Some(3), 2, 1),
    ];
    let addresses = [
        address(1, "127.0.0.1"),
        address(2, "10.244.0.1"),
        address(3, "10.244.1.1"),
        address(3, "fd00:10:244:1::1"),
    ];
    let plan = plan(
        &links,
        &addresses,
        &[frontend(true)],
        Some(ip("10.244.0.1")),
    );

    let bound = SourceBinding {
        ifindex: 4,
        master: 3,
    };
    assert_eq!(plan.sources[&ip("10.244.1.2")], bound);
    assert_eq!(plan.sources[&ip("fd00:10:244:1::2")], bound);
    // The gateway is the bridge's own (a bridge is not guarded itself, but its address is
    // bound); the node's link address is fab0's; loopback's are not bound.
    assert_eq!(
        plan.sources[&ip("10.244.1.1")],
        SourceBinding {
            ifindex: 3,
            master: 0
        }
    );
    assert_eq!(plan.sources[&ip("10.244.0.1")].ifindex, 2);
    assert!(!plan.sources.contains_key(&ip("127.0.0.1")));

    assert_eq!(
        plan.interfaces[&4],
        InterfaceInfo {
            flags: INTERFACE_POD | INTERFACE_VETH | INTERFACE_BRIDGE_PORT | INTERFACE_OWN_MAC,
            master: 3,
            ..frontends_copy()
        }
    );
    assert_eq!(
        plan.interfaces[&5],
        InterfaceInfo {
            flags: INTERFACE_VETH | INTERFACE_BRIDGE_PORT,
            master: 3,
            ..Default::default()
        }
    );
    assert_copies_granted(&plan);
    // fab0 holds the node's address: no reverse-path check there. br0 is not guarded.
    assert!(!plan.interfaces.contains_key(&2) && !plan.interfaces.contains_key(&3));
    assert_eq!(plan.macs, HashMap::from([(FRONTEND_MAC, 4)]));
    assert!(plan.unbound.is_empty());
}

#[test]
fn routed_node() {
    // No bridge: each pod has its own veth, every one of them holding the gateway address.
    let links = [
        loopback(),
        link(2, "fab0", Kind::Other),
        veth(4, "p2", None, 2, 0),
        veth(5, "p3", None, 2, 1),
    ];
    let addresses = [
        address(4, "10.244.1.1"),
        address(5, "10.244.1.1"),
        address(4, "fe80::1"),
        address(5, "fe80::1"),
    ];
    let plan = plan(
        &links,
        &addresses,
        &[frontend(true)],
        Some(ip("10.244.0.1")),
    );
    assert_eq!(
        plan.sources[&ip("10.244.1.2")],
        SourceBinding {
            ifindex: 4,
            master: 0
        }
    );
    assert!(!plan.sources.contains_key(&ip("10.244.1.1")));
    assert!(!plan.sources.contains_key(&ip("fe80::1")));
    assert_eq!(
        plan.interfaces,
        HashMap::from([
            (
                4,
                InterfaceInfo {
                    flags: INTERFACE_POD | INTERFACE_VETH | INTERFACE_OWN_MAC,
                    master: 0,
                    ..frontends_copy()
                }
            ),
            (
                5,
                InterfaceInfo {
                    flags: INTERFACE_VETH,
                    master: 0,
                    ..Default::default()
                }
            )
        ])
    );
    assert_copies_granted(&plan);
}

/// Frontend's port's copy of its bindings: its MAC and both its addresses, IPv4 first.
fn frontends_copy() -> InterfaceInfo {
    InterfaceInfo {
        own_mac: FRONTEND_MAC,
        own_count: 2,
        own: [ip_key(ip("10.244.1.2")), ip_key(ip("fd00:10:244:1::2"))],
        ..Default::default()
    }
}

/// Every interface's copy is what `sources` and `macs` bind to it, never more.
fn assert_copies_granted(plan: &Plan) {
    for (ifindex, info) in &plan.interfaces {
        for own in &info.own[..usize::from(info.own_count)] {
            let granted = plan
                .sources
                .iter()
                .any(|(ip, b)| ip_key(*ip) == *own && b.ifindex == *ifindex);
            assert!(
                granted,
                "interface {ifindex} copies {own:?}, not bound to it"
            );
        }
        if info.flags & INTERFACE_OWN_MAC != 0 {
            assert_eq!(plan.macs.get(&info.own_mac), Some(ifindex));
        }
    }
}

/// Loopback, the node's link, and one veth to a pod (index 4), no bridge.
fn one_pod_port() -> [Link; 3] {
    [
        loopback(),
        link(2, "fab0", Kind::Other),
        veth(4, "p2", None, 2, 0),
    ]
}

#[test]
fn a_port_copies_at_most_two_of_its_addresses_the_lowest() {
    let links = one_pod_port();
    let mut pod = frontend(true);
    for extra in ["10.244.1.9", "10.244.1.3"] {
        pod.pod.ips.push(ip(extra));
        pod.sides.push((ip(extra), pod.sides[0].1));
    }
    let plan = plan(&links, &[], &[pod], Some(ip("10.244.0.1")));
    assert_eq!(plan.sources.len(), 4);
    let info = plan.interfaces[&4];
    assert_eq!(info.own_count, 2);
    assert_eq!(
        info.own,
        [ip_key(ip("10.244.1.2")), ip_key(ip("10.244.1.3"))]
    );
    assert_copies_granted(&plan);
}

#[test]
fn a_pod_with_no_confirmed_side_gives_no_port_a_copy() {
    let links = one_pod_port();
    let plan = plan(&links, &[], &[frontend(false)], Some(ip("10.244.0.1")));
    assert_eq!(
        plan.interfaces[&4],
        InterfaceInfo {
            flags: INTERFACE_VETH,
            ..Default::default()
        }
    );
}

#[test]
fn a_pod_without_a_confirmed_host_side_binds_nowhere() {
    let links = [loopback(), link(2, "fab0", Kind::Other)];
    for pod in [frontend(false), frontend(true)] {
        // Unresolved, or resolved to an interface the agent's namespace does not have.
        let plan = plan(&links, &[], &[pod], None);
        assert_eq!(plan.sources[&ip("10.244.1.2")], SourceBinding::default());
        assert_eq!(
            plan.sources[&ip("fd00:10:244:1::2")],
            SourceBinding::default()
        );
        assert!(plan.macs.is_empty());
        assert_eq!(plan.unbound, BTreeSet::from(["prod/frontend".to_owned()]));
    }
}

#[test]
fn guards_ethernet_interfaces_but_loopback_masters_and_veths_within_the_node() {
    let links = [
        loopback(),
        link(2, "eth0", Kind::Other),
        link(3, "br0", Kind::Bridge),
        veth(4, "p2", Some(3), 2, 0),
        link(5, "bond0", Kind::Other),
        Link {
            master: Some(5),
            ..link(6, "eth1", Kind::Other)
        },
        // Both ends still the node's: a pair a CNI is about to move into a pod.
        Link {
            peer_netns: None,
            ..veth(7, "cali1", None, 8, 0)
        },
        Link {
            ethernet: false,
            ..link(9, "wg0", Kind::Other)
        },
    ];
    let masters = masters(&links);
    let guarded: Vec<&str> = links
        .iter()
        .filter(|l| guarded(l, &masters))
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(guarded, ["eth0", "p2", "eth1"]);
}
