//! The commands proper: build, test, demo, bench.

use std::{path::Path, process::Command, time::SystemTime};

use anyhow::bail;

use crate::{
    cmd::{self, bench_dir, cargo, root, step},
    plots, setup,
};

fn build_binaries(release: bool) -> anyhow::Result<()> {
    step(&format!(
        "build: agent (with its eBPF object) and test binaries{}",
        if release { ", release" } else { "" }
    ));
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    cmd::run(cargo().args(["build", "-p", "latch"]).args(profile))?;
    cmd::run(
        cargo()
            .args(["build", "-p", "latch-tests", "--bins"])
            .args(profile),
    )
}

pub fn build(release: bool) -> anyhow::Result<()> {
    setup::toolchain()?;
    build_binaries(release)
}

/// `cargo xtask image`: the release agent (as `cargo xtask build --release` builds it), then
/// the image; with `--check`, the debug agent and the image check of `cargo xtask test`.
pub fn image(check: bool) -> anyhow::Result<()> {
    setup::toolchain()?;
    let profile: &[&str] = if check { &[] } else { &["--release"] };
    step(&format!(
        "build: agent (with its eBPF object){}",
        if check { "" } else { ", release" }
    ));
    cmd::run(cargo().args(["build", "-p", "latch"]).args(profile))?;
    if check {
        crate::image::test()
    } else {
        crate::image::release()
    }
}

fn bin(profile: &str, name: &str) -> std::path::PathBuf {
    root().join("target").join(profile).join(name)
}

pub fn test() -> anyhow::Result<()> {
    setup::toolchain()?;
    setup::kernel()?;
    setup::disk();

    step("format: cargo fmt --check (all crates, eBPF and fuzz targets included)");
    cmd::run(cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are a workspace of their own (they link libFuzzer, on the nightly); their
    // code is `latch::fuzzing`, linted with the agent, and the corpus is replayed by the tests.
    cmd::run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))?;
    // So is the TLS provider measurement (it builds ring, which the agent does not use).
    cmd::run(cargo().args(["fmt", "--manifest-path", TLS_BENCH, "--check"]))?;

    step("lint: clippy -D warnings on the host crates");
    cmd::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("lint: clippy -D warnings on the TLS provider measurement (bench/tls-providers)");
    cmd::run(cargo().args([
        "clippy",
        "--manifest-path",
        TLS_BENCH,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    crate::modules::check_acyclic()?;
    crate::manifests::check()?;

    step("lint: clippy -D warnings on the eBPF crate, for bpfel-unknown-none");
    let arch = std::env::consts::ARCH;
    cmd::run(
        cargo()
            .args([
                "+nightly",
                "clippy",
                "-p",
                "latch-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--target-dir",
                "target/ebpf-clippy",
                "--",
                "-D",
                "warnings",
            ])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{arch}\""),
            ),
    )?;

    build_binaries(false)?;
    crate::image::test()?;
    let python_h2 = crate::venv::python_h2()?;

    step("tests: unit and kernel integration tests");
    cmd::run(
        cargo()
            .args(["test", "--workspace"])
            .env("LATCH_BIN", bin("debug", "latch"))
            .env("LATCH_PROBE", bin("debug", "latch-probe"))
            .env("LATCH_PYTHON_H2", python_h2)
            .env("RUST_BACKTRACE", "1"),
    )?;
    println!("\nxtask test: all steps passed");
    Ok(())
}

fn run_tool(binary: &Path, args: &[String], release: bool) -> anyhow::Result<()> {
    if !binary.exists() {
        bail!("{} was not built", binary.display());
    }
    let profile = if release { "release" } else { "debug" };
    cmd::run(tool(binary, profile).args(args))
}

/// A command running `binary` from the repository's root, with the agent and probe of `profile`.
fn tool(binary: &Path, profile: &str) -> Command {
    let mut cmd = Command::new(binary);
    cmd.current_dir(root())
        .env("LATCH_BIN", bin(profile, "latch"))
        .env("LATCH_PROBE", bin(profile, "latch-probe"))
        .env("LATCH_BENCH_OUT", bench_dir());
    cmd
}

pub fn demo(args: &[String]) -> anyhow::Result<()> {
    setup::toolchain()?;
    setup::kernel()?;
    build_binaries(false)?;
    step("demo: two nodes, real agents, real kernel programs");
    run_tool(&bin("debug", "latch-demo"), args, false)
}

/// The TLS provider measurement: a workspace of its own (`cargo xtask bench tls`).
const TLS_BENCH: &str = "bench/tls-providers/Cargo.toml";

pub fn bench(what: &str, args: &[String]) -> anyhow::Result<()> {
    setup::toolchain()?;
    if what == "tls" {
        step("bench: tls (ring against aws-lc-rs, with and without post-quantum key exchange)");
        return cmd::run(
            cargo()
                .args(["run", "--release", "--manifest-path", TLS_BENCH, "--"])
                .args(args)
                .current_dir(root())
                .env("LATCH_BENCH_OUT", bench_dir()),
        );
    }
    setup::kernel()?;
    build_binaries(true)?;
    if what == "all" {
        return crate::bench_all::run(|suite| {
            let mut cmd = tool(&bin("release", "latch-bench"), "release");
            cmd.arg(suite);
            cmd
        });
    }
    step(&format!("bench: {what}"));
    let started = SystemTime::now();
    let mut all = vec![what.to_owned()];
    all.extend_from_slice(args);
    run_tool(&bin("release", "latch-bench"), &all, true)?;
    if what == "load" {
        let dir = bench_dir();
        if plots::load_json_written_since(&dir, started) {
            step("bench: load plots");
            plots::render(&dir)?;
        } else {
            println!(
                "\nno plots: {} was not written by this run",
                cmd::relative(&dir.join(plots::LOAD_JSON))
            );
        }
    }
    Ok(())
}
