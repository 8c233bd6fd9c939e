//! Connecting from inside a pod: runs `latch-probe connect` in the pod's netns (and cgroup) and
//! parses the one JSON line it prints.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

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
    /// With `--fail-first`: the errno of the socket's first `connect()`.
    #[serde(default)]
    pub first_errno: Option<i32>,
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
    run(netns, cgroup, &["--to", &to.to_string()], send)
}

/// One connection from the address `from` (which the namespace must hold), giving up after
/// `timeout` (a connection that is never answered fails then).
pub fn connect_from(
    netns: &Path,
    cgroup: Option<&Path>,
    from: IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<ProbeResult> {
    connect_from_port(netns, cgroup, SocketAddr::new(from, 0), to, timeout)
}

/// [`connect_from`] from a chosen port too (`SO_REUSEADDR`, so a four-tuple of an earlier
/// connection can be used again).
pub fn connect_from_port(
    netns: &Path,
    cgroup: Option<&Path>,
    from: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<ProbeResult> {
    let timeout = timeout.as_millis().to_string();
    let args = [
        "--to",
        &to.to_string(),
        "--from",
        &from.to_string(),
        "--timeout-ms",
        &timeout,
    ];
    run(netns, cgroup, &args, Some("spoofed"))
}

/// One connection to `to` from a socket whose first `connect()`, to `first` (an IPv4-mapped
/// address from an IPv6-only socket), failed after the connect programs ran and before any SYN.
pub fn connect_after_failure(
    netns: &Path,
    cgroup: Option<&Path>,
    first: SocketAddr,
    to: SocketAddr,
    send: &str,
) -> anyhow::Result<ProbeResult> {
    let args = ["--to", &to.to_string(), "--fail-first", &first.to_string()];
    run(netns, cgroup, &args, Some(send))
}

/// One connection made by TCP Fast Open (`latch-probe connect --fast-open`): `sendto()` with
/// `MSG_FASTOPEN` carries `send`, with no `connect()` call.
pub fn connect_fast_open(
    netns: &Path,
    cgroup: Option<&Path>,
    to: SocketAddr,
    send: &str,
) -> anyhow::Result<ProbeResult> {
    run(
        netns,
        cgroup,
        &["--to", &to.to_string(), "--fast-open"],
        Some(send),
    )
}

fn run(
    netns: &Path,
    cgroup: Option<&Path>,
    args: &[&str],
    send: Option<&str>,
) -> anyhow::Result<ProbeResult> {
    let mut cmd = Command::new(env::probe_bin()?);
    cmd.arg("connect").args(args);
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
