//! The kernel ABI of Latch: everything the eBPF programs and the agent must agree on byte for byte.
//!
//! Map names, map sizes, the `#[repr(C)]` keys and values stored in those maps, and the constants
//! that give their fields meaning. Nothing else in the project defines any of these; the eBPF crate
//! and the agent's `datapath` module both import them from here.
//!
//! Conventions:
//! - IP addresses are 16 bytes; IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one
//!   map serves both families and a dual-stack socket connecting to a mapped address matches the
//!   IPv4 endpoint.
//! - Ports are in host byte order.
//! - Times are nanoseconds of `CLOCK_BOOTTIME` (`bpf_ktime_get_boot_ns` in the kernel).
//! - Identities are 128-bit keys ([`Identity`]) derived by the agent from SPIFFE IDs; the kernel
//!   only copies and compares them.
#![no_std]

/// Names of the maps, as they appear in the eBPF object and under the pin directory.
pub mod map_names {
    /// cgroup id → [`crate::WorkloadInfo`]: the enrolled workloads of this node.
    pub const WORKLOADS: &str = "LATCH_WORKLOADS";
    /// [`crate::IpKey`] → [`crate::EndpointInfo`]: every mesh endpoint (local and remote pods).
    pub const ENDPOINTS: &str = "LATCH_ENDPOINTS";
    /// [`crate::VerdictKey`] → [`crate::VerdictValue`]: the verdict cache (LRU).
    pub const VERDICTS: &str = "LATCH_VERDICTS";
    /// socket cookie → [`crate::OrigDst`]: original destination of a redirected socket (LRU).
    pub const ORIG_DST: &str = "LATCH_ORIG_DST";
    /// [`crate::RedirectKey`] → [`crate::OrigDst`]: the same, keyed the way the agent sees the
    /// accepted side of the connection (LRU).
    pub const REDIRECTS: &str = "LATCH_REDIRECTS";
    /// [`crate::IpKey`] (local pod IP) → inbound listener socket in that pod's netns.
    pub const INBOUND_LISTENERS: &str = "LATCH_INBOUND_LISTENERS";
    /// Single-entry array of [`crate::DatapathConfig`].
    pub const CONFIG: &str = "LATCH_CONFIG";
    /// Per-CPU `u64` counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "LATCH_COUNTERS";
    /// [`crate::DeliveryKey`] → `u8`: connections the agent delivers to a pod's application
    /// from the client's own address, while they live; the inbound check lets them through (LRU).
    pub const DELIVERIES: &str = "LATCH_DELIVERIES";
    /// [`crate::IpKey`] → [`crate::SourceBinding`]: each address of an enrolled local pod, bound
    /// to the node-side interface its packets must come in through (anti-spoofing).
    pub const SOURCES: &str = "LATCH_SOURCES";
    /// ifindex → [`crate::InterfaceInfo`]: interfaces of the node that are veths to another
    /// namespace, an enrolled pod's host side, or a port of a bridge (anti-spoofing).
    pub const INTERFACES: &str = "LATCH_INTERFACES";
    /// [`crate::MacKey`] → ifindex: each enrolled local pod's MAC address, bound to its host-side
    /// interface, so that no other bridge port can claim it (anti-spoofing).
    pub const MACS: &str = "LATCH_MACS";
    /// Socket storage of a [`crate::FastpathConn`] per socket: the connections `connect4`/
    /// `connect6` let through by a cached allow, and the server sockets of those the inbound
    /// check admitted by one, so that `sock_ops` can report them; freed with the socket.
    pub const FASTPATH_CONNS: &str = "LATCH_FASTPATH_CONNS";
    /// Ring buffer of [`crate::FastpathEvent`]s: each fast-path connection opened and closed,
    /// for the agent's metrics and access log.
    pub const FASTPATH_EVENTS: &str = "LATCH_FASTPATH_EVENTS";
    /// Socket storage of [`crate::AGENT_LISTENER`] on the agent's inbound listener in each
    /// enrolled pod's netns, set by the agent and cloned by the kernel onto every socket the
    /// listener accepts (`BPF_F_CLONE`): `sock_ops` tells by it the connections the inbound
    /// check steered to the agent from those it admitted straight to the application, which it
    /// reports (fast-path audit). Only the agent writes it: no program creates an entry.
    pub const AGENT_LISTENERS: &str = "LATCH_AGENT_LISTENERS";
    /// [`crate::ListenerKey`] → `u8`: the ports on which a pod's application listens with a
    /// socket mark of its own, recorded by `sock_ops` as each listener starts. Linux gives an
    /// accepted socket the SYN's mark only when its listener has none, so a delivery to such a
    /// listener from the client's address would have its answers routed out of the pod; the agent
    /// delivers to it from the loopback marker instead (LRU).
    pub const MARKED_LISTENERS: &str = "LATCH_MARKED_LISTENERS";

