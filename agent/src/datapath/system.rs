//! Host facts the datapath depends on: bpffs, the cgroup v2 mount, cgroup ids and levels, the
//! boot clock the kernel programs compare expiries against, and network-namespace cookies.

use std::{
    fs,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::Duration,
};

use super::error::DatapathError;

/// Make sure `dir` lives on a bpffs, mounting one at `/sys/fs/bpf` if none is there.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !is_bpffs(root) {
        fs::create_dir_all(root).map_err(|e| DatapathError::io("creating", root, e))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::System(format!("mounting bpffs at {}: {e}", root.display())))?;
        tracing::info!(path = %root.display(), "mounted bpffs");
    }
    fs::create_dir_all(dir).map_err(|e| DatapathError::io("creating pin directory", dir, e))?;
    if !is_bpffs(dir) {
        return Err(DatapathError::System(format!(
            "bpfPinDir {} is not on a bpf filesystem (mount one with `mount -t bpf bpf {}`)",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| DatapathError::io("reading", "/proc/mounts", e))?;
    parse_cgroup2_mount(&mounts).ok_or_else(|| {
        DatapathError::System(
            "no cgroup2 filesystem in /proc/mounts (mount one with `mount -t cgroup2 none /sys/fs/cgroup`)"
                .into(),
        )
    })
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    cgroup2_mounts(mounts).into_iter().next()
}

/// Every cgroup2 mount point in `mounts` (the text of `/proc/mounts`), in order.
pub fn cgroup2_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, mount_point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
        })
        .collect()
}

/// `/proc/mounts` escapes spaces and a few other bytes as `\ooo` octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &raw[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of a cgroup directory (its inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
    let meta = fs::metadata(path).map_err(|e| DatapathError::io("reading cgroup", path, e))?;
    if !meta.is_dir() {
        return Err(DatapathError::System(format!(
            "cgroup {} is not a directory",
            path.display()
        )));
    }
    Ok(meta.ino())
}

/// The level of a cgroup in the v2 hierarchy (the root is level 0), checking that it is inside
/// the cgroup v2 mount.
pub fn cgroup_level(path: &Path) -> Result<u32, DatapathError> {
    let mount = cgroup2_mount()?;
    let canonical =
        fs::canonicalize(path).map_err(|e| DatapathError::io("resolving cgroupRoot", path, e))?;
    let rel = canonical.strip_prefix(&mount).map_err(|_| {
        DatapathError::System(format!(
            "cgroupRoot {} is not inside the cgroup v2 mount {}",
            path.display(),
            mount.display()
        ))
    })?;
    Ok(rel.components().count() as u32)
}

/// Nanoseconds of `CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns`.
pub fn now_boot_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // CLOCK_BOOTTIME exists on every kernel Latch supports; an expired time is the safe answer.
        Err(_) => 0,
    }
}

/// The boot-clock time `ttl` from now.
pub fn boot_ns_after(ttl: Duration) -> u64 {
    now_boot_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}

/// The cookie of the network namespace a socket lives in (`SO_NETNS_COOKIE`).
pub fn netns_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = now_boot_ns();
        let b = boot_ns_after(Duration::from_secs(5));
        assert!(a > 0);
        assert!(b >= a + 5_000_000_000);
    }
}
