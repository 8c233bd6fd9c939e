//! The anti-spoofing check: a TC classifier at the ingress (TCX) of every Ethernet interface of
//! the node's network namespace, so that no pod can send with an address that is not its own.
//!
//! The kernel fast path binds an identity to a source address (the inbound check admits a SYN by
//! the identity of its source IP), so that binding has to be true. For each address a frame
//! *claims* — the IPv4 or IPv6 source, the sender of an ARP packet, the target of an IPv6
//! neighbour advertisement (or of a duplicate-address probe) — arriving on interface `I`:
//!
//! 1. the address is bound in `LATCH_SOURCES` (an enrolled local pod's address, or one the node
//!    itself holds on exactly one interface): pass only if `I` is the interface it is bound to,
//!    or that interface's bridge (frames bridged up to the node are seen again at the bridge);
//! 2. `I` is an enrolled pod's host-side interface (`INTERFACE_POD`): drop, unless the address
//!    is IPv6 link-local or unspecified, or the ARP sender is `0.0.0.0` (neighbour discovery,
//!    duplicate-address detection, ARP probes need them);
//! 3. the address is a mesh endpoint (`LATCH_ENDPOINTS`, a pod on another node) and `I` is a
//!    veth to another namespace (`INTERFACE_VETH`, which is how pods reach the node): pass only
//!    if the route back to it leaves through `I` (or `I`'s master), as strict `rp_filter`
//!    decides. The node's other interfaces link it to the other nodes, whose pods legitimately
//!    come in there; the network between the nodes is trusted and the lookup is spared;
//! 4. otherwise pass.
//!
//! Besides: a frame on a bridge port that carries an enrolled pod's MAC address as its source is
//! dropped unless the port is that pod's own (a bridge would otherwise learn the MAC on the
//! attacker's port and hand it the pod's traffic); router advertisements and redirects from an
//! enrolled pod are dropped (pods are not routers); and an enrolled pod may send only IPv4, IPv6
//! and ARP. Drops are counted (`spoof_dropped`). A pass returns `TCX_NEXT`, so programs attached
//! after this one still run; this one is attached first.
//!
//! An interface's `LATCH_INTERFACES` entry carries a copy of what `LATCH_SOURCES` and
//! `LATCH_MACS` bind to it (up to two addresses and a MAC), so an enrolled pod's own frames pass
//! after that one lookup, as the other two would pass them; anything else asks them.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_fib_lookup as FibLookup, tcx_action_base::TCX_NEXT},
    helpers::bpf_fib_lookup,
    macros::classifier,
    programs::TcContext,
};
use core::ptr::{addr_of, read_volatile};
use latch_common::{
    AF_INET, AF_INET6, Counter, INTERFACE_BRIDGE_PORT, INTERFACE_OWN_MAC, INTERFACE_POD,
    INTERFACE_VETH, InterfaceInfo, IpKey, LOOPBACK_IFINDEX, MacKey,
};

use crate::{
    context::count,
    maps::{LATCH_ENDPOINTS, LATCH_INTERFACES, LATCH_MACS, LATCH_SOURCES},
};

/// The frame goes on (to the next TCX program, then the stack or the bridge).
const PASS: i32 = TCX_NEXT;
const DROP: i32 = TC_ACT_SHOT;

/// Only Ethernet interfaces are guarded: the network header follows a 14-byte Ethernet header
/// (a VLAN tag the kernel has already taken into the skb's metadata is not in the data).
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_ICMPV6: u8 = 58;
/// Extension headers walked to find an ICMPv6 message; a packet with more is dropped (nothing
/// legitimate needs that many, and neighbour discovery must not hide behind them).
const MAX_EXTENSION_HEADERS: usize = 8;

const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_NEIGHBOUR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;

/// `bpf_fib_lookup` results after which the output interface is filled in.
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

/// `T` at `offset` from the start of the frame: read in place when the linear part of the
/// packet holds it (the usual case: headers are linear), else copied by `bpf_skb_load_bytes`,
/// which also reads from fragments. `None` if the packet is shorter.
#[inline(always)]
fn read<T: Copy, const OFFSET: usize>(ctx: &TcContext) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + OFFSET + core::mem::size_of::<T>() <= end {
        // SAFETY: within [data, data_end), which the verifier checks too.
        Some(unsafe { core::ptr::read_unaligned((start + OFFSET) as *const T) })
    } else {
        ctx.load::<T>(OFFSET).ok()
    }
}

#[classifier]
pub fn latch_antispoof(ctx: TcContext) -> i32 {
    if allowed(&ctx) {
        PASS
    } else {
        count(Counter::SpoofDropped);
        DROP
    }
}

