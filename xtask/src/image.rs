//! `cargo xtask image`: the agent as an OCI image, `latch:dev`, made without a container daemon
//! and without pulling anything from a registry. The image is the `latch` binary at `/latch`
//! (its entry point) and the shared libraries `ldd` names for it, the dynamic loader included,
//! at the paths `ldd` gives: no base image, no shell. umoci writes it to the OCI layout
//! `target/image/latch` (tag `dev`); skopeo then copies it into podman's local storage (where
//! podman is installed) and into `target/image/latch-dev.tar`, a docker-archive that
//! `kind load image-archive` and `ctr -n k8s.io images import` take.
//!
//! `cargo xtask test` (and `cargo xtask image --check`) makes the same image from the debug build
//! (tag `test`, so that it never replaces a release `latch:dev`), loads it into podman for the
//! run only and runs it without network: `latch --version` and `latch policy check` on policy
//! files mounted from the repository, which must answer as the binary it was made from does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, relative, root, step};

/// The layout (under `target/image/`) and the image's name in podman's storage.
const NAME: &str = "latch";

fn image_dir() -> PathBuf {
    root().join("target").join("image")
}

fn layout() -> PathBuf {
    image_dir().join(NAME)
}

/// `cargo xtask image`: `latch:dev` from the release build.
pub fn release() -> anyhow::Result<()> {
    tools(&[("umoci", "umoci"), ("skopeo", "skopeo")])?;
    let reference = build("release", "dev")?;
    let archive = image_dir().join(format!("{NAME}-dev.tar"));
    let _ = std::fs::remove_file(&archive);
    step("image: copies for Kubernetes nodes and for podman");
    cmd::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{reference}"),
        &format!("docker-archive:{}:{NAME}:dev", archive.display()),
    ]))?;
    if cmd::capture(Command::new("podman").arg("--version")).is_some() {
        load("dev", &format!("localhost/{NAME}:dev"))?;
    } else {
        println!("    podman is not installed: not loading the image into its storage");
    }
    println!(
        "\nxtask image: {NAME}:dev is in the OCI layout {} (tag dev){}, and in {} for \
         `kind load image-archive` or `ctr -n k8s.io images import`",
        relative(&layout()),
        if cmd::capture(Command::new("podman").arg("--version")).is_some() {
            " and podman's storage (localhost/latch:dev)"
        } else {
            ""
        },
        relative(&archive)
    );
    Ok(())
}

