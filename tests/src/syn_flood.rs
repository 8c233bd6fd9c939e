//! TCP SYNs sent from a raw socket inside a pod, that never complete a handshake: what a pod with
//! `CAP_NET_RAW` can send without the connect programs, or any socket of its own, ever seeing a
//! connection. For the attacks on the kernel's bookkeeping of connections it admits.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    path::Path,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns;

/// Send, from inside `netns`, one SYN from `src` to `dst` for every pair of a port of
/// `src_ports` and one of `dst_ports` (IPv4; the kernel adds the IP header, from `src`, which
/// the namespace must hold). Returns how many were sent.
pub fn send_syns(
    netns: &Path,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_ports: RangeInclusive<u16>,
    dst_ports: Vec<u16>,
) -> anyhow::Result<u64> {
    netns::in_netns(netns, move || {
        let socket =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).context("raw TCP socket")?;
        socket
            .bind(&SockAddr::from(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("binding {src}"))?;
        let to = SockAddr::from(SocketAddrV4::new(dst, 0));
        let mut sent = 0u64;
        for dst_port in &dst_ports {
            for src_port in src_ports.clone() {
                let segment = syn(src, dst, src_port, *dst_port, sent as u32);
                socket
                    .send_to(&segment, &to)
                    .with_context(|| format!("sending a SYN to {dst}:{dst_port}"))?;
                sent += 1;
            }
        }
        Ok(sent)
    })
}

/// A 20-byte TCP header with only SYN set, its checksum over the IPv4 pseudo-header.
pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16, seq: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    // Data offset 5 words; flags SYN; window 64240.
    h[12] = 5 << 4;
    h[13] = 0x02;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(&h);
    h[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_with_its_checksum_sums_to_all_ones() {
        let (src, dst) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2));
        let h = syn(src, dst, 40_000, 8080, 7);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&h);
        assert_eq!(checksum(&pseudo), 0, "{h:?}");
        assert_eq!(h[13], 0x02, "SYN only");
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 8080);
    }
}
