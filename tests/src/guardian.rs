//! Cleanup that survives the harness binaries' deaths. The demo and the benchmarks run their
//! work in a child process of their own (the worker); the process started from the command line
//! (the guardian) waits for it and, however it ended (its own teardown, a panic, Ctrl-C,
//! SIGTERM, SIGKILL), kills what it started that outlived it and removes what its clusters left
//! ([`crate::leftovers`]). A cluster's teardown runs on drop, which a signal skips.

use std::{collections::HashSet, os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    sys::{
        prctl,
        signal::{
            SigSet,
            Signal::{SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGTERM},
            kill,
        },
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{Pid, getppid},
};

use crate::leftovers;

/// Set in the worker's environment to the guardian's process id.
const GUARDIAN: &str = "LATCH_HARNESS_GUARDIAN";

/// Call first in `main`, before any thread starts. In the worker (a child whose parent set
/// [`GUARDIAN`] to its own id) it returns at once. Otherwise it never returns: it starts this
/// program again with the same arguments as the worker, passes SIGINT, SIGTERM and SIGHUP on to
/// it, waits for it, cleans up after it and exits with its status (128 plus the signal's number
/// if a signal ended it).
pub fn run_guarded(program: &str) {
    if of_this_process().is_some() {
        return;
    }
    // Held while the worker runs and while the guardian cleans up after it: a sweep by another
    // run leaves the worker's state to this process (`leftovers`). What earlier runs abandoned
    // goes first.
    let claim = match leftovers::claim() {
        Ok(claim) => claim,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::exit(1)
        }
    };
    leftovers::sweep_abandoned();
    let (worker, status) = match run_worker() {
        Ok(ended) => ended,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::exit(1)
        }
    };
    // A cleanup that fails is said, and the worker's status stays the command's.
    match clean_up_after(worker) {
        Ok((outlived, left)) if outlived > 0 || !left.is_empty() => eprintln!(
            "{program}: removed what the run left: processes {outlived}, {}",
            left.summary()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("{program}: cleaning up after the run: {e:#}"),
    }
    drop(claim);
    std::process::exit(status)
}

/// The guardian of this process, if it is a worker: [`GUARDIAN`] names its parent.
pub fn of_this_process() -> Option<u32> {
    let guardian = std::env::var(GUARDIAN).ok()?.parse::<u32>().ok()?;
    (i64::from(guardian) == i64::from(getppid().as_raw())).then_some(guardian)
}

/// Kill what the ended worker started that outlived it and remove what its clusters left: how
/// many processes were still running, and what was left.
fn clean_up_after(worker: Pid) -> anyhow::Result<(usize, leftovers::Found)> {
    let outlived = kill_children()?;
    let left = leftovers::remove(worker.as_raw().unsigned_abs());
    Ok((outlived, left))
}

/// Start the worker and wait for it, passing signals on: its process id and exit status.
fn run_worker() -> anyhow::Result<(Pid, i32)> {
    // The worker's orphans (agents, servers, probes) become this process's children, so they can
    // be found and killed.
    prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    // Blocked before the worker exists, so none is lost (SIGCHLD's default action discards it);
    // they are taken with `sigwait` below.
    let signals = SigSet::from_iter([SIGINT, SIGTERM, SIGHUP, SIGCHLD]);
    signals.thread_block().context("blocking signals")?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut command = Command::new(&exe);
    command
        .args(std::env::args_os().skip(1))
        .env(GUARDIAN, std::process::id().to_string());
    // SAFETY: the closure runs in the forked child before `exec` and only calls
    // `pthread_sigmask`, which is async-signal-safe. A child inherits its parent's signal mask
    // (std no longer resets it), and the worker, with everything it starts, must take these
    // signals as usual.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    // Reaped with `waitpid` below, not through the handle.
    let worker = Pid::from_raw(i32::try_from(child.id()).context("the worker's process id")?);
    drop(child);
    let status = loop {
        let signal = signals.wait().context("waiting for a signal")?;
        if signal == SIGCHLD {
            if let Some(status) = reap(worker)? {
                break status;
            }
        } else {
            // The worker may have ended already; it is reaped at its SIGCHLD.
            let _ = kill(worker, signal);
        }
    };
    Ok((worker, status))
}

/// Reap every child that has ended; the worker's exit status if it was one of them.
fn reap(worker: Pid) -> anyhow::Result<Option<i32>> {
    let mut status = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => status = Some(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == worker => {
                status = Some(128 + signal as i32)
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(status),
            Ok(_) => {}
            Err(e) => return Err(e).context("reaping children"),
        }
    }
}

/// Kill this process's children until none is left (each one's orphans become children in
/// turn); how many were still running.
fn kill_children() -> anyhow::Result<usize> {
    let mut killed = HashSet::new();
    loop {
        let children = running_children()?;
        if children.is_empty() {
            if reap_any(false)? {
                return Ok(killed.len());
            }
            // A child came (an orphan handed over after the listing) or went: look again
            // rather than wait for one that was never killed.
            continue;
        }
        for (pid, running) in children {
            if running {
                killed.insert(pid);
                let _ = kill(pid, SIGKILL);
            }
        }
        // One ends (a killed one or a zombie), then look again.
        if reap_any(true)? {
            return Ok(killed.len());
        }
    }
}

/// Reap one child, waiting for it if `block`; whether there are no children at all.
fn reap_any(block: bool) -> anyhow::Result<bool> {
    let flags = (!block).then_some(WaitPidFlag::WNOHANG);
    match waitpid(None, flags) {
        Err(Errno::ECHILD) => Ok(true),
        Err(e) => Err(e).context("reaping children"),
        Ok(_) => Ok(false),
    }
}

/// This process's children, each with whether it still runs (not a zombie).
fn running_children() -> anyhow::Result<Vec<(Pid, bool)>> {
    let me = std::process::id();
    Ok(processes()?
        .into_iter()
        .filter(|p| p.parent == me)
        .map(|p| (Pid::from_raw(p.pid as i32), !p.zombie))
        .collect())
}

/// One process as `/proc/PID/stat` has it.
#[derive(Clone, Copy, Debug)]
pub struct Process {
    pub pid: u32,
    pub parent: u32,
    /// Ended, and not yet reaped by its parent.
    pub zombie: bool,
}

/// Every process on the machine, from one pass over `/proc`.
pub fn processes() -> anyhow::Result<Vec<Process>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process that ended in the meantime has no stat to read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; the name may hold spaces and parentheses.
        let Some((_, after_name)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = after_name.split_whitespace();
        let (Some(state), Some(Ok(parent))) = (fields.next(), fields.next().map(str::parse)) else {
            continue;
        };
        all.push(Process {
            pid,
            parent,
            zombie: state == "Z",
        });
    }
    Ok(all)
}
