//! What can go wrong while finding a pod's cgroup and network namespace: each error names the
//! pod (where there is one) and the path looked at, and says whether trying again later may
//! succeed ([`DiscoveryError::is_retryable`]).

use std::{net::IpAddr, path::PathBuf};

/// Why a pod's cgroup or network namespace was not found (yet).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `/proc/mounts` lists no cgroup2 filesystem.
    #[error("no cgroup2 filesystem in {mounts} (cgroup v2 is required)")]
    NoCgroup2 { mounts: PathBuf },
    /// No cgroup2 mount holds the kubepods root (configured or one of the well-known layouts).
    #[error("no kubepods cgroup found; looked at {}", paths(.looked_at))]
    NoKubepodsRoot { looked_at: Vec<PathBuf> },
    /// A configured root that is not inside a cgroup v2 hierarchy, or not a kubepods root.
    #[error("configured kubepods root {path}: {why}")]
    BadRoot { path: PathBuf, why: &'static str },
    /// The pod UID would not make a cgroup name (only hex digits and `-` are).
    #[error("pod {uid:?}: not a pod UID (only hex digits and '-' are accepted)")]
    InvalidUid { uid: String },
    /// The pod's cgroup does not exist (yet): kubelet makes it when it starts the pod.
    #[error("pod {uid}: no pod cgroup at {path} (yet)")]
    NoPodCgroup { uid: String, path: PathBuf },
    /// The pod cgroup has no container cgroup (besides CRI-O's conmon) yet.
    #[error("pod {uid}: no container cgroup under {path} (yet)")]
    NoContainer { uid: String, path: PathBuf },
    /// The pod's container cgroups hold no process (yet, or any more).
    #[error("pod {uid}: no process in the {containers} container cgroup(s) under {path} (yet)")]
    NoProcess {
        uid: String,
        path: PathBuf,
        containers: usize,
    },
    /// Processes were found, but no network namespace of theirs holds one of the pod's IPs
    /// (the CNI plugin has not configured it yet, or the pod's IPs are not known right).
    #[error(
        "pod {uid}: network namespace {path} holds none of the pod's IPs {} (it has {}; \
         {checked} namespace(s) checked)",
        list(.wanted), list(.found)
    )]
    NetnsLacksIps {
        uid: String,
        /// `/proc/PID/ns/net` of the last namespace checked.
        path: PathBuf,
        wanted: Vec<IpAddr>,
        /// The addresses of that namespace.
        found: Vec<IpAddr>,
        checked: usize,
    },
    /// The pod has no IPs to confirm a namespace with.
    #[error("pod {uid}: no pod IPs given to confirm its network namespace under {path}")]
    NoPodIps { uid: String, path: PathBuf },
    /// Reading the cgroup tree or `/proc` failed otherwise.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The same, for one pod.
    #[error("pod {uid}: {what} {path}: {source}")]
    PodIo {
        uid: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DiscoveryError {
    /// Whether the pod may simply not be ready yet: the caller retries these later (the pod
    /// cgroup, a container, a process or the pod's addresses come as the pod starts).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NoPodCgroup { .. }
                | Self::NoContainer { .. }
                | Self::NoProcess { .. }
                | Self::NetnsLacksIps { .. }
        )
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "nothing".into();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn paths(items: &[PathBuf]) -> String {
    let shown: Vec<_> = items.iter().map(|p| p.display().to_string()).collect();
    list(&shown)
}
