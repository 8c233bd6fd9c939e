//! Reads policy files into a [`PolicySet`]: expands directories, splits multi-document files
//! on `---` lines (as kubectl does), parses each document by its `kind`, compiles it, and
//! rejects duplicates. All errors of all files are collected; any error means no set.
//!
//! Each document is parsed on its own, so positions from the parser and from
//! [`crate::config::locate`] are offset by the document's first line in the file.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

use super::{
    Compiled, FileSummary, PolicyError, PolicyObject, PolicySet,
    compile::{self, AuthzPolicy, Meta, PeerAuthPolicy, Problem},
    decision::PolicyKind,
    model,
    request_authn::{self, RequestAuthnPolicy},
};
use crate::config::locate::{deserialize, locate, locate_nearest, syntax_error};

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The API group of `latch policy test` documents (`crate::policy_test`).
pub(crate) const POLICY_TEST_GROUP: &str = "test.latch.dev";
/// Their kind.
pub(crate) const POLICY_TEST_KIND: &str = "PolicyTest";

/// Whether a document is a policy test (`test.latch.dev/*`, kind `PolicyTest`): tests may sit
/// beside the policies they test, so the loader skips them.
pub(crate) fn is_policy_test(api_version: Option<&str>, kind: Option<&str>) -> bool {
    let group = api_version
        .and_then(|v| v.split_once('/'))
        .map(|(group, _)| group);
    group == Some(POLICY_TEST_GROUP) && kind == Some(POLICY_TEST_KIND)
}

pub(super) fn load(paths: &[PathBuf], root_namespace: &str) -> Result<PolicySet, Vec<PolicyError>> {
    let mut loader = Loader::default();
    for path in paths {
        match expand(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => loader.file(&file, &text),
                        Err(source) => loader.errors.push(PolicyError::Read { file, source }),
                    }
                }
            }
            Err(source) => loader.errors.push(PolicyError::Read {
                file: path.clone(),
                source,
            }),
        }
    }
    loader.finish(root_namespace)
}

pub(super) fn from_texts(
    sources: &[(&Path, &str)],
    root_namespace: &str,
) -> Result<PolicySet, Vec<PolicyError>> {
    let mut loader = Loader::default();
    for (file, text) in sources {
        loader.file(file, text);
    }
    loader.finish(root_namespace)
}

/// One policy object on its own (a Kubernetes object, written out as YAML), named by `origin`
/// in its errors.
pub(super) fn object(origin: &Path, text: &str) -> Result<PolicyObject, Vec<PolicyError>> {
    let mut loader = Loader::default();
    let mut summary = FileSummary {
        file: origin.to_owned(),
        authorization_policies: 0,
        peer_authentications: 0,
        warnings: Vec::new(),
        request_authentications: 0,
        policy_tests: 0,
    };
    let doc = Doc {
        file: origin,
        text,
        offset: 0,
    };
    loader.document(&doc, &mut summary)?;
    match (
        loader.authz.pop(),
        loader.peer.pop(),
        loader.request_authn.pop(),
    ) {
        (Some(policy), _, _) => Ok(PolicyObject(Compiled::Authorization(policy))),
        (_, Some(policy), _) => Ok(PolicyObject(Compiled::PeerAuthentication(policy))),
        (_, _, Some(policy)) => Ok(PolicyObject(Compiled::RequestAuthentication(policy))),
        (None, None, None) => Err(vec![doc.error("", "not a policy".to_owned())]),
    }
}

/// A file as itself; a directory as its `*.yaml` and `*.yml` files, by name.
pub(crate) fn expand(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let file = entry?.path();
        let yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// The documents of a multi-document file, each with the number of lines before it.
pub(crate) fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut pos) = (0, 0, 0);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            docs.push((start_line, &text[start..pos]));
            start = pos + line.len();
            start_line = i + 1;
        }
        pos += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// `---`, optionally followed by blanks and a comment.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let trimmed = rest.trim();
        (rest.is_empty() || rest.starts_with(char::is_whitespace))
            && (trimmed.is_empty() || trimmed.starts_with('#'))
    })
}

pub(crate) fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// One document and where it is.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
    /// Lines before the document in the file.
    offset: usize,
}

