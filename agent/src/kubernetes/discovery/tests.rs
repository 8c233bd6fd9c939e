//! Kubelet-like cgroup layouts built in the test's own subtree of the real cgroup2 mount
//! (`<mount>/latch-test-discovery-<pid>-<n>/…`), with real processes in fresh network namespaces
//! moved into container cgroups; and the pure parts (mount choice, names) on synthetic input.
//! The kernel tests need root and cgroup v2, and fail, never skip, without them.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{cgroup::Entry, *};

const UID: &str = "0f6a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
const UID_: &str = "0f6a1c2e_3b4d_4e5f_8a9b_0c1d2e3f4a5b";
const ID: &str = "4c1e0b7d9a2f3e8c5b6a7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

// ---------------------------------------------------------------------------------------------
// Pure: mount choice, pod cgroup names, container cgroup names.

#[test]
fn the_mount_is_the_cgroup2_mount_that_holds_the_root_not_the_first() {
    let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
proc /proc proc rw 0 0
cgroup2 /host/sys/fs/cgroup cgroup2 rw,nosuid 0 0
cgroup2 /mnt/with\\040space cgroup2 rw 0 0
";
    let all = cgroup2_mounts(mounts);
    assert_eq!(
        all,
        [
            PathBuf::from("/sys/fs/cgroup/unified"),
            PathBuf::from("/host/sys/fs/cgroup"),
            PathBuf::from("/mnt/with space"),
        ]
    );
    let holding = |holder: &'static str| {
        move |mount: &Path| (mount == Path::new(holder)).then(|| mount.join("kubepods.slice"))
    };
    assert_eq!(
        choose_mount(&all, holding("/host/sys/fs/cgroup")),
        Some((
            PathBuf::from("/host/sys/fs/cgroup"),
            PathBuf::from("/host/sys/fs/cgroup/kubepods.slice")
        ))
    );
    assert_eq!(
        choose_mount(&all, holding("/mnt/with space")).map(|(m, _)| m),
        Some(PathBuf::from("/mnt/with space"))
    );
    assert_eq!(choose_mount(&all, |_| None), None);
    // Every mount holding it: the first.
    assert_eq!(
        choose_mount(&all, |m| Some(m.join("kubepods"))).map(|(m, _)| m),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    assert!(matches!(
        KubepodsRoot::detect_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n", None),
        Err(DiscoveryError::NoCgroup2 { .. })
    ));
}

