//! Policy loading errors, each naming the file, the line and column where known, and the field.

use std::path::PathBuf;

use crate::config::report::{path_prefix, position};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax, type, field or consistency error in a document.
    #[error("{}{}: {}{}", file.display(), position(*line, *column), path_prefix(path), message)]
    Invalid {
        file: PathBuf,
        /// 1-based, in the whole file.
        line: Option<usize>,
        column: Option<usize>,
        /// Dotted field path (`spec.rules[0].to[0].operation.ports[1]`), empty for the document.
        path: String,
        message: String,
    },
}

impl PolicyError {
    /// The line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            Self::Read { .. } => None,
        }
    }

    pub fn file(&self) -> &std::path::Path {
        match self {
            Self::Read { file, .. } | Self::Invalid { file, .. } => file,
        }
    }
}
