//! Typed access to the pinned maps. Every read and write of kernel state outside the eBPF
//! programs goes through [`KernelMaps`]; callers speak in `std::net` addresses and the
//! `latch_common` key/value types.

use std::{
    net::{IpAddr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, SkStorage, SockHash};
use latch_common::{
    AGENT_LISTENER, Counter, DECISION_ALLOW, DECISION_DENY, DatapathConfig, DeliveryKey,
    EndpointInfo, IpKey, OrigDst, RedirectKey, VerdictKey, VerdictValue, WorkloadInfo, map_names,
};

use super::{error::DatapathError, syscall, system};

/// One entry of the verdict cache, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub key: VerdictKey,
    pub value: VerdictValue,
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        self.value.decision == DECISION_ALLOW
    }

    pub fn is_deny(&self) -> bool {
        self.value.decision == DECISION_DENY
    }

    /// Nanoseconds left before the kernel ignores it (0 once expired).
    pub fn remaining_ns(&self, now_ns: u64) -> u64 {
        self.value.expires_at_ns.saturating_sub(now_ns)
    }
}

/// The 16-byte map form of an address (IPv4 mapped).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpKey::from_v4(v4.octets()),
            None => IpKey::from_v6(v6.octets()),
        },
    }
}

/// The address a map key stands for (mapped addresses come back as IPv4).
pub fn ip_from_key(key: &IpKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Handles on every Latch map, opened from their pins. Each owner (the runtime, the verdict
/// cache, the debug socket, the metrics) opens its own, so none waits on another's lock.
pub struct KernelMaps {
    workloads: HashMap<MapData, u64, WorkloadInfo>,
    endpoints: HashMap<MapData, IpKey, EndpointInfo>,
    verdicts: HashMap<MapData, VerdictKey, VerdictValue>,
    orig_dst: HashMap<MapData, u64, OrigDst>,
    redirects: HashMap<MapData, RedirectKey, OrigDst>,
    inbound_listeners: SockHash<MapData, IpKey>,
    agent_listeners: SkStorage<MapData, u32>,
    config: Array<MapData, DatapathConfig>,
    counters: PerCpuArray<MapData, u64>,
    deliveries: HashMap<MapData, DeliveryKey, u8>,
}

pub(super) fn open(pin_dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| DatapathError::map("opening pinned map", path.display().to_string(), e))?;
    Map::from_map_data(data).map_err(|e| DatapathError::map("typing map", name, e))
}

macro_rules! typed {
    ($pin_dir:expr, $name:expr) => {
        open($pin_dir, $name)?
            .try_into()
            .map_err(|e| DatapathError::map("typing map", $name, e))?
    };
}

/// The redirect map alone, for the capture path: a lookup takes no lock, so nothing another
/// owner of a map handle does (a debug read of the whole verdict map, a reload's writes) stalls a
/// connection.
pub struct RedirectMap(HashMap<MapData, RedirectKey, OrigDst>);

impl RedirectMap {
    /// Open the redirect map pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self(typed!(pin_dir, map_names::REDIRECTS)))
    }

    /// The original destination of a connection accepted on a capture listener, by the
    /// client's netns cookie, local port and family.
    pub fn get(&self, key: &RedirectKey) -> Result<Option<OrigDst>, DatapathError> {
        found(self.0.get(key, 0), map_names::REDIRECTS)
    }
}

