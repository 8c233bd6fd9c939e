//! `cgroup/connect4` and `cgroup/connect6`: the outbound decision for enrolled workloads.
//!
//! For a TCP `connect()` from an enrolled cgroup to a mesh endpoint:
//! - a fresh cached allow for (source identity, destination identity, port, outbound) leaves the
//!   connection untouched (fast path), remembered on the socket (`LATCH_FASTPATH_CONNS`, socket
//!   storage) for `sock_ops`'s audit events;
//! - a fresh cached deny fails `connect()` with `EPERM`;
//! - otherwise the original destination is stored under the socket cookie (and a fast-path record
//!   an earlier, failed `connect()` of the socket left is removed) and the destination is
//!   rewritten to the capture listener on loopback in the caller's own network namespace.
//!
//! Everything else (not enrolled, not TCP, loopback, not a mesh endpoint) is left alone.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use latch_common::{
    AF_INET, AF_INET6, Counter, DECISION_ALLOW, DECISION_DENY, DIRECTION_OUTBOUND,
    ENDPOINT_TUNNEL_ONLY, EndpointInfo, IpKey, MAX_CGROUP_DEPTH, OrigDst, VerdictKey,
    WORKLOAD_TUNNEL_ONLY, WorkloadInfo,
};

use crate::{
    context::{Fresh, config, count, fastpath_conn, fresh_verdict},
    maps::{LATCH_ENDPOINTS, LATCH_FASTPATH_CONNS, LATCH_ORIG_DST, LATCH_WORKLOADS},
};

