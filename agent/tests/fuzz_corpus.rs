//! The fuzz corpus as regression tests, on stable and without a fuzzer: every file of
//! `fuzz/seeds/TARGET/` (hand-written), `fuzz/corpus/TARGET/` (what fuzzing found worth keeping,
//! minimised) and `fuzz/regressions/TARGET/` (inputs that once crashed a target) goes through the
//! same `latch::fuzzing` function the fuzz target calls. A panic or a failed property fails the test,
//! naming the file. See docs/fuzzing.md.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use latch::fuzzing::{TARGETS, Target, target};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir/TARGET/` for each target directory in `dir`, sorted.
fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(targets) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in targets.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(entry.path()) else {
            continue;
        };
        for file in files.flatten() {
            if file.path().is_file() {
                found.push((name.clone(), file.path()));
            }
        }
    }
    found.sort();
    found
}

/// Replays `inputs` through the functions `lookup` names, returning one line per failure.
fn replay(inputs: &[(String, PathBuf)], lookup: fn(&str) -> Option<Target>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, file) in inputs {
        let Some(run) = lookup(name) else {
            failures.push(format!(
                "{}: no fuzz target {name:?} in latch::fuzzing::TARGETS",
                file.display()
            ));
            continue;
        };
        let data = match std::fs::read(file) {
            Ok(data) => data,
            Err(e) => {
                failures.push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            failures.push(format!("{}: {why}", file.display()));
        }
    }
    failures
}

/// Replay every input under `fuzz/<folder>/`, which must hold inputs for every target
/// (`missing` says how to add them), and assert that all pass.
fn replay_folder(folder: &str, what: &str, missing: &str) {
    let inputs = inputs(&fuzz_dir().join(folder));
    for (name, _) in TARGETS {
        assert!(
            inputs.iter().any(|(n, _)| n == name),
            "fuzz/{folder}/{name}/ has no input: {}",
            missing.replace("{name}", name)
        );
    }
    let failures = replay(&inputs, target);
    assert!(
        failures.is_empty(),
        "{} of {} {what} fail:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn every_seed_passes_its_target() {
    replay_folder("seeds", "seeds", "every target keeps hand-written seeds");
}

#[test]
fn every_corpus_file_passes_its_target() {
    replay_folder(
        "corpus",
        "corpus files",
        "run `cargo xtask fuzz --cmin {name}` and commit it",
    );
}

#[test]
fn every_regression_passes_its_target() {
    let inputs = inputs(&fuzz_dir().join("regressions"));
    let failures = replay(&inputs, target);
    assert!(
        failures.is_empty(),
        "{} of {} regression inputs fail:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    for (name, _) in TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
}

#[test]
fn a_failing_input_is_reported_with_its_file() {
    // The replay can fail: a target that panics, and a directory no target owns, are each
    // reported with the file.
    let dir = std::env::temp_dir().join(format!("latch-fuzz-replay-{}", std::process::id()));
    for name in ["panics", "unknown"] {
        let file = dir.join(name).join("input");
        std::fs::create_dir_all(dir.join(name)).expect("temp dir");
        std::fs::write(&file, b"x").expect("write");
    }
    fn lookup(name: &str) -> Option<Target> {
        (name == "panics").then_some((|_| panic!("a property failed")) as Target)
    }
    let failures = replay(&inputs(&dir), lookup);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(
        failures[0].contains("panics/input: a property failed"),
        "{failures:?}"
    );
    assert!(
        failures[1].contains("unknown/input: no fuzz target"),
        "{failures:?}"
    );
}