impl Doc<'_> {
    /// An error at `path`, or at the nearest enclosing field that can be found.
    fn error(&self, path: &str, message: String) -> PolicyError {
        self.error_at(path, message, locate_nearest(self.text, path))
    }

    fn error_at(&self, path: &str, message: String, at: Option<(usize, usize)>) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_owned(),
            line: at.map(|(l, _)| l + self.offset),
            column: at.map(|(_, c)| c),
            path: path.to_owned(),
            message,
        }
    }

    fn problems(&self, problems: Vec<Problem>) -> Vec<PolicyError> {
        problems
            .into_iter()
            .map(|p| self.error(&p.path, p.message))
            .collect()
    }

    /// A YAML syntax error, at the parser's position.
    fn syntax_error(&self) -> Option<PolicyError> {
        syntax_error(self.text).map(|(message, at)| self.error_at("", message, Some(at)))
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, PolicyError> {
        deserialize(self.text).map_err(|e| {
            let message = if e.message.contains("expected struct Header") {
                "expected a Kubernetes object (a mapping with apiVersion, kind, metadata and spec)"
                    .to_owned()
            } else {
                e.message
            };
            self.error_at(&e.path, message, e.at)
        })
    }

    /// The checked metadata, `namespace` defaulting to `default`.
    fn meta(&self, meta: &model::ObjectMeta) -> Result<Meta, PolicyError> {
        if meta.name.is_empty() {
            return Err(self.error("metadata.name", "must not be empty".to_owned()));
        }
        let namespace = meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        if namespace.is_empty() {
            return Err(self.error("metadata.namespace", "must not be empty".to_owned()));
        }
        let created = match &meta.creation_timestamp {
            None => None,
            Some(text) => Some(
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                    self.error(
                        "metadata.creationTimestamp",
                        format!("{text:?} is not an RFC 3339 time: {e}"),
                    )
                })?,
            ),
        };
        Ok(Meta {
            namespace,
            name: meta.name.clone(),
            file: self.file.to_owned(),
            line: locate(self.text, "metadata.name")
                .map_or(self.offset + 1, |(l, _)| l + self.offset),
            created,
        })
    }
}

#[derive(Default)]
struct Loader {
    errors: Vec<PolicyError>,
    authz: Vec<AuthzPolicy>,
    peer: Vec<PeerAuthPolicy>,
    request_authn: Vec<RequestAuthnPolicy>,
    files: Vec<FileSummary>,
    /// Where each (kind, namespace, name) was first defined.
    seen: HashMap<(PolicyKind, String, String), (PathBuf, usize)>,
    /// As `seen`, for RequestAuthentications.
    seen_request_authn: HashMap<(String, String), (PathBuf, usize)>,
}

impl Loader {
    fn file(&mut self, file: &Path, text: &str) {
        let mut summary = FileSummary {
            file: file.to_owned(),
            authorization_policies: 0,
            peer_authentications: 0,
            warnings: Vec::new(),
            request_authentications: 0,
            policy_tests: 0,
        };
        for (offset, text) in split_documents(text) {
            if is_blank(text) {
                continue;
            }
            let doc = Doc { file, text, offset };
            if let Err(errors) = self.document(&doc, &mut summary) {
                self.errors.extend(errors);
            }
        }
        self.files.push(summary);
    }

