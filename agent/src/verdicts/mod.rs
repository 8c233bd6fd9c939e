//! The verdict cache policy: what the agent writes into the kernel's verdict map, with which
//! expiry, and what it removes when the world changes. The kernel only reads these entries.
//! [`rule`] says whether, and for how long, a decided pair's verdict is cached.

pub mod rule;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use latch_common::{DECISION_ALLOW, DECISION_DENY, VerdictKey, VerdictValue};

use crate::{
    conn::Direction,
    datapath::{DatapathError, KernelMaps, system},
    identity::IdentityKey,
    state::{SharedState, Snapshot, decide},
    sync::lock,
};

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

/// Writes verdicts with the right expiry, and removes the ones the world no longer supports.
///
/// The agent is the only writer of the verdict map, so it keeps a copy of what it wrote (the
/// shadow, loaded from the kernel at start for verdicts an earlier run pinned). Revocation
/// decides on the shadow and removes the stale keys in batches; it never has to walk the
/// kernel's million-bucket map. Keys the kernel's LRU evicted meanwhile are skipped.
///
/// A verdict is written only if the state it was decided under is still in force: a reload
/// puts its snapshot in place and then revokes under the shadow's lock, so a verdict decided
/// under the old snapshot is either in the shadow before the sweep (and judged by it) or
/// refused here. Nothing decided under generation N reaches the kernel once N+1 is committed.
#[derive(Clone)]
pub struct VerdictCache {
    maps: SharedMaps,
    state: SharedState,
    shadow: Arc<Mutex<HashMap<VerdictKey, VerdictValue>>>,
}

/// Whether a verdict was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    Cached,
    /// A newer state was committed after the verdict was decided: not written.
    Stale,
}

impl VerdictCache {
    /// A cache over `maps`, starting from the verdicts already in the kernel, writing only
    /// verdicts decided under `state`'s current generation.
    pub fn new(maps: SharedMaps, state: SharedState) -> Result<Self, DatapathError> {
        let now = system::now_boot_ns();
        let shadow = lock(&maps)
            .verdicts()?
            .into_iter()
            .filter(|v| v.value.expires_at_ns > now)
            .map(|v| (v.key, v.value))
            .collect();
        Ok(Self {
            maps,
            state,
            shadow: Arc::new(Mutex::new(shadow)),
        })
    }

    /// Unexpired verdicts the agent has cached (the kernel's LRU may have evicted a few).
    pub fn len(&self) -> usize {
        let now = system::now_boot_ns();
        self.shadow()
            .values()
            .filter(|v| v.expires_at_ns > now)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shadow(&self) -> MutexGuard<'_, HashMap<VerdictKey, VerdictValue>> {
        lock(&self.shadow)
    }

    /// Cache an allow for `pair`, decided under state generation `decided_under`, that expires
    /// after `ttl` (the caller passes the smaller of the configured TTL and what the proof it
    /// holds allows).
    pub fn allow(
        &self,
        pair: Pair,
        ttl: Duration,
        decided_under: u64,
    ) -> Result<Put, DatapathError> {
        self.put(pair, DECISION_ALLOW, ttl, decided_under)
    }

    /// Cache `pair`'s verdict (allow or deny) for `ttl`, which [`rule::lifetime`] gave;
    /// whether it was written. A failed write is logged, and the connection goes on uncached.
    pub fn remember(&self, pair: Pair, allowed: bool, ttl: Duration, decided_under: u64) -> bool {
        let put = if allowed {
            self.allow(pair, ttl, decided_under)
        } else {
            self.deny(pair, ttl, decided_under)
        };
        match put {
            Ok(put) => put == Put::Cached,
            Err(e) => {
                tracing::error!(error = %e, ?pair, allowed, "caching a verdict");
                false
            }
        }
    }

    /// Cache a deny for `pair`: the next `connect()` fails at once with `EPERM`.
    pub fn deny(
        &self,
        pair: Pair,
        ttl: Duration,
        decided_under: u64,
    ) -> Result<Put, DatapathError> {
        self.put(pair, DECISION_DENY, ttl, decided_under)
    }

    fn put(
        &self,
        pair: Pair,
        decision: u32,
        ttl: Duration,
        decided_under: u64,
    ) -> Result<Put, DatapathError> {
        let value = VerdictValue {
            expires_at_ns: system::boot_ns_after(ttl),
            decision,
            _pad: 0,
        };
        // The shadow is locked across the check and the kernel write, so a sweep (which takes
        // it after its state is in force) sees the entry, or the entry sees the new state.
        let mut shadow = self.shadow();
        if self.state.generation() != decided_under {
            return Ok(Put::Stale);
        }
        lock(&self.maps).insert_verdict(pair.key(), value)?;
        shadow.insert(pair.key(), value);
        Ok(Put::Cached)
    }

    /// Remove from the kernel (and the shadow) every unexpired verdict matching `stale`;
    /// expired ones are forgotten (the kernel ignores them and its LRU reclaims them).
    fn remove_where(
        &self,
        mut stale: impl FnMut(&VerdictKey, &VerdictValue) -> bool,
    ) -> Result<usize, DatapathError> {
        let now = system::now_boot_ns();
        let mut shadow = self.shadow();
        shadow.retain(|_, v| v.expires_at_ns > now);
        let keys: Vec<VerdictKey> = shadow
            .iter()
            .filter(|(k, v)| stale(k, v))
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            shadow.remove(key);
        }
        lock(&self.maps).remove_verdicts(&keys)
    }

    /// Remove every cached verdict that the current state would not cache the same way: an
    /// identity is gone, the dataplane no longer caches, or the policy's verdict for the pair
    /// changed or stopped being cacheable. Allows and denies alike; returns how many.
    pub fn revoke_stale(&self, snapshot: &Snapshot) -> Result<usize, DatapathError> {
        // A pair with a pod in `mode: tunnel` on either side is never wanted (`decide::pair`).
        let mut wanted = decide::PairMemo::new(snapshot);
        self.remove_where(|k, v| {
            let want = wanted.get(
                IdentityKey(k.src_identity),
                IdentityKey(k.dst_identity),
                k.port,
            );
            want != Some(v.decision == DECISION_ALLOW)
        })
    }

    /// Remove every cached verdict proven under `identity`'s trust bundle: its outbound
    /// verdicts (the destination verified with its bundle) and its inbound ones (the source
    /// verified with it). Allows and denies alike; returns how many.
    pub fn revoke_proven_by(&self, identity: IdentityKey) -> Result<usize, DatapathError> {
        self.remove_where(|k, _| match Direction::from_wire(k.direction) {
            Some(Direction::Outbound) => IdentityKey(k.src_identity) == identity,
            Some(Direction::Inbound) => IdentityKey(k.dst_identity) == identity,
            None => true,
        })
    }

    /// Remove the cached verdicts matching `pred` (a debug flush); returns how many.
    pub fn flush_where(&self, pred: impl Fn(&VerdictKey) -> bool) -> Result<usize, DatapathError> {
        self.remove_where(|k, _| pred(k))
    }
}