/// The interface a frame came in on.
struct Ingress {
    ifindex: u32,
    /// `INTERFACE_*` flags, 0 for an interface with no entry.
    flags: u32,
    /// Its entry in `LATCH_INTERFACES`, read in place (copying it would cost more than the
    /// lookups its copy saves), if it has one.
    entry: Option<*const InterfaceInfo>,
}

impl Ingress {
    fn is_pod(&self) -> bool {
        self.flags & INTERFACE_POD != 0
    }

    fn is_veth(&self) -> bool {
        self.flags & INTERFACE_VETH != 0
    }

    fn master(&self) -> u32 {
        // SAFETY: pointer from a successful hash lookup, valid for the program's run.
        self.entry.map_or(0, |e| unsafe { (*e).master })
    }

    /// `LATCH_SOURCES` binds `addr` to this interface, by the copy its entry carries.
    #[inline(always)]
    fn owns(&self, addr: &IpKey) -> bool {
        let Some(e) = self.entry else {
            return false;
        };
        // SAFETY: as above.
        let (n, own) = unsafe { ((*e).own_count, &(*e).own) };
        (n > 0 && own[0].same_as(addr)) || (n > 1 && own[1].same_as(addr))
    }

    /// `LATCH_MACS` binds `mac` to this interface, by the copy its entry carries.
    #[inline(always)]
    fn owns_mac(&self, mac: &[u8; 6]) -> bool {
        match self.entry {
            // SAFETY: as above.
            Some(e) if self.flags & INTERFACE_OWN_MAC != 0 => unsafe { (*e).own_mac == *mac },
            _ => false,
        }
    }
}

#[inline(always)]
fn allowed(ctx: &TcContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: 4-byte reads of `__sk_buff` fields at constant offsets.
    let (protocol, ifindex) = unsafe {
        (
            read_volatile(addr_of!((*skb).protocol)),
            read_volatile(addr_of!((*skb).ifindex)),
        )
    };
    let entry = LATCH_INTERFACES.get_ptr(ifindex);
    // SAFETY: pointer from a successful hash lookup.
    let flags = entry.map_or(0, |e| unsafe { (*e).flags });
    let at = Ingress {
        ifindex,
        flags,
        entry,
    };
    if flags & INTERFACE_BRIDGE_PORT != 0 && !mac_allowed(ctx, &at) {
        return false;
    }
    match u16::from_be(protocol as u16) {
        ETH_P_IP => ipv4(ctx, &at),
        ETH_P_IPV6 => ipv6(ctx, &at),
        ETH_P_ARP => arp(ctx, &at),
        // A pod speaks IPv4, IPv6 and ARP; anything else from an enrolled one (a second VLAN
        // tag, say) is not let through to be interpreted by someone else.
        _ => !at.is_pod(),
    }
}

