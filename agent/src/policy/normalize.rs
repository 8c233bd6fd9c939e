//! Request path normalisation as Istio configures Envoy (MeshConfig `pathNormalization`): one
//! pure function, [`normalize_path`], for every caller — per-request enforcement, which also
//! forwards its result to the application so that policy and application judge the same path,
//! `latch policy explain`, `GET /v1/explain`, and fuzzing.
//!
//! The modes, by Istio's names:
//! - `NONE`: the path as received; only `%00` is refused (Istio refuses it in every mode).
//! - `BASE`, the default (Envoy's `normalize_path`): percent-encoded unreserved characters
//!   (RFC 3986 §2.3: letters, digits, `-`, `.`, `_`, `~`) are decoded, once (`%2561` stays);
//!   a backslash becomes `/`; dot segments are removed (RFC 3986 §5.2.4; `%2e` is a dot, and `..`
//!   never climbs above the root); bytes that may not stand in a path (controls, space, `"`, `#`,
//!   `<`, `>`, `?`, `^`, `` ` ``, `{`, `|`, `}`, DEL, non-ASCII) are percent-encoded with upper-case
//!   hex; every other escape is kept exactly as sent, case included (`%2F`, `%2f`, `%5C`); `//` stays.
//! - `MERGE_SLASHES`: `BASE`, then every run of `/` becomes one (Envoy's `merge_slashes`).
//! - `DECODE_AND_MERGE_SLASHES`: first `%2F` and `%5C` (either case) are decoded to `/` (Envoy's
//!   `path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD`, a decoded backslash then being a
//!   slash as above), then `MERGE_SLASHES`.
//!
//! Except in `NONE`, a `%` that is not followed by two hex digits is refused: Envoy passes such
//! a path through, but no application can then be trusted to read it as policy did. The query
//! string is not part of the path: callers split it off first and pass it on untouched.

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
mod tests {
    use proptest::prelude::*;

    use super::{PathError, PathNormalization::*, normalize_path};

    fn ok(path: &str, mode: super::PathNormalization) -> String {
        normalize_path(path, mode).unwrap_or_else(|e| panic!("{path:?} in {mode}: {e}"))
    }