    pub const ALL: [&str; 16] = [
        WORKLOADS,
        ENDPOINTS,
        VERDICTS,
        ORIG_DST,
        REDIRECTS,
        INBOUND_LISTENERS,
        CONFIG,
        COUNTERS,
        DELIVERIES,
        SOURCES,
        INTERFACES,
        MACS,
        FASTPATH_CONNS,
        FASTPATH_EVENTS,
        AGENT_LISTENERS,
        MARKED_LISTENERS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "latch_connect4";
    pub const CONNECT6: &str = "latch_connect6";
    pub const GETPEERNAME4: &str = "latch_getpeername4";
    pub const GETPEERNAME6: &str = "latch_getpeername6";
    pub const SOCK_OPS: &str = "latch_sock_ops";
    pub const INBOUND: &str = "latch_inbound";
    /// The anti-spoofing check at the ingress (TCX) of every interface of the node.
    pub const ANTISPOOF: &str = "latch_antispoof";

    pub const ALL: [&str; 7] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_OPS,
        INBOUND,
        ANTISPOOF,
    ];
}

/// Verdict cache entries. At least a million: one per (source identity, destination identity,
/// port, direction) seen recently on a large node.
pub const MAX_VERDICTS: u32 = 1 << 20;
/// Enrolled workloads (cgroups) on one node.
pub const MAX_WORKLOADS: u32 = 1 << 16;
/// Mesh endpoints (pod IPs) known to one node.
pub const MAX_ENDPOINTS: u32 = 1 << 16;
/// Redirected sockets alive at once (LRU, so a leak can never fill it).
pub const MAX_REDIRECTS: u32 = 1 << 18;
/// Inbound listeners: one per local pod IP.
pub const MAX_INBOUND_LISTENERS: u32 = 1 << 12;
/// Deliveries from clients' addresses alive at once. LRU: an entry only matters until its SYN is
/// answered, so evicting a live connection's is harmless, and one the agent died before
/// withdrawing ages out.
pub const MAX_DELIVERIES: u32 = 1 << 14;
/// Listening ports with a socket mark of their own, over every pod of a node (LRU: an entry
/// outlives its listener until another takes the port, so the oldest go first).
pub const MAX_MARKED_LISTENERS: u32 = 1 << 14;
/// Addresses of enrolled local pods (each pod has a few).
pub const MAX_SOURCES: u32 = 1 << 16;
/// Interfaces of the node that are a pod's host side or a bridge port.
pub const MAX_INTERFACES: u32 = 1 << 16;
/// MAC addresses of enrolled local pods.
pub const MAX_MACS: u32 = 1 << 16;
/// Size in bytes of the fast-path event ring buffer (a power of two, a multiple of the page
/// size): about 9,000 events of 112 bytes (header included) before the agent must drain it.
pub const FASTPATH_EVENTS_BYTES: u32 = 1 << 20;
/// Bytes waiting in the fast-path event ring buffer from which `sock_ops` wakes the agent when it
/// submits an event (a quarter of the ring, about 2,300 events). Below it, events are submitted
/// without a wake-up and the agent drains the ring on its own clock: a wake-up per event would
/// cost the agent a context switch per connection on every node, more than the event's own work.
/// Past it, only the events that take the ring over a [`FASTPATH_EVENTS_WAKEUP_STEP`] boundary
/// wake it ([`fastpath_event_wakes`]).
pub const FASTPATH_EVENTS_WAKEUP_BYTES: u64 = FASTPATH_EVENTS_BYTES as u64 / 4;
/// Past [`FASTPATH_EVENTS_WAKEUP_BYTES`], the agent is woken again each time this many more bytes
/// are waiting (a sixteenth of the ring): at most a dozen wake-ups while the ring fills.
pub const FASTPATH_EVENTS_WAKEUP_STEP: u64 = FASTPATH_EVENTS_BYTES as u64 / 16;
/// Bytes one [`FastpathEvent`] takes in the ring buffer: the kernel's 8-byte record header and
/// the event, rounded up to 8.
pub const FASTPATH_EVENT_RECORD_BYTES: u64 =
    (core::mem::size_of::<FastpathEvent>() as u64 + 8).div_ceil(8) * 8;

