//! Finds the `PolicyTest` documents in files and directories (a directory's `*.yaml` and
//! `*.yml` files, in name order, not recursive, as the policy loader reads them) and checks
//! each into a [`Suite`]. Other documents (the policies beside the tests) are left alone.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    document::Doc,
    error::TestFileError,
    suite::{self, Suite},
};
use crate::policy::load::{POLICY_TEST_KIND, expand, is_blank, is_policy_test, split_documents};

/// Only what tells a test document from others.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Every test document of `paths`, checked; all errors of all files, or the suites.
pub fn suites(paths: &[PathBuf]) -> Result<Vec<Suite>, Vec<TestFileError>> {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let files = match expand(path) {
            Ok(files) => files,
            Err(source) => {
                errors.push(TestFileError::Read {
                    file: path.clone(),
                    source,
                });
                continue;
            }
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => in_file(&file, &text, &mut found, &mut errors),
                Err(source) => errors.push(TestFileError::Read { file, source }),
            }
        }
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(errors)
    }
}

/// The test documents of one file.
pub fn in_file(file: &Path, text: &str, found: &mut Vec<Suite>, errors: &mut Vec<TestFileError>) {
    for (offset, text) in split_documents(text) {
        if is_blank(text) {
            continue;
        }
        let doc = Doc { file, text, offset };
        // A broken document may be a test that would silently not run: say so. Valid YAML
        // that is not a mapping is the policy loader's to report.
        let Ok(header) = serde_yaml_ng::from_str::<Header>(text) else {
            errors.extend(doc.syntax_error());
            continue;
        };
        let test = is_policy_test(header.api_version.as_deref(), header.kind.as_deref())
            || header.kind.as_deref() == Some(POLICY_TEST_KIND);
        if !test {
            continue;
        }
        match suite::build(&doc) {
            Ok(suite) => found.push(suite),
            Err(mut e) => errors.append(&mut e),
        }
    }
}
