//! Latch's kernel programs, built for `bpfel-unknown-none` and embedded in the agent.
//!
//! - [`connect`]: `cgroup/connect4` and `connect6`: fast path, cached deny, or redirect to the
//!   capture listener of the caller's own network namespace.
//! - [`getpeername`]: `cgroup/getpeername4` and `6`: a redirected socket reports its original peer.
//! - [`sock_ops`]: records how the agent finds a redirected connection, and forgets it on close.
//! - [`inbound`]: `sk_lookup` on each enrolled pod's netns: admit by cached verdict or steer to the
//!   agent's inbound listener.
//! - [`antispoof`]: TC ingress on every Ethernet interface of the node: no pod sends with an
//!   address (or MAC) that is not its own.
//!
//! Maps and their layouts come from `latch-common`; nothing here defines ABI of its own.
//! On the host this crate builds to an empty binary so that workspace-wide tools still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod antispoof;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod context;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot unwind or abort; the verifier rejects any path that could
    // reach here, so it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
