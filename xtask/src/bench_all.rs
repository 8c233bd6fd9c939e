//! `cargo xtask bench` with no suite named: every suite of `latch-bench` in one run, on one
//! machine, one after the other, and `target/bench/BENCHMARKS.md` written from what they printed,
//! with the machine and the commit at the top, then issue 21's targets as judged from the JSON
//! the suites wrote in this run (`latch-bench targets`), and the load suite's plots under its
//! section (each suite's JSON is under `target/bench/` too).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::Context as _;

use crate::{
    cmd::{bench_dir, relative, root, step},
    plots,
};

/// The suites run, in order.
pub const SUITES: [&str; 5] = ["datapath", "tunnel", "load", "memory", "policy"];

/// Run every suite (`suite` makes the command for one) and write the report, with the load
/// suite's plots; a suite or the plots failing is said so in the report, the rest still runs, and
/// the run fails at the end.
pub fn run(suite: impl Fn(&str) -> Command) -> anyhow::Result<()> {
    let dir = bench_dir();
    let run_started = SystemTime::now();
    let header = header();
    let mut report = String::new();
    let mut failed = Vec::new();
    for name in SUITES {
        step(&format!("bench: {name}"));
        report.push_str(&format!("\n## {name}\n\n"));
        let started = SystemTime::now();
        match printed(suite(name)) {
            Ok(text) => report.push_str(&text),
            Err(e) => {
                report.push_str(&format!("**This suite failed:** {e:#}\n"));
                failed.push(format!("the {name} suite"));
            }
        }
        if name == "load" {
            step("bench: load plots");
            match load_plots(&dir, started) {
                Ok(text) => report.push_str(&text),
                Err(e) => {
                    report.push_str(&format!("\n**The plots failed:** {e:#}\n"));
                    failed.push("the load plots".to_owned());
                }
            }
        }
    }
    // Issue 21's targets, judged from the JSON this run's suites wrote, at the top.
    step("bench: targets");
    let mut targets = suite("targets");
    targets.args(["--since", &unix_seconds(run_started).to_string()]);
    let targets = match printed(targets) {
        Ok(text) => text,
        Err(e) => {
            failed.push("judging the targets".to_owned());
            format!("**Judging the targets failed:** {e:#}\n")
        }
    };
    let report = format!("{header}\n## Issue 21's targets\n\n{targets}{report}");
    let path = dir.join("BENCHMARKS.md");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    if !failed.is_empty() {
        anyhow::bail!("{} failed (see {})", failed.join(", "), relative(&path));
    }
    Ok(())
}

/// `time` in whole seconds since the Unix epoch, rounded down (0 before it).
fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The load suite's plots, drawn from the `load.json` it wrote in this run (started at
/// `since`), as the report's image links; or why there are none.
fn load_plots(dir: &Path, since: SystemTime) -> anyhow::Result<String> {
    if !plots::load_json_written_since(dir, since) {
        return Ok(format!(
            "\nNo plots: the load suite wrote no {} in this run.\n",
            plots::LOAD_JSON
        ));
    }
    plots::render(dir)?;
    Ok(format!(
        "\n![Latency percentiles against offered load, persistent connections]({})\n\n\
         ![Each agent's vCPU per 1,000 requests/s, by load shape and setup]({})\n",
        plots::LATENCY_SVG,
        plots::CPU_SVG
    ))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_report_links_the_plots_of_this_runs_load_json_only() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-all-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        let json = dir.join(plots::LOAD_JSON);

        let started = SystemTime::now();
        let none = load_plots(&dir, started).expect("no load.json is no error");
        assert!(none.contains("No plots"), "{none}");

        std::fs::write(&json, "{\"benchmark\": \"load\"").expect("writing");
        let message = format!(
            "{:#}",
            load_plots(&dir, started).expect_err("truncated JSON")
        );
        assert!(message.contains(plots::LOAD_JSON), "{message}");

        std::fs::write(&json, plots::tests::sample().to_string()).expect("writing");
        let links = load_plots(&dir, started).expect("plots of the sample");
        for svg in [plots::LATENCY_SVG, plots::CPU_SVG] {
            assert!(links.contains(&format!("]({svg})")), "{links}");
            assert!(dir.join(svg).exists(), "{svg} was not written");
        }

        let stale = load_plots(&dir, SystemTime::now() + Duration::from_secs(60))
            .expect("an earlier run's load.json is no error");
        assert!(stale.contains("No plots"), "{stale}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
