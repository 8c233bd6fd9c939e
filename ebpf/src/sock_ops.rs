//! `sock_ops` on `cgroupRoot`: bookkeeping for redirected sockets.
//!
//! - `TCP_CONNECT_CB` (the local port is assigned, the SYN not yet sent): for a socket the connect
//!   programs redirected, publish its original destination under (netns cookie, local port,
//!   family) — exactly what the agent sees as the peer of the connection it accepts on the capture
//!   listener — and ask for state callbacks.
//! - `STATE_CB` to `TCP_CLOSE`: remove both entries, so the maps do not leak.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use latch_common::{OrigDst, RedirectKey};

use crate::maps::{LATCH_ORIG_DST, LATCH_REDIRECTS};

/// sock_ops programs return 1.
const OK: u32 = 1;

#[sock_ops]
pub fn latch_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        on_close(&ctx);
    }
    OK
}

#[inline(always)]
fn redirected(ctx: &SockOpsContext) -> Option<(u64, OrigDst)> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let orig = LATCH_ORIG_DST.get_ptr(cookie)?;
    // SAFETY: pointer from a successful hash lookup.
    Some((cookie, unsafe { *orig }))
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
fn on_connect(ctx: &SockOpsContext) {
    let Some((_, orig)) = redirected(ctx) else {
        return;
    };
    let key = redirect_key(ctx, &orig);
    if LATCH_REDIRECTS.insert(key, orig, 0).is_ok() {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let Some((cookie, orig)) = redirected(ctx) else {
        return;
    };
    let key = redirect_key(ctx, &orig);
    let _ = LATCH_REDIRECTS.remove(key);
    let _ = LATCH_ORIG_DST.remove(cookie);
}
