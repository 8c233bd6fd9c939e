//! `latch policy test`: policies as tested code. Test files (`PolicyTest` documents,
//! `test.latch.dev/v1`) state expected decisions as data; each is checked ([`suite`], errors as
//! `file:line:col: field: why`), its policies loaded and its cases decided by the agent's own
//! engine ([`run`]), and the outcome reported as text ([`report`]), rule coverage
//! ([`coverage`]) and JUnit XML ([`junit`]). The format and the output: `docs/policy-testing.md`.

pub mod coverage;
mod discover;
mod document;
mod error;
pub mod junit;
mod model;
pub mod report;
pub mod request;
pub mod run;
pub mod suite;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use error::TestFileError;
pub use run::Outcome;

/// Run the test files of `paths` (files, or directories whose `*.yaml`/`*.yml` files hold test
/// documents among other documents). Finding no test at all is an error: a CI step that tests
/// nothing should not pass.
pub fn run(paths: &[PathBuf]) -> Result<Outcome, Vec<TestFileError>> {
    match run_found(paths)? {
        Some(outcome) => Ok(outcome),
        None => Err(vec![TestFileError::NoTests {
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
        }]),
    }
}

/// The test files among `paths`, run; `None` when there are none (`latch policy check`, which
/// runs the tests it finds beside the policies).
pub fn run_found(paths: &[PathBuf]) -> Result<Option<Outcome>, Vec<TestFileError>> {
    let suites = discover::suites(paths)?;
    if suites.is_empty() {
        return Ok(None);
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for suite in suites {
        match run::run(suite) {
            Ok(result) => results.push(result),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(Some(Outcome { suites: results }))
    } else {
        Err(errors)
    }
}
