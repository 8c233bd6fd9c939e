//! Facts about the machine the tests depend on, checked up front so that a missing capability is
//! a clear failure and never a silent skip; and where the binaries under test are.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The cgroup v2 mount point, from `/proc/mounts`.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 filesystem mounted (see /proc/mounts)")
}

/// Root, cgroup v2, bpffs (mounted here if absent), `ip`. Errors say what is missing and how to
/// fix it; kernel tests call this first and fail on error (they never skip).
pub fn require_kernel_features() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("kernel tests need root (run `cargo xtask test` as root)");
    }
    cgroup2_mount()
        .context("kernel tests need cgroup v2: mount -t cgroup2 none /sys/fs/cgroup/unified")?;
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("kernel tests need bpffs: mount -t bpf bpf /sys/fs/bpf")?;
    }
    let ip = std::process::Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        bail!("kernel tests need `ip` from iproute2 (apt-get install iproute2)");
    }
    Ok(())
}

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
}

fn binary(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        if path.exists() {
            return Ok(path);
        }
        bail!("{var}={} does not exist", path.display());
    }
    // Next to the running executable (target/<profile>/deps/.. or target/<profile>/).
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    for profile in ["debug", "release"] {
        let candidate = workspace_target().join(profile).join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!("cannot find the `{name}` binary: build it (cargo xtask build) or set {var}")
}

/// The agent binary (`LATCH_BIN`, else `target/<profile>/latch`).
pub fn latch_bin() -> anyhow::Result<PathBuf> {
    binary("LATCH_BIN", "latch")
}

/// The probe binary (`LATCH_PROBE`, else `target/<profile>/latch-probe`).
pub fn probe_bin() -> anyhow::Result<PathBuf> {
    binary("LATCH_PROBE", "latch-probe")
}

/// Replace `path` with `contents` in one step, as an editor or a Kubernetes ConfigMap does: the
/// text is written to a file outside the watched directory (on the same filesystem, the
/// system's temporary directory that holds every test's files) and renamed into place, so an
/// agent that looks at `path` at any moment reads the old file or the new one, never half of it.
pub fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let staging = std::env::temp_dir().join(format!(
        ".latch-staging-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&staging, contents).with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, path)
        .with_context(|| format!("moving {} to {}", staging.display(), path.display()))
}

/// Run the `latch` command under test with `args`: its exit code and its stdout and stderr
/// together.
pub fn run_latch(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(latch_bin()?)
        .args(args)
        .output()
        .context("running latch")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}
