//! Pod → cgroup: the cgroup2 mount that holds kubelet's kubepods root, the root itself (and so
//! the cgroup driver), a pod's pod-level cgroup for its QoS class, the container cgroups below
//! it, and the processes in them. Everything is read from what exists on disk.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

use super::error::DiscoveryError;
pub use crate::datapath::system::cgroup2_mounts;

/// kubelet's cgroup driver, which decides how cgroups are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// A pod's QoS class (`status.qosClass`), which decides where kubelet puts its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    /// Directly under the kubepods root.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];

    /// From `status.qosClass` as the API spells it.
    pub fn from_api(value: &str) -> Option<Self> {
        match value {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The QoS level's cgroup name (none for Guaranteed).
    fn level(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// The container runtime a container cgroup's name points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope` (systemd driver).
    Containerd,
    /// `crio-<id>.scope` (systemd) or `crio-<id>` (cgroupfs).
    CriO,
    /// `docker-<id>.scope`: cri-dockerd (systemd driver).
    CriDockerd,
    /// A bare `<id>` directory: the cgroupfs driver's containerd or cri-dockerd.
    Unnamed,
}

/// One container's cgroup below a pod cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// The runtime's container ID, from the cgroup's name.
    pub id: String,
    pub runtime: Runtime,
    pub path: PathBuf,
}

/// A pod's pod-level cgroup (every container of the pod, restarts included, lives below it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    pub path: PathBuf,
}

impl PodCgroup {
    /// The pod's container cgroups (CRI-O's `crio-conmon-<id>` cgroups left out), by name.
    pub fn containers(&self) -> Result<Vec<ContainerCgroup>, DiscoveryError> {
        list_containers(&self.path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => DiscoveryError::NoPodCgroup {
                uid: self.uid.clone(),
                path: self.path.clone(),
            },
            _ => DiscoveryError::PodIo {
                uid: self.uid.clone(),
                what: "listing the pod cgroup",
                path: self.path.clone(),
                source,
            },
        })
    }
}

/// kubelet's kubepods root on this node: the cgroup2 mount it was found under, its directory,
/// and the driver its name implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubepodsRoot {
    mount: PathBuf,
    path: PathBuf,
    driver: CgroupDriver,
}

/// Names of the kubepods root directly under a cgroup2 mount (kubelet's default `--cgroup-root`).
const TOP_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];

impl KubepodsRoot {
    /// Find the root from `/proc/mounts`; see [`KubepodsRoot::detect_in`].
    pub fn detect(configured: Option<&Path>) -> Result<Self, DiscoveryError> {
        let mounts = Path::new("/proc/mounts");
        let text = fs::read_to_string(mounts).map_err(|source| DiscoveryError::Io {
            what: "reading",
            path: mounts.into(),
            source,
        })?;
        Self::detect_in(&text, configured)
    }

    /// Find the root under the cgroup2 mounts listed in `mounts` (the text of `/proc/mounts`),
    /// trying every cgroup2 mount in order and taking the first that holds it.
    ///
    /// `configured` is either a directory inside one of those mounts
    /// (`/sys/fs/cgroup/kubepods.slice`) or a cgroup path as kubelet and `/proc/PID/cgroup`
    /// spell it (`/kubelet.slice/kubelet-kubepods.slice`), looked up under each mount. Without
    /// one, each mount is searched for `kubepods.slice` or `kubepods` at its top, then one level
    /// down (kubelet's `--cgroup-root`, as a kind node's `kubelet.slice/kubelet-kubepods.slice`).
    pub fn detect_in(mounts: &str, configured: Option<&Path>) -> Result<Self, DiscoveryError> {
        let mount_points = cgroup2_mounts(mounts);
        if mount_points.is_empty() {
            return Err(DiscoveryError::NoCgroup2 {
                mounts: "/proc/mounts".into(),
            });
        }
        let mut looked_at = Vec::new();
        let found = choose_mount(&mount_points, |mount| {
            let candidates = match configured {
                Some(path) => configured_candidates(mount, path),
                None => detected_candidates(mount),
            };
            let found = candidates.iter().find(|c| c.is_dir()).cloned();
            looked_at.extend(candidates);
            found
        });
        let Some((mount, path)) = found else {
            return Err(DiscoveryError::NoKubepodsRoot { looked_at });
        };
        let root = Self::at(&mount, &path)?;
        tracing::debug!(
            mount = %root.mount.display(),
            root = %root.path.display(),
            driver = ?root.driver,
            "kubepods root"
        );
        Ok(root)
    }