/// The check `cargo xtask test` runs: `latch:test` from the debug build, run with podman.
pub fn test() -> anyhow::Result<()> {
    tools(&[
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("podman", "podman"),
        ("runc", "runc"),
    ])?;
    let started = std::time::Instant::now();
    build("debug", "test")?;
    // Podman's storage is the machine's: each run loads the image under a name of its own, so
    // that runs in other work trees do not replace it under this one, and removes it after.
    let name = format!("localhost/{NAME}:test-{}", std::process::id());
    load("test", &name)?;
    step(&format!(
        "image: {name} run by podman without network: --version, policy check"
    ));
    let result = checks(&name);
    let removed = cmd::capture(Command::new("podman").args(["rmi", &name]));
    if !removed.is_some_and(|o| o.status.success()) {
        println!("    could not remove {name} from podman's storage (podman rmi {name})");
    }
    result?;
    println!(
        "    image check took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `latch --version` and `latch policy check` in the image `name`, against the host's binary.
fn checks(name: &str) -> anyhow::Result<()> {
    let host = cmd::stdout_of(Command::new(root().join("target/debug/latch")).arg("--version"))
        .context("running target/debug/latch --version")?;
    let (ok, out) = podman_run(name, &[], &["--version"])?;
    if !ok || out.trim() != host.trim() {
        bail!(
            "`latch --version` in the image printed {:?} (succeeded: {ok}); the binary it was \
             made from prints {:?}",
            out.trim(),
            host.trim()
        );
    }
    println!("    ok: latch --version in the image: {}", out.trim());

    // Policy files from the repository, mounted read-only, one valid and one full of mistakes:
    // the image must say what the binary it was made from says of them, and exit the same.
    let policies = root().join("fuzz/seeds/policy");
    let mount = format!("{}:/policies:ro", policies.display());
    for (file, valid) in [("latch-demo-1477e38b.yaml", true), ("errors.yaml", false)] {
        let on_host = policies.join(file);
        let host = Command::new(root().join("target/debug/latch"))
            .args(["policy", "check"])
            .arg(&on_host)
            .output()
            .context("running target/debug/latch policy check")?;
        let mut expected = String::from_utf8_lossy(&host.stdout).into_owned();
        expected.push_str(&String::from_utf8_lossy(&host.stderr));
        let expected =
            expected.replace(&on_host.display().to_string(), &format!("/policies/{file}"));
        let in_image = format!("/policies/{file}");
        let (ok, out) = podman_run(name, &["--volume", &mount], &["policy", "check", &in_image])?;
        if ok != valid || host.status.success() != valid || out != expected {
            bail!(
                "`latch policy check {in_image}` in the image (fuzz/seeds/policy/{file}, {}) \
                 {} and printed:\n{out}\nthe binary it was made from {} and printed:\n{expected}",
                if valid { "valid" } else { "invalid" },
                if ok { "succeeded" } else { "failed" },
                if host.status.success() {
                    "succeeded"
                } else {
                    "failed"
                },
            );
        }
        println!(
            "    ok: latch policy check on {} policy files: exit {}, the same {} line(s) as on the host",
            if valid { "valid" } else { "invalid" },
            if valid { 0 } else { 1 },
            out.lines().count()
        );
    }
    Ok(())
}

/// Install each `(tool, Debian package)` that is missing, with apt-get, saying so.
fn tools(needed: &[(&str, &str)]) -> anyhow::Result<()> {
    step("setup: image tools (umoci, skopeo; podman and runc to run it)");
    let mut updated = false;
    for (tool, package) in needed {
        if cmd::capture(Command::new(tool).arg("--version")).is_some() {
            println!("    ok: {tool}");
            continue;
        }
        println!("    {tool} is missing: installing the Debian package {package} with apt-get");
        if !updated {
            let _ = cmd::run(Command::new("apt-get").arg("update"));
            updated = true;
        }
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// Write `latch:TAG` into the layout from `target/PROFILE/latch`; return `LAYOUT:TAG`.
fn build(profile: &str, tag: &str) -> anyhow::Result<String> {
    step(&format!(
        "image: {NAME}:{tag} from target/{profile}/latch, the libraries ldd names and nothing else"
    ));
    let binary = root().join("target").join(profile).join("latch");
    if !binary.exists() {
        bail!("{} was not built", binary.display());
    }
    // An empty image, unpacked into a bundle whose rootfs is filled here and packed back as
    // the image's one layer (`umoci insert` writes layers without a tar trailer).
    let layout = layout();
    let reference = format!("{}:{tag}", layout.display());
    if layout.join("index.json").exists() {
        let tags = cmd::stdout_of(Command::new("umoci").args(["ls", "--layout"]).arg(&layout))
            .unwrap_or_default();
        if tags.lines().any(|t| t.trim() == tag) {
            cmd::run(Command::new("umoci").args(["rm", "--image", &reference]))?;
        }
    } else {
        std::fs::create_dir_all(image_dir())?;
        cmd::run(
            Command::new("umoci")
                .args(["init", "--layout"])
                .arg(&layout),
        )?;
    }
    cmd::run(Command::new("umoci").args(["new", "--image", &reference]))?;
    let bundle = image_dir().join(format!("bundle-{tag}"));
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle)
            .with_context(|| format!("removing {}", bundle.display()))?;
    }
    cmd::run(
        Command::new("umoci")
            .args(["unpack", "--image", &reference])
            .arg(&bundle),
    )?;
    let rootfs = bundle.join("rootfs");

    // Debug information is no use in the image (the symbols stay, for backtraces).
    let entry = rootfs.join("latch");
    let stripped = cmd::capture(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&binary)
            .arg(&entry),
    )
    .is_some_and(|o| o.status.success());
    if !stripped {
        std::fs::copy(&binary, &entry).with_context(|| format!("copying {}", binary.display()))?;
    }
    let ldd = Command::new("ldd")
        .arg(&binary)
        .output()
        .context("running ldd")?;
    let libraries = libraries(&String::from_utf8_lossy(&ldd.stdout))?;
    for library in &libraries {
        let inside = rootfs.join(library.strip_prefix("/").unwrap_or(library));
        if let Some(parent) = inside.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // The file a symbolic link names, copied under the link's own name.
        std::fs::copy(library, &inside)
            .with_context(|| format!("copying {}", library.display()))?;
    }
    for line in
        std::iter::once(format!("/latch ({})", size(&entry))).chain(libraries.iter().map(|l| {
            format!(
                "{} ({})",
                l.display(),
                size(&rootfs.join(l.strip_prefix("/").unwrap_or(l)))
            )
        }))
    {
        println!("    {line}");
    }

    cmd::run(
        Command::new("umoci")
            .args(["repack", "--image", &reference])
            .arg(&bundle),
    )?;
    std::fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    cmd::run(Command::new("umoci").args([
        "config",
        "--image",
        &reference,
        "--os",
        "linux",
        "--architecture",
        arch,
        "--config.entrypoint",
        "/latch",
        "--config.workingdir",
        "/",
        "--config.label",
        "org.opencontainers.image.title=latch",
        "--config.label",
        &format!(
            "org.opencontainers.image.version={}",
            env!("CARGO_PKG_VERSION")
        ),
        "--history.created_by",
        "cargo xtask image",
    ]))?;
    cmd::run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    Ok(reference)
}

/// Copy `latch:TAG` from the layout into podman's storage as `NAME` (`localhost/latch:...`).
fn load(tag: &str, name: &str) -> anyhow::Result<()> {
    // The previous build of the name goes, rather than staying behind untagged.
    if cmd::capture(Command::new("podman").args(["image", "exists", name]))
        .is_some_and(|o| o.status.success())
    {
        cmd::run(Command::new("podman").args(["rmi", name]))?;
    }
    cmd::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}:{tag}", layout().display()),
        &format!("containers-storage:{name}"),
    ]))
}