/// Whether `sock_ops` wakes the agent as it submits an event, given the bytes waiting in the ring
/// buffer with that event reserved (`BPF_RB_AVAIL_DATA`): only when the event took the ring to
/// [`FASTPATH_EVENTS_WAKEUP_BYTES`] or over a further [`FASTPATH_EVENTS_WAKEUP_STEP`] boundary.
///
/// Waking on every event past the threshold cost a self-interrupt (`irq_work`, an exit to the
/// hypervisor on a VM) on the connection's own path for each event while the agent did not drain
/// (stopped, or stalled on its log): about a sixth of the fast path's connection rate
/// (`docs/benchmarks.md`). An agent that is draining takes everything there is, so one wake-up
/// per boundary loses nothing; one missed by a race between CPUs is made up at the next boundary
/// or by the agent's own clock.
pub const fn fastpath_event_wakes(waiting: u64) -> bool {
    waiting >= FASTPATH_EVENTS_WAKEUP_BYTES
        && (waiting - FASTPATH_EVENTS_WAKEUP_BYTES) % FASTPATH_EVENTS_WAKEUP_STEP
            < FASTPATH_EVENT_RECORD_BYTES
}
/// Depth of cgroup ancestors the connect programs walk to find an enrolled workload (a pod cgroup
/// with container cgroups below it).
pub const MAX_CGROUP_DEPTH: u32 = 8;

/// A 16-byte IP address (IPv4 mapped into IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u8; 16],
}

impl IpKey {
    /// The IPv4 address `a.b.c.d` given as the big-endian bytes of the address.
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// Build from the four 32-bit words of an address as the kernel stores them (network order in
    /// memory, read as native-endian integers).
    pub const fn from_words(w: [u32; 4]) -> Self {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        Self { addr }
    }

    /// The inverse of [`IpKey::from_words`].
    pub const fn to_words(&self) -> [u32; 4] {
        let a = &self.addr;
        let mut w = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            w[i] = u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
            i += 1;
        }
        w
    }

    /// `127.0.0.0/8` (mapped) or `::1`.
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4_mapped() {
            return self.addr[12] == 127;
        }
        let a = &self.addr;
        let mut i = 0;
        while i < 15 {
            if a[i] != 0 {
                return false;
            }
            i += 1;
        }
        a[15] == 1
    }

    /// `fe80::/10`, an IPv6 link-local address.
    pub const fn is_v6_link_local(&self) -> bool {
        self.addr[0] == 0xfe && (self.addr[1] & 0xc0) == 0x80
    }

    /// The same address as `other`, compared as two 64-bit words (an array's `==` may become a
    /// `memcmp` call, which BPF programs cannot make).
    pub const fn same_as(&self, other: &IpKey) -> bool {
        let (a, b) = (self.halves(), other.halves());
        a[0] == b[0] && a[1] == b[1]
    }

    const fn halves(&self) -> [u64; 2] {
        let a = &self.addr;
        [
            u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
            u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
        ]
    }

    /// `::`, the IPv6 unspecified address (a mapped `0.0.0.0` is not).
    pub const fn is_v6_unspecified(&self) -> bool {
        let a = &self.addr;
        let mut i = 0;
        while i < 16 {
            if a[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    /// Whether this is an IPv4-mapped address.
    pub const fn is_v4_mapped(&self) -> bool {
        let a = &self.addr;
        a[0] == 0
            && a[1] == 0
            && a[2] == 0
            && a[3] == 0
            && a[4] == 0
            && a[5] == 0
            && a[6] == 0
            && a[7] == 0
            && a[8] == 0
            && a[9] == 0
            && a[10] == 0xff
            && a[11] == 0xff
    }
}

/// A workload identity as the kernel stores it: the first 16 bytes of SHA-256 of the SPIFFE ID,
/// in digest order (the agent derives it). 128 bits, so that no one can make two identities share
/// a key by choosing service-account names: a 64-bit key falls to a birthday search of about 2^32
/// hashes, a 128-bit one would take 2^64. Aligned to 8 so the programs copy it as two words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Identity {
    pub bytes: [u8; 16],
}

impl Identity {
    pub const fn new(bytes: [u8; 16]) -> Self {
        Self { bytes }
    }
}

/// An enrolled workload, keyed by its (pod) cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkloadInfo {
    pub identity: Identity,
    /// `WORKLOAD_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// The workload's data-plane mode is `tunnel`: never take the fast path, every connection goes
/// through the enforcer.
pub const WORKLOAD_TUNNEL_ONLY: u32 = 1;

/// A mesh endpoint, keyed by one of its IPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    pub identity: Identity,
    /// `ENDPOINT_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// The endpoint is a pod on this node (its netns has the inbound check).
pub const ENDPOINT_LOCAL: u32 = 1;
/// The endpoint's workload is in `tunnel` mode: never take the fast path to or from it.
pub const ENDPOINT_TUNNEL_ONLY: u32 = 2;

/// Direction of a cached verdict, from the point of view of this node.
pub const DIRECTION_OUTBOUND: u8 = 0;
pub const DIRECTION_INBOUND: u8 = 1;

/// Key of the verdict cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VerdictKey {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    /// Destination port, host byte order.
    pub port: u16,
    /// `DIRECTION_*`.
    pub direction: u8,
    pub _pad: [u8; 5],
}