    /// (input, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
    const TABLE: &[(&str, &str, &str, &str, &str)] = &[
        // The attacks of issue 18 on `DENY paths: ["/admin", "/admin/*"]`.
        ("/x/../admin", "/x/../admin", "/admin", "/admin", "/admin"),
        ("/./admin", "/./admin", "/admin", "/admin", "/admin"),
        ("/%61dmin", "/%61dmin", "/admin", "/admin", "/admin"),
        (
            "/admin/../admin",
            "/admin/../admin",
            "/admin",
            "/admin",
            "/admin",
        ),
        ("/a/./b/../c", "/a/./b/../c", "/a/c", "/a/c", "/a/c"),
        // Encoded dots are dots.
        (
            "/a/%2e%2E/admin",
            "/a/%2e%2E/admin",
            "/admin",
            "/admin",
            "/admin",
        ),
        ("/%2e/admin", "/%2e/admin", "/admin", "/admin", "/admin"),
        ("/a/.%2e", "/a/.%2e", "/", "/", "/"),
        // Dot segments, RFC 3986 §5.2.4 and its examples.
        (
            "/a/b/c/./../../g",
            "/a/b/c/./../../g",
            "/a/g",
            "/a/g",
            "/a/g",
        ),
        (
            "/mid/content=5/../6",
            "/mid/content=5/../6",
            "/mid/6",
            "/mid/6",
            "/mid/6",
        ),
        ("/a/b/.", "/a/b/.", "/a/b/", "/a/b/", "/a/b/"),
        ("/a/b/..", "/a/b/..", "/a/", "/a/", "/a/"),
        ("/a/b/../", "/a/b/../", "/a/", "/a/", "/a/"),
        ("/..", "/..", "/", "/", "/"),
        ("/../../admin", "/../../admin", "/admin", "/admin", "/admin"),
        ("/.", "/.", "/", "/", "/"),
        ("/...", "/...", "/...", "/...", "/..."),
        (
            "/a..b/.c/c./",
            "/a..b/.c/c./",
            "/a..b/.c/c./",
            "/a..b/.c/c./",
            "/a..b/.c/c./",
        ),
        // Empty segments: kept by BASE, and a `..` takes one like any other segment.
        ("//admin", "//admin", "//admin", "/admin", "/admin"),
        ("/a//../b", "/a//../b", "/a/b", "/a/b", "/a/b"),
        ("/a//b///c", "/a//b///c", "/a//b///c", "/a/b/c", "/a/b/c"),
        // Escaped slashes and backslashes: kept exactly (case too) unless decoding them.
        ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
        ("/a%2fb", "/a%2fb", "/a%2fb", "/a%2fb", "/a/b"),
        ("/a%5Cb", "/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"),
        ("/a%5cb", "/a%5cb", "/a%5cb", "/a%5cb", "/a/b"),
        (
            "/x/..%2Fadmin",
            "/x/..%2Fadmin",
            "/x/..%2Fadmin",
            "/x/..%2Fadmin",
            "/admin",
        ),
        // Decoded first, then resolved, then merged (Envoy's order): the `..` takes the empty
        // segment.
        (
            "/x%2F%2F..%2Fadmin",
            "/x%2F%2F..%2Fadmin",
            "/x%2F%2F..%2Fadmin",
            "/x%2F%2F..%2Fadmin",
            "/x/admin",
        ),
        // A raw backslash is a slash (Envoy's `normalize_path`).
        (
            "/a\\..\\admin",
            "/a\\..\\admin",
            "/admin",
            "/admin",
            "/admin",
        ),
        ("\\admin", "\\admin", "/admin", "/admin", "/admin"),
        // Other escapes keep their case; decoding happens once.
        (
            "/%7euser/%41%5a",
            "/%7euser/%41%5a",
            "/~user/AZ",
            "/~user/AZ",
            "/~user/AZ",
        ),
        (
            "/a%3fb%3Dc%25",
            "/a%3fb%3Dc%25",
            "/a%3fb%3Dc%25",
            "/a%3fb%3Dc%25",
            "/a%3fb%3Dc%25",
        ),
        (
            "/%2561dmin",
            "/%2561dmin",
            "/%2561dmin",
            "/%2561dmin",
            "/%2561dmin",
        ),
        (
            "/%252e%252e/admin",
            "/%252e%252e/admin",
            "/%252e%252e/admin",
            "/%252e%252e/admin",
            "/%252e%252e/admin",
        ),
        ("/%252F", "/%252F", "/%252F", "/%252F", "/%252F"),
        // Bytes that may not stand raw are encoded; non-ASCII as its UTF-8 bytes.
        (
            "/caf\u{e9}",
            "/caf\u{e9}",
            "/caf%C3%A9",
            "/caf%C3%A9",
            "/caf%C3%A9",
        ),
        ("/%C3%A9", "/%C3%A9", "/%C3%A9", "/%C3%A9", "/%C3%A9"),
        (
            "/{\"a\"}|^",
            "/{\"a\"}|^",
            "/%7B%22a%22%7D%7C%5E",
            "/%7B%22a%22%7D%7C%5E",
            "/%7B%22a%22%7D%7C%5E",
        ),
        ("/a b", "/a b", "/a%20b", "/a%20b", "/a%20b"),
        // Characters a path may hold are left alone.
        (
            "/a;b=c/@:!$&'()*+,",
            "/a;b=c/@:!$&'()*+,",
            "/a;b=c/@:!$&'()*+,",
            "/a;b=c/@:!$&'()*+,",
            "/a;b=c/@:!$&'()*+,",
        ),
        // The empty path is `/`; a relative one is made absolute.
        ("", "", "/", "/", "/"),
        ("admin", "admin", "/admin", "/admin", "/admin"),
        ("../admin", "../admin", "/admin", "/admin", "/admin"),
        ("/", "/", "/", "/", "/"),
    ];

