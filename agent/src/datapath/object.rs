//! The eBPF object this agent loads, embedded at build time.

/// The eBPF object built from `ebpf/` by this crate's build script.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latch"));
