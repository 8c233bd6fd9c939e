//! Route netlink requests: one socket in a network namespace, a request and its replies (a dump
//! read to its end, re-read if it changed underneath; an acknowledgement; or one reply). What
//! the requests mean belongs to their users: the delivery routing in each pod's netns
//! (`capture::transparent`) and the interfaces anti-spoofing watches (`antispoof::netlink`).
//! The addresses of a namespace are read here, for anti-spoofing and for Kubernetes mode's
//! check of a pod's namespace.

use std::{fs::File, io, net::IpAddr, path::Path};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// `NLM_F_DUMP_INTR`: the dump changed while it was read; read it again.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// Dumps that keep changing underneath are read this many times before giving up.
const DUMP_ATTEMPTS: usize = 5;

/// A route netlink socket for requests, in the namespace it was opened in.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl RouteSocket {
    /// In the calling thread's namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// In the namespace at `netns` (a short-lived thread enters it to make the socket).
    pub fn open_in(netns: &Path) -> io::Result<Self> {
        let file = File::open(netns).map_err(|e| annotate(e, "opening", netns))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| annotate(e.into(), "entering", netns))?;
                    Self::open()
                })
                .join()
                .map_err(|_| io::Error::other("netlink thread panicked"))?
        })
    }

    pub(crate) fn dump(
        &mut self,
        request: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let (messages, interrupted) = self.exchange(request.clone(), NLM_F_DUMP)?;
            if !interrupted {
                return Ok(messages);
            }
        }
        Err(io::Error::other(
            "the netlink dump kept changing while it was read",
        ))
    }

    pub(crate) fn request(
        &mut self,
        request: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(request, flags).map(|(messages, _)| messages)
    }

    /// Send one request and read its replies: until `NLMSG_DONE` for a dump, else until the
    /// acknowledgement or the first reply.
    fn exchange(
        &mut self,
        request: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let ack = flags & NLM_F_ACK != 0;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < datagram.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[at..])
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}"))
                    })?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                // Messages in one datagram start at 4-byte boundaries.
                at += length.next_multiple_of(4);
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((out, interrupted)),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if !dump && !ack {
                            return Ok((out, interrupted));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// One address of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
}

impl RouteSocket {
    /// Every address of the namespace, both families.
    pub fn addresses(&mut self) -> io::Result<Vec<Address>> {
        let messages = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(address) => address_of(&address),
                _ => None,
            })
            .collect())
    }
}

fn address_of(message: &AddressMessage) -> Option<Address> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
    // links and the same as IFA_LOCAL elsewhere (IPv6 sends IFA_ADDRESS only).
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(Address {
        index: message.header.index,
        ip: local.or(address)?,
    })
}
