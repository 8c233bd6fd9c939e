//! `cargo xtask bench` with no suite named: every suite of `latch-bench` in one run, on one
//! machine, one after the other, and `target/bench/BENCHMARKS.md` written from what they printed,
//! with the machine and the commit at the top (each suite's JSON is under `target/bench/` too).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::cmd::{bench_dir, root, step};

/// The suites run, in order.
pub const SUITES: [&str; 5] = ["datapath", "tunnel", "load", "memory", "policy"];

/// Run every suite (`suite` makes the command for one) and write the report; a suite that fails
/// is said so in the report, the others still run, and the run fails at the end.
pub fn run(suite: impl Fn(&str) -> Command) -> anyhow::Result<()> {
    let mut report = header();
    let mut failed = Vec::new();
    for name in SUITES {
        step(&format!("bench: {name}"));
        report.push_str(&format!("\n## {name}\n\n"));
        match printed(suite(name)) {
            Ok(text) => report.push_str(&text),
            Err(e) => {
                report.push_str(&format!("**This suite failed:** {e:#}\n"));
                failed.push(name);
            }
        }
    }
    let dir = bench_dir();
    let path = dir.join("BENCHMARKS.md");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    if !failed.is_empty() {
        anyhow::bail!("suites failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Run `cmd`, passing its output through as it comes, and return what it printed; an error if
/// it fails (with what it printed before).
fn printed(mut cmd: Command) -> anyhow::Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut text = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading the suite's output")?;
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
    }
    let status = child.wait().context("waiting for the suite")?;
    if !status.success() {
        anyhow::bail!("{status}; it printed:\n\n{text}");
    }
    Ok(text)
}

/// The report's title, date, commit and machine.
fn header() -> String {
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "# Latch benchmarks\n\n\
         `cargo xtask bench`: every suite in one run (what each measures and how: \
         `docs/benchmarks.md`).\n\n\
         - date: {}\n- commit: {}\n- machine: {cores} CPUs, {cpu}\n- kernel: {}\n",
        run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        run("git", &["rev-parse", "--short", "HEAD"]),
        run("uname", &["-r"]),
    )
}
