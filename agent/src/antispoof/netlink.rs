//! Route netlink as anti-spoofing needs it: the links of a network namespace (dumped; its
//! addresses are [`crate::netlink`]'s), the id a namespace has as seen from another one (`RTM_GETNSID`), and a socket that
//! wakes up on every link or address change (`RTNLGRP_LINK`, `RTNLGRP_IPV4_IFADDR`,
//! `RTNLGRP_IPV6_IFADDR`). Sockets keep the namespace they were made in.

use std::{fs::File, io, os::fd::AsRawFd};

use netlink_packet_core::NLM_F_ACK;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

pub use crate::netlink::{Address, RouteSocket};

/// What kind of device a link is, as far as anti-spoofing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Veth,
    Bridge,
    Other,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Kind,
    /// An Ethernet device (veths, bridges, bonds, NICs); layer-3 devices (tunnels, WireGuard)
    /// and loopback are not.
    pub ethernet: bool,
    pub loopback: bool,
    /// `IFLA_MASTER`: the bridge or bond this interface is a port of.
    pub master: Option<u32>,
    /// `IFLA_LINK`: for a veth, its peer's index (in the peer's namespace).
    pub peer: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the peer's namespace, by its id in this one.
    pub peer_netns: Option<i32>,
    pub mac: Option<[u8; 6]>,
}

impl RouteSocket {
    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let messages = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            })
            .collect())
    }

    /// The id the namespace `netns` has in this socket's namespace, assigned now if it had none.
    pub fn netns_id(&mut self, netns: &File) -> io::Result<i32> {
        if let Some(id) = self.get_netns_id(netns)? {
            return Ok(id);
        }
        let mut assign = NsidMessage::default();
        assign.attributes = vec![
            NsidAttribute::Fd(netns.as_raw_fd() as u32),
            NsidAttribute::Id(-1),
        ];
        match self.request(RouteNetlinkMessage::NewNsId(assign), NLM_F_ACK) {
            // Assigned meanwhile by someone else: fine too.
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        self.get_netns_id(netns)?
            .ok_or_else(|| io::Error::other("the kernel assigned no namespace id"))
    }

    fn get_netns_id(&mut self, netns: &File) -> io::Result<Option<i32>> {
        let mut query = NsidMessage::default();
        query.attributes = vec![NsidAttribute::Fd(netns.as_raw_fd() as u32)];
        let replies = self.request(RouteNetlinkMessage::GetNsId(query), 0)?;
        let id = replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(msg) => msg.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(*id),
                _ => None,
            }),
            _ => None,
        });
        Ok(id.filter(|id| *id >= 0))
    }
}

fn link_of(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        kind: Kind::Other,
        ethernet: message.header.link_layer_type == LinkLayerType::Ether,
        loopback: message.header.flags.contains(LinkFlags::Loopback)
            || message.header.link_layer_type == LinkLayerType::Loopback,
        master: None,
        peer: None,
        peer_netns: None,
        mac: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Controller(index) if index != 0 => link.master = Some(index),
            LinkAttribute::Link(index) if index != 0 => link.peer = Some(index),
            LinkAttribute::LinkNetNsId(id) if id >= 0 => link.peer_netns = Some(id),
            LinkAttribute::Address(bytes) => link.mac = bytes.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = match kind {
                            InfoKind::Veth => Kind::Veth,
                            InfoKind::Bridge => Kind::Bridge,
                            _ => Kind::Other,
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Route netlink multicast groups that announce changes to links and addresses:
/// `RTNLGRP_LINK`, `RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV6_IFADDR` (`linux/rtnetlink.h`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const GROUPS: [u32; 3] = [RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR];

/// A socket subscribed to link and address changes in the calling thread's namespace.
pub struct Events {
    socket: tokio::io::unix::AsyncFd<Socket>,
}

impl Events {
    /// Subscribe. Changes from this moment on wake [`Events::changed`].
    // tokio polls a descriptor only through `AsyncFd::register`, which is unsafe.
    #[allow(unsafe_code)]
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        for group in GROUPS {
            socket.add_membership(group)?;
        }
        socket.set_non_blocking(true)?;
        // SAFETY: a netlink `Socket` owns its descriptor, keeps it open until it is dropped
        // (with the `AsyncFd`) and always reports the same one.
        let socket =
            unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Self { socket })
    }

    /// Wait for one or more changes and consume every notification queued so far. What they
    /// say does not matter (the caller reads the whole state again), so a lost notification
    /// (`ENOBUFS`, the socket's buffer overran) is reported as a change too.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let mut any = false;
            loop {
                let mut buf = Vec::with_capacity(64 * 1024);
                match ready.get_inner().recv(&mut buf, 0) {
                    Ok(_) => any = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                    Err(e) => return Err(e),
                }
            }
            if any {
                return Ok(());
            }
        }
    }
}