/// `podman run` of the image `name` with `args`; whether it succeeded, its stdout and stderr.
fn podman_run(name: &str, options: &[&str], args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new("podman");
    // runc, not podman's default crun: crun refuses hosts with a hybrid cgroup layout (this
    // project's VMs). podman asks for open-file and process limits above the host's by default
    // (1048576 and more), which needs CAP_SYS_RESOURCE where the host's are lower, as here: the
    // container gets xtask's own, and at most the 32768 processes podman runs conmon with.
    command.args(["--runtime", "runc", "run", "--rm", "--network=none"]);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for (name, row, most) in [
        ("nofile", "Max open files", u64::MAX),
        ("nproc", "Max processes", 32768),
    ] {
        let limit = soft_limit(&limits, row)
            .unwrap_or(most)
            .min(most)
            .min(1 << 20);
        command.args(["--ulimit", &format!("{name}={limit}:{limit}")]);
    }
    command.args(options);
    command.arg(name);
    command.args(args);
    let shown = format!("podman {}", {
        let all: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        all.join(" ")
    });
    println!("    $ {shown}");
    let output = command
        .output()
        .with_context(|| format!("running {shown}"))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

/// The soft limit of one row of `/proc/self/limits` (`Max open files  20000  20000  files`);
/// None when it is unlimited or missing.
fn soft_limit(limits: &str, row: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix(row))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// The files `ldd` says the binary loads (the loader included; not the vDSO).
fn libraries(ldd: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd: {} not found", name.trim());
                }
                rest
            }
            None => line,
        };
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            found.push(PathBuf::from(path));
        }
    }
    if found.is_empty() {
        bail!("ldd names no library (is the binary static? then nothing is needed: {ldd:?})");
    }
    Ok(found)
}

fn size(path: &Path) -> String {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             96362                96362                processes\n\
                      Max open files            20000                40000                files\n\
                      Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(super::soft_limit(limits, "Max open files"), Some(20000));
        assert_eq!(super::soft_limit(limits, "Max processes"), Some(96362));
        assert_eq!(super::soft_limit(limits, "Max locked memory"), None);
        assert_eq!(super::soft_limit(limits, "Max nice priority"), None);
    }

    #[test]
    fn reads_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd5b1f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2a)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f29)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f2a5f)\n";
        let found = super::libraries(ldd).unwrap();
        assert_eq!(
            found,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(std::path::PathBuf::from)
        );
        assert!(super::libraries("\tlibfoo.so.1 => not found\n").is_err());
        assert!(super::libraries("\tstatically linked\n").is_err());
    }
}