impl VerdictKey {
    pub const fn new(
        src_identity: Identity,
        dst_identity: Identity,
        port: u16,
        direction: u8,
    ) -> Self {
        Self {
            src_identity,
            dst_identity,
            port,
            direction,
            _pad: [0; 5],
        }
    }
}

/// Decisions stored in the cache.
pub const DECISION_ALLOW: u32 = 1;
pub const DECISION_DENY: u32 = 2;

/// Value of the verdict cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictValue {
    /// `CLOCK_BOOTTIME` nanoseconds after which the entry is ignored.
    pub expires_at_ns: u64,
    /// `DECISION_*`.
    pub decision: u32,
    pub _pad: u32,
}

/// Interface index of the loopback device, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// One connection the agent is about to make inside a pod's netns, from a client's address to
/// the application: the inbound check would otherwise take it for a connection straight from the
/// client (a locally routed packet's ingress interface is the pod's own, not loopback).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeliveryKey {
    /// The client's address, the delivery's source.
    pub remote: IpKey,
    /// The application's address.
    pub local: IpKey,
    /// Host byte order.
    pub remote_port: u16,
    /// Host byte order.
    pub local_port: u16,
}

/// Inside each enrolled pod's netns, the agent's delivery sockets carry this mark (`SO_MARK`) and
/// `ip rule fwmark DELIVERY_MARK lookup DELIVERY_TABLE` routes their packets, and the packets of
/// the application sockets that accept them, over loopback: a delivery can then come from the
/// client's own address. Chosen clear of the marks kube-proxy, Cilium and Istio use.
pub const DELIVERY_MARK: u32 = 0x4c54;
/// The value the agent stores on its inbound listeners in [`map_names::AGENT_LISTENERS`] (what
/// counts is that a socket has an entry).
pub const AGENT_LISTENER: u32 = 1;
/// The routing table holding `local default dev lo` for marked packets.
pub const DELIVERY_TABLE: u32 = 0x4c54;
/// Preference of the rule: after `local` (0), before `main` (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 32700;

/// Where packets from one address of an enrolled local pod may come in (anti-spoofing): the
/// pod's host-side interface, and the bridge that interface is a port of, if any (frames bridged
/// up to the node are seen again at the bridge's own ingress). An `ifindex` of 0 binds the
/// address to no interface at all: the agent could not find the pod's host side, and nothing
/// may use the address (fail closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceBinding {
    pub ifindex: u32,
    /// 0 when the host-side interface has no master.
    pub master: u32,
}

/// How many addresses bound to an interface its [`InterfaceInfo`] carries.
pub const OWN_ADDRESSES: usize = 2;

