//! `LATCH_DELIVERIES` on a handle of its own: the connections the agent delivers to pods'
//! applications from their clients' own addresses, announced to the inbound check before they
//! connect and withdrawn when they end; and `LATCH_MARKED_LISTENERS`, read before a delivery,
//! the listeners it must not deliver to from a client's address. Apart from
//! [`super::maps::KernelMaps`] so that a delivery never waits behind a sweep of the verdict cache
//! holding that lock.

use std::{net::SocketAddr, path::Path, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError};
use latch_common::{DeliveryKey, ListenerKey, map_names};

use crate::sync::lock;

use super::{
    error::DatapathError,
    maps::{self, ip_key},
};

pub struct DeliveryMap {
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
    /// `LATCH_MARKED_LISTENERS`, only read here.
    marked_listeners: HashMap<MapData, ListenerKey, u8>,
}

impl DeliveryMap {
    /// Open the maps pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let deliveries = HashMap::try_from(maps::open(pin_dir, map_names::DELIVERIES)?)
            .map_err(|e| DatapathError::map("typing map", map_names::DELIVERIES, e))?;
        let marked_listeners = HashMap::try_from(maps::open(pin_dir, map_names::MARKED_LISTENERS)?)
            .map_err(|e| DatapathError::map("typing map", map_names::MARKED_LISTENERS, e))?;
        Ok(Self {
            deliveries: Mutex::new(deliveries),
            marked_listeners,
        })
    }

    /// Whether the application listening on `port` in the network namespace whose cookie is
    /// `netns_cookie` carries a socket mark of its own (`sock_ops` records it as the listener
    /// starts): a delivery to it must then come from the loopback marker. A failed read says no,
    /// and is logged.
    pub fn listener_marked(&self, netns_cookie: u64, port: u16) -> bool {
        let key = ListenerKey {
            netns_cookie,
            port,
            _pad: [0; 3],
        };
        match self.marked_listeners.get(&key, 0) {
            Ok(_) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => {
                tracing::warn!(port, error = %e, "reading LATCH_MARKED_LISTENERS");
                false
            }
        }
    }

    /// The agent is about to connect `from` → `to` inside a pod's netns: let it through.
    pub fn announce(&self, from: SocketAddr, to: SocketAddr) -> Result<(), DatapathError> {
        lock(&self.deliveries)
            .insert(key(from, to), 1, 0)
            .map_err(|e| DatapathError::map("writing", map_names::DELIVERIES, e))
    }

    /// Forget every announcement: at start, those left by an earlier run (a crash never
    /// withdrew them) would let anyone who reuses their four-tuples past the inbound check. The
    /// connections they announced are established already; a new agent delivers anew. Returns
    /// how many were removed.
    pub fn clear(&self) -> Result<usize, DatapathError> {
        let mut map = lock(&self.deliveries);
        let keys: Vec<DeliveryKey> = map.keys().filter_map(Result::ok).collect();
        for key in &keys {
            maps::remove_if_present(map.remove(key), map_names::DELIVERIES)?;
        }
        Ok(keys.len())
    }

    /// The delivery `from` → `to` has ended.
    pub fn withdraw(&self, from: SocketAddr, to: SocketAddr) -> Result<(), DatapathError> {
        let removed = lock(&self.deliveries).remove(&key(from, to));
        maps::remove_if_present(removed, map_names::DELIVERIES)
    }
}

fn key(from: SocketAddr, to: SocketAddr) -> DeliveryKey {
    DeliveryKey {
        remote: ip_key(from.ip()),
        local: ip_key(to.ip()),
        remote_port: from.port(),
        local_port: to.port(),
    }
}
