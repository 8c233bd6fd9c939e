//! How a problem in a YAML file is reported, for the config and the policy loaders alike: a
//! problem at a field path, and the `file:line:col: field.path: ` prefix of its message.

/// A problem at a field path (`workloads[1].ips[0]`, `spec.rules[0].to[0].operation.ports[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

pub fn problem(path: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        message: message.into(),
    }
}

/// `:line:col`, `:line` or nothing.
pub fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// `path: `, or nothing for the document itself.
pub fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}
