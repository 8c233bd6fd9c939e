//! `cargo xtask setup`: the nightly's `rust-src`, a `bpf-linker` built for the nightly's LLVM, and
//! the kernel features Latch and its tests need. Idempotent: what is there is only checked.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd::{self, step};

/// bpf-linker releases that load a given LLVM major version from the Rust nightly.
const BPF_LINKER_FOR_LLVM: &[(u32, &str)] = &[(22, "0.10.4")];

pub fn toolchain() -> anyhow::Result<()> {
    step("setup: eBPF toolchain");
    let installed =
        cmd::stdout_of(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        println!("    no nightly toolchain: installing it (minimal profile, with rust-src)");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = cmd::stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("    ok: nightly has rust-src");
    } else {
        println!(
            "    nightly lacks rust-src (needed to build core for bpfel-unknown-none): adding it"
        );
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let version = cmd::stdout_of(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("running `rustc +nightly -vV`")?;
    let llvm_major =
        llvm_major(&version).context("no `LLVM version:` line in `rustc +nightly -vV`")?;
    let Some((_, linker)) = BPF_LINKER_FOR_LLVM
        .iter()
        .find(|(major, _)| *major == llvm_major)
    else {
        bail!(
            "the nightly uses LLVM {llvm_major}; Latch knows a matching bpf-linker only for LLVM {} \
             (bpf-linker 0.10.4 loads the nightly's LLVM 22). Install a nightly with LLVM 22, or add \
             the bpf-linker release for LLVM {llvm_major} to xtask/src/setup.rs",
            BPF_LINKER_FOR_LLVM
                .iter()
                .map(|(m, _)| m.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let current = cmd::stdout_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.split_whitespace().any(|w| w == *linker) {
        println!("    ok: bpf-linker {linker} (for the nightly's LLVM {llvm_major})");
    } else {
        println!(
            "    installing bpf-linker {linker} for the nightly's LLVM {llvm_major} (found: {}); this takes about a minute",
            if current.trim().is_empty() {
                "none"
            } else {
                current.trim()
            }
        );
        cmd::run(
            Command::new("cargo")
                .args(["install", &format!("bpf-linker@{linker}"), "--locked"])
                .env_remove("RUSTUP_TOOLCHAIN"),
        )?;
        let after = cmd::stdout_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
        if !after.split_whitespace().any(|w| w == *linker) {
            bail!(
                "bpf-linker {linker} was installed but `bpf-linker --version` says {after:?}; is ~/.cargo/bin on PATH?"
            );
        }
    }
    Ok(())
}

/// cargo-fuzz (the `cargo fuzz` subcommand), for `cargo xtask fuzz`.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    step("setup: cargo-fuzz");
    let found = cmd::stdout_of(Command::new("cargo").args(["fuzz", "--version"]));
    if let Some(version) = found {
        println!("    ok: {}", version.trim());
        return Ok(());
    }
    println!("    cargo-fuzz is missing: installing it with `cargo install cargo-fuzz --locked`");
    cmd::run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

/// Kernel and host checks for running agents and kernel tests.
pub fn kernel() -> anyhow::Result<()> {
    step("setup: kernel and host");
    let mut missing = Vec::new();

    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
            })
        });
    report(
        &mut missing,
        uid.as_deref() == Some("0"),
        "running as root",
        "run as root (sudo -E cargo xtask ...)",
    );

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    report(
        &mut missing,
        (major, minor) >= (6, 6),
        &format!(
            "kernel {} (6.6 or newer: TCX links, for anti-spoofing)",
            release.trim()
        ),
        "use a Linux 6.6+ kernel",
    );
    report(
        &mut missing,
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "kernel BTF (/sys/kernel/btf/vmlinux)",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF",
    );

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup2 = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].to_owned())
    });
    report(
        &mut missing,
        cgroup2.is_some(),
        &format!(
            "cgroup v2 mounted{}",
            cgroup2
                .as_deref()
                .map(|m| format!(" at {m}"))
                .unwrap_or_default()
        ),
        "mount it: mount -t cgroup2 none /sys/fs/cgroup/unified",
    );

    let bpffs = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    if !bpffs {
        println!("    bpffs is not mounted: mounting it at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        let _ = cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    report(
        &mut missing,
        bpffs,
        "bpffs mounted",
        "mount it: mount -t bpf bpf /sys/fs/bpf",
    );

    for (tool, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        let mut found = cmd::capture(Command::new(tool).arg("-V")).is_some();
        if !found {
            println!("    {tool} is missing: installing {package} with apt-get");
            let _ = cmd::run(Command::new("apt-get").arg("update"));
            let _ = cmd::run(Command::new("apt-get").args(["install", "-y", package]));
            found = cmd::capture(Command::new(tool).arg("-V")).is_some();
        }
        report(
            &mut missing,
            found,
            &format!("`{tool}` ({package})"),
            &format!("apt-get install {package}"),
        );
    }

    if !missing.is_empty() {
        bail!(
            "setup found missing requirements:\n  - {}",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

/// What a first `cargo xtask test` of a fresh clone leaves under `target/` and
/// `bench/tls-providers/target/`, in GiB, rounded up (4.4 with `CI` set, 2026-12-04).
const TEST_NEEDS_GIB: u64 = 5;

/// Say how much disk the build has: a full disk shows up as a compiler or linker crash (the
/// linker dies of SIGBUS when the file it maps cannot grow), which names no cause.
pub fn disk() {
    let target = cmd::root().join("target");
    let at = if target.exists() { target } else { cmd::root() };
    let free = cmd::stdout_of(Command::new("df").args(["--output=avail", "-B1"]).arg(&at))
        .and_then(|out| {
            out.lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<u64>().ok())
        });
    let Some(free) = free else {
        println!("    could not read the free disk space of {}", at.display());
        return;
    };
    let gib = free / (1 << 30);
    if gib >= TEST_NEEDS_GIB {
        println!(
            "    ok: {gib} GiB free for target/ (a fresh clone's test run takes about {TEST_NEEDS_GIB})"
        );
    } else {
        println!(
            "    LOW DISK: {gib} GiB free for target/, and a fresh clone's test run takes about \
             {TEST_NEEDS_GIB}: if the disk fills, the compiler or the linker crashes (SIGBUS) \
             without saying why"
        );
    }
}

fn report(missing: &mut Vec<String>, ok: bool, what: &str, fix: &str) {
    if ok {
        println!("    ok: {what}");
    } else {
        println!("    MISSING: {what} — {fix}");
        missing.push(format!("{what}: {fix}"));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_llvm_major() {
        let vv = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(super::llvm_major(vv), Some(22));
        assert_eq!(super::llvm_major("rustc 1.0"), None);
    }
}
