//! The kernel datapath: the only code in Latch that talks to aya. [`install`] loads and attaches
//! the eBPF object, [`layout`] refuses maps pinned by another build, [`maps`] and [`deliveries`]
//! give typed access to the pinned maps, [`antispoof`] owns the anti-spoofing links, [`system`] the
//! host facts and [`syscall`] the BPF commands aya does not expose. Programs, maps and the pin
//! layout: `docs/datapath.md`.

pub mod antispoof;
pub mod deliveries;
pub mod install;
pub mod layout;
pub mod maps;
// The datapath's only unsafe: raw bpf(2) commands and a getsockopt(2) that neither aya nor nix
// offers, each block with its SAFETY comment.
#[allow(unsafe_code)]
pub mod syscall;
#[allow(unsafe_code)]
pub mod system;

pub use antispoof::AntiSpoofDatapath;
pub use deliveries::DeliveryMap;
pub use install::{Datapath, DatapathSettings, uninstall};
pub use maps::{KernelMaps, Verdict};

use std::path::PathBuf;

/// The eBPF object built from `ebpf/` by this crate's build script.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latch"));

/// Everything that can go wrong in the datapath, with what it was doing and on what.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{what} {name}: {source}")]
    Program {
        what: &'static str,
        name: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what} {name}: {source}")]
    Map {
        what: &'static str,
        name: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{what} {path}: {detail}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} interface {ifindex}: {source}")]
    Interface {
        what: &'static str,
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    System(String),
}

impl From<aya::EbpfError> for DatapathError {
    fn from(e: aya::EbpfError) -> Self {
        Self::Load(Box::new(e))
    }
}

impl DatapathError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn map(
        what: &'static str,
        name: impl Into<String>,
        source: aya::maps::MapError,
    ) -> Self {
        Self::Map {
            what,
            name: name.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn program(
        what: &'static str,
        name: impl Into<String>,
        source: aya::programs::ProgramError,
    ) -> Self {
        Self::Program {
            what,
            name: name.into(),
            source: Box::new(source),
        }
    }
}

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
            !super::EBPF_OBJECT.is_empty(),
            "the eBPF object was not built"
        );
        for name in map_names::ALL.iter().chain(program_names::ALL.iter()) {
            assert!(
                contains(super::EBPF_OBJECT, name),
                "{name} is missing from the eBPF object"
            );
        }
    }
}