/// An interface of the node the anti-spoofing check needs to know about.
///
/// Besides its flags, an enrolled pod's port carries what the check would find for it in the
/// other two maps, so that the pod's own packets pass after this one lookup: up to
/// [`OWN_ADDRESSES`] of the addresses `LATCH_SOURCES` binds to this interface, and the MAC
/// address `LATCH_MACS` binds to it ([`INTERFACE_OWN_MAC`]). They are a copy, never more: each
/// is written only once the other map grants it, and cleared before the other map takes it
/// back (`agent/src/datapath/antispoof.rs`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InterfaceInfo {
    /// `INTERFACE_*` flags.
    pub flags: u32,
    /// The interface's master (bridge, bond), 0 if none: a route that leaves through the
    /// master counts as leaving through this interface in the reverse-path check.
    pub master: u32,
    /// The MAC address `LATCH_MACS` binds to this interface, with [`INTERFACE_OWN_MAC`].
    pub own_mac: [u8; 6],
    /// How many of `own` are addresses (the rest are zero).
    pub own_count: u8,
    pub _pad: u8,
    /// Addresses `LATCH_SOURCES` binds to this interface.
    pub own: [IpKey; OWN_ADDRESSES],
}

impl InterfaceInfo {
    /// The same interface with no copy of the other maps' bindings.
    pub const fn without_own(&self) -> Self {
        Self {
            flags: self.flags & !INTERFACE_OWN_MAC,
            master: self.master,
            own_mac: [0; 6],
            own_count: 0,
            _pad: 0,
            own: [IpKey { addr: [0; 16] }; OWN_ADDRESSES],
        }
    }

    /// Whether `other` carries the same copy of the other maps' bindings.
    pub fn same_own(&self, other: &Self) -> bool {
        self.flags & INTERFACE_OWN_MAC == other.flags & INTERFACE_OWN_MAC
            && self.own_mac == other.own_mac
            && self.own_count == other.own_count
            && self.own == other.own
    }
}

/// The interface is the host side of an enrolled local pod: every packet it brings in must carry
/// one of that pod's addresses (or a link-local or unspecified one, for neighbour discovery).
pub const INTERFACE_POD: u32 = 1;
/// The interface is a port of a bridge: frames from it must not carry an enrolled pod's MAC
/// address unless it is that pod's own port.
pub const INTERFACE_BRIDGE_PORT: u32 = 2;
/// The interface is a veth whose peer is in another network namespace: all a pod can send
/// through to the node, so a remote mesh endpoint's address coming in on it must pass the
/// reverse-path check. The node's other interfaces (NICs, bonds, VXLAN) link it to the other
/// nodes, where the network is trusted, and skip it.
pub const INTERFACE_VETH: u32 = 4;
/// [`InterfaceInfo::own_mac`] holds the MAC address `LATCH_MACS` binds to this interface.
pub const INTERFACE_OWN_MAC: u32 = 8;

/// A MAC address as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacKey {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}

impl MacKey {
    pub const fn new(addr: [u8; 6]) -> Self {
        Self { addr, _pad: [0; 2] }
    }
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The original destination of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// The destination as the application gave it (IPv4 mapped for `connect4`).
    pub addr: IpKey,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the application's socket.
    pub family: u16,
    pub _pad: u32,
}

/// How the agent finds a redirected connection it accepted on a capture listener: the client
/// socket's network namespace (cookie) and local port, as seen from the accepted socket's peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RedirectKey {
    pub netns_cookie: u64,
    /// The client's local port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u32,
}

/// A listening port in one network namespace (`LATCH_MARKED_LISTENERS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// A connection `connect4`/`connect6` let through by a cached allow, by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FastpathConn {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    /// `CLOCK_BOOTTIME` nanoseconds at `connect()` (outbound) or when the server's socket was
    /// established (inbound).
    pub started_ns: u64,
    /// Destination port, host byte order.
    pub port: u16,
    /// `DIRECTION_*`: outbound from the connect programs, inbound from `sock_ops` on a server
    /// socket the inbound check admitted.
    pub direction: u8,
    /// Non-zero once the connection was established and its opened event sent: only those
    /// get a closed event.
    pub opened: u8,
    pub _pad: u32,
}

/// [`FastpathEvent::kind`]: the connection was established.
pub const FASTPATH_OPENED: u8 = 1;
/// [`FastpathEvent::kind`]: the connection closed; bytes and duration are filled in.
pub const FASTPATH_CLOSED: u8 = 2;

