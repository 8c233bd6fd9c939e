//! Pod → network namespace: a process of one of the pod's containers, its `/proc/PID/ns/net`
//! opened and kept as a descriptor, accepted only if that namespace holds one of the pod's IPs.
//! The addresses are read with the agent's route netlink socket ([`crate::netlink`]), made by a
//! short-lived thread of its own that enters the namespace (`setns` moves only the calling
//! thread, so never a tokio worker).

use std::{
    collections::HashSet,
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use crate::netlink::RouteSocket;

use super::{
    cgroup::{self, ContainerCgroup, PodCgroup},
    error::DiscoveryError,
};

/// A network namespace's identity (the `nsfs` inode and device of its descriptor): the same
/// namespace has the same one however it is opened, for as long as it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace `netns` refers to (a descriptor of `/proc/PID/ns/net` or
    /// of a bind mount of one).
    pub fn of(netns: &File) -> io::Result<Self> {
        let meta = netns.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A pod's network namespace, found and confirmed.
#[derive(Debug)]
pub struct PodNetns {
    /// The namespace itself, held open: it stays valid (and the namespace alive) after the
    /// process it was found through exits, unlike the `/proc/PID/ns/net` path. Enter it with
    /// `setns(2)` on a thread of its own, or open `/proc/self/fd/<fd>` for code that takes a path.
    pub netns: File,
    pub id: NetnsId,
    /// The process it was found through, and that process's `/proc/PID/ns/net`.
    pub pid: u32,
    pub path: PathBuf,
    /// The container cgroup that process was in.
    pub container: ContainerCgroup,
    /// The pod IP the namespace was confirmed by.
    pub ip: IpAddr,
}

/// The network namespace of the pod whose cgroup is `pod`, confirmed by one of `ips` (the pod's
/// `status.podIPs`) being an address of one of its interfaces. Blocking (reads the cgroup tree
/// and `/proc`, and starts a thread per namespace checked): call it from a blocking context,
/// not a tokio worker. The retryable errors ([`DiscoveryError::is_retryable`]) say why the pod
/// is not there yet.
pub fn pod_netns(pod: &PodCgroup, ips: &[IpAddr]) -> Result<PodNetns, DiscoveryError> {
    if ips.is_empty() {
        return Err(DiscoveryError::NoPodIps {
            uid: pod.uid.clone(),
            path: pod.path.clone(),
        });
    }
    let containers = pod.containers()?;
    if containers.is_empty() {
        return Err(DiscoveryError::NoContainer {
            uid: pod.uid.clone(),
            path: pod.path.clone(),
        });
    }
    let mut checked = HashSet::new();
    let mut lacking: Option<(PathBuf, Vec<IpAddr>)> = None;
    for container in &containers {
        let pids = match cgroup::processes(&container.path) {
            Ok(pids) => pids,
            // The container's cgroup went away meanwhile (it exited): try the next one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DiscoveryError::PodIo {
                    uid: pod.uid.clone(),
                    what: "reading the processes of",
                    path: container.path.clone(),
                    source,
                });
            }
        };
        for pid in pids {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let netns = match File::open(&path) {
                Ok(file) => file,
                // Exited since `cgroup.procs` was read.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                    continue;
                }
                Err(source) => return Err(pod_io(pod, "opening", path, source)),
            };
            let id = NetnsId::of(&netns).map_err(|e| pod_io(pod, "reading", path.clone(), e))?;
            // The container's processes nearly always share one namespace: check it once.
            if !checked.insert(id) {
                continue;
            }
            let found = addresses(&netns)
                .map_err(|e| pod_io(pod, "listing the addresses of", path.clone(), e))?;
            // The PID may have been reused by a process of another namespace since the cgroup
            // was read; the pod's own IP is what makes the namespace the pod's.
            if let Some(ip) = ips.iter().find(|ip| found.contains(&ip.to_canonical())) {
                tracing::debug!(
                    pod = %pod.uid,
                    pid,
                    netns = ?id,
                    container = %container.id,
                    %ip,
                    "pod network namespace"
                );
                return Ok(PodNetns {
                    netns,
                    id,
                    pid,
                    path,
                    container: container.clone(),
                    ip: *ip,
                });
            }
            lacking = Some((path, found));
        }
    }
    match lacking {
        Some((path, found)) => Err(DiscoveryError::NetnsLacksIps {
            uid: pod.uid.clone(),
            path,
            wanted: ips.to_vec(),
            found,
            checked: checked.len(),
        }),
        None => Err(DiscoveryError::NoProcess {
            uid: pod.uid.clone(),
            path: pod.path.clone(),
            containers: containers.len(),
        }),
    }
}

fn pod_io(pod: &PodCgroup, what: &'static str, path: PathBuf, source: io::Error) -> DiscoveryError {
    DiscoveryError::PodIo {
        uid: pod.uid.clone(),
        what,
        path,
        source,
    }
}

/// Every address of every interface of the namespace `netns`. A scoped thread enters it to
/// make the netlink socket (which stays in the namespace it was made in) and ends there.
pub fn addresses(netns: &File) -> io::Result<Vec<IpAddr>> {
    let netns = netns.as_fd();
    let mut socket = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("netns-discovery".into())
            .spawn_scoped(scope, || {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("entering: {e}"))
                })?;
                RouteSocket::open()
            })?
            .join()
            .map_err(|_| io::Error::other("the netlink thread panicked"))?
    })?;
    Ok(socket
        .addresses()?
        .into_iter()
        .map(|address| address.ip.to_canonical())
        .collect())
}
