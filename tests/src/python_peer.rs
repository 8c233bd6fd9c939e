//! An HBONE peer that is not Latch's code: `tests/python/hbone_peer.py` (Python's `ssl` and
//! PyPI's `h2`, installed by `cargo xtask test` into a venv under `target/interop/`) run inside a
//! pod's netns as a tunnel server or client. The test sends it JSON commands and waits for the
//! JSON events it prints (each line kept, so a test waits for an event instead of sleeping); the
//! certificates it presents are the istiod-shaped ones of `tests/testdata/interop/`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::netns;

/// The interpreter with PyPI's `h2`: `LATCH_PYTHON_H2`, else the venv `cargo xtask test` makes.
pub fn python() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LATCH_PYTHON_H2") {
        return Ok(PathBuf::from(path));
    }
    let venv = workspace().join("target/interop/venv/bin/python");
    if venv.exists() {
        return Ok(venv);
    }
    bail!(
        "no Python with PyPI's h2 for the interop tests: run `cargo xtask test` (it installs one \
         in target/interop/venv) or set LATCH_PYTHON_H2"
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/hbone_peer.py")
}

/// What a peer presents and trusts: PEM files.
#[derive(Clone, Debug)]
pub struct PeerCerts {
    /// The leaf, then the intermediate.
    pub chain: PathBuf,
    pub key: PathBuf,
    /// The trust anchors.
    pub bundle: PathBuf,
}

impl PeerCerts {
    /// The istiod-shaped SVID of `prod/<service_account>` (`frontend` or `payment`) from
    /// `tests/testdata/interop/` (see its `regenerate.sh`), trusting that hierarchy's RSA root.
    pub fn istio_shaped(service_account: &str) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/interop");
        Self {
            chain: dir.join(format!("{service_account}.pem")),
            key: dir.join(format!("{service_account}-key.pem")),
            bundle: dir.join("root.pem"),
        }
    }

    /// Write this SVID as the `files` certificate source's `<dir>/prod/<service_account>/`.
    pub fn install(&self, dir: &Path, service_account: &str) -> anyhow::Result<()> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        crate::hbone::write_svid_parts(
            dir,
            "prod",
            service_account,
            &read(&self.chain)?,
            &read(&self.key)?,
            &read(&self.bundle)?,
        )
    }
}

#[derive(Default)]
struct Events {
    lines: Vec<Value>,
    closed: bool,
}

/// A running `hbone_peer.py`.
pub struct PythonPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<(Mutex<Events>, Condvar)>,
}

/// How long a peer may take to start listening or to connect.
const START: Duration = Duration::from_secs(20);

impl PythonPeer {
    /// A tunnel server on `listen` inside `netns`, answering `CONNECT`s to the ports of
    /// `statuses` with their code and relaying the others.
    pub fn server(
        netns: &Path,
        listen: SocketAddr,
        certs: &PeerCerts,
        statuses: &[(u16, u16)],
    ) -> anyhow::Result<Self> {
        let mut args = vec!["server".to_owned(), "--listen".into(), listen.to_string()];
        for (port, code) in statuses {
            args.push("--status".into());
            args.push(format!("{port}={code}"));
        }
        let peer = Self::spawn(netns, certs, &args)?;
        peer.wait_for(0, START, |e| e["event"] == "listening")
            .context("the Python HBONE server did not start")?;
        Ok(peer)
    }

    /// A tunnel client connected to `endpoint` from inside `netns` (and no cgroup: nothing
    /// captures it), requiring the server to be `server_id`.
    pub fn client(
        netns: &Path,
        endpoint: SocketAddr,
        certs: &PeerCerts,
        server_id: &str,
    ) -> anyhow::Result<Self> {
        let args = [
            "client".to_owned(),
            "--connect".into(),
            endpoint.to_string(),
            "--server-id".into(),
            server_id.into(),
        ];
        let peer = Self::spawn(netns, certs, &args)?;
        let first = peer
            .wait_for(0, START, |e| {
                matches!(e["event"].as_str(), Some("connected" | "refused" | "error"))
            })
            .context("the Python HBONE client said nothing")?;
        if first["event"] != "connected" {
            bail!("the Python HBONE client did not connect to {endpoint}: {first}");
        }
        Ok(peer)
    }

    fn spawn(netns: &Path, certs: &PeerCerts, args: &[String]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(python()?);
        cmd.arg(script())
            .args(args)
            .arg("--cert")
            .arg(&certs.chain)
            .arg("--key")
            .arg(&certs.key)
            .arg("--ca")
            .arg(&certs.bundle)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        netns::enter(&mut cmd, netns, None)?;
        let mut child = cmd.spawn().context("starting hbone_peer.py")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("hbone_peer.py stdout")?;
        let events: Arc<(Mutex<Events>, Condvar)> = Arc::default();
        let shared = events.clone();
        std::thread::spawn(move || {
            let (lock, cvar) = &*shared;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "event": "unparsed", "line": line }));
                if let Ok(mut events) = lock.lock() {
                    events.lines.push(value);
                }
                cvar.notify_all();
            }
            if let Ok(mut events) = lock.lock() {
                events.closed = true;
            }
            cvar.notify_all();
        });
        Ok(Self {
            child,
            stdin,
            events,
        })
    }

    /// Send one command (`{"cmd": ...}`).
    pub fn send(&mut self, command: Value) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("hbone_peer.py's stdin is closed")?;
        writeln!(stdin, "{command}").context("writing to hbone_peer.py")?;
        stdin.flush().context("writing to hbone_peer.py")
    }

    /// How many events have been seen so far (to wait for one after them).
    pub fn mark(&self) -> usize {
        self.events.0.lock().map_or(0, |e| e.lines.len())
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .0
            .lock()
            .map_or_else(|_| Vec::new(), |e| e.lines.clone())
    }

    /// Wait until `n` events named `event` have been seen, at most `timeout`; returns them.
    pub fn wait_count(
        &self,
        event: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let named = |e: &&Value| e["event"] == event;
        let (lock, cvar) = &*self.events;
        let deadline = Instant::now() + timeout;
        let mut events = lock
            .lock()
            .map_err(|_| anyhow::anyhow!("event lock poisoned"))?;
        loop {
            let found: Vec<Value> = events.lines.iter().filter(named).cloned().collect();
            if found.len() >= n {
                return Ok(found);
            }
            let now = Instant::now();
            if events.closed || now >= deadline {
                bail!(
                    "{} `{event}` events, not {n}; hbone_peer.py's events: {:?}",
                    found.len(),
                    events.lines
                );
            }
            events = cvar
                .wait_timeout(events, deadline - now)
                .map(|(e, _)| e)
                .map_err(|_| anyhow::anyhow!("event lock poisoned"))?;
        }
    }

    /// Wait for an event after the first `after` that `matches`, at most `timeout`.
    pub fn wait_for(
        &self,
        after: usize,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let (lock, cvar) = &*self.events;
        let deadline = Instant::now() + timeout;
        let mut events = lock
            .lock()
            .map_err(|_| anyhow::anyhow!("event lock poisoned"))?;
        let mut seen = after;
        loop {
            if let Some(found) = events.lines.iter().skip(seen).find(|e| matches(e)) {
                return Ok(found.clone());
            }
            seen = events.lines.len();
            if events.closed {
                bail!("hbone_peer.py exited; its events: {:?}", events.lines);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "timed out after {timeout:?}; hbone_peer.py's events: {:?}",
                    events.lines
                );
            }
            events = cvar
                .wait_timeout(events, deadline - now)
                .map(|(e, _)| e)
                .map_err(|_| anyhow::anyhow!("event lock poisoned"))?;
        }
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
