//! `sock_ops` on `cgroupRoot`: bookkeeping for redirected sockets, and the audit events of
//! fast-path ones.
//!
//! - `TCP_CONNECT_CB` (the local port is assigned, the SYN not yet sent): for a socket the connect
//!   programs redirected, publish its original destination under (netns cookie, local port,
//!   family) — exactly what the agent sees as the peer of the connection it accepts on the capture
//!   listener — and ask for state callbacks. A socket they let through on a cached allow (in
//!   `LATCH_FASTPATH_CONNS`) asks for state callbacks too.
//! - `ACTIVE_ESTABLISHED_CB`: a fast-path socket is connected: send its opened event.
//! - `STATE_CB` to `TCP_CLOSE`: remove a redirected socket's entries, so the maps do not leak;
//!   for a fast-path socket that was opened, send its closed event (bytes acknowledged and
//!   received, the state it closed from and whether all it sent was acknowledged, duration) and
//!   forget it.
//!
//! An event the ring buffer has no room for is counted (`Counter::FastpathAuditDropped`), never
//! lost silently.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::{addr_of, read_volatile};
use latch_common::{
    AF_INET, Counter, FASTPATH_CLOSED, FASTPATH_OPENED, FastpathConn, FastpathEvent, IpKey,
    OrigDst, RedirectKey,
};

use crate::{
    context::count,
    maps::{LATCH_FASTPATH_CONNS, LATCH_FASTPATH_EVENTS, LATCH_ORIG_DST, LATCH_REDIRECTS},
};

/// sock_ops programs return 1.
const OK: u32 = 1;

#[sock_ops]
pub fn latch_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let cookie = socket_cookie(&ctx);
        on_connect(&ctx, cookie);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let cookie = socket_cookie(&ctx);
        on_established(&ctx, cookie);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        let cookie = socket_cookie(&ctx);
        on_close(&ctx, cookie);
    }
    OK
}

#[inline(always)]
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

#[inline(always)]
fn redirected(cookie: u64) -> Option<OrigDst> {
    let orig = LATCH_ORIG_DST.get_ptr(cookie)?;
    // SAFETY: pointer from a successful hash lookup.
    Some(unsafe { *orig })
}

#[inline(always)]
fn redirect_key(ctx: &SockOpsContext, orig: &OrigDst) -> RedirectKey {
    RedirectKey {
        // SAFETY: the context pointer is valid for the program's lifetime.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        family: orig.family,
        _pad: 0,
    }
}

#[inline(always)]
fn ask_for_state_callbacks(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext, cookie: u64) {
    if let Some(orig) = redirected(cookie) {
        let key = redirect_key(ctx, &orig);
        if LATCH_REDIRECTS.insert(key, orig, 0).is_ok() {
            ask_for_state_callbacks(ctx);
        }
        return;
    }
    if LATCH_FASTPATH_CONNS.get_ptr(cookie).is_some() {
        ask_for_state_callbacks(ctx);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, cookie: u64) {
    let Some(conn) = LATCH_FASTPATH_CONNS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: pointer from a successful hash lookup; only this socket's callbacks, which the
    // kernel runs under the socket lock, touch its entry.
    let snapshot = unsafe {
        (*conn).opened = 1;
        *conn
    };
    report(ctx, cookie, &snapshot, FASTPATH_OPENED);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext, cookie: u64) {
    if let Some(orig) = redirected(cookie) {
        let key = redirect_key(ctx, &orig);
        let _ = LATCH_REDIRECTS.remove(key);
        let _ = LATCH_ORIG_DST.remove(cookie);
        return;
    }
    let Some(conn) = LATCH_FASTPATH_CONNS.get_ptr(cookie) else {
        return;
    };
    // SAFETY: pointer from a successful hash lookup.
    let conn = unsafe { *conn };
    // A connection that never got established (refused, timed out) was never reported opened.
    if conn.opened != 0 {
        report(ctx, cookie, &conn, FASTPATH_CLOSED);
    }
    let _ = LATCH_FASTPATH_CONNS.remove(cookie);
}

/// Send one event for `conn` to the agent; count it dropped if the ring buffer is full.
#[inline(always)]
fn report(ctx: &SockOpsContext, cookie: u64, conn: &FastpathConn, kind: u8) {
    let (src_addr, dst_addr) = addresses(ctx);
    let ops = ctx.ops;
    let (duration_ns, bytes_acked, bytes_received, close_state, all_acked) =
        if kind == FASTPATH_CLOSED {
            // SAFETY: helper without arguments; single reads of context fields, each at a
            // constant offset and of its own size.
            unsafe {
                let snd_una = read_volatile(addr_of!((*ops).snd_una));
                let snd_nxt = read_volatile(addr_of!((*ops).snd_nxt));
                (
                    bpf_ktime_get_boot_ns().saturating_sub(conn.started_ns),
                    read_volatile(addr_of!((*ops).bytes_acked)),
                    read_volatile(addr_of!((*ops).bytes_received)),
                    // STATE_CB's first argument: the state the socket leaves.
                    ctx.arg(0) as u8,
                    u8::from(snd_una == snd_nxt),
                )
            }
        } else {
            (0, 0, 0, 0, 0)
        };
    let event = FastpathEvent {
        src_identity: conn.src_identity,
        dst_identity: conn.dst_identity,
        src_addr,
        dst_addr,
        cookie,
        duration_ns,
        bytes_acked,
        bytes_received,
        src_port: ctx.local_port() as u16,
        dst_port: conn.port,
        kind,
        direction: conn.direction,
        close_state,
        all_acked,
    };
    if LATCH_FASTPATH_EVENTS
        .output::<FastpathEvent>(&event, 0)
        .is_err()
    {
        count(Counter::FastpathAuditDropped);
    }
}

/// (local, remote) address of the socket. A dual-stack socket talking IPv4 reports mapped
/// addresses in its IPv6 fields, which is the map form already. Every field is read, whatever
/// the family, each word at a constant offset from the context pointer: reads on two branches
/// get merged by LLVM into one load through a derived pointer, which the verifier refuses.
#[inline(always)]
fn addresses(ctx: &SockOpsContext) -> (IpKey, IpKey) {
    let ops = ctx.ops;
    // SAFETY: single 4-byte context reads.
    let (family, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
        )
    };
    if family == AF_INET as u32 {
        (
            IpKey::from_v4(local4.to_ne_bytes()),
            IpKey::from_v4(remote4.to_ne_bytes()),
        )
    } else {
        (IpKey::from_words(local6), IpKey::from_words(remote6))
    }
}
