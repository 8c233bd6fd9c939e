//! Layer 2 in the test cluster: raw Ethernet frames sent from inside a pod with an `AF_PACKET`
//! socket (what a pod with `CAP_NET_RAW` can do: gratuitous ARP, unsolicited neighbour
//! advertisements, any source MAC), and what a namespace learned from them: its neighbour table
//! (`ip neigh`) and its bridge's forwarding database (`bridge fdb`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
};

use anyhow::Context as _;

use crate::netns;

pub type Mac = [u8; 6];

const BROADCAST: Mac = [0xff; 6];
/// `33:33:00:00:00:01`, the Ethernet address of `ff02::1` (all nodes).
const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

fn ip_json(ns: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = netns::sh(Command::new("ip").args(["-n", ns, "-j"]).args(args))?;
    serde_json::from_str(&out).with_context(|| format!("parsing `ip {}`: {out}", args.join(" ")))
}

fn parse_mac(text: &str) -> anyhow::Result<Mac> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address {text:?}"))
}

/// The MAC address of interface `ifname` in namespace `ns`.
pub fn mac(ns: &str, ifname: &str) -> anyhow::Result<Mac> {
    let links = ip_json(ns, &["link", "show", "dev", ifname])?;
    parse_mac(links[0]["address"].as_str().context("no address")?)
}

/// The IPv6 link-local address of interface `ifname` in namespace `ns`.
pub fn link_local(ns: &str, ifname: &str) -> anyhow::Result<Ipv6Addr> {
    let addrs = ip_json(ns, &["-6", "addr", "show", "dev", ifname, "scope", "link"])?;
    // `ip -j` may list filtered-out addresses as empty objects.
    let local = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["scope"] == "link")
        .and_then(|a| a["local"].as_str())
        .with_context(|| format!("{ifname} in {ns} has no link-local address: {addrs}"))?;
    Ok(local.parse()?)
}

/// The MAC address namespace `ns`'s neighbour table holds for `ip`, if any.
pub fn neighbour(ns: &str, ip: IpAddr) -> anyhow::Result<Option<Mac>> {
    let entries = ip_json(ns, &["neigh", "show", "to", &ip.to_string()])?;
    entries
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["lladdr"].as_str())
        .map(parse_mac)
        .transpose()
}

/// The port a bridge in namespace `ns` learned `mac` on, if it did.
pub fn fdb_port(ns: &str, mac: Mac) -> anyhow::Result<Option<String>> {
    let out = netns::sh(Command::new("bridge").args(["-n", ns, "-j", "fdb", "show"]))?;
    let entries: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parsing `bridge fdb`: {out}"))?;
    for entry in entries.as_array().into_iter().flatten() {
        let learned = entry["mac"].as_str().map(parse_mac).transpose()?;
        // The bridge's own entries carry "master"; a learned one names the port in "ifname".
        if learned == Some(mac) && entry["flags"].as_array().is_none_or(|f| f.is_empty()) {
            return Ok(entry["ifname"].as_str().map(str::to_owned));
        }
    }
    Ok(None)
}

/// Send `frames` (complete Ethernet frames) out of `ifname`, from inside the namespace at
/// `netns`.
// Raw AF_PACKET frames to a chosen link address: nix offers no safe way to build the address.
#[allow(unsafe_code)]
pub fn send_frames(netns: &Path, ifname: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let ifname = ifname.to_owned();
    netns::in_netns(netns, move || {
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
            .with_context(|| format!("no interface {ifname}"))?;
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: a new fd we own.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        for frame in frames {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = ifindex as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: the frame and the address outlive the call; sizes are theirs.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if sent < 0 {
                return Err(std::io::Error::last_os_error()).context("sending a frame");
            }
        }
        Ok(())
    })
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    // The minimum Ethernet frame (without its checksum).
    frame.resize(frame.len().max(60), 0);
    frame
}

/// An ARP packet for IPv4 over Ethernet, broadcast, from `frame_src`.
pub fn arp(
    frame_src: Mac,
    op: u16,
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip.octets());
    arp.extend_from_slice(&if op == ARP_REQUEST { [0; 6] } else { BROADCAST });
    arp.extend_from_slice(&target_ip.octets());
    ethernet(BROADCAST, frame_src, 0x0806, &arp)
}

/// A gratuitous ARP (request and reply forms): `mac` announces that it holds `ip`.
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<Vec<u8>> {
    [ARP_REQUEST, ARP_REPLY]
        .map(|op| arp(mac, op, mac, ip, ip))
        .to_vec()
}

/// An unsolicited neighbour advertisement to all nodes, with the override flag: `mac` (from
/// the link-local address `src`) announces that it holds `target`.
pub fn unsolicited_na(mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // type, code, checksum (below)
    icmp.extend_from_slice(&[0x20, 0, 0, 0]); // override
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]); // target link-layer address option, 8 bytes
    icmp.extend_from_slice(&mac);
    let checksum = icmpv6_checksum(src, ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut ip = Vec::with_capacity(40 + icmp.len());
    ip.extend_from_slice(&[0x60, 0, 0, 0]);
    ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 255]); // ICMPv6, hop limit 255 as neighbour discovery requires
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&ALL_NODES.octets());
    ip.extend_from_slice(&icmp);
    ethernet(ALL_NODES_MAC, mac, 0x86dd, &ip)
}

fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(message);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `aa:bb:...`, for messages.
pub fn show(mac: Option<Mac>) -> String {
    match mac {
        Some(m) => m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        None => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a message with its checksum filled in sums to zero.
    #[test]
    fn neighbour_advertisement_checksum_verifies() {
        let src: Ipv6Addr = "fe80::1".parse().expect("literal");
        let frame = unsolicited_na([2, 0, 0, 0, 0, 1], src, "fd00::2".parse().expect("literal"));
        let icmp = &frame[14 + 40..14 + 40 + 32];
        assert_eq!(icmpv6_checksum(src, ALL_NODES, icmp), 0);
        assert!(
            frame.len() >= 60,
            "frames are padded to the Ethernet minimum"
        );
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("02:0a:ff:00:01:10").expect("mac"),
            [2, 10, 255, 0, 1, 16]
        );
        assert!(parse_mac("02:0a").is_err());
    }
}
