//! The benchmarks and the demo clean up after themselves however they end
//! (`latch_tests::guardian`): a run stopped midway, by SIGTERM as `kill` sends it or by the
//! kernel's SIGKILL of the process doing the work, leaves no process, network namespace, cgroup,
//! pin or temporary file behind. A run with no guardian (a `cargo test` killed) leaves all of it,
//! and the next cluster made on the machine removes it (`latch_tests::leftovers`).

use std::{
    collections::HashMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use latch_tests::{cluster::Cluster, env, eventually, guardian, leftovers};
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
    let mut run = Run {
        bench: start_bench(&dir, 500, true),
        worker: None,
    };
    let command = run.bench.id();

    // Once its agents run and have pinned their maps it has processes, namespaces, cgroups,
    // pins and files of its own, all named after the process doing the work (the worker).
    let mut worker = None;
    let running = eventually(Duration::from_secs(120), || {
        let all = descendants(command);
        if all.iter().filter(|p| is_agent(**p)).count() < 2 {
            return false;
        }
        // The command itself, or (with the guardian) its one child.
        worker = std::iter::once(command)
            .chain(children(command, &parents()))
            .find(|p| has_everything(&leftovers::find(*p)));
        worker.is_some()
    });
    let worker = worker
        .filter(|_| running)
        .expect("latch-bench's agents never started, or its state was not found");
    run.worker = Some(worker);
    let processes = descendants(command);

    let (target, signal) = match stop {
        Stop::TermTheCommand => (command, Signal::SIGTERM),
        Stop::KillTheWorker => (worker, Signal::SIGKILL),
    };
    kill(Pid::from_raw(target as i32), signal).expect("signal");
    let mut status = None;
    let ended = eventually(Duration::from_secs(120), || {
        status = run.bench.try_wait().expect("latch-bench's status");
        status.is_some()
    });
    assert!(
        ended,
        "latch-bench did not end within 2 minutes of the signal"
    );
    let status = status.expect("latch-bench's status");
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    let after = leftovers::find(worker);
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

#[test]
fn what_a_killed_run_with_no_guardian_left_is_removed_by_the_next_cluster() {
    let dir = TestDir::new("sweep");
    // The runs below name this process as their guardian (so none of their own starts), and a
    // sweep by another run leaves their state to a guardian that runs: this process, which
    // removes it itself once it makes a cluster.
    let _claim = leftovers::claim().expect("this process's claim");
    let mut killed = Run {
        bench: start_bench(&dir.0.join("killed"), 500, false),
        worker: None,
    };
    let mut running = Run {
        bench: start_bench(&dir.0.join("running"), 500, false),
        worker: None,
    };
    for run in [&mut killed, &mut running] {
        let pid = run.bench.id();
        let started = eventually(Duration::from_secs(120), || {
            descendants(pid).iter().filter(|p| is_agent(**p)).count() >= 2
                && has_everything(&leftovers::find(pid))
        });
        assert!(
            started,
            "latch-bench {pid}: its agents never started, or its state was not found"
        );
        run.worker = Some(pid);
    }
    let (killed_pid, running_pid) = (killed.bench.id(), running.bench.id());
    // Stopped, the other run stays as it is, alive, for as long as the test looks at it.
    kill(Pid::from_raw(running_pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    let killed_processes = descendants(killed_pid);

    // As `cargo test` is killed: nothing of the run gets to clean up.
    killed.bench.kill().expect("SIGKILL");
    killed.bench.wait().expect("reaping latch-bench");
    let before = leftovers::find(killed_pid);
    assert!(
        has_everything(&before),
        "the killed run's state went before any sweep: {before:?}"
    );

    // The next run on the machine.
    let cluster = Cluster::new().expect("a cluster");
    let after = leftovers::find(killed_pid);
    assert!(after.is_empty(), "left behind: {after:?}");
    let running_processes = |pids: &[u32]| -> Vec<u32> {
        let alive: std::collections::HashSet<u32> = guardian::processes()
            .expect("the processes")
            .into_iter()
            .filter(|p| !p.zombie)
            .map(|p| p.pid)
            .collect();
        pids.iter().copied().filter(|p| alive.contains(p)).collect()
    };
    // Killed through their cgroup; each is gone once its parent (init, now) reaps it.
    let gone = eventually(Duration::from_secs(30), || {
        running_processes(&killed_processes).is_empty()
    });
    assert!(
        gone,
        "processes the killed run started still run: {:?}",
        running_processes(&killed_processes)
    );
    let kept = leftovers::find(running_pid);
    assert!(
        has_everything(&kept),
        "the sweep took the state of a run that still goes on: {kept:?}"
    );
    assert_eq!(
        descendants(running_pid)
            .iter()
            .filter(|p| is_agent(**p))
            .count(),
        2,
        "the sweep stopped the agents of a run that still goes on"
    );
    drop(cluster);
    drop(running);
}

/// The test's own directory in the temporary directory, removed however the test ends.
struct TestDir(std::path::PathBuf);

impl TestDir {
    fn new(label: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("latch-harness-test-{}-{label}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test directory");
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `latch-bench` run; should the test fail, it is killed and its state removed.
struct Run {
    bench: Child,
    worker: Option<u32>,
}

impl Drop for Run {
    fn drop(&mut self) {
        // Only while latch-bench still runs is the worker's id surely still the worker's.
        if self.bench.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Some(worker) = self.worker {
            let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
        }
        let _ = self.bench.kill();
        let _ = self.bench.wait();
        if let Some(worker) = self.worker {
            leftovers::remove(worker);
        }
    }
}

/// `latch-bench datapath` with the binaries under test, its output in `dir`: `connections` per
/// phase, with its guardian or (`guarded` false) doing the work itself, as a test binary does:
/// its guardian variable then names this process, its parent.
fn start_bench(dir: &Path, connections: usize, guarded: bool) -> Child {
    std::fs::create_dir_all(dir).expect("output directory");
    let file = |name: &str| std::fs::File::create(dir.join(name)).expect("output file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_latch-bench"));
    command
        .args([
            "datapath",
            "--count",
            &connections.to_string(),
            "--rounds",
            "1",
        ])
        .env("LATCH_BIN", env::latch_bin().expect("latch binary"))
        .env("LATCH_PROBE", env::probe_bin().expect("probe binary"))
        .env("LATCH_BENCH_OUT", dir.join("out"))
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"));
    if !guarded {
        command.env("LATCH_HARNESS_GUARDIAN", std::process::id().to_string());
    }
    command.spawn().expect("starting latch-bench")
}

/// Every process's parent.
fn parents() -> HashMap<u32, u32> {
    guardian::processes()
        .expect("the processes")
        .into_iter()
        .map(|p| (p.pid, p.parent))
        .collect()
}

/// The children of `pid`.
fn children(pid: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    parents
        .iter()
        .filter(|(_, parent)| **parent == pid)
        .map(|(child, _)| *child)
        .collect()
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let parents = parents();
    let mut all = Vec::new();
    let mut next = children(pid, &parents);
    while let Some(p) = next.pop() {
        next.extend(children(p, &parents));
        all.push(p);
    }
    all
}

/// Whether a run's state has each kind of thing a cluster with agents makes.
fn has_everything(found: &leftovers::Found) -> bool {
    !found.cgroups.is_empty()
        && !found.netns.is_empty()
        && !found.pins.is_empty()
        && !found.files.is_empty()
}

/// Whether process `pid` is a `latch agent`.
fn is_agent(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice()))
}
