//! Running commands: announce them, run them with inherited output, fail with the command line.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where the benchmarks write their JSON, reports and plots: `target/bench/`.
pub fn bench_dir() -> PathBuf {
    root().join("target").join("bench")
}

/// `path` as the repository names it (relative to its root), for messages.
pub fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn step(text: &str) {
    println!("\n==> {text}");
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// A cargo command that uses the toolchain named on its command line (`+nightly`) or the
/// default one, not the one running xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    // CI builds a fresh clone once: incremental compilation's caches (gigabytes for
    // `cargo xtask test`) would only take disk.
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd.current_dir(root());
    cmd
}

/// Run with inherited stdio; error if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    println!("    $ {line}");
    let status = cmd.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Run and capture output (for probing versions); None if it cannot start.
pub fn capture(cmd: &mut Command) -> Option<Output> {
    cmd.output().ok()
}

pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    capture(cmd)
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}
