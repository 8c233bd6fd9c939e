//! What can go wrong in the datapath, with what it was doing and on what.

use std::path::PathBuf;

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
