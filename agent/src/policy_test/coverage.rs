//! Which AuthorizationPolicy rules the cases exercise, as OPA's coverage does for Rego: every
//! rule of every policy the suites load, with the number of cases that matched it (whatever
//! the final decision), and the rules no case matched.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use super::run::{RuleSite, SuiteResult};

/// One rule and how many cases matched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCoverage {
    pub site: RuleSite,
    pub cases: usize,
}

/// Every rule of the suites' policies, by (namespace, name, rule, file); suites that load the
/// same policies add up.
pub fn coverage(results: &[SuiteResult]) -> Vec<RuleCoverage> {
    let mut rules: BTreeMap<(String, String, usize, PathBuf), RuleCoverage> = BTreeMap::new();
    for result in results {
        for site in &result.rules {
            let cases = result
                .cases
                .iter()
                .filter(|c| {
                    c.matched
                        .iter()
                        .any(|(p, r)| *p == site.policy && *r == site.rule)
                })
                .count();
            let key = (
                site.policy.namespace.clone(),
                site.policy.name.clone(),
                site.rule,
                site.file.clone(),
            );
            rules
                .entry(key)
                .or_insert_with(|| RuleCoverage {
                    site: site.clone(),
                    cases: 0,
                })
                .cases += cases;
        }
    }
    rules.into_values().collect()
}

/// The coverage table, then the rules no case exercises.
pub fn render(rules: &[RuleCoverage]) -> String {
    let mut out = String::new();
    let covered = rules.iter().filter(|r| r.cases > 0).count();
    let _ = writeln!(
        out,
        "coverage: {covered} of {} AuthorizationPolicy rules matched by a case",
        rules.len()
    );
    for r in rules {
        let _ = writeln!(
            out,
            "  {:>4} case{}  {}  ({})",
            r.cases,
            if r.cases == 1 { " " } else { "s" },
            name(r),
            site(r)
        );
    }
    let uncovered: Vec<&RuleCoverage> = rules.iter().filter(|r| r.cases == 0).collect();
    if uncovered.is_empty() {
        let _ = writeln!(out, "every rule is exercised");
    } else {
        let _ = writeln!(out, "not exercised by any case:");
        for r in uncovered {
            let _ = writeln!(out, "  {}: {}", site(r), name(r));
        }
    }
    out
}

/// `namespace/name rule N (ACTION)`.
fn name(r: &RuleCoverage) -> String {
    let action = r
        .site
        .policy
        .action
        .map(|a| format!(" ({})", a.as_str()))
        .unwrap_or_default();
    format!(
        "{}/{} rule {}{action}",
        r.site.policy.namespace, r.site.policy.name, r.site.rule
    )
}

/// `file:line` of the rule's policy.
fn site(r: &RuleCoverage) -> String {
    format!("{}:{}", r.site.file.display(), r.site.line)
}