    #[test]
    fn every_mode_on_the_table() {
        for &(input, none, base, merge, decode) in TABLE {
            assert_eq!(ok(input, None), none, "NONE {input:?}");
            assert_eq!(ok(input, Base), base, "BASE {input:?}");
            assert_eq!(ok(input, MergeSlashes), merge, "MERGE_SLASHES {input:?}");
            assert_eq!(
                ok(input, DecodeAndMergeSlashes),
                decode,
                "DECODE_AND_MERGE_SLASHES {input:?}"
            );
        }
    }

    #[test]
    fn invalid_escapes_are_refused_except_in_none() {
        for (input, offset, found) in [
            ("/%zz", 1, "%zz"),
            ("/admin%", 6, "%"),
            ("/admin%4", 6, "%4"),
            ("/%4g/x", 1, "%4g"),
            ("/%%61", 1, "%%6"),
            ("/%\u{e9}", 1, "%\u{e9}"),
        ] {
            for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                assert_eq!(
                    normalize_path(input, mode),
                    Err(PathError::InvalidEscape {
                        offset,
                        found: found.to_owned()
                    }),
                    "{input:?} in {mode}"
                );
            }
            assert_eq!(ok(input, None), input, "NONE passes {input:?}");
        }
    }

    #[test]
    fn nul_is_refused_in_every_mode() {
        for mode in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(
                normalize_path("/a%00b", mode),
                Err(PathError::EncodedNul {
                    offset: 2,
                    found: "%00".to_owned()
                }),
                "{mode}"
            );
            assert_eq!(
                normalize_path("/a\0", mode),
                Err(PathError::Nul { offset: 2 }),
                "{mode}"
            );
        }
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = normalize_path("/%zz", Base).expect_err("invalid");
        assert_eq!(
            e.to_string(),
            "invalid percent escape \"%zz\" at byte 1 of the path: `%` must be followed by two hex digits"
        );
    }

    #[test]
    fn modes_read_as_istio_names_them() {
        for (name, mode) in [
            ("NONE", None),
            ("BASE", Base),
            ("DEFAULT", Base),
            ("MERGE_SLASHES", MergeSlashes),
            ("DECODE_AND_MERGE_SLASHES", DecodeAndMergeSlashes),
        ] {
            let parsed: super::PathNormalization = serde_yaml_ng::from_str(name).expect("a mode");
            assert_eq!(parsed, mode, "{name}");
        }
        assert_eq!(Base.to_string(), "BASE");
        assert!(serde_yaml_ng::from_str::<super::PathNormalization>("base").is_err());
    }

    /// Paths made of the pieces normalisation cares about.
    fn path_pieces() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just("\\".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2F".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("%25".to_owned()),
            Just("%61".to_owned()),
            Just("%".to_owned()),
            Just("a".to_owned()),
            Just("\u{e9}".to_owned()),
            any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..16).prop_map(|pieces| pieces.concat())
    }

    fn segments_ok(path: &str) -> bool {
        path.split('/').skip(1).all(|s| s != "." && s != "..")
    }

    proptest! {
        /// Whatever comes in, what comes out is settled: normalising it again changes nothing,
        /// it starts with `/`, holds no dot segment, and (merging) no `//`.
        #[test]
        fn normalised_paths_are_fixed_points(path in path_pieces()) {
            for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                if let Ok(once) = normalize_path(&path, mode) {
                    prop_assert_eq!(normalize_path(&once, mode), Ok(once.clone()), "{}", mode);
                    prop_assert!(once.starts_with('/'));
                    prop_assert!(segments_ok(&once), "{:?} in {}: {:?}", path, mode, once);
                    prop_assert!(once.is_ascii());
                    if mode != Base {
                        prop_assert!(!once.contains("//"));
                    }
                }
            }
        }
    }
}
