//! `sk_lookup` on each enrolled pod's network namespace: the inbound check.
//!
//! Every new TCP connection to a non-loopback address of the pod's netns is checked; the
//! addresses the agent knows are the pod's mesh IPs (local endpoints):
//! - from a loopback source: delivered normally. This is the marker for connections the agent
//!   itself delivers (from 127.0.0.6 or ::1 inside the pod's netns) when it cannot deliver them
//!   from the client's own address; the kernel drops packets with loopback sources arriving on
//!   any other interface, so no remote peer can forge it.
//! - announced in `LATCH_DELIVERIES` (the agent's delivery from the client's own address, by its
//!   exact four-tuple, for as long as that connection lives): delivered normally.
//! - to the tunnel port: delivered normally (the agent's HBONE listener is there).
//! - with a fresh inbound allow for (source identity by IP, pod identity, port): delivered
//!   normally; `sock_ops` reports it once its server socket is established (fast-path audit).
//!   Nothing is remembered here: `sock_ops` tells such a socket by what it is not (see there),
//!   so no map of pending handshakes can fill up or lose one.
//! - with a fresh inbound deny: reset.
//! - otherwise: steered to the agent's inbound listener in that netns; if the agent is not there
//!   (no listener), reset: fail closed, never a hang and never a bypass.
//!
//! A connection to any other address of the netns (a link-local address, a secondary address,
//! an address of a family the pod's `ips` do not list) is reset: the agent cannot tell which
//! workload it is for, and nothing may reach the application around the check.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use core::ptr::{addr_of, read_volatile};
use latch_common::{
    AF_INET, Counter, DECISION_ALLOW, DECISION_DENY, DIRECTION_INBOUND, DeliveryKey,
    ENDPOINT_LOCAL, ENDPOINT_TUNNEL_ONLY, EndpointInfo, IpKey, VerdictKey,
};

use crate::{
    context::{Fresh, config, count, fresh_verdict},
    maps::{LATCH_DELIVERIES, LATCH_ENDPOINTS, LATCH_INBOUND_LISTENERS},
};

const IPPROTO_TCP: u32 = 6;
const PASS: u32 = sk_action::SK_PASS;
const DROP: u32 = sk_action::SK_DROP;

/// The fields of one lookup, read in one straight run of constant-offset loads at entry (the
/// verifier rejects loads through a derived context pointer, which LLVM can produce when loads
/// are spread over branches).
struct Lookup {
    protocol: u32,
    local_port: u32,
    /// Network byte order, as the context has it.
    remote_port: u16,
    remote: IpKey,
    local: IpKey,
}

#[inline(always)]
fn read_lookup(lk: *mut bpf_sk_lookup) -> Lookup {
    // SAFETY: 4-byte context reads at constant offsets.
    unsafe {
        let family = read_volatile(addr_of!((*lk).family));
        let protocol = read_volatile(addr_of!((*lk).protocol));
        let local_port = read_volatile(addr_of!((*lk).local_port));
        let remote_port = read_volatile(addr_of!((*lk).remote_port));
        let remote4 = read_volatile(addr_of!((*lk).remote_ip4));
        let local4 = read_volatile(addr_of!((*lk).local_ip4));
        let r = [
            read_volatile(addr_of!((*lk).remote_ip6[0])),
            read_volatile(addr_of!((*lk).remote_ip6[1])),
            read_volatile(addr_of!((*lk).remote_ip6[2])),
            read_volatile(addr_of!((*lk).remote_ip6[3])),
        ];
        let l = [
            read_volatile(addr_of!((*lk).local_ip6[0])),
            read_volatile(addr_of!((*lk).local_ip6[1])),
            read_volatile(addr_of!((*lk).local_ip6[2])),
            read_volatile(addr_of!((*lk).local_ip6[3])),
        ];
        let (remote, local) = if family == AF_INET as u32 {
            (
                IpKey::from_v4(remote4.to_ne_bytes()),
                IpKey::from_v4(local4.to_ne_bytes()),
            )
        } else {
            (IpKey::from_words(r), IpKey::from_words(l))
        };
        Lookup {
            protocol,
            local_port,
            remote_port,
            remote,
            local,
        }
    }
}

#[sk_lookup]
pub fn latch_inbound(ctx: SkLookupContext) -> u32 {
    let Lookup {
        protocol,
        local_port,
        remote_port,
        remote,
        local,
    } = read_lookup(ctx.lookup);
    if protocol != IPPROTO_TCP {
        return PASS;
    }
    let Some(cfg) = config() else {
        return PASS;
    };
    let local_port = local_port as u16;
    if local_port == cfg.tunnel_port {
        return PASS;
    }
    if remote.is_loopback() {
        return PASS;
    }
    let delivery = DeliveryKey {
        remote,
        local,
        remote_port: u16::from_be(remote_port),
        local_port,
    };
    if LATCH_DELIVERIES.get_ptr(delivery).is_some() {
        return PASS;
    }
    let Some(pod) = LATCH_ENDPOINTS.get_ptr(local) else {
        count(Counter::InboundRejected);
        return DROP;
    };
    // SAFETY: pointer from a successful hash lookup.
    let pod: EndpointInfo = unsafe { *pod };
    if pod.flags & ENDPOINT_LOCAL == 0 {
        count(Counter::InboundRejected);
        return DROP;
    }

    if pod.flags & ENDPOINT_TUNNEL_ONLY == 0
        && let Some(src) = LATCH_ENDPOINTS.get_ptr(remote)
    {
        // SAFETY: pointer from a successful hash lookup.
        let src: EndpointInfo = unsafe { *src };
        if src.flags & ENDPOINT_TUNNEL_ONLY == 0 {
            let key = VerdictKey::new(src.identity, pod.identity, local_port, DIRECTION_INBOUND);
            match fresh_verdict(&key) {
                Some(Fresh {
                    decision: DECISION_ALLOW,
                    ..
                }) => {
                    count(Counter::InboundAdmitted);
                    return PASS;
                }
                Some(Fresh {
                    decision: DECISION_DENY,
                    ..
                }) => {
                    count(Counter::InboundRejected);
                    return DROP;
                }
                _ => {}
            }
        }
    }

    match LATCH_INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(Counter::InboundSteered);
            PASS
        }
        Err(_) => {
            count(Counter::InboundRejected);
            DROP
        }
    }
}
