//! Network namespaces: create and delete them (`ip netns`), run a closure on a thread inside one
//! (for sockets, which keep the namespace they were created in), and start processes inside one
//! and, optionally, inside a cgroup — without `ip netns exec`, which remounts `/sys` and would
//! hide the cgroup2 and bpffs mounts.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Run a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` inside namespace `ns` (`ip -n`).
pub fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

pub fn create(name: &str) -> anyhow::Result<()> {
    sh(Command::new("ip").args(["netns", "add", name]))?;
    // No duplicate address detection: addresses (link-local ones included) are usable at once.
    for scope in ["all", "default"] {
        sysctl(
            &path(name),
            &format!("net/ipv6/conf/{scope}/accept_dad"),
            "0",
        )?;
    }
    ip(name, &["link", "set", "lo", "up"])
}

pub fn delete(name: &str) -> anyhow::Result<()> {
    sh(Command::new("ip").args(["netns", "del", name])).map(drop)
}

/// Run `f` on a new thread that has entered the namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let name = netns.display().to_string();
    std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {name}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
}

/// Write a sysctl of the namespace (e.g. `net/ipv4/ip_forward`).
pub fn sysctl(netns: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let key = key.to_owned();
    let value = value.to_owned();
    in_netns(netns, move || {
        let path = Path::new("/proc/sys").join(&key);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Make `cmd` start inside `netns` and, if given, inside `cgroup`.
// `CommandExt::pre_exec` is unsafe: the closure runs between fork and exec.
#[allow(unsafe_code)]
pub fn enter(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) -> anyhow::Result<()> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs = match cgroup {
        Some(cg) => Some(
            File::options()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?,
        ),
        None => None,
    };
    // SAFETY: the closure only makes async-signal-safe system calls (setns, write) on fds opened
    // before fork; the files are moved into it and stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                let zero = b"0";
                if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), zero.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}
