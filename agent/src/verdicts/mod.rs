//! The verdict cache policy: what the agent writes into the kernel's verdict map, with which
//! expiry, and what it removes when the world changes. The kernel only reads these entries.
//! [`decide`] turns policy into the decisions the enforcement points and the cache need.

pub mod decide;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use latch_common::{
    DECISION_ALLOW, DECISION_DENY, DIRECTION_INBOUND, DIRECTION_OUTBOUND, VerdictKey, VerdictValue,
};

use crate::{
    config::DataplaneMode,
    datapath::{DatapathError, KernelMaps, system},
    identity::IdentityKey,
    state::Snapshot,
};

/// Which side of the connection this node is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn wire(self) -> u8 {
        match self {
            Direction::Outbound => DIRECTION_OUTBOUND,
            Direction::Inbound => DIRECTION_INBOUND,
        }
    }

    pub fn from_wire(raw: u8) -> Option<Self> {
        match raw {
            DIRECTION_OUTBOUND => Some(Direction::Outbound),
            DIRECTION_INBOUND => Some(Direction::Inbound),
            _ => None,
        }
    }
}

/// A pair whose verdict is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub src: IdentityKey,
    pub dst: IdentityKey,
    pub port: u16,
    pub direction: Direction,
}

impl Pair {
    pub fn key(&self) -> VerdictKey {
        VerdictKey::new(self.src.0, self.dst.0, self.port, self.direction.wire())
    }
}

/// Shared handle on the kernel maps, used by every task that writes verdicts.
pub type SharedMaps = Arc<Mutex<KernelMaps>>;

pub fn lock(maps: &SharedMaps) -> MutexGuard<'_, KernelMaps> {
    // A panic while holding the lock cannot leave the kernel maps inconsistent (each write is one
    // syscall), so a poisoned lock is still usable.
    maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes verdicts with the right expiry.
#[derive(Clone)]
pub struct VerdictCache {
    maps: SharedMaps,
}

impl VerdictCache {
    pub fn new(maps: SharedMaps) -> Self {
        Self { maps }
    }

    /// Cache an allow for `pair` that expires after `ttl` (the caller passes the smaller of the
    /// configured TTL and what the proof it holds allows).
    pub fn allow(&self, pair: Pair, ttl: Duration) -> Result<(), DatapathError> {
        self.put(pair, DECISION_ALLOW, ttl)
    }

    /// Cache a deny for `pair`: the next `connect()` fails at once with `EPERM`.
    pub fn deny(&self, pair: Pair, ttl: Duration) -> Result<(), DatapathError> {
        self.put(pair, DECISION_DENY, ttl)
    }

    fn put(&self, pair: Pair, decision: u32, ttl: Duration) -> Result<(), DatapathError> {
        let value = VerdictValue {
            expires_at_ns: system::boot_ns_after(ttl),
            decision,
            _pad: 0,
        };
        lock(&self.maps).insert_verdict(pair.key(), value)
    }

    /// Remove every cached verdict that the current state would not cache the same way: an
    /// identity is gone, the dataplane no longer caches, or the policy's verdict for the pair
    /// changed or stopped being cacheable. Allows and denies alike; returns how many.
    pub fn revoke_stale(&self, snapshot: &Snapshot) -> Result<usize, DatapathError> {
        let fastpath = snapshot.config.dataplane.mode == DataplaneMode::Fastpath;
        let mut wanted: HashMap<(u64, u64, u16), Option<bool>> = HashMap::new();
        lock(&self.maps).remove_verdicts_where(|k, v| {
            if !fastpath {
                return true;
            }
            let Some(source) = snapshot.registry.identity(IdentityKey(k.src_identity)) else {
                return true;
            };
            let want = *wanted
                .entry((k.src_identity, k.dst_identity, k.port))
                .or_insert_with(|| {
                    decide::pair(
                        snapshot,
                        &source.to_string(),
                        IdentityKey(k.dst_identity),
                        k.port,
                    )
                });
            want != Some(v.decision == DECISION_ALLOW)
        })
    }

    /// Remove the cached verdicts matching `pred` (a debug flush); returns how many.
    pub fn flush_where(&self, pred: impl Fn(&VerdictKey) -> bool) -> Result<usize, DatapathError> {
        lock(&self.maps).remove_verdicts_where(|k, _| pred(k))
    }
}
