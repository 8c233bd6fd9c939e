//! The maps, declared once for all programs. Names, sizes and value types come from
//! `latch_common` (a static's identifier is its map name; the agent checks at load that every name
//! in `latch_common::map_names` is present). All maps are pinned by name so that a restarted
//! agent adopts them and the cache survives.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use latch_common::{
    COUNTER_SLOTS, DatapathConfig, DeliveryKey, EndpointInfo, FASTPATH_EVENTS_BYTES, FastpathConn,
    InterfaceInfo, IpKey, MAX_DELIVERIES, MAX_ENDPOINTS, MAX_FASTPATH_CONNS, MAX_INBOUND_LISTENERS,
    MAX_INTERFACES, MAX_MACS, MAX_REDIRECTS, MAX_SOURCES, MAX_VERDICTS, MAX_WORKLOADS, MacKey,
    OrigDst, RedirectKey, SourceBinding, VerdictKey, VerdictValue, WorkloadInfo,
};

#[map]
pub static LATCH_WORKLOADS: HashMap<u64, WorkloadInfo> = HashMap::pinned(MAX_WORKLOADS, 0);

#[map]
pub static LATCH_ENDPOINTS: HashMap<IpKey, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
pub static LATCH_VERDICTS: LruHashMap<VerdictKey, VerdictValue> =
    LruHashMap::pinned(MAX_VERDICTS, 0);

#[map]
pub static LATCH_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_REDIRECTS, 0);

#[map]
pub static LATCH_REDIRECTS: LruHashMap<RedirectKey, OrigDst> = LruHashMap::pinned(MAX_REDIRECTS, 0);

#[map]
pub static LATCH_INBOUND_LISTENERS: SockHash<IpKey> = SockHash::pinned(MAX_INBOUND_LISTENERS, 0);

#[map]
pub static LATCH_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map]
pub static LATCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
pub static LATCH_DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(MAX_DELIVERIES, 0);

#[map]
pub static LATCH_SOURCES: HashMap<IpKey, SourceBinding> = HashMap::pinned(MAX_SOURCES, 0);

#[map]
pub static LATCH_INTERFACES: HashMap<u32, InterfaceInfo> = HashMap::pinned(MAX_INTERFACES, 0);

#[map]
pub static LATCH_MACS: HashMap<MacKey, u32> = HashMap::pinned(MAX_MACS, 0);

#[map]
pub static LATCH_FASTPATH_CONNS: LruHashMap<u64, FastpathConn> =
    LruHashMap::pinned(MAX_FASTPATH_CONNS, 0);

#[map]
pub static LATCH_FASTPATH_EVENTS: RingBuf = RingBuf::pinned(FASTPATH_EVENTS_BYTES, 0);