#[test]
fn pod_cgroup_paths_for_both_drivers_and_every_qos_class() {
    let mount = Path::new("/sys/fs/cgroup");
    let cases = [
        (
            "kubepods.slice",
            QosClass::Burstable,
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
        ),
        (
            "kubepods.slice",
            QosClass::BestEffort,
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
        ),
        (
            "kubepods.slice",
            QosClass::Guaranteed,
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
        ),
        (
            "kubelet.slice/kubelet-kubepods.slice",
            QosClass::Burstable,
            format!(
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice"
            ),
        ),
        (
            "kubelet.slice/kubelet-kubepods.slice",
            QosClass::Guaranteed,
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
        ),
        (
            "kubepods",
            QosClass::Burstable,
            format!("kubepods/burstable/pod{UID}"),
        ),
        (
            "kubepods",
            QosClass::BestEffort,
            format!("kubepods/besteffort/pod{UID}"),
        ),
        (
            "kubepods",
            QosClass::Guaranteed,
            format!("kubepods/pod{UID}"),
        ),
        (
            "kubelet/kubepods",
            QosClass::BestEffort,
            format!("kubelet/kubepods/besteffort/pod{UID}"),
        ),
    ];
    for (root, qos, expected) in cases {
        let root = KubepodsRoot::at(mount, &mount.join(root)).expect("root");
        assert_eq!(
            root.pod_cgroup_path(UID, qos).expect("path"),
            mount.join(&expected),
            "{root:?} {qos:?}"
        );
    }
    let root = KubepodsRoot::at(mount, &mount.join("kubepods.slice")).expect("root");
    assert_eq!(root.driver(), CgroupDriver::Systemd);
    for bad in ["", "../../etc", "pod/x", "0f6a.slice"] {
        assert!(
            matches!(
                root.pod_cgroup_path(bad, QosClass::Burstable),
                Err(DiscoveryError::InvalidUid { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        KubepodsRoot::at(mount, Path::new("/elsewhere/kubepods")),
        Err(DiscoveryError::BadRoot { .. })
    ));
    assert_eq!(QosClass::from_api("BestEffort"), Some(QosClass::BestEffort));
    assert_eq!(QosClass::from_api("besteffort"), None);
}

#[test]
fn container_cgroup_names() {
    let cases = [
        (
            format!("cri-containerd-{ID}.scope"),
            Entry::Container(Runtime::Containerd, ID),
        ),
        (
            format!("crio-{ID}.scope"),
            Entry::Container(Runtime::CriO, ID),
        ),
        (format!("crio-conmon-{ID}.scope"), Entry::Conmon),
        (
            format!("docker-{ID}.scope"),
            Entry::Container(Runtime::CriDockerd, ID),
        ),
        (ID.to_string(), Entry::Container(Runtime::Unnamed, ID)),
        (format!("crio-{ID}"), Entry::Container(Runtime::CriO, ID)),
        (format!("crio-conmon-{ID}"), Entry::Conmon),
        ("init.scope".to_string(), Entry::Other),
        ("cri-containerd-.scope".to_string(), Entry::Other),
        ("cri-containerd-xyz.scope".to_string(), Entry::Other),
        ("cgroup.procs".to_string(), Entry::Other),
    ];
    for (name, expected) in &cases {
        assert_eq!(&cgroup::entry(name), expected, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel: real cgroups, real processes, real network namespaces.

/// The cgroup2 mount the test builds in; a clear failure without root or cgroup v2.
fn cgroup2() -> PathBuf {
    assert!(
        nix::unistd::geteuid().is_root(),
        "discovery tests need root (they make cgroups and network namespaces)"
    );
    let mounts = fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    cgroup2_mounts(&mounts)
        .into_iter()
        .next()
        .expect("discovery tests need cgroup v2: mount -t cgroup2 none /sys/fs/cgroup/unified")
}

/// The test's own subtree of the cgroup2 mount, and the processes it started. Dropping it kills
/// and reaps them, then removes the cgroups deepest first (their namespaces go with them).
struct Scratch {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = cgroup2().join(format!("latch-test-discovery-{}-{n}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self {
            dir,
            children: Vec::new(),
        }
    }

    /// A cgroup at `rel` below the subtree (with its parents).
    fn cgroup(&self, rel: &str) -> PathBuf {
        let path = self.dir.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        path
    }

    /// A process in a network namespace of its own (loopback up, plus `address` on `eth0`, one
    /// end of a veth pair whose other end stays inside), moved into `cgroup`. Returns its PID
    /// once its namespace is set up.
    fn process(&mut self, cgroup: &Path, address: Option<&str>) -> u32 {
        let mut script = String::from("set -e; ip link set lo up; ");
        if let Some(address) = address {
            script.push_str(&format!(
                "ip link add eth0 type veth peer name peer0; ip addr add {address}/32 dev eth0; \
                 ip link set eth0 up; ip link set peer0 up; "
            ));
        }
        script.push_str("echo ready; exec sleep infinity");
        let mut child = Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting unshare (util-linux)");
        let stdout = child.stdout.take().expect("piped stdout");
        let pid = child.id();
        self.children.push(child);
        // The child says when its namespace is ready (no sleeping).
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the child's output");
        assert_eq!(line.trim(), "ready", "setting up the child's netns failed");
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", procs.display()));
        pid
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut dirs = Vec::new();
        let mut todo = vec![self.dir.clone()];
        while let Some(dir) = todo.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        todo.push(entry.path());
                    }
                }
            }
            dirs.push(dir);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            if let Err(e) = fs::remove_dir(&dir) {
                eprintln!("removing cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// `/proc/mounts` text naming `mounts` as cgroup2 mounts.
fn mounts_text(mounts: &[&Path]) -> String {
    mounts
        .iter()
        .map(|m| format!("cgroup2 {} cgroup2 rw,relatime 0 0\n", m.display()))
        .collect()
}

fn netns_id_of(pid: u32) -> NetnsId {
    let file = fs::File::open(format!("/proc/{pid}/ns/net")).expect("the child's netns");
    NetnsId::of(&file).expect("fstat")
}

#[test]
fn detection_finds_the_root_under_the_mount_that_holds_it() {
    let scratch = Scratch::new();
    let empty = scratch.cgroup("empty");
    let systemd = scratch.cgroup("systemd");
    scratch.cgroup("systemd/kubepods.slice");
    let cgroupfs = scratch.cgroup("cgroupfs");
    scratch.cgroup("cgroupfs/kubepods");
    let kind = scratch.cgroup("kind");
    scratch.cgroup("kind/system.slice");
    scratch.cgroup("kind/kubelet.slice/kubelet-kubepods.slice");
    let kind_fs = scratch.cgroup("kind-cgroupfs");
    scratch.cgroup("kind-cgroupfs/kubelet/kubepods");

    let cases = [
        (&systemd, "kubepods.slice", CgroupDriver::Systemd),
        (&cgroupfs, "kubepods", CgroupDriver::Cgroupfs),
        (
            &kind,
            "kubelet.slice/kubelet-kubepods.slice",
            CgroupDriver::Systemd,
        ),
        (&kind_fs, "kubelet/kubepods", CgroupDriver::Cgroupfs),
    ];
    for (mount, root, driver) in cases {
        let found = KubepodsRoot::detect_in(&mounts_text(&[&empty, mount]), None)
            .unwrap_or_else(|e| panic!("{}: {e}", mount.display()));
        assert_eq!(found.mount(), mount.as_path());
        assert_eq!(found.path(), mount.join(root));
        assert_eq!(found.driver(), driver);
    }

    // Configured: a cgroup path, looked up under each mount; or a directory.
    let found = KubepodsRoot::detect_in(
        &mounts_text(&[&systemd, &kind]),
        Some(Path::new("/kubelet.slice/kubelet-kubepods.slice")),
    )
    .expect("configured cgroup path");
    assert_eq!(found.mount(), kind.as_path());
    let configured = cgroupfs.join("kubepods");
    let found = KubepodsRoot::detect_in(&mounts_text(&[&systemd, &cgroupfs]), Some(&configured))
        .expect("configured directory");
    assert_eq!(found.path(), configured);
    assert_eq!(found.driver(), CgroupDriver::Cgroupfs);

    match KubepodsRoot::detect_in(&mounts_text(&[&empty]), None) {
        Err(DiscoveryError::NoKubepodsRoot { looked_at }) => {
            assert!(
                looked_at.contains(&empty.join("kubepods.slice")),
                "{looked_at:?}"
            );
        }
        other => panic!("expected NoKubepodsRoot, got {other:?}"),
    }
}

/// One pod per driver, QoS class and runtime, each with a process in a netns of its own that
/// holds the pod's IP: found through the container cgroup, the right process and namespace.
#[test]
fn every_driver_qos_class_and_runtime_leads_to_the_pods_netns() {
    let mut scratch = Scratch::new();
    let systemd = scratch.cgroup("systemd");
    let cgroupfs = scratch.cgroup("cgroupfs");
    let systemd_pods = [
        (
            QosClass::Burstable,
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
        ),
        (
            QosClass::BestEffort,
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
        ),
        (
            QosClass::Guaranteed,
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
        ),
    ];
    let systemd_containers = [
        (format!("cri-containerd-{ID}.scope"), Runtime::Containerd),
        (format!("crio-{ID}.scope"), Runtime::CriO),
        (format!("docker-{ID}.scope"), Runtime::CriDockerd),
    ];
    let cgroupfs_pods = [
        (QosClass::Burstable, format!("kubepods/burstable/pod{UID}")),
        (
            QosClass::BestEffort,
            format!("kubepods/besteffort/pod{UID}"),
        ),
        (QosClass::Guaranteed, format!("kubepods/pod{UID}")),
    ];
    let cgroupfs_containers = [
        (ID.to_string(), Runtime::Unnamed),
        (format!("crio-{ID}"), Runtime::CriO),
    ];
    let mut cases = Vec::new();
    for (mount, pods, containers) in [
        (&systemd, &systemd_pods, &systemd_containers[..]),
        (&cgroupfs, &cgroupfs_pods, &cgroupfs_containers[..]),
    ] {
        for (qos, pod) in pods {
            for (container, runtime) in containers {
                cases.push((
                    mount.clone(),
                    *qos,
                    pod.clone(),
                    container.clone(),
                    *runtime,
                ));
            }
        }
    }

    for (n, (mount, qos, pod, container, runtime)) in cases.into_iter().enumerate() {
        let what = format!("{pod}/{container}");
        let address = format!("10.244.250.{}", 10 + n);
        let pod_dir = mount.join(&pod);
        let container_dir = pod_dir.join(&container);
        fs::create_dir_all(&container_dir).expect("container cgroup");
        if runtime == Runtime::CriO {
            // conmon's cgroup next to the container's: never listed.
            fs::create_dir_all(pod_dir.join(container.replace("crio-", "crio-conmon-")))
                .expect("conmon cgroup");
        }
        let pid = scratch.process(&container_dir, Some(&address));

        let root = KubepodsRoot::detect_in(&mounts_text(&[&mount]), None).expect("root");
        let found_pod = root.pod_cgroup(UID, qos).expect(&what);
        assert_eq!(found_pod.path, pod_dir, "{what}");
        assert_eq!(
            found_pod.containers().expect("containers"),
            [ContainerCgroup {
                id: ID.into(),
                runtime,
                path: container_dir.clone(),
            }],
            "{what}"
        );
        let netns = pod_netns(&found_pod, &[ip("fd00:10:244::1"), ip(&address)])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(netns.pid, pid, "{what}");
        assert_eq!(netns.id, netns_id_of(pid), "{what}");
        assert_eq!(NetnsId::of(&netns.netns).expect("fstat"), netns.id);
        assert_eq!(netns.ip, ip(&address), "{what}");
        assert_eq!(netns.container.path, container_dir, "{what}");

        // The next case reuses the mount: this pod's cgroups go (its process first).
        let mut child = scratch.children.pop().expect("the child");
        child.kill().expect("kill");
        child.wait().expect("reap");
        fs::remove_dir(&container_dir).expect("rmdir container");
        for dir in fs::read_dir(&pod_dir).expect("pod dir").flatten() {
            if dir.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir(dir.path()).expect("rmdir conmon");
            }
        }
        fs::remove_dir(&pod_dir).expect("rmdir pod");
    }
}

/// A kubelet layout at `scratch/<name>` with pod `UID` (Burstable, systemd) and an empty
/// containerd container cgroup; returns the pod and the container cgroup.
fn systemd_pod(scratch: &Scratch, name: &str) -> (PodCgroup, PathBuf) {
    let pod = scratch.cgroup(&format!(
        "{name}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    ));
    let container = pod.join(format!("cri-containerd-{ID}.scope"));
    fs::create_dir(&container).expect("container cgroup");
    let mount = scratch.dir.join(name);
    let root = KubepodsRoot::detect_in(&mounts_text(&[&mount]), None).expect("root");
    let found = root
        .pod_cgroup(UID, QosClass::Burstable)
        .expect("pod cgroup");
    assert_eq!(found.path, pod);
    (found, container)
}

#[test]
fn a_netns_without_the_pods_ips_is_refused() {
    let mut scratch = Scratch::new();
    let (pod, container) = systemd_pod(&scratch, "m");
    let pid = scratch.process(&container, Some("10.244.250.2"));
    match pod_netns(&pod, &[ip("10.244.250.3")]) {
        Err(e @ DiscoveryError::NetnsLacksIps { .. }) => {
            assert!(e.is_retryable());
            let text = e.to_string();
            let expected = format!(
                "pod {UID}: network namespace /proc/{pid}/ns/net holds none of the pod's IPs \
                 10.244.250.3 (it has "
            );
            assert!(text.starts_with(&expected), "{text}");
            let DiscoveryError::NetnsLacksIps {
                uid,
                path,
                found,
                checked,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(uid, UID);
            assert_eq!(path, PathBuf::from(format!("/proc/{pid}/ns/net")));
            assert!(found.contains(&ip("10.244.250.2")), "{found:?}");
            assert_eq!(checked, 1);
        }
        other => panic!("expected NetnsLacksIps, got {other:?}"),
    }
}

#[test]
fn an_empty_container_cgroup_is_no_process_yet_and_none_is_no_container() {
    let scratch = Scratch::new();
    let (pod, container) = systemd_pod(&scratch, "m");
    match pod_netns(&pod, &[ip("10.244.250.4")]) {
        Err(e @ DiscoveryError::NoProcess { .. }) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains(UID), "{e}");
            assert!(
                e.to_string().contains(&pod.path.display().to_string()),
                "{e}"
            );
        }
        other => panic!("expected NoProcess, got {other:?}"),
    }
    fs::remove_dir(&container).expect("rmdir container");
    assert!(matches!(
        pod_netns(&pod, &[ip("10.244.250.4")]),
        Err(DiscoveryError::NoContainer { .. })
    ));
    assert!(matches!(
        pod_netns(&pod, &[]),
        Err(DiscoveryError::NoPodIps { .. })
    ));
}

/// conmon holds a process in a namespace that even has the pod's IP: still not the pod's.
#[test]
fn crio_conmon_is_never_used() {
    let mut scratch = Scratch::new();
    let pod = scratch.cgroup(&format!(
        "m/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
    ));
    let container = pod.join(format!("crio-{ID}.scope"));
    let conmon = pod.join(format!("crio-conmon-{ID}.scope"));
    for dir in [&container, &conmon] {
        fs::create_dir(dir).expect("cgroup");
    }
    scratch.process(&conmon, Some("10.244.250.5"));
    let root =
        KubepodsRoot::detect_in(&mounts_text(&[&scratch.dir.join("m")]), None).expect("root");
    let pod = root.pod_cgroup(UID, QosClass::BestEffort).expect("pod");
    assert!(matches!(
        pod_netns(&pod, &[ip("10.244.250.5")]),
        Err(DiscoveryError::NoProcess { containers: 1, .. })
    ));
    // Once the container has its process, it is found through it.
    let pid = scratch.process(&container, Some("10.244.250.5"));
    assert_eq!(
        pod_netns(&pod, &[ip("10.244.250.5")]).expect("found").pid,
        pid
    );
}

#[test]
fn an_absent_pod_cgroup_is_no_pod_cgroup_yet() {
    let scratch = Scratch::new();
    let mount = scratch.cgroup("m");
    scratch.cgroup("m/kubepods");
    let root = KubepodsRoot::detect_in(&mounts_text(&[&mount]), None).expect("root");
    match root.pod_cgroup(UID, QosClass::Guaranteed) {
        Err(e @ DiscoveryError::NoPodCgroup { .. }) => {
            assert!(e.is_retryable());
            let DiscoveryError::NoPodCgroup { uid, path } = e else {
                unreachable!()
            };
            assert_eq!(uid, UID);
            assert_eq!(path, mount.join(format!("kubepods/pod{UID}")));
        }
        other => panic!("expected NoPodCgroup, got {other:?}"),
    }
}

/// A container that made cgroups of its own holds its processes below its cgroup; and the
/// namespace found stays usable through the descriptor after its process is gone.
#[test]
fn processes_below_the_container_cgroup_and_a_netns_that_outlives_them() {
    let mut scratch = Scratch::new();
    let (pod, container) = systemd_pod(&scratch, "m");
    let nested = container.join("init.scope");
    fs::create_dir(&nested).expect("nested cgroup");
    let pid = scratch.process(&nested, Some("10.244.250.6"));
    let found = pod_netns(&pod, &[ip("10.244.250.6")]).expect("found below the container");
    assert_eq!(found.pid, pid);

    let mut child = scratch.children.pop().expect("the child");
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(
        !found.path.exists(),
        "{} outlived its process",
        found.path.display()
    );
    assert_eq!(NetnsId::of(&found.netns).expect("fstat"), found.id);
    assert!(
        addresses(&found.netns)
            .expect("addresses")
            .contains(&ip("10.244.250.6"))
    );
    assert!(matches!(
        pod_netns(&pod, &[ip("10.244.250.6")]),
        Err(DiscoveryError::NoProcess { .. })
    ));
}
