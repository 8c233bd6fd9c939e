//! `cargo xtask fuzz`: runs the fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer, nightly), each
//! for a while, on its committed corpus, and says where crashes are. See docs/fuzzing.md.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{self, cargo, root, step},
    setup,
};

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// The targets: the files of `fuzz/fuzz_targets`, by name.
fn targets() -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// `cargo fuzz` run from `fuzz/` on the nightly, without sanitizers: the code fuzzed is safe
/// Rust, and uninstrumented runs are several times faster (debug assertions, overflow checks
/// included, stay on).
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut c = cargo();
    c.args(["+nightly", "fuzz"])
        .args(args)
        .current_dir(fuzz_dir());
    c
}

pub fn run(seconds: u64, cmin: bool, only: Option<&str>) -> anyhow::Result<()> {
    setup::toolchain()?;
    setup::cargo_fuzz()?;
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_owned()],
        Some(name) => bail!(
            "no fuzz target {name:?}; the targets are {}",
            all.join(", ")
        ),
        None => all,
    };
    step("fuzz: build the targets (release, debug assertions, libFuzzer)");
    cmd::run(&mut cargo_fuzz(&["build", "--sanitizer", "none"]))?;
    let mut crashed = Vec::new();
    for target in &chosen {
        step(&format!("fuzz: {target} for {seconds} s"));
        // New inputs go to the first directory; the seeds are read, never minimised away.
        let corpus = format!("corpus/{target}");
        let seeds = format!("seeds/{target}");
        std::fs::create_dir_all(fuzz_dir().join(&corpus))
            .with_context(|| format!("creating fuzz/{corpus}"))?;
        let run = cmd::run(&mut cargo_fuzz(&[
            "run",
            "--sanitizer",
            "none",
            target,
            &corpus,
            &seeds,
            "--",
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-max_len=65536",
        ]));
        if run.is_err() {
            crashed.push(target.clone());
            continue;
        }
        if cmin {
            step(&format!("fuzz: minimise the corpus of {target}"));
            // Inputs that reach new edges, not new hit counts: a corpus a fifth the size.
            cmd::run(&mut cargo_fuzz(&[
                "cmin",
                "--sanitizer",
                "none",
                target,
                &corpus,
                "--",
                "-use_counters=0",
            ]))?;
        }
    }
    let corpus = fuzz_dir().join("corpus");
    println!(
        "\nxtask fuzz: inputs that found new code were added to {}/TARGET/",
        corpus.display()
    );
    if !crashed.is_empty() {
        bail!(
            "crashes or failed properties in: {}. The inputs are in {}/TARGET/ (crash-*, \
             timeout-*, oom-*); replay one with `cd fuzz && cargo +nightly fuzz run --sanitizer none \
             TARGET artifacts/TARGET/FILE`. Fix it, add a named test in the module that was wrong, \
             and keep the input in fuzz/regressions/TARGET/ (docs/fuzzing.md)",
            crashed.join(", "),
            fuzz_dir().join("artifacts").display()
        );
    }
    println!("xtask fuzz: no crash in {}", chosen.join(", "));
    Ok(())
}
