//! Connecting from inside a pod: runs `latch-probe connect` in the pod's netns (and cgroup) and
//! parses the one JSON line it prints.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{env, netns};

/// What `latch-probe connect` observed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ProbeResult {
    /// `connect()` succeeded.
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// `getpeername()` after connecting.
    pub peer: Option<String>,
    /// `getsockname()` after connecting.
    pub local: Option<String>,
    /// What came back after sending and half-closing.
    pub echo: Option<String>,
    /// The exchange ended with a reset.
    pub reset: bool,
    pub elapsed_ms: f64,
}

impl ProbeResult {
    pub fn eperm(&self) -> bool {
        self.errno == Some(libc::EPERM)
    }

    pub fn refused(&self) -> bool {
        self.errno == Some(libc::ECONNREFUSED)
    }
}

pub fn connect(
    netns: &Path,
    cgroup: Option<&Path>,
    to: SocketAddr,
    send: Option<&str>,
) -> anyhow::Result<ProbeResult> {
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.args(["connect", "--to", &to.to_string()]);
    if let Some(text) = send {
        cmd.args(["--send", text]);
    }
    netns::enter(&mut cmd, netns, cgroup)?;
    let out = cmd.output().context("running latch-probe")?;
    if !out.status.success() {
        bail!(
            "latch-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing latch-probe output {stdout:?}"))
}
