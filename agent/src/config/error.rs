//! Config errors, each naming the file, the line and column where known, and the field path.

use std::path::PathBuf;

use super::{
    locate,
    report::{Problem, path_prefix, position},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the config file is empty", file.display())]
    Empty { file: PathBuf },
    /// A syntax, type or field error, or a check across fields.
    #[error("{}{}: {}{}", file.display(), position(*line, *column), path_prefix(path), message)]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        /// Dotted field path (`workloads[1].ips[0]`), empty for the document itself.
        path: String,
        message: String,
    },
}

impl ConfigError {
    /// A parse error. The position is that of the field when it can be found (the parser only
    /// knows the start of the enclosing mapping for errors raised by field checks), else the
    /// parser's own.
    pub(super) fn from_parse(
        file: &std::path::Path,
        text: &str,
        error: serde_path_to_error::Error<serde_yaml_ng::Error>,
    ) -> Self {
        let path = match error.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let inner = error.into_inner();
        let location = locate::locate(text, &path)
            .or_else(|| inner.location().map(|l| (l.line(), l.column())));
        Self::Invalid {
            file: file.to_owned(),
            line: location.map(|(l, _)| l),
            column: location.map(|(_, c)| c),
            message: clean_message(&inner.to_string(), &path),
            path,
        }
    }

    pub(super) fn invalid(file: &std::path::Path, text: &str, problem: Problem) -> Self {
        let location = locate::locate(text, &problem.path);
        Self::Invalid {
            file: file.to_owned(),
            line: location.map(|(l, _)| l),
            column: location.map(|(_, c)| c),
            path: problem.path,
            message: problem.message,
        }
    }

    /// The line the error points at, if any (for tests and tooling).
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}

/// serde_yaml_ng puts the (parent) path in front and the location at the end of its messages;
/// both are reported separately here.
pub(crate) fn clean_message(raw: &str, path: &str) -> String {
    let mut msg = raw;
    if let Some(idx) = msg.rfind(" at line ") {
        msg = &msg[..idx];
    }
    for prefix in [path, path.rsplit_once('.').map(|(p, _)| p).unwrap_or("")] {
        if prefix.is_empty() {
            continue;
        }
        if let Some(rest) = msg.strip_prefix(prefix).and_then(|r| r.strip_prefix(": ")) {
            msg = rest;
            break;
        }
    }
    msg.to_owned()
}
