//! The text a test run prints: one line per failing case (`file:line: case: expected ..., got
//! ... by ...`) and the summary line `N passed, M failed`.

use std::fmt::Write as _;

use super::{
    run::{CaseResult, Mismatch, Outcome},
    suite::Suite,
};
use crate::policy::Decision;

/// The failing cases, one line each, then the summary.
pub fn render(outcome: &Outcome) -> String {
    format!("{}{}\n", failures(outcome), summary(outcome))
}

/// One line per failing case.
pub fn failures(outcome: &Outcome) -> String {
    let mut out = String::new();
    for (suite, result) in outcome.cases().filter(|(_, c)| !c.passed()) {
        let _ = writeln!(out, "{}", failure(&suite.suite, result));
    }
    out
}

/// `N passed, M failed`.
pub fn summary(outcome: &Outcome) -> String {
    format!("{} passed, {} failed", outcome.passed(), outcome.failed())
}

/// `file:line: name: expected ..., got ...` for one case.
pub fn failure(suite: &Suite, result: &CaseResult) -> String {
    let case = &result.case;
    format!(
        "{}:{}: {}: {}",
        suite.file.display(),
        case.line,
        case.name,
        explain(result)
    )
}

/// `expected ..., got ... by ...`, and what did not match.
pub fn explain(result: &CaseResult) -> String {
    let case = &result.case;
    let mut expected = verdict(case.expect_allow).to_owned();
    if let Some(by) = &case.decided_by {
        let _ = write!(expected, " by {by}");
    }
    if let Some(rule) = case.rule {
        let _ = write!(expected, ", rule {rule}");
    }
    if let Some(dry) = case.expect_dry_run {
        let _ = write!(expected, " (dry run: {})", verdict(dry));
    }
    let d = &result.decision;
    let mut text = format!(
        "expected {expected}, got {} by {}",
        verdict(d.allowed),
        decider(d)
    );
    if case.expect_dry_run.is_some() {
        let _ = write!(text, " (dry run: {})", dry_run(d));
    }
    let wrong: Vec<&str> = result
        .mismatches
        .iter()
        .map(|m| match m {
            Mismatch::Verdict => "decision",
            Mismatch::DecidedBy => "decidedBy",
            Mismatch::Rule => "rule",
            Mismatch::DryRun => "expectDryRun",
        })
        .collect();
    if !wrong.is_empty() {
        let _ = write!(text, " [wrong: {}]", wrong.join(", "));
    }
    if let Some(why) = &result.needs_http {
        let _ = write!(
            text,
            "; decided as a connection without HTTP because the case has no request, and the \
             outcome depends on HTTP ({why})"
        );
    }
    text
}

/// Who decided: the policy and rule, the PeerAuthentication, or the default and why.
pub fn decider(d: &Decision) -> String {
    match (&d.decided_by, d.rule) {
        (Some(policy), Some(rule)) => format!("{policy}, rule {rule}"),
        (Some(policy), None) => format!("{policy} ({})", d.reason),
        (None, _) => format!("default ({})", d.reason),
    }
}

/// The shadow decision of the dry-run policies, and who made it.
fn dry_run(d: &Decision) -> String {
    match &d.dry_run {
        None => "none, no dry-run policy applies".to_owned(),
        Some(dry) => match (dry.allowed, &dry.decided_by, dry.rule) {
            (None, ..) => format!("undecided, {}", dry.reason),
            (Some(allowed), Some(policy), Some(rule)) => {
                format!("{} by {policy}, rule {rule}", verdict(allowed))
            }
            (Some(allowed), ..) => format!("{} by default ({})", verdict(allowed), dry.reason),
        },
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "ALLOW" } else { "DENY" }
}