/// One record of the fast-path event ring buffer. The byte counts are the kernel's
/// (`bpf_sock_ops`), which count TCP sequence space: `bytes_acked` includes the SYN and, once
/// acknowledged, the FIN; `bytes_received` includes the peer's FIN. `close_state` and
/// `all_acked` let the agent take those out (`latch::metrics::audit::payload_bytes`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FastpathEvent {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    /// The client's address (the socket's own for outbound, its peer's for inbound).
    pub src_addr: IpKey,
    /// The server's address.
    pub dst_addr: IpKey,
    /// Socket cookie: pairs an opened event with its closed one.
    pub cookie: u64,
    /// From `connect()` (or the SYN's lookup) to the close (0 in an opened event).
    pub duration_ns: u64,
    /// `bytes_acked` of the socket at its close (0 in an opened event).
    pub bytes_acked: u64,
    /// `bytes_received` of the socket at its close (0 in an opened event).
    pub bytes_received: u64,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// `FASTPATH_OPENED` or `FASTPATH_CLOSED`.
    pub kind: u8,
    /// `DIRECTION_*`: which side of the connection this node is.
    pub direction: u8,
    /// The TCP state (`TCP_*`) the socket closed from (0 in an opened event).
    pub close_state: u8,
    /// 1 if everything the socket sent was acknowledged at its close (`snd_una == snd_nxt`).
    pub all_acked: u8,
}

/// TCP states as the kernel numbers them (`BPF_TCP_*`), for [`FastpathEvent::close_state`].
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_CLOSING: u8 = 11;

/// Node-wide settings the programs read at run time (single entry at index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Capture listener port on loopback in each pod netns (outbound redirect target).
    pub capture_port: u16,
    /// Tunnel (HBONE) listener port in each pod netns: never steered by the inbound check.
    pub tunnel_port: u16,
    /// Inbound listener port (for reference; steering uses the listener socket itself).
    pub inbound_port: u16,
    pub _pad: u16,
    /// cgroup v2 level of `cgroupRoot` (the root cgroup is level 0): the connect programs look for
    /// enrolled workloads among the ancestors below this level.
    pub cgroup_root_level: u32,
    /// Non-zero once the agent has filled the config; until then the programs let all through.
    pub enabled: u32,
}

/// Per-CPU counters, by index in the `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` allowed straight through by a fresh cached allow.
    FastpathAllowed = 0,
    /// `connect()` redirected to the agent's capture listener.
    Redirected = 1,
    /// `connect()` failed with `EPERM` by a fresh cached deny.
    CachedDeny = 2,
    /// Inbound connection delivered straight to the application by a fresh inbound verdict.
    InboundAdmitted = 3,
    /// Inbound connection steered to the agent's inbound listener.
    InboundSteered = 4,
    /// Inbound connection that had to be steered but no listener was there: reset.
    InboundRejected = 5,
    /// Packet dropped at an interface of the node by the anti-spoofing check: a source (or ARP
    /// sender, or neighbour-advertisement target) address, or a MAC address, it may not use.
    SpoofDropped = 6,
    /// A fast-path connection event (opened or closed) that could not be reported: the ring
    /// buffer to the agent was full, or the connection could not be remembered.
    FastpathAuditDropped = 7,
}

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::FastpathAllowed,
        Counter::Redirected,
        Counter::CachedDeny,
        Counter::InboundAdmitted,
        Counter::InboundSteered,
        Counter::InboundRejected,
        Counter::SpoofDropped,
        Counter::FastpathAuditDropped,
    ];

    /// Stable snake_case name, used in the debug API and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::FastpathAllowed => "fastpath_allowed",
            Counter::Redirected => "redirected",
            Counter::CachedDeny => "cached_deny",
            Counter::InboundAdmitted => "inbound_admitted",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundRejected => "inbound_rejected",
            Counter::SpoofDropped => "spoof_dropped",
            Counter::FastpathAuditDropped => "fastpath_audit_dropped",
        }
    }
}

pub const COUNTER_SLOTS: u32 = 8;

