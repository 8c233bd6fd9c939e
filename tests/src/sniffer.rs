//! A packet capture on one interface of a namespace (an `AF_PACKET` socket), to check what
//! crosses the wire between nodes: which TCP ports, and whether a payload ever appears in clear.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

use crate::netns;

/// A capture started on an interface; frames queue in the socket until [`Sniffer::frames`].
pub struct Sniffer {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl Sniffer {
    /// Start capturing every frame on `ifname` inside `netns_path`.
    // A raw AF_PACKET socket bound to one interface, read by hand: libc only.
    #[allow(unsafe_code)]
    pub fn start(netns_path: &Path, ifname: &str) -> anyhow::Result<Self> {
        let ifname = ifname.to_owned();
        let fd = netns::in_netns(netns_path, move || {
            let c_name = std::ffi::CString::new(ifname.clone())?;
            // SAFETY: plain syscalls with valid arguments; the fd is owned right away.
            unsafe {
                let raw = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                );
                if raw < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(raw);
                let size: libc::c_int = 16 * 1024 * 1024;
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
                let index = libc::if_nametoindex(c_name.as_ptr());
                if index == 0 {
                    bail!("no interface {ifname}");
                }
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = ETH_P_ALL.to_be();
                addr.sll_ifindex = index as i32;
                if libc::bind(
                    raw,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    bail!("binding to {ifname}: {}", std::io::Error::last_os_error());
                }
                Ok(fd)
            }
        })
        .context("starting the capture")?;
        Ok(Self { fd })
    }

    /// Every frame captured so far (drains the queue).
    pub fn frames(&self) -> Vec<Vec<u8>> {
        use nix::sys::socket::{MsgFlags, recv};
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) if n > 0 => n,
                _ => return frames,
            };
            frames.push(buf[..n].to_vec());
        }
    }
}

/// A TCP segment seen in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
}

/// Parse an Ethernet frame carrying TCP over IPv4 or IPv6.
pub fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (ip, proto, tcp_start) = match ethertype {
        0x0800 => {
            let ip = frame.get(14..)?;
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            (&ip[..total.min(ip.len())], *ip.get(9)?, ihl)
        }
        0x86dd => {
            let ip = frame.get(14..)?;
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            (&ip[..(40 + len).min(ip.len())], *ip.get(6)?, 40)
        }
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let tcp = ip.get(tcp_start..)?;
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src_port: u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        dst_port: u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
        payload_len: tcp.len().saturating_sub(data_offset),
    })
}

/// Whether `needle` appears anywhere in `frame`.
pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && frame.windows(needle.len()).any(|w| w == needle)
}
