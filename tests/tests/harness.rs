//! The benchmarks and the demo clean up after themselves however they end
//! (`latch_tests::guardian`): a run stopped midway, by SIGTERM as `kill` sends it or by the
//! kernel's SIGKILL of the process doing the work, leaves no process, network namespace, cgroup,
//! pin or temporary file behind.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use latch_tests::{env, eventually, leftovers};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How the run is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGTERM to the process started from the command line.
    TermTheCommand,
    /// SIGKILL to the worker it started, as the kernel's out-of-memory killer would.
    KillTheWorker,
}

#[test]
fn a_benchmark_stopped_with_sigterm_leaves_nothing_behind() {
    stopped_midway(Stop::TermTheCommand, "term");
}

#[test]
fn a_benchmark_whose_worker_is_killed_leaves_nothing_behind() {
    stopped_midway(Stop::KillTheWorker, "kill");
}

/// Start `latch-bench datapath`, wait until its agents run, stop it as `stop` says and check
/// that nothing of its clusters is left.
fn stopped_midway(stop: Stop, label: &str) {
    let dir =
        std::env::temp_dir().join(format!("latch-harness-test-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test directory");
    let mut bench = start_bench(&dir);
    let command = bench.id();

    // Once its agents run it has namespaces, cgroups, pins, files and processes of its own.
    let agents_run = eventually(Duration::from_secs(120), || {
        descendants(command)
            .iter()
            .filter(|p| is_agent(**p))
            .count()
            >= 2
    });
    assert!(agents_run, "latch-bench's agents never started");
    // The process whose clusters these are (their names carry its id): the worker.
    let worker = std::iter::once(command)
        .chain(descendants(command))
        .find(|p| leftovers::find(*p).is_ok_and(|f| !f.is_empty()))
        .expect("no process of latch-bench's owns its clusters");
    let before = leftovers::find(worker).expect("its state");
    assert!(
        !before.cgroups.is_empty()
            && !before.netns.is_empty()
            && !before.pins.is_empty()
            && !before.files.is_empty(),
        "latch-bench's state was not found: {before:?}"
    );
    let processes = descendants(command);

    let (target, signal) = match stop {
        Stop::TermTheCommand => (command, Signal::SIGTERM),
        Stop::KillTheWorker => (worker, Signal::SIGKILL),
    };
    kill(Pid::from_raw(target as i32), signal).expect("signal");
    let mut status = None;
    let ended = eventually(Duration::from_secs(120), || {
        status = bench.try_wait().expect("latch-bench's status");
        status.is_some()
    });
    if !ended {
        let _ = bench.kill();
    }
    let status = status.expect("latch-bench did not end within 2 minutes of the signal");
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    let after = leftovers::find(worker).expect("what is left");
    assert!(after.is_empty(), "{stop:?}: left behind: {after:?}");
    let alive: Vec<u32> = processes
        .into_iter()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(
        alive.is_empty(),
        "{stop:?}: processes it started still run: {alive:?}"
    );
    assert_eq!(
        status.code(),
        Some(128 + signal as i32),
        "{stop:?}: latch-bench ended with {status}; its stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("latch-bench: removed what the run left"),
        "{stop:?}: no cleanup reported; stderr:\n{stderr}"
    );
}

/// `latch-bench datapath` with the binaries under test, its output in `dir`.
fn start_bench(dir: &Path) -> Child {
    let file = |name: &str| std::fs::File::create(dir.join(name)).expect("output file");
    Command::new(env!("CARGO_BIN_EXE_latch-bench"))
        .args(["datapath", "--count", "500", "--rounds", "1"])
        .env("LATCH_BIN", env::latch_bin().expect("latch binary"))
        .env("LATCH_PROBE", env::probe_bin().expect("probe binary"))
        .env("LATCH_BENCH_OUT", dir.join("out"))
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .expect("starting latch-bench")
}

/// The children of process `pid`, from every process's parent in `/proc`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; the name may hold spaces and parentheses.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Whether process `pid` is a `latch agent`.
fn is_agent(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice()))
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut next = children(pid);
    while let Some(p) = next.pop() {
        next.extend(children(p));
        all.push(p);
    }
    all
}
