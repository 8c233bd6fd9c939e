//! Small helpers shared by the programs: the node config, counters, the clock, verdict lookups,
//! and the record of a fast-path connection to audit.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use latch_common::{Counter, DatapathConfig, FastpathConn, VerdictKey, VerdictValue};

use crate::maps::{LATCH_CONFIG, LATCH_COUNTERS, LATCH_VERDICTS};

/// The node config, if the agent has filled it in.
#[inline(always)]
pub fn config() -> Option<DatapathConfig> {
    let cfg = LATCH_CONFIG.get_ptr(0)?;
    // SAFETY: the pointer comes from a successful array lookup and points to map memory.
    let cfg = unsafe { *cfg };
    (cfg.enabled != 0).then_some(cfg)
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = LATCH_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; no other program writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// A cached verdict that has not expired.
#[derive(Clone, Copy)]
pub struct Fresh {
    pub decision: u32,
    /// The clock it was checked against (`bpf_ktime_get_boot_ns`): a connection it lets through
    /// starts then (one clock read per program; in a VM each is a paravirtual clock read).
    pub now_ns: u64,
}

/// A cached verdict for `key` that has not expired.
#[inline(always)]
pub fn fresh_verdict(key: &VerdictKey) -> Option<Fresh> {
    let value = LATCH_VERDICTS.get_ptr(key)?;
    // SAFETY: the pointer comes from a successful hash lookup.
    let value: VerdictValue = unsafe { *value };
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_boot_ns() };
    (value.expires_at_ns > now_ns).then_some(Fresh {
        decision: value.decision,
        now_ns,
    })
}

/// The audit record of a connection let through by the cached allow of `key` at `started_ns`,
/// not yet reported opened.
#[inline(always)]
pub fn fastpath_conn(key: &VerdictKey, started_ns: u64) -> FastpathConn {
    FastpathConn {
        src_identity: key.src_identity,
        dst_identity: key.dst_identity,
        started_ns,
        port: key.port,
        direction: key.direction,
        opened: 0,
        _pad: 0,
    }
}