    /// The root at `path` inside the cgroup2 mount `mount`, its driver from its name: a
    /// `*.slice` is the systemd driver's, anything else cgroupfs's.
    pub fn at(mount: &Path, path: &Path) -> Result<Self, DiscoveryError> {
        let bad = |why| DiscoveryError::BadRoot {
            path: path.into(),
            why,
        };
        if !path.starts_with(mount) || path == mount {
            return Err(bad("not below its cgroup2 mount"));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("no UTF-8 directory name"))?;
        let driver = if name.ends_with(".slice") {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        Ok(Self {
            mount: mount.into(),
            path: path.into(),
            driver,
        })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// Where kubelet puts the cgroup of pod `uid` of class `qos` (whether it exists or not).
    pub fn pod_cgroup_path(&self, uid: &str, qos: QosClass) -> Result<PathBuf, DiscoveryError> {
        if uid.is_empty()
            || uid.len() > 64
            || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(DiscoveryError::InvalidUid { uid: uid.into() });
        }
        Ok(match self.driver {
            CgroupDriver::Systemd => {
                // systemd slices name their whole path: `a.slice/a-b.slice/a-b-c.slice`.
                let stem = self.slice_stem();
                let uid = uid.replace('-', "_");
                match qos.level() {
                    None => self.path.join(format!("{stem}-pod{uid}.slice")),
                    Some(level) => self
                        .path
                        .join(format!("{stem}-{level}.slice"))
                        .join(format!("{stem}-{level}-pod{uid}.slice")),
                }
            }
            CgroupDriver::Cgroupfs => match qos.level() {
                None => self.path.join(format!("pod{uid}")),
                Some(level) => self.path.join(level).join(format!("pod{uid}")),
            },
        })
    }

    /// The cgroup of pod `uid` of class `qos`, if kubelet has made it.
    pub fn pod_cgroup(&self, uid: &str, qos: QosClass) -> Result<PodCgroup, DiscoveryError> {
        let path = self.pod_cgroup_path(uid, qos)?;
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(PodCgroup {
                uid: uid.into(),
                path,
            }),
            Ok(_) => Err(DiscoveryError::NoPodCgroup {
                uid: uid.into(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DiscoveryError::NoPodCgroup {
                uid: uid.into(),
                path,
            }),
            Err(source) => Err(DiscoveryError::PodIo {
                uid: uid.into(),
                what: "reading the pod cgroup",
                path,
                source,
            }),
        }
    }

    /// `kubepods` for `kubepods.slice`, `kubelet-kubepods` for `kubelet-kubepods.slice`.
    fn slice_stem(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".slice"))
            .unwrap_or("kubepods")
    }
}

/// The first of `mounts` (in order) under which `find` finds the kubepods root, with that root.
/// Not simply the first cgroup2 mount: a container sees its own cgroup namespace at
/// `/sys/fs/cgroup` and the host's hierarchy wherever the host's was mounted for it.
pub fn choose_mount(
    mounts: &[PathBuf],
    mut find: impl FnMut(&Path) -> Option<PathBuf>,
) -> Option<(PathBuf, PathBuf)> {
    mounts
        .iter()
        .find_map(|mount| find(mount).map(|root| (mount.clone(), root)))
}

