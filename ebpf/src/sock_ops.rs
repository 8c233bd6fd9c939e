//! `sock_ops` on `cgroupRoot`: bookkeeping for redirected sockets, and the audit events of
//! fast-path ones.
//!
//! - `TCP_CONNECT_CB` (the local port is assigned, the SYN not yet sent): for a socket the connect
//!   programs redirected, publish its original destination under (netns cookie, local port,
//!   family) — exactly what the agent sees as the peer of the connection it accepts on the capture
//!   listener — and ask for state callbacks.
//! - `ACTIVE_ESTABLISHED_CB`: a socket they let through on a cached allow (with a record in
//!   `LATCH_FASTPATH_CONNS`, socket storage) is connected: ask for state callbacks and send its
//!   opened event.
//! - `PASSIVE_ESTABLISHED_CB`: a server socket the inbound check admitted to a local pod's
//!   application by a cached allow (told from the agent's own sockets by what they carry; see
//!   `on_accepted`): give it a record in `LATCH_FASTPATH_CONNS`, ask for state callbacks and
//!   send its opened event.
//! - `TCP_LISTEN_CB`: a socket starts listening; record in `LATCH_MARKED_LISTENERS` whether it
//!   carries a socket mark of its own (see `on_listen`).
//! - `STATE_CB` to `TCP_CLOSE`: remove a redirected socket's entries, so the maps do not leak;
//!   for a fast-path socket that was opened, send its closed event (bytes acknowledged and
//!   received, the state it closed from and whether all it sent was acknowledged, duration) and
//!   forget it.
//!
//! Events are submitted without waking the agent until a quarter of the ring is waiting
//! (`FASTPATH_EVENTS_WAKEUP_BYTES`), and past that only at each further step
//! (`fastpath_event_wakes`); the agent drains it on its own clock as well. An event the
//! ring buffer has no room for is counted (`Counter::FastpathAuditDropped`), never
//! lost silently.

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_boot_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile},
};
use latch_common::{
    AF_INET, Counter, DIRECTION_INBOUND, DeliveryKey, ENDPOINT_LOCAL, FASTPATH_CLOSED,
    FASTPATH_OPENED, FastpathConn, FastpathEvent, IpKey, ListenerKey, OrigDst, RedirectKey,
    fastpath_event_wakes,
};

use crate::{
    context::{config, count},
    maps::{
        LATCH_AGENT_LISTENERS, LATCH_DELIVERIES, LATCH_ENDPOINTS, LATCH_FASTPATH_CONNS,
        LATCH_FASTPATH_EVENTS, LATCH_MARKED_LISTENERS, LATCH_ORIG_DST, LATCH_REDIRECTS,
    },
};

/// sock_ops programs return 1.
const OK: u32 = 1;

#[sock_ops]
pub fn latch_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // The event to report, if any, reported from one call site (the BPF stack is 512 bytes).
    let event = if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
        None
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        on_established(&ctx).map(|conn| (socket_cookie(&ctx), conn, FASTPATH_OPENED))
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_accepted(&ctx).map(|conn| (socket_cookie(&ctx), conn, FASTPATH_OPENED))
    } else if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        on_listen(&ctx);
        None
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        on_close(&ctx).map(|conn| (socket_cookie(&ctx), conn, FASTPATH_CLOSED))
    } else {
        None
    };
    if let Some((cookie, conn, kind)) = event {
        report(&ctx, cookie, &conn, kind);
    }
    OK
}

/// The context's full socket (null in the callbacks that run on request sockets).
#[inline(always)]
fn full_socket(ctx: &SockOpsContext) -> Option<*mut c_void> {
    // SAFETY: a single read of the context's socket field, at a constant offset.
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    (!sk.is_null()).then_some(sk.cast())
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

// The socket's fast-path record is asked for first, here and at close: a fast-path connection
// then costs no lookup of its cookie in `LATCH_ORIG_DST`, where it is never found (a miss in a
// large map is a cache miss; a socket is never both).
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(sk) = full_socket(ctx) else {
        return;
    };
    // A fast-path socket asks for state callbacks once it is established: until then nothing is
    // reported for it, and its record goes with the socket if it never connects.
    if LATCH_FASTPATH_CONNS.get(sk).is_some() {
        return;
    }
    if let Some(orig) = redirected(socket_cookie(ctx)) {
        let key = redirect_key(ctx, &orig);
        if LATCH_REDIRECTS.insert(key, orig, 0).is_ok() {
            ask_for_state_callbacks(ctx);
        }
    }
}

/// A fast-path socket connected: mark it opened, and ask for state callbacks to report its
/// close (asked for here, not at connect, so that its own change to `ESTABLISHED` costs no
/// callback); it is to be reported.
#[inline(always)]
fn on_established(ctx: &SockOpsContext) -> Option<FastpathConn> {
    let conn = LATCH_FASTPATH_CONNS.get(full_socket(ctx)?)?;
    ask_for_state_callbacks(ctx);
    // SAFETY: the socket's own record; only this socket's callbacks, which the kernel runs under
    // the socket lock, and `connect()` on it touch it.
    Some(unsafe {
        (*conn).opened = 1;
        *conn
    })
}

