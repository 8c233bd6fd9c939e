//! The kernel datapath: the only code in Latch that talks to aya. [`install`] loads and attaches
//! the eBPF object, [`layout`] refuses maps pinned by another build, [`maps`] and [`deliveries`]
//! give typed access to the pinned maps, [`audit`] reads the fast-path event ring buffer,
//! [`run_stats`] the kernel's run counts of the programs (for benchmarks), [`antispoof`] owns the
//! anti-spoofing links, [`system`] the host facts and [`syscall`] the BPF commands aya does not
//! expose. Programs, maps and the pin
//! layout: `docs/datapath.md`.

pub mod antispoof;
pub mod audit;
pub mod deliveries;
mod error;
pub mod install;
pub mod layout;
pub mod maps;
mod object;
mod pins;
pub mod run_stats;
// The datapath's only unsafe: raw bpf(2) commands and a getsockopt(2) that neither aya nor nix
// offers, each block with its SAFETY comment.
#[allow(unsafe_code)]
pub mod syscall;
#[allow(unsafe_code)]
pub mod system;

pub use antispoof::AntiSpoofDatapath;
pub use audit::FastpathEvents;
pub use deliveries::DeliveryMap;
pub use error::DatapathError;
pub use install::{Datapath, DatapathSettings, uninstall};
pub use maps::{KernelMaps, RedirectMap, Verdict};

#[cfg(test)]
mod tests {
    use latch_common::{map_names, program_names};

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    /// The object built from `ebpf/` defines every map and program `latch-common` names: the
    /// eBPF crate names its statics and functions after them, and this catches a rename on one
    /// side only.
    #[test]
    fn embedded_object_matches_the_abi_names() {
        assert!(
            !super::object::EBPF_OBJECT.is_empty(),
            "the eBPF object was not built"
        );
        for name in map_names::ALL.iter().chain(program_names::ALL.iter()) {
            assert!(
                contains(super::object::EBPF_OBJECT, name),
                "{name} is missing from the eBPF object"
            );
        }
    }
}
