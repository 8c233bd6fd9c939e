//! What can be wrong with policy test files: each error names the file, the line (and column)
//! and the field, as the policy loader's do.

use std::path::PathBuf;

use crate::config::report::{path_prefix, position};

#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax, type, field or reference error in a test document.
    #[error("{}{}: {}{}", file.display(), position(*line, *column), path_prefix(path), message)]
    Invalid {
        file: PathBuf,
        /// 1-based, in the whole file.
        line: Option<usize>,
        column: Option<usize>,
        /// Dotted field path (`spec.cases[2].to`), empty for the document.
        path: String,
        message: String,
    },
    /// The policies a test names do not load; each policy error follows on its own line.
    #[error(
        "{}{}: spec.policies: the policies do not load ({} error{}):\n{}",
        file.display(),
        position(*line, None),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        errors.join("\n")
    )]
    Policies {
        file: PathBuf,
        line: Option<usize>,
        /// Each as `file:line:col: field: why`.
        errors: Vec<String>,
    },
    #[error("{}: no PolicyTest document (apiVersion test.latch.dev/v1, kind PolicyTest) found", paths.join(", "))]
    NoTests { paths: Vec<String> },
}