/// A server socket established: if the inbound check admitted it to the application by a cached
/// allow, give it a record; it is to be reported.
///
/// The inbound check passes a connection to a local pod's address in four cases, and this tells
/// them apart on the established socket itself, so nothing has to be remembered from the SYN (a
/// map of pending handshakes could be filled with SYNs that never complete, and lose the entry of
/// one held open meanwhile; `docs/datapath.md`):
/// - to the tunnel port, or from a loopback source (the agent's delivery marker): not a pod's
///   connection to report;
/// - announced in `LATCH_DELIVERIES`: the agent's own delivery, which it logs itself;
/// - steered to the agent's inbound listener: accepted there, so carrying the listener's entry in
///   `LATCH_AGENT_LISTENERS` (the kernel clones it onto each socket the listener accepts; only
///   the agent writes that map, so no application can pass its sockets off as the agent's, as
///   it could a socket mark); the agent logs it;
/// - otherwise admitted by a cached allow: reported, with the identities of both addresses as
///   the endpoint map has them now. One whose source is no longer known is counted as a dropped
///   audit event.
// A function of its own (a BPF-to-BPF call), so that its keys and the event of `report` do not
// share one 512-byte stack frame. Keys are lent by reference: by value, each lookup would take a
// copy on the stack.
#[inline(never)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn on_accepted(ctx: &SockOpsContext) -> Option<FastpathConn> {
    let (local, remote) = address_words(ctx);
    let ops = ctx.ops;
    // SAFETY: single 4-byte context reads. `remote_port` holds the port in network byte order in
    // its upper 16 bits, `local_port` in host byte order.
    let (remote_port, local_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let local_port = local_port as u16;
    let cfg = config()?;
    if local_port == cfg.tunnel_port {
        return None;
    }
    // One key on the stack, its addresses the keys of the endpoint lookups too (the frame, with
    // its caller's, must fit in 512 bytes).
    let four_tuple = DeliveryKey {
        remote: IpKey::from_words(remote),
        local: IpKey::from_words(local),
        remote_port: port_from_ops(remote_port),
        local_port,
    };
    if four_tuple.remote.is_loopback() {
        return None;
    }
    let pod = LATCH_ENDPOINTS.get_ptr(&four_tuple.local)?;
    // SAFETY: pointer from a successful hash lookup, valid for the program's run.
    if unsafe { (*pod).flags } & ENDPOINT_LOCAL == 0 {
        return None;
    }
    let sk = full_socket(ctx)?;
    if LATCH_AGENT_LISTENERS.get(sk).is_some() {
        return None;
    }
    if LATCH_DELIVERIES.get_ptr(&four_tuple).is_some() {
        return None;
    }
    let Some(src) = LATCH_ENDPOINTS.get_ptr(&four_tuple.remote) else {
        count(Counter::FastpathAuditDropped);
        return None;
    };
    // SAFETY: pointers from successful hash lookups; helper without arguments.
    let conn = unsafe {
        FastpathConn {
            src_identity: (*src).identity,
            dst_identity: (*pod).identity,
            started_ns: bpf_ktime_get_boot_ns(),
            port: local_port,
            direction: DIRECTION_INBOUND,
            opened: 1,
            _pad: 0,
        }
    };
    if !LATCH_FASTPATH_CONNS.set(sk, &conn) {
        count(Counter::FastpathAuditDropped);
        return None;
    }
    ask_for_state_callbacks(ctx);
    Some(conn)
}

/// `SOL_SOCKET` and `SO_MARK` (asm-generic/socket.h).
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// A socket starts listening: record its port if it carries a socket mark of its own, or forget
/// the port if it does not (a listener that went leaves its entry until the port is listened on
/// again, or the LRU drops it). The agent delivers to a marked listener from the loopback
/// marker: from the client's address, the listener's mark, not the delivery's, would route the
/// answers, out of the pod.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    if full_socket(ctx).is_none() {
        return;
    }
    let mut mark: u32 = 0;
    // SAFETY: the helper writes at most `size_of::<u32>()` bytes into `mark`, on the stack.
    let read = unsafe {
        bpf_getsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    let key = ListenerKey {
        // SAFETY: the context pointer is valid for the program's lifetime.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        _pad: [0; 3],
    };
    if read == 0 && mark != 0 {
        let _ = LATCH_MARKED_LISTENERS.insert(key, 1, 0);
    } else {
        let _ = LATCH_MARKED_LISTENERS.remove(key);
    }
}

