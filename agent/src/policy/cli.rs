//! Text for `latch policy check` and `latch policy explain`; the binary parses the arguments
//! and calls these pure functions.

use std::{fmt::Write as _, path::PathBuf};

use super::{Decision, Explanation, PolicySet, Protocol};

/// Validate `paths`: one line per file with what it holds, or one `file:line:col: field: why`
/// line per error. The flag is true when everything is valid.
pub fn check(paths: &[PathBuf]) -> (String, bool) {
    // The root namespace does not affect validity.
    match PolicySet::load(paths, "istio-system") {
        Ok(set) => {
            let mut out = String::new();
            for f in set.files() {
                let only_tests = f.policy_tests > 0
                    && f.authorization_policies
                        + f.peer_authentications
                        + f.request_authentications
                        == 0;
                if only_tests {
                    let _ = writeln!(
                        out,
                        "{}: {} policy test{} (run below)",
                        f.file.display(),
                        f.policy_tests,
                        if f.policy_tests == 1 { "" } else { "s" }
                    );
                    continue;
                }
                let _ = write!(
                    out,
                    "{}: ok: {} AuthorizationPolic{}, {} PeerAuthentication{}",
                    f.file.display(),
                    f.authorization_policies,
                    if f.authorization_policies == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    f.peer_authentications,
                    if f.peer_authentications == 1 { "" } else { "s" },
                );
                if f.request_authentications > 0 {
                    let _ = write!(
                        out,
                        ", {} RequestAuthentication{}",
                        f.request_authentications,
                        if f.request_authentications == 1 {
                            ""
                        } else {
                            "s"
                        },
                    );
                }
                out.push('\n');
                for warning in &f.warnings {
                    let _ = writeln!(out, "warning: {warning}");
                }
            }
            (out, true)
        }
        Err(errors) => {
            let mut out = String::new();
            for e in errors {
                let _ = writeln!(out, "{e}");
            }
            (out, false)
        }
    }
}

/// A readable account of an explanation.
pub fn render_explain(explanation: &Explanation) -> String {
    let mut out = render_decision(&explanation.decision);
    let protocol = match explanation.protocol {
        Protocol::Http => "HTTP request",
        Protocol::Tcp => "connection",
    };
    let _ = writeln!(out, "evaluated as: {protocol}");
    let _ = writeln!(
        out,
        "encrypted: {} ({})",
        if explanation.encrypted { "yes" } else { "no" },
        explanation.traffic.describe()
    );
    if let Some(path) = &explanation.request_path {
        if path.given == path.normalized {
            let _ = writeln!(out, "path: {} ({})", path.normalized, path.normalization);
        } else {
            let _ = writeln!(
                out,
                "path: {} ({} normalisation of {:?})",
                path.normalized, path.normalization, path.given
            );
        }
    }
    if let Some(why) = &explanation.needs_http {
        let _ = writeln!(
            out,
            "depends on HTTP: {why}; the decision above is for a non-HTTP connection \
             (give --method/--path/--host for a request)"
        );
    }
    out
}

/// A readable account of one decision.
pub fn render_decision(d: &Decision) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", if d.allowed { "ALLOW" } else { "DENY" });
    let _ = writeln!(
        out,
        "cacheable: {} ({})",
        if d.cacheable { "yes" } else { "no" },
        d.cache_reason
    );
    match &d.decided_by {
        Some(by) => {
            let rule = d.rule.map(|r| format!(", rule {r}")).unwrap_or_default();
            let _ = writeln!(out, "decided by: {by}{rule}");
        }
        None => {
            let _ = writeln!(out, "decided by: default");
        }
    }
    let _ = writeln!(out, "reason: {}", d.reason);
    let source = d
        .mtls_source
        .as_ref()
        .map_or_else(|| "default".to_owned(), ToString::to_string);
    let _ = writeln!(out, "mTLS mode: {} (from {source})", d.mtls_mode.as_str());
    if d.audited.is_empty() {
        let _ = writeln!(out, "audited by: none");
    } else {
        let names: Vec<String> = d.audited.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "audited by: {}", names.join(", "));
    }
    if let Some(dry) = &d.dry_run {
        let names: Vec<String> = dry.policies.iter().map(ToString::to_string).collect();
        let verdict = match dry.allowed {
            Some(true) => "ALLOW",
            Some(false) => "DENY",
            None => "depends on HTTP",
        };
        let _ = writeln!(
            out,
            "dry run ({}): would be {verdict} ({}); not enforced",
            names.join(", "),
            dry.reason
        );
    }
    out
}