    fn document(&mut self, doc: &Doc, summary: &mut FileSummary) -> Result<(), Vec<PolicyError>> {
        if let Some(error) = doc.syntax_error() {
            return Err(vec![error]);
        }
        let header: model::Header = doc.parse().map_err(|e| vec![e])?;
        if is_policy_test(header.api_version.as_deref(), header.kind.as_deref()) {
            summary.policy_tests += 1;
            return Ok(());
        }
        let Some(api_version) = header.api_version else {
            return Err(vec![doc.error("", "missing apiVersion".to_owned())]);
        };
        if !API_VERSIONS.contains(&api_version.as_str()) {
            return Err(vec![doc.error(
                "apiVersion",
                format!(
                    "unsupported apiVersion {api_version:?} (expected {})",
                    API_VERSIONS.join(" or ")
                ),
            )]);
        }
        match header.kind.as_deref() {
            Some("AuthorizationPolicy") => {
                let raw: model::AuthorizationPolicyDoc = doc.parse().map_err(|e| vec![e])?;
                let meta = doc.meta(&raw.metadata).map_err(|e| vec![e])?;
                let policy = compile::authorization_policy(
                    meta,
                    raw.metadata.annotations.as_ref(),
                    &raw.spec,
                )
                .map_err(|p| doc.problems(p))?;
                self.unique(doc, PolicyKind::AuthorizationPolicy, &policy.meta)?;
                if let Some(why) = &policy.not_enforced {
                    summary.warnings.push(format!(
                        "{}:{}: AuthorizationPolicy {}/{}: {why}",
                        policy.meta.file.display(),
                        policy.meta.line,
                        policy.meta.namespace,
                        policy.meta.name
                    ));
                }
                self.authz.push(policy);
                summary.authorization_policies += 1;
            }
            Some("PeerAuthentication") => {
                let raw: model::PeerAuthenticationDoc = doc.parse().map_err(|e| vec![e])?;
                let meta = doc.meta(&raw.metadata).map_err(|e| vec![e])?;
                let policy =
                    compile::peer_authentication(meta, &raw.spec).map_err(|p| doc.problems(p))?;
                self.unique(doc, PolicyKind::PeerAuthentication, &policy.meta)?;
                self.peer.push(policy);
                summary.peer_authentications += 1;
            }
            Some("RequestAuthentication") => {
                let raw: model::RequestAuthenticationDoc = doc.parse().map_err(|e| vec![e])?;
                let meta = doc.meta(&raw.metadata).map_err(|e| vec![e])?;
                let mut policy =
                    request_authn::compile(meta, &raw.spec).map_err(|p| doc.problems(p))?;
                self.unique_request_authn(doc, &policy.meta)?;
                policy.located_warnings = policy
                    .warnings
                    .iter()
                    .map(|w| {
                        let line = match doc.error(&w.path, String::new()) {
                            PolicyError::Invalid { line: Some(l), .. } => l,
                            _ => policy.meta.line,
                        };
                        format!(
                            "{}:{line}: RequestAuthentication {}/{}: {}: {}",
                            policy.meta.file.display(),
                            policy.meta.namespace,
                            policy.meta.name,
                            w.path,
                            w.message
                        )
                    })
                    .collect();
                summary
                    .warnings
                    .extend(policy.located_warnings.iter().cloned());
                self.request_authn.push(policy);
                summary.request_authentications += 1;
            }
            Some(other) => {
                return Err(vec![doc.error(
                    "kind",
                    format!(
                        "unsupported kind {other:?}: Latch reads AuthorizationPolicy, \
                         PeerAuthentication and RequestAuthentication"
                    ),
                )]);
            }
            None => return Err(vec![doc.error("", "missing kind".to_owned())]),
        }
        Ok(())
    }

    fn unique(&mut self, doc: &Doc, kind: PolicyKind, meta: &Meta) -> Result<(), Vec<PolicyError>> {
        let key = (kind, meta.namespace.clone(), meta.name.clone());
        if let Some((file, line)) = self.seen.get(&key) {
            return Err(vec![doc.error(
                "metadata.name",
                format!(
                    "{kind:?} {}/{} is already defined at {}:{line}",
                    meta.namespace,
                    meta.name,
                    file.display()
                ),
            )]);
        }
        self.seen.insert(key, (meta.file.clone(), meta.line));
        Ok(())
    }

    fn unique_request_authn(&mut self, doc: &Doc, meta: &Meta) -> Result<(), Vec<PolicyError>> {
        let key = (meta.namespace.clone(), meta.name.clone());
        if let Some((file, line)) = self.seen_request_authn.get(&key) {
            return Err(vec![doc.error(
                "metadata.name",
                format!(
                    "RequestAuthentication {}/{} is already defined at {}:{line}",
                    meta.namespace,
                    meta.name,
                    file.display()
                ),
            )]);
        }
        self.seen_request_authn
            .insert(key, (meta.file.clone(), meta.line));
        Ok(())
    }

    fn finish(self, root_namespace: &str) -> Result<PolicySet, Vec<PolicyError>> {
        if !self.errors.is_empty() {
            return Err(self.errors);
        }
        Ok(
            PolicySet::build(root_namespace, self.authz, self.peer, self.files)
                .with_request_authn(self.request_authn),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_line_offsets() {
        let text = "a: 1\n---\nb: 2\n--- # c\n\nc: 3\n----\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            vec![(0, "a: 1\n"), (2, "b: 2\n"), (4, "\nc: 3\n----\n")]
        );
    }

    #[test]
    fn policy_test_documents_beside_policies_are_skipped() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                    metadata: { name: a, namespace: prod }\nspec: {}\n---\n\
                    apiVersion: test.latch.dev/v1\nkind: PolicyTest\nmetadata: { name: t }\n\
                    spec: { cases: [] }\n";
        let set = from_texts(&[(Path::new("p.yaml"), text)], "istio-system").expect("loads");
        assert_eq!(set.len(), 1);
        assert_eq!(set.files()[0].authorization_policies, 1);

        // Only that kind of that group: anything else of the group is still refused.
        let other = "apiVersion: test.latch.dev/v1\nkind: Something\nmetadata: { name: t }\n";
        let errors =
            from_texts(&[(Path::new("o.yaml"), other)], "istio-system").expect_err("refused");
        assert!(
            errors[0].to_string().contains("unsupported apiVersion"),
            "{}",
            errors[0]
        );
    }
}
