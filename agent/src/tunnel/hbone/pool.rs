//! The client's pooled HTTP/2 connections, per [`PoolKey`] (source and destination identity,
//! endpoint, trust epoch) and, unless the endpoint is known to run Latch, per source pod address
//! ([`Slot`]): a pair's streams share its connections, a busy pair spreads over up to one per CPU
//! and shrinks back once idle, a connection at its server's `SETTINGS_MAX_CONCURRENT_STREAMS` is
//! passed over for another (dialled if need be), a connection whose proof no longer holds is never
//! used, and those of a replaced trust bundle are retired. See `docs/tunnel.md` (*HBONE*, *How
//! long a proof holds*).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::CertificateDer;
use tokio::sync::{Notify, futures::OwnedNotified};

use crate::{identity::SpiffeId, sync::lock, tls::handshake::PeerChain};

/// Streams a pooled connection carries at once before the pair opens another one.
pub(super) const SPREAD_AT: usize = 4;

/// Most pooled connections per pair: one per CPU (asked once: the answer reads cgroup files).
pub(super) fn max_connections() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Which pooled HTTP/2 connection a tunnel uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    /// The tunnel endpoint (`<pod IP>:15008`).
    pub endpoint: SocketAddr,
    /// The epoch of the source's trust bundle that a connection of this key is verified with
    /// (see [`crate::identity::certs::TrustEpoch`]): a connection proven under another bundle is
    /// never used.
    pub trust: u64,
}

/// Where the pool keeps a stream's connections: a pair's ([`PoolKey`]), shared by every source
/// pod of the identity when the endpoint is known to run Latch (`source: None`), else one set per
/// source pod address. A server other than Latch's (ztunnel) attributes every stream to the TCP
/// peer that dialled the connection and ignores `Forwarded`, so a connection dialled from one
/// pod must carry only that pod's streams.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Slot {
    pub(super) key: PoolKey,
    pub(super) source: Option<IpAddr>,
}

/// Most endpoints remembered as Latch's; beyond it the memory starts again (a forgotten endpoint
/// is learned again from its next answer).
const KNOWN_LATCH_MOST: usize = 4096;

/// What becomes of a pooled connection proven under a trust bundle no longer in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retire {
    /// Not concerned: it stays in the pool.
    Keep,
    /// Out of the pool: no new streams; open ones finish, then it closes.
    Drain,
    /// Closed at once, its open streams reset: the bundle in force no longer verifies the
    /// server.
    Close,
}

/// One pooled HTTP/2 connection.
#[derive(Clone)]
pub(super) struct Pooled {
    pub(super) sender: SendRequest<Bytes>,
    /// The earlier NotAfter of the two certificates this connection was proven with.
    pub(super) proof_not_after: SystemTime,
    /// The connection's task has ended: no new streams on it.
    closed: Arc<AtomicBool>,
    /// What else the connection was proven with, and how to end it.
    proven: Arc<Proven>,
    /// Streams open on it now.
    active: Arc<AtomicUsize>,
}

/// A pooled connection's server certificate, and the handle that ends the connection.
struct Proven {
    /// The server certificate's NotBefore.
    not_before: SystemTime,
    /// The server's chain, as verified (to verify again when the trust bundle changes).
    server_chain: Vec<CertificateDer<'static>>,
    /// Ends the connection's task (and with it the connection) at once.
    abort: tokio::task::AbortHandle,
}

impl Pooled {
    /// A new connection: `sender` opens its streams; `task` drives it and sets `closed` when it
    /// ends; `server` is what its handshake proved of the server, `client_not_after` the NotAfter
    /// of the certificate the client presented.
    pub(super) fn new(
        sender: SendRequest<Bytes>,
        task: tokio::task::AbortHandle,
        closed: Arc<AtomicBool>,
        server: PeerChain,
        client_not_after: SystemTime,
    ) -> Self {
        Self {
            sender,
            proof_not_after: server.not_after.min(client_not_after),
            closed,
            proven: Arc::new(Proven {
                not_before: server.not_before,
                server_chain: server.chain,
                abort: task,
            }),
            active: Arc::default(),
        }
    }

    /// Whether both certificates it was proven with are within their validity at `now`.
    fn proof_holds(&self, now: SystemTime) -> bool {
        self.proven.not_before <= now && now <= self.proof_not_after
    }