impl KernelMaps {
    /// Open the maps pinned under `pin_dir` (as laid out by [`super::install::Datapath::install`]).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            workloads: typed!(pin_dir, map_names::WORKLOADS),
            endpoints: typed!(pin_dir, map_names::ENDPOINTS),
            verdicts: typed!(pin_dir, map_names::VERDICTS),
            orig_dst: typed!(pin_dir, map_names::ORIG_DST),
            redirects: typed!(pin_dir, map_names::REDIRECTS),
            inbound_listeners: typed!(pin_dir, map_names::INBOUND_LISTENERS),
            agent_listeners: typed!(pin_dir, map_names::AGENT_LISTENERS),
            config: typed!(pin_dir, map_names::CONFIG),
            counters: typed!(pin_dir, map_names::COUNTERS),
            deliveries: typed!(pin_dir, map_names::DELIVERIES),
        })
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), DatapathError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| DatapathError::map("writing", map_names::CONFIG, e))
    }

    pub fn config(&self) -> Result<DatapathConfig, DatapathError> {
        self.config
            .get(&0, 0)
            .map_err(|e| DatapathError::map("reading", map_names::CONFIG, e))
    }

    // --- workloads -----------------------------------------------------------------------------

    pub fn set_workload(
        &mut self,
        cgroup_id: u64,
        info: WorkloadInfo,
    ) -> Result<(), DatapathError> {
        self.workloads
            .insert(cgroup_id, info, 0)
            .map_err(|e| DatapathError::map("writing", map_names::WORKLOADS, e))
    }

    pub fn remove_workload(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        remove_if_present(self.workloads.remove(&cgroup_id), map_names::WORKLOADS)
    }

    pub fn workloads(&self) -> Result<Vec<(u64, WorkloadInfo)>, DatapathError> {
        collect(self.workloads.iter(), map_names::WORKLOADS)
    }

    // --- endpoints -----------------------------------------------------------------------------

    pub fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError> {
        self.endpoints
            .insert(ip_key(ip), info, 0)
            .map_err(|e| DatapathError::map("writing", map_names::ENDPOINTS, e))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        remove_if_present(self.endpoints.remove(&ip_key(ip)), map_names::ENDPOINTS)
    }

    pub fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>, DatapathError> {
        Ok(collect(self.endpoints.iter(), map_names::ENDPOINTS)?
            .into_iter()
            .map(|(k, v)| (ip_from_key(&k), v))
            .collect())
    }

    // --- verdicts ------------------------------------------------------------------------------

    pub fn insert_verdict(
        &mut self,
        key: VerdictKey,
        value: VerdictValue,
    ) -> Result<(), DatapathError> {
        self.verdicts
            .insert(key, value, 0)
            .map_err(|e| DatapathError::map("writing", map_names::VERDICTS, e))
    }

    pub fn verdict(&self, key: &VerdictKey) -> Result<Option<Verdict>, DatapathError> {
        let value = found(self.verdicts.get(key, 0), map_names::VERDICTS)?;
        Ok(value.map(|value| Verdict { key: *key, value }))
    }

    pub fn remove_verdict(&mut self, key: &VerdictKey) -> Result<(), DatapathError> {
        remove_if_present(self.verdicts.remove(key), map_names::VERDICTS)
    }

    /// Every cached verdict, expired ones included (the kernel ignores those; LRU evicts them).
    /// Read in batches: a few syscalls for a million entries.
    pub fn verdicts(&self) -> Result<Vec<Verdict>, DatapathError> {
        Ok(self
            .verdict_entries()?
            .into_iter()
            .map(|(key, value)| Verdict { key, value })
            .collect())
    }

    fn verdict_entries(&self) -> Result<Vec<(VerdictKey, VerdictValue)>, DatapathError> {
        syscall::map_lookup_all(self.verdicts.map().fd())
            .map_err(|e| DatapathError::io("batch-reading map", map_names::VERDICTS, e))
    }

    /// Remove `keys` (a batch per syscall); keys already gone are skipped. Returns how many
    /// were removed.
    pub fn remove_verdicts(&mut self, keys: &[VerdictKey]) -> Result<usize, DatapathError> {
        syscall::map_delete_all(self.verdicts.map().fd(), keys)
            .map_err(|e| DatapathError::io("batch-removing from map", map_names::VERDICTS, e))
    }

    /// Remove every verdict matching `pred`; returns how many were removed.
    pub fn remove_verdicts_where(
        &mut self,
        mut pred: impl FnMut(&VerdictKey, &VerdictValue) -> bool,
    ) -> Result<usize, DatapathError> {
        let keys: Vec<VerdictKey> = self
            .verdict_entries()?
            .into_iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        self.remove_verdicts(&keys)
    }

    /// Expired verdicts are removed; returns how many.
    pub fn purge_expired(&mut self) -> Result<usize, DatapathError> {
        let now = system::now_boot_ns();
        let expired: Vec<VerdictKey> = self
            .verdicts
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_at_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for key in &expired {
            self.remove_verdict(key)?;
        }
        Ok(expired.len())
    }

    // --- redirects -----------------------------------------------------------------------------

    /// Entries in the redirect bookkeeping maps (orig-dst by cookie, redirects by port); both
    /// drop to zero when no redirected socket is open.
    pub fn redirect_entries(&self) -> Result<(usize, usize), DatapathError> {
        Ok((
            self.orig_dst.keys().filter_map(Result::ok).count(),
            self.redirects.keys().filter_map(Result::ok).count(),
        ))
    }

    // --- inbound listeners ---------------------------------------------------------------------

    pub fn set_inbound_listener(
        &mut self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), DatapathError> {
        self.inbound_listeners
            .insert(ip_key(ip), listener.as_raw_fd(), 0)
            .map_err(|e| DatapathError::map("writing", map_names::INBOUND_LISTENERS, e))
    }

    /// Mark `listener` as the agent's own in `LATCH_AGENT_LISTENERS`: every socket it accepts
    /// from then on carries the mark too (the kernel clones it), and `sock_ops` does not take
    /// such a socket for one the inbound check admitted straight to an application. Set before
    /// the inbound check may steer a connection to it.
    pub fn mark_agent_listener(&mut self, listener: &impl AsRawFd) -> Result<(), DatapathError> {
        self.agent_listeners
            .insert(listener, AGENT_LISTENER, 0)
            .map_err(|e| DatapathError::map("writing", map_names::AGENT_LISTENERS, e))
    }

    pub fn remove_inbound_listener(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        remove_if_present(
            self.inbound_listeners.remove(&ip_key(ip)),
            map_names::INBOUND_LISTENERS,
        )
    }

    // --- deliveries ----------------------------------------------------------------------------

    /// Deliveries announced and not withdrawn (see [`super::deliveries::DeliveryMap`]).
    pub fn pending_deliveries(&self) -> usize {
        self.deliveries.keys().filter(Result::is_ok).count()
    }

    // --- counters ------------------------------------------------------------------------------

    /// Kernel counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self
                    .counters
                    .get(&(c as u32), 0)
                    .map_err(|e| DatapathError::map("reading", map_names::COUNTERS, e))?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn counter(&self, counter: Counter) -> Result<u64, DatapathError> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(c, _)| *c == counter)
            .map(|(_, v)| v)
            .unwrap_or(0))
    }
}

/// A map read's value, `None` if the key is not there.
pub(super) fn found<V>(
    read: Result<V, aya::maps::MapError>,
    map: &'static str,
) -> Result<Option<V>, DatapathError> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(DatapathError::map("reading", map, e)),
    }
}

pub(super) fn remove_if_present(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // Socket maps report a missing key as the syscall's ENOENT.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(DatapathError::map("removing from", map, e)),
    }
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), aya::maps::MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, DatapathError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|e| DatapathError::map("iterating", map, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip_and_map_v4() {
        let v4: IpAddr = std::net::Ipv4Addr::new(10, 244, 1, 2).into();
        assert_eq!(ip_from_key(&ip_key(v4)), v4);
        let mapped: IpAddr = "::ffff:10.244.1.2".parse().expect("literal");
        assert_eq!(ip_key(mapped), ip_key(v4));
        let v6: IpAddr = "fd00:10:244:1::2".parse().expect("literal");
        assert_eq!(ip_from_key(&ip_key(v6)), v6);
    }
}
