//! What a process's clusters leave behind when it dies before their teardown runs (killed by a
//! signal, or by the kernel): every cluster names its cgroup, network namespaces, pin
//! directories and files after the process (`lt<pid>x<n>…`, the revocation benchmark's
//! `latch-bench-<pid>`), so they can be found and removed by name once that process is gone.
//!
//! Who removes them: the demo's and the benchmarks' guardian ([`crate::guardian`]) right after its
//! worker ends, and otherwise the next cluster made on the machine ([`sweep_abandoned`], from
//! `Cluster::new`): a `cargo test` stopped with SIGKILL, or a guardian killed itself, has no one
//! else to do it. A process with clusters holds a claim ([`claim`]): an exclusive `flock` on
//! `<tmp>/.latch-owner-<pid>`, which the kernel releases however the process ends, so a sweep
//! tells a running owner from an ended one without trusting process ids alone (they are reused),
//! and leaves a worker's state to its guardian while the guardian runs. Every run is assumed to
//! share one process-id namespace, as the names already do.
use std::{
    collections::BTreeSet,
    fs::{File, TryLockError},
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
};

use crate::{cluster, env, guardian, netns};

/// Where pins live ([`crate::env::require_kernel_features`] mounts bpffs there).
const BPFFS: &str = "/sys/fs/bpf";

/// The state of one process's clusters that still exists.
#[derive(Debug, Default)]
pub struct Found {
    /// Cgroups at the cgroup2 root (each with its tree below).
    pub cgroups: Vec<PathBuf>,
    /// Network namespaces, by name.
    pub netns: Vec<String>,
    /// Pin directories on bpffs.
    pub pins: Vec<PathBuf>,
    /// Working directories and staged files in the temporary directory.
    pub files: Vec<PathBuf>,
}

impl Found {
    pub fn is_empty(&self) -> bool {
        self.cgroups.is_empty()
            && self.netns.is_empty()
            && self.pins.is_empty()
            && self.files.is_empty()
    }

    /// One line: how many of each.
    pub fn summary(&self) -> String {
        format!(
            "cgroups {}, network namespaces {}, pin directories {}, temporary files {}",
            self.cgroups.len(),
            self.netns.len(),
            self.pins.len(),
            self.files.len()
        )
    }
}

/// A process's claim file in the temporary directory: `.latch-owner-<pid>`.
const CLAIM_PREFIX: &str = ".latch-owner-";

/// The process whose clusters `name` belongs to, if any.
fn owner_of(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix("lt") {
        // `lt<pid>x<n>`, then anything.
        return pid_then(rest, |after| {
            after
                .strip_prefix('x')
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        });
    }
    if let Some(rest) = name.strip_prefix(".latch-staging-") {
        return pid_then(rest, |after| after.starts_with('-'));
    }
    [CLAIM_PREFIX, "latch-bench-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .and_then(|rest| pid_then(rest, str::is_empty))
}

/// The process id `text` starts with, if what follows it is what `then` accepts.
fn pid_then(text: &str, then: fn(&str) -> bool) -> Option<u32> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if end == 0 || !then(&text[end..]) {
        return None;
    }
    text[..end].parse().ok()
}

/// Whether `name` belongs to process `pid`'s clusters.
fn owned_by(name: &str, pid: u32) -> bool {
    owner_of(name) == Some(pid)
}

/// The entries of `dir` whose names belong to `pid` (none if `dir` cannot be read).
fn entries_of(dir: &Path, pid: u32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| owned_by(n, pid)))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// What of process `pid`'s clusters still exists (nothing where there is no such place: no
/// cgroup2 mount, no `/run/netns`).
pub fn find(pid: u32) -> Found {
    Found {
        cgroups: env::cgroup2_mount()
            .map(|mount| entries_of(&mount, pid))
            .unwrap_or_default(),
        netns: entries_of(Path::new("/run/netns"), pid)
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect(),
        pins: entries_of(Path::new(BPFFS), pid),
        files: entries_of(&std::env::temp_dir(), pid),
    }
}

/// Remove what is left of process `pid`'s clusters, which must be gone: the processes in their
/// cgroups are killed first, so that nothing holds a namespace or a map. Returns what was there;
/// what could not be removed is said on stderr.
pub fn remove(pid: u32) -> Found {
    let found = find(pid);
    for cgroup in &found.cgroups {
        cluster::kill_cgroup_tree(cgroup);
    }
    for cgroup in &found.cgroups {
        cluster::remove_cgroup_tree(cgroup);
    }
    for name in &found.netns {
        if let Err(e) = netns::delete(name) {
            eprintln!("cleanup: {e:#}");
        }
    }
    for path in found.pins.iter().chain(&found.files) {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        if let Err(e) = removed {
            eprintln!("cleanup: removing {}: {e}", path.display());
        }
    }
    found
}

fn claim_path(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{CLAIM_PREFIX}{pid}"))
}

