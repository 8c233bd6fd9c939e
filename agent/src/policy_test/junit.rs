//! The run as JUnit XML for CI systems (`--junit FILE`), written with `quick-junit`: one test
//! suite per test document, one test case per case, a failure carrying the same text as the
//! failing line.

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::{report, run::Outcome};

/// The JUnit XML document for `outcome`.
pub fn xml(outcome: &Outcome) -> Result<String, quick_junit::SerializeError> {
    let mut junit = Report::new("latch policy test");
    for result in &outcome.suites {
        let suite = &result.suite;
        let mut test_suite = TestSuite::new(format!("{} ({})", suite.name, suite.file.display()));
        for case in &result.cases {
            let status = if case.passed() {
                TestCaseStatus::success()
            } else {
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                status
                    .set_message(report::explain(case))
                    .set_type("policy decision")
                    .set_description(report::failure(suite, case));
                status
            };
            let mut test_case = TestCase::new(case.case.name.clone(), status);
            test_case.set_classname(format!("{}:{}", suite.file.display(), case.case.line));
            test_suite.add_test_case(test_case);
        }
        junit.add_test_suite(test_suite);
    }
    junit.to_string()
}
