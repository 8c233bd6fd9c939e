//! Decides each case of a [`Suite`] with the agent's own engine: the policies loaded as the
//! agent loads them (`PolicySet::load` with the root namespace, the default mTLS mode), the
//! case asked as `latch policy explain` asks it, and the rules that match the case recorded
//! for coverage.

use crate::policy::{Connection, Decision, HttpRequest, PolicyRef, PolicySet, Target};

use super::{
    error::TestFileError,
    suite::{Case, Decider, Suite},
};

/// Every suite of a run, decided.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub suites: Vec<SuiteResult>,
}

impl Outcome {
    /// Every case with its suite, in file and document order.
    pub fn cases(&self) -> impl Iterator<Item = (&SuiteResult, &CaseResult)> {
        self.suites
            .iter()
            .flat_map(|s| s.cases.iter().map(move |c| (s, c)))
    }

    pub fn passed(&self) -> usize {
        self.cases().filter(|(_, c)| c.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases().filter(|(_, c)| !c.passed()).count()
    }

    /// Whether every case passed.
    pub fn ok(&self) -> bool {
        self.failed() == 0
    }
}

/// A suite's cases, decided.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub suite: Suite,
    pub cases: Vec<CaseResult>,
    /// Every rule of every AuthorizationPolicy of the suite's policies, with the file and line
    /// of its policy.
    pub rules: Vec<RuleSite>,
}

/// A rule, and where its policy is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSite {
    pub policy: PolicyRef,
    pub rule: usize,
    pub file: std::path::PathBuf,
    pub line: usize,
}

/// One case, decided.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    pub decision: Decision,
    /// Set when the case has no request and the decision depends on HTTP: the decision is the
    /// one for a connection that carries no HTTP.
    pub needs_http: Option<String>,
    /// Every AuthorizationPolicy rule the case matches, whatever the decision.
    pub matched: Vec<(PolicyRef, usize)>,
    /// Why the case failed; empty when it passed.
    pub mismatches: Vec<Mismatch>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// One way the decision differs from the case's expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Verdict,
    DecidedBy,
    Rule,
    /// The dry-run policies' shadow decision (or there is none, or it depends on HTTP).
    DryRun,
}

/// Load the suite's policies and decide every case.
pub fn run(suite: Suite) -> Result<SuiteResult, TestFileError> {
    let set = PolicySet::load(&suite.policies, &suite.root_namespace)
        .map_err(|errors| TestFileError::Policies {
            file: suite.file.clone(),
            line: Some(suite.policies_line),
            errors: errors.iter().map(ToString::to_string).collect(),
        })?
        .with_default_mtls(suite.mtls_mode);
    let cases = suite
        .cases
        .iter()
        .map(|case| decide(&set, &suite, case))
        .collect();
    let summaries = set.summaries();
    let rules = set
        .authorization_rules()
        .into_iter()
        .map(|(policy, rule)| {
            let site = summaries
                .iter()
                .find(|s| {
                    s.kind == policy.kind
                        && s.namespace == policy.namespace
                        && s.name == policy.name
                })
                .map(|s| (s.file.clone(), s.line))
                .unwrap_or_default();
            RuleSite {
                policy,
                rule,
                file: site.0,
                line: site.1,
            }
        })
        .collect();
    Ok(SuiteResult {
        suite,
        cases,
        rules,
    })
}

fn decide(set: &PolicySet, suite: &Suite, case: &Case) -> CaseResult {
    let workload = &suite.workloads[case.destination];
    let target = Target {
        namespace: &workload.namespace,
        labels: &workload.labels,
    };
    let conn = Connection {
        source_principal: case.source.as_deref(),
        source_ip: case.source_ip,
        destination_ip: case.destination_ip,
        destination_port: case.port,
    };
    let request = case.request.as_ref().map(|r| HttpRequest {
        method: &r.method,
        path: &r.path,
        host: &r.host,
        headers: &r.headers,
        auth: r.auth.as_ref(),
    });
    let explanation = set.explain(&target, &conn, request.as_ref());
    let matched = set.matching_rules(&target, &conn, request.as_ref());
    let decision = explanation.decision;
    let mut mismatches = Vec::new();
    if decision.allowed != case.expect_allow {
        mismatches.push(Mismatch::Verdict);
    }
    if let Some(expected) = &case.decided_by
        && !decided_by(expected, &decision)
    {
        mismatches.push(Mismatch::DecidedBy);
    }
    if case.rule.is_some() && case.rule != decision.rule {
        mismatches.push(Mismatch::Rule);
    }
    if let Some(expected) = case.expect_dry_run
        && decision.dry_run.as_ref().and_then(|d| d.allowed) != Some(expected)
    {
        mismatches.push(Mismatch::DryRun);
    }
    CaseResult {
        case: case.clone(),
        decision,
        needs_http: explanation.needs_http,
        matched,
        mismatches,
    }
}

fn decided_by(expected: &Decider, decision: &Decision) -> bool {
    match (expected, &decision.decided_by) {
        (Decider::Default, None) => true,
        (Decider::Policy { namespace, name }, Some(by)) => {
            &by.namespace == namespace && &by.name == name
        }
        _ => false,
    }
}
