//! One YAML document of a test file and where it is: parsing it, and errors that point at a
//! field's line and column in the whole file.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::error::TestFileError;
use crate::config::{clean_yaml_message, locate::locate};

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
        let mut at = path;
        let location = loop {
            if let Some(found) = locate(self.text, at) {
                break Some(found);
            }
            match at.rfind(['.', '[']) {
                Some(cut) => at = &at[..cut],
                None => break None,
            }
        };
        self.error_at(path, message.into(), location)
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
        let mut parser = yaml_rust2::parser::Parser::new_from_str(self.text);
        loop {
            match parser.next_token() {
                Ok((yaml_rust2::parser::Event::StreamEnd, _)) => return None,
                Ok(_) => {}
                Err(e) => {
                    let at = (e.marker().line(), e.marker().col() + 1);
                    return Some(self.error_at("", format!("YAML syntax: {}", e.info()), Some(at)));
                }
            }
        }
    }

    /// The document as `T`; a type or field error names the field and its position.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, TestFileError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(self.text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p,
            };
            let inner = e.into_inner();
            let at = locate(self.text, &path)
                .or_else(|| inner.location().map(|l| (l.line(), l.column())));
            self.error_at(&path, clean_yaml_message(&inner.to_string(), &path), at)
        })
    }
}