// aya reads and writes map values only of types marked with its unsafe `Pod` trait.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    macro_rules! pod {
        ($($map_type:ident),* $(,)?) => {$(
            // SAFETY: every map type is #[repr(C)], Copy, made only of integers and byte arrays,
            // with explicit padding fields, so every bit pattern is valid.
            unsafe impl aya::Pod for super::$map_type {}
        )*};
    }

    pod!(
        IpKey,
        Identity,
        WorkloadInfo,
        EndpointInfo,
        VerdictKey,
        VerdictValue,
        OrigDst,
        RedirectKey,
        ListenerKey,
        DatapathConfig,
        DeliveryKey,
        SourceBinding,
        InterfaceInfo,
        MacKey,
        FastpathConn,
        FastpathEvent,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<Identity>(), 16);
        assert_eq!(core::mem::align_of::<Identity>(), 8);
        assert_eq!(size_of::<WorkloadInfo>(), 24);
        assert_eq!(size_of::<EndpointInfo>(), 24);
        assert_eq!(size_of::<VerdictKey>(), 40);
        assert_eq!(size_of::<VerdictValue>(), 16);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<RedirectKey>(), 16);
        assert_eq!(size_of::<DatapathConfig>(), 16);
        assert_eq!(size_of::<SourceBinding>(), 8);
        assert_eq!(size_of::<InterfaceInfo>(), 48);
        assert_eq!(size_of::<MacKey>(), 8);
        assert_eq!(size_of::<FastpathConn>(), 48);
        assert_eq!(size_of::<FastpathEvent>(), 104);
    }

    /// The ring filled one event at a time with nothing drained: the first event to reach the
    /// threshold wakes the agent, then one per step, never one per event.
    #[test]
    fn a_filling_ring_wakes_the_agent_once_per_step_past_the_threshold() {
        let mut waiting = 0;
        // Where each wake-up came (the crate is `no_std`: no `Vec`).
        let mut wakes = [0u64; 32];
        let mut woken = 0;
        let mut events_past_threshold = 0;
        while waiting + FASTPATH_EVENT_RECORD_BYTES <= FASTPATH_EVENTS_BYTES as u64 {
            waiting += FASTPATH_EVENT_RECORD_BYTES;
            if waiting >= FASTPATH_EVENTS_WAKEUP_BYTES {
                events_past_threshold += 1;
            }
            if fastpath_event_wakes(waiting) {
                if let Some(slot) = wakes.get_mut(woken) {
                    *slot = waiting;
                }
                woken += 1;
            }
        }
        assert_eq!(FASTPATH_EVENT_RECORD_BYTES, 112);
        assert!(events_past_threshold > 6_000, "{events_past_threshold}");
        // The threshold and each step after it, up to the full ring: 256 KiB, 320 KiB, ..., 960 KiB.
        assert_eq!(woken, 12, "wake-ups while the ring filled: {wakes:?}");
        for (i, at) in wakes[..woken].iter().enumerate() {
            let boundary = FASTPATH_EVENTS_WAKEUP_BYTES + i as u64 * FASTPATH_EVENTS_WAKEUP_STEP;
            assert!(
                (boundary..boundary + FASTPATH_EVENT_RECORD_BYTES).contains(at),
                "wake {i} at {at}, boundary {boundary}"
            );
        }
        assert!(!fastpath_event_wakes(0));
        assert!(!fastpath_event_wakes(FASTPATH_EVENTS_WAKEUP_BYTES - 1));
        assert!(fastpath_event_wakes(FASTPATH_EVENTS_WAKEUP_BYTES));
        assert!(!fastpath_event_wakes(
            FASTPATH_EVENTS_WAKEUP_BYTES + FASTPATH_EVENT_RECORD_BYTES
        ));
    }

    #[test]
    fn v4_mapping() {
        let k = IpKey::from_v4([10, 244, 1, 2]);
        assert!(k.is_v4_mapped());
        assert_eq!(&k.addr[12..], &[10, 244, 1, 2]);
        assert!(!IpKey::from_v6([0xfd; 16]).is_v4_mapped());
        assert!(IpKey::from_v4([127, 0, 0, 6]).is_loopback());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(IpKey::from_v6(one).is_loopback());
        assert!(!k.is_loopback());
        assert_eq!(IpKey::from_words(k.to_words()), k);
    }

    #[test]
    fn link_local_and_unspecified() {
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        ll[15] = 7;
        assert!(IpKey::from_v6(ll).is_v6_link_local());
        ll[1] = 0xc0; // fec0::/10, site-local, is not link-local
        assert!(!IpKey::from_v6(ll).is_v6_link_local());
        assert!(IpKey::from_v6([0; 16]).is_v6_unspecified());
        assert!(!IpKey::from_v4([0, 0, 0, 0]).is_v6_unspecified());
        assert!(!IpKey::from_v4([10, 244, 1, 2]).is_v6_link_local());
    }

    #[test]
    fn counter_indices_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
        assert_eq!(Counter::ALL.len() as u32, COUNTER_SLOTS);
    }
}
