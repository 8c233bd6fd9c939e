//! The anti-spoofing check's own cost per packet (`docs/datapath.md`): the loaded program run on
//! crafted frames with `BPF_PROG_TEST_RUN`, for the `datapath` suite.

use anyhow::Context as _;
use latch_tests::netns;

use crate::pair::{PORT, Pair};

/// Nanoseconds per packet of the anti-spoofing check, by kind of packet.
pub type PacketCosts = Vec<(&'static str, u32)>;

/// The anti-spoofing check's own cost per packet, on node 1 of the fast-path cluster (agents
/// running): the loaded program is run on crafted frames with `BPF_PROG_TEST_RUN`, a million
/// times each, as if each had come in on the given interface.
pub fn cost(pair: &Pair) -> anyhow::Result<PacketCosts> {
    let cluster = &pair.cluster;
    let node = cluster.node(cluster.pod(pair.client).node);
    let (c, s) = (cluster.pod(pair.client), cluster.pod(pair.server));
    let client_mac = latch_tests::l2::mac(&c.netns_name, "eth0")?;
    let bridge_mac = latch_tests::l2::mac(&node.netns_name, "br0")?;
    let host_if = c.host_if.clone();
    let frames = vec![
        (
            "an enrolled pod's packet at its own port (bound source, MAC check)",
            host_if.clone(),
            tcp4(bridge_mac, client_mac, c.ipv4, s.ipv4),
        ),
        (
            "a packet from a pod on another node at the node's link",
            "fab0".to_owned(),
            tcp4(client_mac, bridge_mac, s.ipv4, c.ipv4),
        ),
        (
            "the same, IPv6",
            "fab0".to_owned(),
            tcp6(client_mac, bridge_mac, s.ipv6, c.ipv6),
        ),
        (
            "a packet from outside the mesh at the node's link",
            "fab0".to_owned(),
            tcp4(client_mac, bridge_mac, "10.244.99.9".parse()?, c.ipv4),
        ),
    ];
    netns::in_netns(&node.netns(), move || {
        let id = *latch::datapath::install::programs_on_interface(nix::net::if_::if_nametoindex(
            host_if.as_str(),
        )?)?
        .first()
        .context("no program on the pod's interface")?;
        let program = bpf_run::prog_fd_by_id(id).context("opening the program")?;
        frames
            .into_iter()
            .map(|(label, ifname, frame)| {
                let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())?;
                let run = bpf_run::test_run(&program, &frame, ifindex, 1_000_000)
                    .with_context(|| format!("BPF_PROG_TEST_RUN: {label}"))?;
                // TCX_NEXT: every one of these frames passes.
                anyhow::ensure!(run.retval == u32::MAX, "{label}: dropped ({})", run.retval);
                Ok((label, run.ns_per_run))
            })
            .collect()
    })
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP SYN header (checksums are not looked at).
fn syn() -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp
}

fn tcp4(dst: [u8; 6], src: [u8; 6], from: std::net::Ipv4Addr, to: std::net::Ipv4Addr) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&syn());
    ethernet(dst, src, 0x0800, &ip)
}

fn tcp6(dst: [u8; 6], src: [u8; 6], from: std::net::Ipv6Addr, to: std::net::Ipv6Addr) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    ip.extend_from_slice(&syn());
    ethernet(dst, src, 0x86dd, &ip)
}

/// Two BPF commands for the per-packet cost: a program's fd by its id, and a test run.
mod bpf_run {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

    use latch::datapath::syscall::bpf_call as bpf;

    // The bpf(2) calls, and a descriptor one returned, owned through `OwnedFd::from_raw_fd`.
    #[allow(unsafe_code)]
    pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
        #[repr(C)]
        struct Attr {
            prog_id: u32,
            next_id: u32,
            open_flags: u32,
        }
        // SAFETY: the attribute carries only an id and flags.
        let fd = unsafe {
            bpf(
                BPF_PROG_GET_FD_BY_ID,
                &mut Attr {
                    prog_id: id,
                    next_id: 0,
                    open_flags: 0,
                },
            )
        }?;
        // SAFETY: a new fd the kernel handed us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub struct Run {
        pub retval: u32,
        pub ns_per_run: u32,
    }

    /// Run a `sched_cls` program `repeat` times on `frame`, as come in on `ifindex` of the
    /// calling thread's namespace.
    #[allow(unsafe_code)]
    pub fn test_run(
        prog: &impl AsFd,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> std::io::Result<Run> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        // `struct __sk_buff` up to and including `ifindex` (word 10); the rest stays zero.
        let mut ctx = [0u32; 11];
        ctx[10] = ifindex;
        let mut attr = Attr {
            prog_fd: prog.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: std::mem::size_of_val(&ctx) as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `data_in` and `ctx_in` point to `data_size_in` and `ctx_size_in` bytes the
        // kernel only reads, alive until the call returns; no output buffers are given.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
        Ok(Run {
            retval: attr.retval,
            ns_per_run: attr.duration,
        })
    }
}