    fn is(&self, other: &Pooled) -> bool {
        Arc::ptr_eq(&self.active, &other.active)
    }

    /// Whether another stream fits under the server's `SETTINGS_MAX_CONCURRENT_STREAMS` (h2
    /// takes it as unlimited until the server's settings arrive).
    fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.sender.current_max_send_streams()
    }
}

/// What [`Pool::pick`] chose for a pair. Matched at once and never stored, so the size of
/// `Use` (two SPIFFE IDs in its key) costs nothing worth a box per stream.
#[allow(clippy::large_enum_variant)]
pub(super) enum Pick {
    /// A pooled connection, already counting this stream as active.
    Use(Pooled, Active),
    Dial,
    /// No connection has room and as many dials as the pair may have are under way: pick again
    /// once one of them has ended (resolves at once if one ended after this pick).
    Wait(OwnedNotified),
}

#[derive(Default)]
struct Entries {
    slots: HashMap<Slot, PoolEntry>,
    /// Endpoints whose server answered as Latch's does (`x-latch-cacheable` on a `200` or
    /// `403`): their connections are shared by every source pod of an identity.
    latch: HashSet<SocketAddr>,
}

#[derive(Default)]
struct PoolEntry {
    conns: Vec<Pooled>,
    dialing: usize,
    /// Told when a dial of this slot ends, or the slot is dropped: wakes the streams waiting
    /// for room ([`Pick::Wait`]).
    dial_ended: Arc<Notify>,
}

/// The pooled connections of each pair, and how many are being dialled.
#[derive(Clone, Default)]
pub(super) struct Pool(Arc<Mutex<Entries>>);

impl Pool {
    /// Where the streams of `key` from the source pod at `source` go (see [`Slot`]).
    pub(super) fn slot(&self, key: &PoolKey, source: Option<IpAddr>) -> Slot {
        let shared = lock(&self.0).latch.contains(&key.endpoint);
        Slot {
            key: key.clone(),
            source: if shared { None } else { source },
        }
    }

    /// What an answer from `endpoint` said of its server: Latch's (`true`: from now on its
    /// connections are shared by every source pod, and those already dialled per pod join the
    /// shared ones), or another (`false`: streams are kept apart by source pod from now on).
    pub(super) fn learn(&self, endpoint: SocketAddr, latch: bool) {
        let mut pool = lock(&self.0);
        if !latch {
            pool.latch.remove(&endpoint);
            return;
        }
        if pool.latch.contains(&endpoint) {
            return;
        }
        if pool.latch.len() >= KNOWN_LATCH_MOST {
            pool.latch.clear();
        }
        pool.latch.insert(endpoint);
        let per_pod: Vec<Slot> = pool
            .slots
            .keys()
            .filter(|s| s.source.is_some() && s.key.endpoint == endpoint)
            .cloned()
            .collect();
        for slot in per_pod {
            let Some(entry) = pool.slots.get_mut(&slot) else {
                continue;
            };
            let conns = std::mem::take(&mut entry.conns);
            if entry.dialing == 0 {
                pool.slots.remove(&slot);
            }
            let shared = Slot {
                key: slot.key,
                source: None,
            };
            pool.slots.entry(shared).or_default().conns.extend(conns);
        }
    }

    /// The least busy live connection of the slot with room for a stream, unless all are busy
    /// (or there is none) and the pair may have another: then the caller dials, counted until
    /// [`Self::dialled`]. Connections at their server's stream limit are passed over, and when
    /// all are, another is dialled whatever the per-pair bound (a stream does not wait for
    /// another to end). At most the per-pair bound of dials are under way at once: a caller
    /// that finds no room while they are waits for one to end ([`Pick::Wait`]) instead of
    /// dialling too, so that a burst of streams opens a handful of connections, not a TLS
    /// handshake each (a Latch server resets those beyond `tunnel.maxHandshakesPerSource` in
    /// progress from one source).
    pub(super) fn pick(&self, slot: &Slot) -> Pick {
        let mut pool = lock(&self.0);
        let entry = pool.slots.entry(slot.clone()).or_default();
        let now = SystemTime::now();
        // A connection whose certificates are no longer (or not yet) valid proves nothing.
        entry
            .conns
            .retain(|p| !p.closed.load(Ordering::Relaxed) && p.proof_holds(now));
        let least_busy = entry
            .conns
            .iter()
            .filter(|p| p.has_room())
            .min_by_key(|p| p.active.load(Ordering::Relaxed))
            .cloned();
        let room = entry.conns.len() + entry.dialing < max_connections();
        match least_busy {
            Some(p) if !room || p.active.load(Ordering::Relaxed) < SPREAD_AT => {
                // Counted under the pool's lock, so a burst of opens sees each other.
                let active = Active::new(&p.active, &self.0, slot);
                Pick::Use(p, active)
            }
            // Made under the lock that `dialled` takes to tell it: no end is missed.
            None if entry.dialing >= max_connections() => {
                Pick::Wait(entry.dial_ended.clone().notified_owned())
            }
            _ => {
                entry.dialing += 1;
                Pick::Dial
            }
        }
    }