/// A configured root, under `mount`: itself when it lies inside `mount`, else as a cgroup path
/// relative to the mount's root.
fn configured_candidates(mount: &Path, configured: &Path) -> Vec<PathBuf> {
    if configured.starts_with(mount) && configured != mount {
        return vec![configured.into()];
    }
    let relative: PathBuf = configured
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if relative.as_os_str().is_empty() {
        return Vec::new();
    }
    vec![mount.join(relative)]
}

/// The well-known roots under `mount`: at its top, then one level down, below any directory
/// (a `--cgroup-root` such as kind's `/kubelet`): `<d>.slice/<d>-kubepods.slice` or
/// `<d>/kubepods`.
fn detected_candidates(mount: &Path) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = TOP_ROOTS.iter().map(|n| mount.join(n)).collect();
    if candidates.iter().any(|c| c.is_dir()) {
        return candidates;
    }
    let Ok(entries) = fs::read_dir(mount) else {
        return candidates;
    };
    let mut dirs: Vec<(PathBuf, String)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.path(), e.file_name().to_str()?.to_owned())))
        .collect();
    dirs.sort();
    for (dir, name) in dirs {
        match name.strip_suffix(".slice") {
            Some(stem) => candidates.push(dir.join(format!("{stem}-kubepods.slice"))),
            None => candidates.push(dir.join("kubepods")),
        }
    }
    candidates
}

/// What a directory below a pod cgroup is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry<'a> {
    Container(Runtime, &'a str),
    /// CRI-O's `conmon` monitor: not the container, never in the pod's network namespace.
    Conmon,
    Other,
}

pub(super) fn entry(name: &str) -> Entry<'_> {
    let scope = name.strip_suffix(".scope");
    let base = scope.unwrap_or(name);
    if base.starts_with("crio-conmon-") {
        return Entry::Conmon;
    }
    let (runtime, id) = if let Some(id) = base.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, id)
    } else if let Some(id) = base.strip_prefix("crio-") {
        (Runtime::CriO, id)
    } else if let Some(id) = base.strip_prefix("docker-") {
        (Runtime::CriDockerd, id)
    } else if scope.is_none() && base.len() >= 12 {
        // cgroupfs: containerd and cri-dockerd name the cgroup by the bare ID (64 hex digits).
        (Runtime::Unnamed, base)
    } else {
        return Entry::Other;
    };
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Entry::Other;
    }
    Entry::Container(runtime, id)
}

/// The container cgroups directly below `pod_cgroup`, sorted by path; conmon and directories
/// of other names are left out.
pub fn list_containers(pod_cgroup: &Path) -> io::Result<Vec<ContainerCgroup>> {
    let mut out = Vec::new();
    for dirent in fs::read_dir(pod_cgroup)? {
        let dirent = dirent?;
        if !dirent.file_type()?.is_dir() {
            continue;
        }
        let name = dirent.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Entry::Container(runtime, id) = entry(name) {
            out.push(ContainerCgroup {
                id: id.into(),
                runtime,
                path: dirent.path(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// How deep below a container cgroup processes are looked for, when the container made cgroups
/// of its own (a container running systemd, or a nested runtime).
const PROCESS_DEPTH: usize = 3;

/// The processes of the cgroup at `path`: its own, or if it has none, those of the first
/// cgroup below it that has some (a cgroup v2 cgroup with children may hold none itself).
pub(super) fn processes(path: &Path) -> io::Result<Vec<u32>> {
    processes_below(path, PROCESS_DEPTH)
}

fn processes_below(path: &Path, depth: usize) -> io::Result<Vec<u32>> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs)?;
    let pids: Vec<u32> = text
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        // A process outside the reader's PID namespace reads as 0 (the agent needs hostPID).
        .filter(|pid| *pid != 0)
        .collect();
    if !pids.is_empty() || depth == 0 {
        return Ok(pids);
    }
    let mut children: Vec<PathBuf> = fs::read_dir(path)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    children.sort();
    for child in children {
        match processes_below(&child, depth - 1) {
            Ok(pids) if !pids.is_empty() => return Ok(pids),
            // Removed meanwhile: look at the next one.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Vec::new())
}
