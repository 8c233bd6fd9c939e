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

/// A cached verdict for `key` that has not expired: its decision.
#[inline(always)]
pub fn fresh_verdict(key: &VerdictKey) -> Option<u32> {
    let value = LATCH_VERDICTS.get_ptr(key)?;
    // SAFETY: the pointer comes from a successful hash lookup.
    let value: VerdictValue = unsafe { *value };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    (value.expires_at_ns > now).then_some(value.decision)
}

/// The audit record of a connection let through by the cached allow of `key`, started now and
/// not yet reported opened.
#[inline(always)]
pub fn fastpath_conn(key: &VerdictKey) -> FastpathConn {
    FastpathConn {
        src_identity: key.src_identity,
        dst_identity: key.dst_identity,
        // SAFETY: helper without arguments.
        started_ns: unsafe { bpf_ktime_get_boot_ns() },
        port: key.port,
        direction: key.direction,
        opened: 0,
        _pad: 0,
    }
}
