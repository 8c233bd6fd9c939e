//! What a process's clusters leave behind when it dies before their teardown runs (killed by a
//! signal, or by the kernel): every cluster names its cgroup, network namespaces, pin
//! directories and files after the process (`lt<pid>x<n>…`, the revocation benchmark's
//! `latch-bench-<pid>`), so they can be found and removed by name once that process is gone.

use std::path::{Path, PathBuf};

use crate::{cluster, env, netns};

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

/// Whether `name` belongs to process `pid`'s clusters.
fn owned_by(name: &str, pid: u32) -> bool {
    let cluster = format!("lt{pid}x");
    name.strip_prefix(&cluster)
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        || name == format!("latch-bench-{pid}")
        || name.starts_with(&format!(".latch-staging-{pid}-"))
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

#[cfg(test)]
mod tests {
    use super::owned_by;

    #[test]
    fn names_are_told_apart_by_the_whole_process_id() {
        assert!(owned_by("lt42x0", 42));
        assert!(owned_by("lt42x3-n1-frontend", 42));
        assert!(owned_by("latch-bench-42", 42));
        assert!(owned_by(".latch-staging-42-7", 42));
        // Another process whose id starts with the same digits.
        assert!(!owned_by("lt421x0", 42));
        assert!(!owned_by("latch-bench-421", 42));
        assert!(!owned_by(".latch-staging-421-0", 42));
        assert!(!owned_by("lt42", 42));
        assert!(!owned_by("lt42xy", 42));
    }
}
