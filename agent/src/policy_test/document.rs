//! One YAML document of a test file and where it is: parsing it, and errors that point at a
//! field's line and column in the whole file.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::error::TestFileError;
use crate::config::locate::{deserialize, locate, locate_nearest, syntax_error};

/// A document of a (possibly multi-document) file.
#[derive(Debug, Clone, Copy)]
pub struct Doc<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    /// Lines before the document in the file.
    pub offset: usize,
}

impl Doc<'_> {
    /// The 1-based line of the field at `path` in the file, if it is found.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        locate(self.text, path).map(|(line, _)| line + self.offset)
    }

    /// An error at `path`, or at the nearest enclosing field that can be found.
    pub fn error(&self, path: &str, message: impl Into<String>) -> TestFileError {
        self.error_at(path, message.into(), locate_nearest(self.text, path))
    }

    fn error_at(&self, path: &str, message: String, at: Option<(usize, usize)>) -> TestFileError {
        TestFileError::Invalid {
            file: self.file.to_owned(),
            // A document-wide error points at the document's first line.
            line: Some(at.map_or(self.offset + 1, |(l, _)| l + self.offset)),
            column: at.map(|(_, c)| c),
            path: path.to_owned(),
            message,
        }
    }

    /// A YAML syntax error, at the parser's position.
    pub fn syntax_error(&self) -> Option<TestFileError> {
        syntax_error(self.text).map(|(message, at)| self.error_at("", message, Some(at)))
    }

    /// The document as `T`; a type or field error names the field and its position.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, TestFileError> {
        deserialize(self.text).map_err(|e| self.error_at(&e.path, e.message, e.at))
    }
}