/// A frame whose source MAC is an enrolled pod's passes only on that pod's own port. The port's
/// own pod's MAC passes without the lookup.
#[inline(always)]
fn mac_allowed(ctx: &TcContext, at: &Ingress) -> bool {
    let Some(mac) = read::<[u8; 6], 6>(ctx) else {
        return true;
    };
    if at.owns_mac(&mac) {
        return true;
    }
    match LATCH_MACS.get_ptr(MacKey::new(mac)) {
        // SAFETY: pointer from a successful hash lookup.
        Some(owner) => (unsafe { *owner }) == at.ifindex,
        None => true,
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, at: &Ingress) -> bool {
    // Source and destination, bytes 12..20 of the header. A truncated header is left to the
    // stack, which drops it.
    let Some(addrs) = read::<[u8; 8], { ETH_HLEN + 12 }>(ctx) else {
        return true;
    };
    let src = IpKey::from_v4([addrs[0], addrs[1], addrs[2], addrs[3]]);
    let dst = IpKey::from_v4([addrs[4], addrs[5], addrs[6], addrs[7]]);
    claim(ctx, at, &src, false, &dst)
}

#[inline(always)]
fn ipv6(ctx: &TcContext, at: &Ingress) -> bool {
    let Some(header) = read::<[u8; IPV6_HLEN], ETH_HLEN>(ctx) else {
        return true;
    };
    let src = v6_at(&header, 8);
    let dst = v6_at(&header, 24);
    let neighbour_discovery = src.is_v6_link_local() || src.is_v6_unspecified();
    if !claim(ctx, at, &src, neighbour_discovery, &dst) {
        return false;
    }

    let mut next = header[6];
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut walked = 0;
    while walked < MAX_EXTENSION_HEADERS
        && (next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_DEST)
    {
        let Ok(ext) = ctx.load::<[u8; 2]>(offset) else {
            return true;
        };
        next = ext[0];
        offset += (ext[1] as usize + 1) * 8;
        walked += 1;
    }
    if next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_DEST {
        return false;
    }
    if next != NEXTHDR_ICMPV6 {
        return true;
    }
    let Ok(kind) = ctx.load::<u8>(offset) else {
        return true;
    };
    match kind {
        // The target address sits after type, code, checksum and 4 bytes of flags.
        ND_NEIGHBOUR_ADVERT => claim_nd_target(ctx, at, offset),
        // A duplicate-address probe announces the intent to take its target.
        ND_NEIGHBOUR_SOLICIT if src.is_v6_unspecified() => claim_nd_target(ctx, at, offset),
        ND_ROUTER_ADVERT | ND_REDIRECT => !at.is_pod(),
        _ => true,
    }
}

#[inline(always)]
fn claim_nd_target(ctx: &TcContext, at: &Ingress, icmp: usize) -> bool {
    let Ok(target) = ctx.load::<[u8; 16]>(icmp + 8) else {
        return true;
    };
    let target = IpKey::from_v6(target);
    claim(
        ctx,
        at,
        &target,
        target.is_v6_link_local(),
        &IpKey::default(),
    )
}

#[inline(always)]
fn arp(ctx: &TcContext, at: &Ingress) -> bool {
    // hardware type, protocol type, lengths, operation, sender MAC, sender IP, target MAC, IP.
    let Ok(a) = ctx.load::<[u8; 28]>(ETH_HLEN) else {
        return true;
    };
    // Only ARP for IPv4 over 6-byte hardware addresses feeds the neighbour table.
    if a[2] != 0x08 || a[3] != 0x00 || a[4] != 6 || a[5] != 4 {
        return true;
    }
    let sender = [a[14], a[15], a[16], a[17]];
    let probe = sender == [0; 4];
    claim(ctx, at, &IpKey::from_v4(sender), probe, &IpKey::default())
}

#[inline(always)]
fn v6_at(buf: &[u8; IPV6_HLEN], at: usize) -> IpKey {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        addr[i] = buf[at + i];
        i += 1;
    }
    IpKey::from_v6(addr)
}

/// Whether a frame that came in on `at` may use `addr` (see the module doc). `local` is the
/// frame's destination, the source of the reverse route (zero where there is none).
#[inline(always)]
fn claim(ctx: &TcContext, at: &Ingress, addr: &IpKey, exempt: bool, local: &IpKey) -> bool {
    // What the lookup below would find and pass, carried by the interface's own entry: a pod's
    // own packets pass here.
    if at.owns(addr) {
        return true;
    }
    if let Some(binding) = LATCH_SOURCES.get_ptr(addr) {
        // SAFETY: pointer from a successful hash lookup.
        let binding = unsafe { *binding };
        // An ifindex is never 0: a binding to 0 (host side unknown) lets nothing through.
        return binding.ifindex == at.ifindex || binding.master == at.ifindex;
    }
    if at.is_pod() {
        return exempt;
    }
    if at.is_veth() && LATCH_ENDPOINTS.get_ptr(addr).is_some() {
        return route_back_through(ctx, at, addr, local);
    }
    true
}

/// Strict reverse-path check, as the kernel's `rp_filter=1` does it (`fib_validate_source`): the
/// route the node would use to send to `addr` — a full policy-routing lookup, from loopback (no
/// `BPF_FIB_LOOKUP_OUTPUT`, which would pin the lookup to one interface, and no `DIRECT`, which
/// would skip the rules), with `local` as the source — must leave through `at`, or through the
/// master `at` is a port of. Anything but a unicast route (no route, a local address,
/// blackhole, prohibit) fails.
#[inline(always)]
fn route_back_through(ctx: &TcContext, at: &Ingress, addr: &IpKey, local: &IpKey) -> bool {
    // SAFETY: a plain C struct of integers, for which all zeroes is valid.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.ifindex = LOOPBACK_IFINDEX;
    if addr.is_v4_mapped() {
        params.family = AF_INET as u8;
        params.__bindgen_anon_4.ipv4_dst = addr.to_words()[3];
        params.__bindgen_anon_3.ipv4_src = local.to_words()[3];
    } else {
        params.family = AF_INET6 as u8;
        params.__bindgen_anon_4.ipv6_dst = addr.to_words();
        params.__bindgen_anon_3.ipv6_src = local.to_words();
    }
    // SAFETY: the helper reads and writes `params`, a stack struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    (rc == FIB_SUCCESS || rc == FIB_NO_NEIGH || rc == FIB_FRAG_NEEDED)
        && params.ifindex != 0
        && (params.ifindex == at.ifindex || params.ifindex == at.master())
}
