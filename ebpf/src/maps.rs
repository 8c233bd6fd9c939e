//! The maps, declared once for all programs. Names, sizes and value types come from
//! `latch_common` (a static's identifier is its map name; the agent checks at load that every name
//! in `latch_common::map_names` is present). All maps are pinned by name so that a restarted
//! agent adopts them and the cache survives.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use latch_common::{
    COUNTER_SLOTS, DatapathConfig, DeliveryKey, EndpointInfo, FASTPATH_EVENTS_BYTES, FastpathConn,
    InterfaceInfo, IpKey, ListenerKey, MAX_DELIVERIES, MAX_ENDPOINTS, MAX_INBOUND_LISTENERS,
    MAX_INTERFACES, MAX_MACS, MAX_MARKED_LISTENERS, MAX_REDIRECTS, MAX_SOURCES, MAX_VERDICTS,
    MAX_WORKLOADS, MacKey, OrigDst, RedirectKey, SourceBinding, VerdictKey, VerdictValue,
    WorkloadInfo,
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
pub static LATCH_MARKED_LISTENERS: LruHashMap<ListenerKey, u8> =
    LruHashMap::pinned(MAX_MARKED_LISTENERS, 0);

#[map]
pub static LATCH_SOURCES: HashMap<IpKey, SourceBinding> = HashMap::pinned(MAX_SOURCES, 0);

#[map]
pub static LATCH_INTERFACES: HashMap<u32, InterfaceInfo> = HashMap::pinned(MAX_INTERFACES, 0);

#[map]
pub static LATCH_MACS: HashMap<MacKey, u32> = HashMap::pinned(MAX_MACS, 0);

/// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`) of one `V` per socket, pinned by name, created with
/// `FLAGS` (`BPF_F_NO_PREALLOC`, which the kernel requires, and `BPF_F_CLONE` for storage a
/// listener's accepted sockets inherit). Kernels create such maps only from BTF, so this is a BTF
/// map definition (the `.maps` section, libbpf's layout: each field a pointer whose pointee
/// encodes a number or a type); aya-ebpf's own `SkStorage` takes only a `sock_addr` context and
/// has no pinning.
#[repr(C)]
pub struct SocketStorage<V, const FLAGS: usize> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    map_flags: *const [i32; FLAGS],
    /// libbpf's `LIBBPF_PIN_BY_NAME`.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl<V, const FLAGS: usize> Sync for SocketStorage<V, FLAGS> {}

impl<V: Copy, const FLAGS: usize> SocketStorage<V, FLAGS> {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    #[inline(always)]
    fn as_map(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// The record of the full socket `sk` (a context's non-null socket pointer), if it has one.
    #[inline(always)]
    pub fn get(&self, sk: *mut c_void) -> Option<*mut V> {
        // SAFETY: `sk` is a socket pointer the verifier tracks; no initial value is passed.
        let found = unsafe { bpf_sk_storage_get(self.as_map(), sk, ptr::null_mut(), 0) };
        (!found.is_null()).then_some(found.cast())
    }

    /// Give `sk` the record `value` (replacing one it had); `false` if the kernel could not
    /// allocate it.
    #[inline(always)]
    pub fn set(&self, sk: *mut c_void, value: &V) -> bool {
        let mut init = *value;
        // SAFETY: as for `get`; `init` outlives the call and is copied into a new record.
        let record = unsafe {
            bpf_sk_storage_get(
                self.as_map(),
                sk,
                ptr::from_mut(&mut init).cast(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        };
        if record.is_null() {
            return false;
        }
        // An existing record is returned as it is: overwrite it.
        // SAFETY: a non-null pointer to this socket's record, of `V`'s size.
        unsafe { record.cast::<V>().write(*value) };
        true
    }

    /// Remove `sk`'s record, if any.
    #[inline(always)]
    pub fn remove(&self, sk: *mut c_void) {
        // SAFETY: as for `get`.
        let _ = unsafe { bpf_sk_storage_delete(self.as_map(), sk) };
    }
}

/// The record of a fast-path socket lives on the socket itself and the kernel frees it with the
/// socket, so no number of live sockets can push one out, and one whose `connect()` fails before
/// its SYN leaves nothing behind.
#[btf_map]
pub static LATCH_FASTPATH_CONNS: SocketStorage<FastpathConn, { BPF_F_NO_PREALLOC as usize }> =
    SocketStorage::new();

/// Set by the agent on its inbound listeners; every socket a listener accepts inherits it.
#[btf_map]
pub static LATCH_AGENT_LISTENERS: SocketStorage<
    u32,
    { (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize },
> = SocketStorage::new();

#[map]
pub static LATCH_FASTPATH_EVENTS: RingBuf = RingBuf::pinned(FASTPATH_EVENTS_BYTES, 0);