/// This process's claim on what it names after itself: its claim file, locked. Shared by
/// everything of the process that makes such state; the last holder to drop it removes the file,
/// and the lock goes with the file's closing (or with the process, however it ends).
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    // Held for the lock: closing it releases the lock, after `drop` removed the path.
    _file: File,
}

/// The claim every holder in this process shares while any holds it.
static CLAIM: Mutex<Weak<Claim>> = Mutex::new(Weak::new());

/// This process's claim, taken if no one in the process holds it now. Take it before making
/// anything named after the process.
pub fn claim() -> anyhow::Result<Arc<Claim>> {
    let mut current = CLAIM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(claim) = current.upgrade() {
        return Ok(claim);
    }
    let claim = Arc::new(Claim::take()?);
    *current = Arc::downgrade(&claim);
    Ok(claim)
}

impl Claim {
    fn take() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = claim_path(std::process::id());
        loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // Blocks only while a sweep holds a file of an ended process that had this id, or
            // while this process's previous claim is being dropped.
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
            // Either may have removed the file after it was opened here: the lock is then on a
            // file no one else can open, so take a new one.
            let (Ok(held), Ok(named)) = (file.metadata(), std::fs::metadata(&path)) else {
                continue;
            };
            if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
                continue;
            }
            file.set_len(0)
                .with_context(|| format!("emptying {}", path.display()))?;
            // A worker names its guardian, which removes the worker's state once it ends.
            if let Some(guardian) = guardian::of_this_process() {
                writeln!(&file, "guardian {guardian}")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            return Ok(Self { path, _file: file });
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every process that names something in the four places.
fn owners() -> BTreeSet<u32> {
    let mut dirs = vec![
        PathBuf::from("/run/netns"),
        PathBuf::from(BPFFS),
        std::env::temp_dir(),
    ];
    dirs.extend(env::cgroup2_mount().ok());
    dirs.iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|entry| owner_of(entry.file_name().to_str()?))
        .collect()
}

/// Whether process `pid` holds its claim.
fn claim_held(pid: u32) -> bool {
    File::open(claim_path(pid))
        .is_ok_and(|file| matches!(file.try_lock(), Err(TryLockError::WouldBlock)))
}

/// Whether what process `pid` named is abandoned: its claim is not held and its guardian, if it
/// names one other than `me`, has ended too; or, with no claim file, no process `pid` exists.
/// The claim's file stays locked (returned) while its state is removed, so that no other sweep
/// removes it at the same time.
fn abandoned(pid: u32, me: u32) -> Option<Option<File>> {
    let Ok(file) = File::open(claim_path(pid)) else {
        return (!Path::new(&format!("/proc/{pid}")).exists()).then_some(None);
    };
    // Held: the process runs. An error: nothing can be told, so it stays.
    file.try_lock().ok()?;
    let text = std::io::read_to_string(&file).unwrap_or_default();
    let guardian = text
        .trim()
        .strip_prefix("guardian ")
        .and_then(|g| g.parse::<u32>().ok());
    if guardian.is_some_and(|g| g != me && claim_held(g)) {
        return None;
    }
    Some(Some(file))
}

/// Remove what every ended process left that no one else will: each process named in the four
/// places whose state is [`abandoned`]. What was removed is said on stderr and returned, by
/// process.
pub fn sweep_abandoned() -> Vec<(u32, Found)> {
    let me = std::process::id();
    let mut swept = Vec::new();
    for pid in owners().into_iter().filter(|pid| *pid != me) {
        let Some(_claim) = abandoned(pid, me) else {
            continue;
        };
        let found = remove(pid);
        if !found.is_empty() {
            eprintln!(
                "cleanup: removed what process {pid} left, which ended without its teardown: {}",
                found.summary()
            );
            swept.push((pid, found));
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::owned_by;

    #[test]
    fn names_are_told_apart_by_the_whole_process_id() {
        assert!(owned_by("lt42x0", 42));
        assert!(owned_by("lt42x3-n1-frontend", 42));
        assert!(owned_by("latch-bench-42", 42));
        assert!(owned_by(".latch-staging-42-7", 42));
        assert!(owned_by(".latch-owner-42", 42));
        // Another process whose id starts with the same digits.
        assert!(!owned_by("lt421x0", 42));
        assert!(!owned_by("latch-bench-421", 42));
        assert!(!owned_by(".latch-staging-421-0", 42));
        assert!(!owned_by("lt42", 42));
        assert!(!owned_by("lt42xy", 42));
        assert!(!owned_by(".latch-owner-421", 42));
        assert!(!owned_by(".latch-owner-42.tmp", 42));
        assert!(!owned_by("latch-bench-42x", 42));
    }

    #[test]
    fn names_of_no_process_have_no_owner() {
        for name in [
            "lt",
            "ltx0",
            "lt-1x0",
            "latch-bench-",
            ".latch-owner-",
            "lo",
            "cgroup.procs",
        ] {
            assert_eq!(super::owner_of(name), None, "{name}");
        }
        assert_eq!(super::owner_of("lt7x12-fab"), Some(7));
    }
}
