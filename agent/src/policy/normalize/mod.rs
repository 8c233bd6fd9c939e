//! Request path normalisation as Istio configures Envoy (MeshConfig `pathNormalization`): one pure
//! function, [`normalize_path`], for every caller (per-request enforcement, which forwards its
//! result so that policy and application judge the same path; `explain`; fuzzing). The modes, and
//! where they differ from Envoy: `docs/policy.md` (Decisions). The query string is not part of the
//! path: callers split it off first and pass it on untouched.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Istio's MeshConfig `pathNormalization` options (`DEFAULT` is accepted for `BASE`, as in
/// Istio).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    #[default]
    #[serde(alias = "DEFAULT")]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

impl std::fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a path is refused (the request gets `400 Bad Request`). Offsets are byte offsets into
/// the path as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "invalid percent escape {found:?} at byte {offset} of the path: `%` must be followed by two hex digits"
    )]
    InvalidEscape { offset: usize, found: String },
    #[error("{found:?} at byte {offset} of the path encodes a NUL character")]
    EncodedNul { offset: usize, found: String },
    #[error("NUL character at byte {offset} of the path")]
    Nul { offset: usize },
}

/// `path` (a request target's path, without its query string) as `mode` normalises it. Except
/// in `NONE` the result starts with `/` (an empty path is `/`), and normalising it again gives
/// it back unchanged.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    if mode == PathNormalization::None {
        refuse_nul(path)?;
        return Ok(path.to_owned());
    }
    let decoded = decode(path, mode == PathNormalization::DecodeAndMergeSlashes)?;
    let resolved = remove_dot_segments(&decoded);
    Ok(match mode {
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes => {
            merge_slashes(&resolved)
        }
        PathNormalization::None | PathNormalization::Base => resolved,
    })
}

/// `NONE` passes everything but NUL, raw or encoded.
fn refuse_nul(path: &str) -> Result<(), PathError> {
    if let Some(offset) = path.bytes().position(|b| b == 0) {
        return Err(PathError::Nul { offset });
    }
    if let Some(offset) = path.find("%00") {
        return Err(PathError::EncodedNul {
            offset,
            found: "%00".to_owned(),
        });
    }
    Ok(())
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes that are percent-encoded wherever they appear raw (Envoy's path canonicalisation).
fn must_escape(b: u8) -> bool {
    !(0x20..0x7f).contains(&b)
        || matches!(
            b,
            b' ' | b'"' | b'#' | b'<' | b'>' | b'?' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// One pass over the path: escapes decoded or kept, backslashes turned into slashes, bytes that
/// may not stand raw encoded. The result starts with `/`.
fn decode(path: &str, slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len() + 1);
    if !matches!(bytes.first(), Some(b'/' | b'\\')) {
        out.push('/');
    }
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let found =
                    || String::from_utf8_lossy(&bytes[i..(i + 3).min(bytes.len())]).into_owned();
                let value = match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(high), Some(low)) => high << 4 | low,
                    _ => {
                        return Err(PathError::InvalidEscape {
                            offset: i,
                            found: found(),
                        });
                    }
                };
                match value {
                    0 => {
                        return Err(PathError::EncodedNul {
                            offset: i,
                            found: found(),
                        });
                    }
                    v if is_unreserved(v) => out.push(char::from(v)),
                    b'/' | b'\\' if slashes => out.push('/'),
                    // Kept as sent: `%` and two ASCII hex digits.
                    _ => out.push_str(&found()),
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            0 => return Err(PathError::Nul { offset: i }),
            b if must_escape(b) => {
                let _ = write!(out, "%{b:02X}");
                i += 1;
            }
            b => {
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on a path that starts with `/`: `.` segments go, `..` takes the segment
/// before it (none above the root), and a path that ended in one ends in `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path.get(1..).unwrap_or_default().split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            other => {
                kept.push(other);
                continue;
            }
        }
        if last {
            kept.push("");
        }
    }
    format!("/{}", kept.join("/"))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
