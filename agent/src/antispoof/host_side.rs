//! Finding the host side of an enrolled pod's addresses. In the pod's network namespace, the
//! interface that holds the address must be a veth; its peer (`IFLA_LINK`) names an interface of
//! the agent's namespace. The agent's own view confirms the pair: that interface must be a veth
//! whose peer is the pod's interface, in the pod's namespace (`IFLA_LINK_NETNSID`, compared with
//! the id the pod's namespace has in the agent's). Interface indexes repeat from namespace to
//! namespace (every pod has its `eth0` at index 2 or so), so the namespace check is what makes
//! the pair certain.

use std::{fs::File, io, net::IpAddr, path::Path};

use super::netlink::{Kind, Link, RouteSocket};

/// A pod's interface that holds one of its addresses, as the pod's namespace shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSide {
    /// Index in the pod's namespace.
    pub ifindex: u32,
    /// The peer's index, in the namespace the veth's other end lives in.
    pub peer: u32,
    pub mac: [u8; 6],
}

/// The pod's namespace, opened, and what it says about each of `ips`: `None` for an address no
/// veth of the pod holds.
pub struct PodView {
    pub netns: File,
    pub sides: Vec<(IpAddr, Option<PodSide>)>,
}

/// Read the pod's side of each address, from inside the pod's namespace.
pub fn look_in_pod(netns: &Path, ips: &[IpAddr]) -> io::Result<PodView> {
    let file = File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", netns.display())))?;
    let mut socket = RouteSocket::open_in(netns)?;
    let addresses = socket.addresses()?;
    let links = socket.links()?;
    let sides = ips
        .iter()
        .map(|ip| {
            let side = addresses
                .iter()
                .find(|a| a.ip == *ip)
                .and_then(|a| links.iter().find(|l| l.index == a.index))
                .filter(|l| l.kind == Kind::Veth)
                .and_then(|l| {
                    Some(PodSide {
                        ifindex: l.index,
                        peer: l.peer?,
                        mac: l.mac?,
                    })
                });
            (*ip, side)
        })
        .collect();
    Ok(PodView { netns: file, sides })
}

/// The agent-side interface of `side`, if the agent's links confirm the pair: a veth at the
/// index the pod names, whose own peer is the pod's interface in the pod's namespace
/// (`pod_netns_id`, that namespace's id in the agent's).
pub fn confirm<'a>(side: &PodSide, pod_netns_id: i32, host_links: &'a [Link]) -> Option<&'a Link> {
    host_links.iter().find(|l| {
        l.index == side.peer
            && l.kind == Kind::Veth
            && l.peer == Some(side.ifindex)
            && l.peer_netns == Some(pod_netns_id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(index: u32, peer: u32, netns: i32) -> Link {
        Link {
            index,
            name: format!("p{index}"),
            kind: Kind::Veth,
            ethernet: true,
            loopback: false,
            master: None,
            peer: Some(peer),
            peer_netns: Some(netns),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
        }
    }

    #[test]
    fn the_pair_is_confirmed_by_index_and_namespace() {
        let side = PodSide {
            ifindex: 2,
            peer: 7,
            mac: [2, 0, 0, 0, 0, 1],
        };
        // Two pods, both with their eth0 at index 2, in namespaces 0 and 1.
        let links = [veth(7, 2, 0), veth(8, 2, 1)];
        assert_eq!(confirm(&side, 0, &links).map(|l| l.index), Some(7));
        // The index the pod names is another pod's host side: not confirmed.
        assert_eq!(confirm(&side, 1, &links), None);
        let mut bridge = veth(7, 2, 0);
        bridge.kind = Kind::Bridge;
        assert_eq!(confirm(&side, 0, &[bridge]), None);
        assert_eq!(confirm(&side, 0, &[]), None);
    }
}
