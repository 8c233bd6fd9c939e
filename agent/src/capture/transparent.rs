//! Routing inside one pod's network namespace that lets the agent deliver a connection to the
//! application from the client's own address, as a fast-path connection arrives (without it the
//! application would see the loopback marker): once per pod, `tcp_fwmark_accept`,
//! `fwmark_reflect` and a local route for packets marked [`DELIVERY_MARK`]. The settings and why: `docs/datapath.md` (Deliveries from
//! the client's address). A family that cannot be set up falls back to the marker, with a warning.

use std::{io, net::IpAddr, path::Path};

use latch_common::{DELIVERY_MARK, DELIVERY_RULE_PRIORITY, DELIVERY_TABLE, LOOPBACK_IFINDEX};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};

use crate::netlink::RouteSocket;

/// The families whose deliveries may come from the client's own address in one pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transparent {
    pub v4: bool,
    pub v6: bool,
}

impl Transparent {
    /// Whether a delivery from `ip` can use it.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.family(ip.is_ipv6())
    }

    /// Whether deliveries of IPv6 (`v6`) or IPv4 can use it.
    pub fn family(&self, v6: bool) -> bool {
        if v6 { self.v6 } else { self.v4 }
    }
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// Replies the kernel sends on no socket's behalf (a reset for a SYN to a port where nothing
/// listens, an ICMP error) take the mark of the packet they answer, per family.
const FWMARK_REFLECT: [&str; 2] = [
    "/proc/sys/net/ipv4/fwmark_reflect",
    "/proc/sys/net/ipv6/fwmark_reflect",
];

/// Set the routing up in the calling thread's network namespace (a pod's netns worker); `netns`
/// only names it in warnings.
pub fn install(netns: &Path) -> Transparent {
    let warn = |what: &str, e: &io::Error| {
        tracing::warn!(netns = %netns.display(), error = %e, "{what}; deliveries there come from the loopback marker instead of the client's address");
    };
    // The sysctl is per network namespace: the thread's own, as it opens the file.
    if let Err(e) = std::fs::write(FWMARK_ACCEPT, "1") {
        warn(&format!("setting {FWMARK_ACCEPT}"), &e);
        return Transparent::default();
    }
    // Without it, the reset for a delivery to a closed port leaves by the pod's interface
    // towards the client's address instead of coming back to the agent, which then waits for
    // the connect to time out instead of answering 503 at once.
    for reflect in FWMARK_REFLECT {
        if let Err(e) = std::fs::write(reflect, "1") {
            tracing::warn!(netns = %netns.display(), error = %e, "setting {reflect}; a delivery to a closed port there is refused only when its connect times out");
        }
    }
    let mut socket = match Routes::open() {
        Ok(socket) => socket,
        Err(e) => {
            warn("opening a netlink socket", &e);
            return Transparent::default();
        }
    };
    let mut family = |family: AddressFamily, name: &str| match socket.install(family) {
        Ok(()) => true,
        Err(e) => {
            warn(&format!("{name} delivery routing"), &e);
            false
        }
    };
    Transparent {
        v4: family(AddressFamily::Inet, "IPv4"),
        v6: family(AddressFamily::Inet6, "IPv6"),
    }
}

/// The delivery routing, set over a route netlink socket of the calling thread's namespace.
struct Routes(RouteSocket);

impl Routes {
    fn open() -> io::Result<Self> {
        RouteSocket::open().map(Self)
    }

    fn install(&mut self, family: AddressFamily) -> io::Result<()> {
        let mut rule = RuleMessage::default();
        rule.header.family = family;
        rule.header.action = RuleAction::ToTable;
        rule.attributes = vec![
            RuleAttribute::Priority(DELIVERY_RULE_PRIORITY),
            RuleAttribute::FwMark(DELIVERY_MARK),
            RuleAttribute::Table(DELIVERY_TABLE),
        ];
        self.create(RouteNetlinkMessage::NewRule(rule))
            .map_err(|e| io::Error::new(e.kind(), format!("adding the fwmark rule: {e}")))?;

        let mut route = RouteMessage::default();
        route.header.address_family = family;
        route.header.table = RouteHeader::RT_TABLE_UNSPEC;
        route.header.protocol = RouteProtocol::Static;
        route.header.scope = RouteScope::Host;
        route.header.kind = RouteType::Local;
        route.attributes = vec![
            RouteAttribute::Table(DELIVERY_TABLE),
            RouteAttribute::Oif(LOOPBACK_IFINDEX),
        ];
        self.create(RouteNetlinkMessage::NewRoute(route))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("adding `local default dev lo table {DELIVERY_TABLE}`: {e}"),
                )
            })
    }

    /// Send one create request and wait for its acknowledgement; already there counts as done.
    fn create(&mut self, message: RouteNetlinkMessage) -> io::Result<()> {
        match self
            .0
            .request(message, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `install` in a network namespace of its own (a thread that left the test's), twice.
    #[test]
    fn installs_in_a_fresh_namespace_and_again_over_itself() {
        let installed = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("new netns");
            // As in a pod: loopback up (a child process starts in this thread's namespace).
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(up.success());
            let sysctl = |path: &str| std::fs::read_to_string(path).expect("sysctl");
            for path in [FWMARK_ACCEPT, FWMARK_REFLECT[0], FWMARK_REFLECT[1]] {
                assert_eq!(
                    sysctl(path).trim(),
                    "0",
                    "a fresh namespace's default: {path}"
                );
            }
            let first = install(Path::new("test"));
            for path in [FWMARK_ACCEPT, FWMARK_REFLECT[0], FWMARK_REFLECT[1]] {
                assert_eq!(sysctl(path).trim(), "1", "{path}");
            }
            (first, install(Path::new("test")))
        })
        .join()
        .expect("thread");
        let both = Transparent { v4: true, v6: true };
        assert_eq!(installed, (both, both), "set up, then found in place");
        assert!(both.covers("10.244.1.2".parse().expect("v4")));
        assert!(
            !Transparent {
                v4: true,
                v6: false
            }
            .covers("fd00::2".parse().expect("v6"))
        );
    }
}
