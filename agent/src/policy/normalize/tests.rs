//! The path normalization table (every mode against the same inputs) and its properties.

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