/// `connect()` proceeds.
const ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`.
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn latch_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: `sa` is the context pointer; each field is read on its own (4-byte loads).
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    let octets = ip.to_ne_bytes();
    if octets[0] == 127 {
        return ALLOW;
    }
    let dst = IpKey::from_v4(octets);
    match decide(&ctx, &dst, port_from_user(port), AF_INET) {
        Action::Allow => ALLOW,
        Action::Reject => REJECT,
        Action::Redirect(capture_port) => {
            let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
            // SAFETY: connect4 programs may write user_ip4 and user_port (4-byte stores).
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), loopback);
                write_volatile(addr_of_mut!((*sa).user_port), port_to_user(capture_port));
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn latch_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let dst = read_ip6(sa);
    // SAFETY: single 4-byte context read.
    let port = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    let mapped = dst.is_v4_mapped();
    if dst.is_loopback() {
        return ALLOW;
    }
    // A dual-stack socket connecting to a mapped IPv4 address talks IPv4 on the wire and reaches
    // the IPv4 capture listener.
    let wire_family = if mapped { AF_INET } else { AF_INET6 };
    match decide(&ctx, &dst, port_from_user(port), wire_family) {
        Action::Allow => ALLOW,
        Action::Reject => REJECT,
        Action::Redirect(capture_port) => {
            let target = if mapped {
                IpKey::from_v4([127, 0, 0, 1])
            } else {
                let mut one = [0u8; 16];
                one[15] = 1;
                IpKey::from_v6(one)
            };
            write_ip6(sa, &target);
            // SAFETY: connect6 programs may write user_port (4-byte store).
            unsafe { write_volatile(addr_of_mut!((*sa).user_port), port_to_user(capture_port)) };
            ALLOW
        }
    }
}

enum Action {
    Allow,
    Reject,
    /// Rewrite the destination to this loopback port.
    Redirect(u16),
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: &IpKey, port: u16, wire_family: u16) -> Action {
    let Some(cfg) = config() else {
        return Action::Allow;
    };
    let Some(workload) = caller_workload(cfg.cgroup_root_level) else {
        return Action::Allow;
    };
    let Some(endpoint) = LATCH_ENDPOINTS.get_ptr(dst) else {
        return Action::Allow;
    };
    // SAFETY: pointer from a successful hash lookup.
    let endpoint: EndpointInfo = unsafe { *endpoint };

    let cacheable =
        workload.flags & WORKLOAD_TUNNEL_ONLY == 0 && endpoint.flags & ENDPOINT_TUNNEL_ONLY == 0;
    if cacheable {
        let key = VerdictKey::new(
            workload.identity,
            endpoint.identity,
            port,
            DIRECTION_OUTBOUND,
        );
        match fresh_verdict(&key) {
            Some(Fresh {
                decision: DECISION_ALLOW,
                now_ns,
            }) => {
                count(Counter::FastpathAllowed);
                remember_fastpath(ctx, &key, now_ns);
                return Action::Allow;
            }
            Some(Fresh {
                decision: DECISION_DENY,
                ..
            }) => {
                count(Counter::CachedDeny);
                return Action::Reject;
            }
            _ => {}
        }
    }

    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: *dst,
        port,
        family: wire_family,
        _pad: 0,
    };
    // A fast-path record left on this socket by an earlier connect() that failed before its SYN
    // would make `sock_ops`, which asks for it first, take the socket for a fast-path one and
    // leave its original destination unpublished. One deletion on the redirected path, which
    // goes through the agent anyway.
    LATCH_FASTPATH_CONNS.remove(socket(ctx));
    if LATCH_ORIG_DST.insert(cookie, orig, 0).is_err() {
        // Without the original destination the agent could not serve the connection: fail closed.
        return Action::Reject;
    }
    count(Counter::Redirected);
    Action::Redirect(cfg.capture_port)
}

/// Remember a connection let through by a cached allow, so that `sock_ops` can report it when it
/// is established and when it closes. The connection proceeds either way; an entry that cannot
/// be stored is counted as a dropped audit event.
#[inline(always)]
fn remember_fastpath(ctx: &SockAddrContext, key: &VerdictKey, now_ns: u64) {
    if !LATCH_FASTPATH_CONNS.set(socket(ctx), &fastpath_conn(key, now_ns)) {
        count(Counter::FastpathAuditDropped);
    }
}

/// The socket `connect()` was called on (never null in `connect4/6`).
#[inline(always)]
fn socket(ctx: &SockAddrContext) -> *mut core::ffi::c_void {
    // SAFETY: a single read of the context's socket field, at a constant offset.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk)) }.cast()
}

/// The enrolled workload of the calling task: its own cgroup, or the nearest enrolled ancestor
/// below `cgroupRoot` (containers nested in a pod cgroup).
#[inline(always)]
fn caller_workload(root_level: u32) -> Option<WorkloadInfo> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(w) = LATCH_WORKLOADS.get_ptr(own) {
        // SAFETY: pointer from a successful hash lookup.
        return Some(unsafe { *w });
    }
    // A constant trip count keeps the loop provable for the verifier.
    let mut depth = 1;
    while depth <= MAX_CGROUP_DEPTH {
        // SAFETY: helper with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id((root_level + depth) as i32) };
        if id == 0 || id == own {
            return None;
        }
        if let Some(w) = LATCH_WORKLOADS.get_ptr(id) {
            // SAFETY: pointer from a successful hash lookup.
            return Some(unsafe { *w });
        }
        depth += 1;
    }
    None
}

#[inline(always)]
fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: single 4-byte context reads.
    let (ty, proto) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    ty == SOCK_STREAM && proto == IPPROTO_TCP
}

// Each word of `user_ip6` is read and written at a constant offset from the context pointer:
// the verifier rejects accesses through a derived pointer, which a loop can produce.

#[inline(always)]
fn read_ip6(sa: *mut bpf_sock_addr) -> IpKey {
    // SAFETY: one 4-byte context read per word.
    let w = unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    };
    IpKey::from_words(w)
}

#[inline(always)]
pub(crate) fn write_ip6(sa: *mut bpf_sock_addr, ip: &IpKey) {
    let w = ip.to_words();
    // SAFETY: one 4-byte context store per word.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
    }
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_from_user(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

#[inline(always)]
fn port_to_user(port: u16) -> u32 {
    port.to_be() as u32
}