/// A socket closes: forget a redirected one; forget a fast-path one, which is to be reported if
/// it was opened (one that never got established, refused or timed out, was never reported).
#[inline(always)]
fn on_close(ctx: &SockOpsContext) -> Option<FastpathConn> {
    let sk = full_socket(ctx)?;
    if let Some(conn) = LATCH_FASTPATH_CONNS.get(sk) {
        // SAFETY: the socket's own record.
        let conn = unsafe { *conn };
        LATCH_FASTPATH_CONNS.remove(sk);
        return (conn.opened != 0).then_some(conn);
    }
    let cookie = socket_cookie(ctx);
    if let Some(orig) = redirected(cookie) {
        let key = redirect_key(ctx, &orig);
        let _ = LATCH_REDIRECTS.remove(key);
        let _ = LATCH_ORIG_DST.remove(cookie);
    }
    None
}

/// Send one event for `conn` to the agent, written in place into the ring buffer (a 104-byte
/// event on the stack, with its addresses, overflows the 512-byte BPF stack); count it dropped if
/// the ring buffer is full. Every context field is read up front, whatever the event: reads on
/// separate branches get merged by LLVM into loads through a derived context pointer, which the
/// verifier refuses.
// A function of its own (a BPF-to-BPF call), so that its frame is not added to the callers'.
#[inline(never)]
fn report(ctx: &SockOpsContext, cookie: u64, conn: &FastpathConn, kind: u8) {
    let (local, remote) = address_words(ctx);
    let ops = ctx.ops;
    // SAFETY: single reads of context fields, each at a constant offset and of its own size.
    let (local_port, remote_port, snd_una, snd_nxt, bytes_acked, bytes_received) = unsafe {
        (
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).snd_una)),
            read_volatile(addr_of!((*ops).snd_nxt)),
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
        )
    };
    // STATE_CB's first argument: the state the socket leaves.
    let leaving = ctx.arg(0);
    let closed = kind == FASTPATH_CLOSED;
    // The clock only for a duration: an opened event has none (a helper call, not a context
    // read, so it may sit on a branch).
    // SAFETY: helper without arguments.
    let now = if closed {
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        0
    };
    // The client is this socket for outbound, its peer for inbound.
    let inbound = conn.direction == DIRECTION_INBOUND;
    let remote_port = port_from_ops(remote_port);
    let local_port = local_port as u16;
    let Some(mut entry) = LATCH_FASTPATH_EVENTS.reserve::<FastpathEvent>(0) else {
        count(Counter::FastpathAuditDropped);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer record of `FastpathEvent`'s size, aligned
    // to 8 by the kernel; every field is written once before it is submitted. The addresses are
    // written as four native-endian words, the layout `IpKey::from_words` reads.
    unsafe {
        addr_of_mut!((*event).src_identity).write(conn.src_identity);
        addr_of_mut!((*event).dst_identity).write(conn.dst_identity);
        let (src, dst) = if inbound {
            (remote, local)
        } else {
            (local, remote)
        };
        addr_of_mut!((*event).src_addr)
            .cast::<[u32; 4]>()
            .write_unaligned(src);
        addr_of_mut!((*event).dst_addr)
            .cast::<[u32; 4]>()
            .write_unaligned(dst);
        addr_of_mut!((*event).cookie).write(cookie);
        addr_of_mut!((*event).duration_ns).write(if closed {
            now.saturating_sub(conn.started_ns)
        } else {
            0
        });
        addr_of_mut!((*event).bytes_acked).write(if closed { bytes_acked } else { 0 });
        addr_of_mut!((*event).bytes_received).write(if closed { bytes_received } else { 0 });
        addr_of_mut!((*event).src_port).write(if inbound { remote_port } else { local_port });
        addr_of_mut!((*event).dst_port).write(conn.port);
        addr_of_mut!((*event).kind).write(kind);
        addr_of_mut!((*event).direction).write(conn.direction);
        addr_of_mut!((*event).close_state).write(if closed { leaving as u8 } else { 0 });
        addr_of_mut!((*event).all_acked).write(u8::from(closed && snd_una == snd_nxt));
    }
    // Wake the agent only once a quarter of the ring is waiting, and past that once per step;
    // otherwise it drains on its own clock (`fastpath_event_wakes`).
    let waiting = LATCH_FASTPATH_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    entry.submit(if fastpath_event_wakes(waiting) {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    });
}

/// A `bpf_sock_ops` `remote_port` in host byte order (the context holds the port in network
/// byte order in its upper 16 bits).
#[inline(always)]
fn port_from_ops(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

/// (local, remote) address of the socket as four native-endian words each (`IpKey::from_words`),
/// IPv4 mapped. A dual-stack socket talking IPv4 reports mapped addresses in its IPv6 fields
/// already. Every field is read, whatever the family, each word at a constant offset from the
/// context pointer: reads on two branches get merged by LLVM into one load through a derived
/// pointer, which the verifier refuses.
#[inline(always)]
fn address_words(ctx: &SockOpsContext) -> ([u32; 4], [u32; 4]) {
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
        // `::ffff:a.b.c.d`: the third word is the bytes 00 00 ff ff, the fourth the address as
        // the context holds it (network order in memory).
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        ([0, 0, mapped, local4], [0, 0, mapped, remote4])
    } else {
        (local6, remote6)
    }
}