    /// Add a newly dialled connection to the slot's pool.
    pub(super) fn add(&self, slot: &Slot, pooled: Pooled) {
        lock(&self.0)
            .slots
            .entry(slot.clone())
            .or_default()
            .conns
            .push(pooled);
    }

    /// A dial started by [`Self::pick`] has ended (either way).
    pub(super) fn dialled(&self, slot: &Slot) {
        let mut pool = lock(&self.0);
        if let Some(entry) = pool.slots.get_mut(slot) {
            entry.dialing = entry.dialing.saturating_sub(1);
            entry.dial_ended.notify_waiters();
            if entry.conns.is_empty() && entry.dialing == 0 {
                pool.slots.remove(slot);
            }
        }
    }

    /// Count one more stream as active on `pooled`, a connection of `slot`.
    pub(super) fn activate(&self, pooled: &Pooled, slot: &Slot) -> Active {
        Active::new(&pooled.active, &self.0, slot)
    }

    /// Take one connection out of the pool (it closes once nothing uses it), whichever slot
    /// holds it now.
    pub(super) fn forget(&self, pooled: &Pooled) {
        for entry in lock(&self.0).slots.values_mut() {
            entry.conns.retain(|p| !p.is(pooled));
        }
    }

    /// Drop every pooled connection whose key matches.
    pub(super) fn evict_where(&self, pred: impl Fn(&PoolKey) -> bool) {
        lock(&self.0).slots.retain(|s, entry| {
            let keep = !pred(&s.key);
            if !keep {
                entry.dial_ended.notify_waiters();
            }
            keep
        });
    }

    /// Retire the connections of the keys `which` names, given each key and the chain its
    /// server proved (see [`Retire`]). Returns how many were taken out.
    pub(super) fn retire(
        &self,
        which: impl Fn(&PoolKey, &[CertificateDer<'static>]) -> Retire,
    ) -> usize {
        let mut pool = lock(&self.0);
        let mut retired = 0;
        for (slot, entry) in pool.slots.iter_mut() {
            entry
                .conns
                .retain(|p| match which(&slot.key, &p.proven.server_chain) {
                    Retire::Keep => true,
                    Retire::Drain => {
                        retired += 1;
                        false
                    }
                    Retire::Close => {
                        p.proven.abort.abort();
                        retired += 1;
                        false
                    }
                });
        }
        pool.slots
            .retain(|_, e| !e.conns.is_empty() || e.dialing > 0);
        retired
    }

    /// Number of pooled connections.
    pub(super) fn connections(&self) -> usize {
        lock(&self.0).slots.values().map(|e| e.conns.len()).sum()
    }
}

/// One active stream on a pooled connection. When the last stream of a connection ends and the
/// pair has other connections, this one leaves the pool (and closes once nothing uses it), so a
/// burst's extra connections do not outlive it.
pub(super) struct Active {
    count: Arc<AtomicUsize>,
    pool: Weak<Mutex<Entries>>,
    slot: Slot,
}

impl Active {
    fn new(count: &Arc<AtomicUsize>, pool: &Arc<Mutex<Entries>>, slot: &Slot) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self {
            count: count.clone(),
            pool: Arc::downgrade(pool),
            slot: slot.clone(),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut pool = lock(&pool);
        if let Some(entry) = pool.slots.get_mut(&self.slot)
            && entry.conns.len() > 1
        {
            entry.conns.retain(|p| {
                !Arc::ptr_eq(&p.active, &self.count) || p.active.load(Ordering::Relaxed) > 0
            });
        }
    }
}
