//! `cgroup/getpeername4` and `6`: a socket the connect programs redirected reports the original
//! destination as its peer, so the application cannot tell it was redirected.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use core::ptr::{addr_of_mut, write_volatile};
use latch_common::OrigDst;

use crate::{connect::write_ip6, maps::LATCH_ORIG_DST};

/// getpeername programs must return 1.
const OK: i32 = 1;

fn original(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = LATCH_ORIG_DST.get_ptr(cookie)?;
    // SAFETY: pointer from a successful hash lookup.
    Some(unsafe { *orig })
}

#[cgroup_sock_addr(getpeername4)]
pub fn latch_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        let ip = orig.addr.to_words()[3];
        let sa = ctx.sock_addr;
        // SAFETY: getpeername4 programs may write user_ip4 and user_port (4-byte stores).
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), ip);
            write_volatile(addr_of_mut!((*sa).user_port), orig.port.to_be() as u32);
        }
    }
    OK
}

#[cgroup_sock_addr(getpeername6)]
pub fn latch_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
        let sa = ctx.sock_addr;
        write_ip6(sa, &orig.addr);
        // SAFETY: 4-byte store to user_port.
        unsafe { write_volatile(addr_of_mut!((*sa).user_port), orig.port.to_be() as u32) };
    }
    OK
}
