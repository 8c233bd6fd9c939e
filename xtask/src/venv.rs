//! Python virtualenvs under `target/` for what `cargo xtask test` takes from PyPI: the manifests'
//! validator (`kubernetes-validate`, `target/manifests/venv`) and the interop tests' HBONE peer
//! (`h2`, `target/interop/venv`). Each is made with `python3 -m venv` (python3-venv installed
//! with apt-get where missing) and gets one pinned package from pip.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::{self, root, step};

/// The `h2` release the interop tests' Python HBONE peer is written against.
const H2: &str = "4.4.1";

/// Make the virtualenv `venv` afresh and install `requirement` (`name==version`) into it.
pub fn install(venv: &Path, requirement: &str) -> anyhow::Result<()> {
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut make_venv = Command::new("python3");
    make_venv.args(["-m", "venv", "--clear"]).arg(venv);
    if cmd::run(&mut make_venv).is_err() {
        println!("    python3 cannot make a virtualenv: installing python3-venv with apt-get");
        let _ = cmd::run(Command::new("apt-get").arg("update"));
        cmd::run(Command::new("apt-get").args(["install", "-y", "python3-venv"]))?;
        cmd::run(&mut make_venv)?;
    }
    cmd::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(requirement),
    )
}

/// The Python of `target/interop/venv`, with PyPI's `h2` at [`H2`] (installed if missing or
/// another version), for `tests/python/hbone_peer.py`.
pub fn python_h2() -> anyhow::Result<PathBuf> {
    step(&format!(
        "setup: Python's h2 {H2}, for the HBONE interop tests"
    ));
    let venv = root().join("target").join("interop").join("venv");
    let python = venv.join("bin").join("python");
    let found =
        cmd::stdout_of(Command::new(&python).args(["-c", "import h2; print(h2.__version__)"]));
    if found.as_deref().map(str::trim) == Some(H2) {
        println!("    ok: h2 {H2} in target/interop/venv");
        return Ok(python);
    }
    println!(
        "    h2 {H2} is missing: installing it from PyPI into {}",
        venv.display()
    );
    install(&venv, &format!("h2=={H2}"))?;
    Ok(python)
}
