//! A real `latch agent` process in a node's network namespace: its config file, its JSON log
//! (followed line by line, so tests wait for events instead of sleeping), and its life cycle.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{env, netns};

/// Per-node agent settings a test can choose.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `STRICT` or `PERMISSIVE`.
    pub mtls_mode: String,
    /// `mtls.strictFastpath`: STRICT pairs take the kernel fast path after their first
    /// connection.
    pub strict_fastpath: bool,
    /// `fastpath` or `tunnel`.
    pub dataplane_mode: String,
    pub verdict_ttl: String,
    /// `dataplane.busyPoll`; `None` leaves the agent's default.
    pub busy_poll: Option<String>,
    /// `dataplane.busyPollAdaptive`; `None` leaves the agent's default.
    pub busy_poll_adaptive: Option<bool>,
    /// `dataplane.workerThreads`; `None` leaves the agent's default.
    pub worker_threads: Option<u16>,
    /// Lifetime of the SVIDs the node's agent mints from the cluster's development CA.
    pub cert_ttl: String,
    /// Mint from this development CA (a `latch ca init` directory) instead of the cluster's.
    pub ca_dir: Option<PathBuf>,
    /// Read SVIDs from this directory (`certificates.source: files`) instead of minting them.
    pub cert_files: Option<PathBuf>,
    /// The `metrics` setting: `off`, or an address inside the node's netns.
    pub metrics: String,
    /// Appended to the generated config.
    pub extra_yaml: String,
    /// Run this agent binary instead of `LATCH_BIN`'s (to compare builds).
    pub bin: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            mtls_mode: "PERMISSIVE".into(),
            strict_fastpath: false,
            dataplane_mode: "fastpath".into(),
            verdict_ttl: "5m".into(),
            busy_poll: None,
            busy_poll_adaptive: None,
            worker_threads: None,
            cert_ttl: "1h".into(),
            ca_dir: None,
            cert_files: None,
            metrics: "off".into(),
            extra_yaml: String::new(),
            bin: None,
        }
    }
}

impl AgentOptions {
    /// STRICT mTLS: every connection tunneled.
    pub fn strict() -> Self {
        Self {
            mtls_mode: "STRICT".into(),
            ..Self::default()
        }
    }

    /// STRICT mTLS with `strictFastpath`: plaintext is refused, and a pair's repeats take the
    /// kernel fast path once its first connection has proven both identities.
    pub fn strict_fastpath() -> Self {
        Self {
            strict_fastpath: true,
            ..Self::strict()
        }
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The current process's output has ended.
    closed: bool,
    /// Which spawn the current process is; readers of an earlier one must not mark it closed.
    generation: u64,
}

type Log = Arc<(Mutex<LogState>, Condvar)>;

pub struct Agent {
    bin: PathBuf,
    netns: PathBuf,
    /// The agent's own cgroup, below its node's `cgroupRoot` (a DaemonSet's pod is below the
    /// root Latch's programs attach to, so they see the agent's own sockets too).
    cgroup: PathBuf,
    config: PathBuf,
    log_file: PathBuf,
    /// After `agent --config FILE`.
    args: Vec<String>,
    child: Option<Child>,
    log: Log,
    /// Log lines before the current process started (earlier runs).
    offset: usize,
}

/// Append complete log lines to the log file and to the lines kept in memory.
fn record(log: &Log, file: &Mutex<std::fs::File>, complete: &[u8]) {
    if let Ok(mut f) = file.lock() {
        let _ = f.write_all(complete);
    }
    let text = String::from_utf8_lossy(complete);
    let (lock, cvar) = &**log;
    lock.lock()
        .unwrap_or_else(|p| p.into_inner())
        .lines
        .extend(text.lines().map(str::to_owned));
    cvar.notify_all();
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Write `config_yaml` into `dir` and start the agent in `netns` and `cgroup` (made if
    /// absent); waits until it logs `agent ready`, or fails with the end of its log.
    pub fn start(
        netns: &Path,
        cgroup: &Path,
        dir: &Path,
        config_yaml: &str,
    ) -> anyhow::Result<Self> {
        Self::start_binary(env::latch_bin()?, netns, cgroup, dir, config_yaml)
    }

    /// [`Agent::start`] with the agent binary `bin`.
    pub fn start_binary(
        bin: PathBuf,
        netns: &Path,
        cgroup: &Path,
        dir: &Path,
        config_yaml: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_args(bin, netns, cgroup, dir, config_yaml, &[])
    }

    /// [`Agent::start_binary`] with `args` after `agent --config FILE`.
    pub fn start_with_args(
        bin: PathBuf,
        netns: &Path,
        cgroup: &Path,
        dir: &Path,
        config_yaml: &str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(cgroup)
            .with_context(|| format!("creating the agent's cgroup {}", cgroup.display()))?;
        let config = dir.join("config.yaml");
        std::fs::write(&config, config_yaml)
            .with_context(|| format!("writing {}", config.display()))?;
        let mut agent = Self {
            bin,
            netns: netns.to_owned(),
            cgroup: cgroup.to_owned(),
            args: args.to_vec(),
            log_file: dir.join("agent.log"),
            config,
            child: None,
            log: Arc::new((Mutex::new(LogState::default()), Condvar::new())),
            offset: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let mut cmd = Command::new(&bin);
        cmd.args(["agent", "--config"])
            .arg(&self.config)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        netns::enter(&mut cmd, &self.netns, Some(&self.cgroup))?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let generation = {
            let mut state = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
            state.closed = false;
            state.generation += 1;
            self.offset = state.lines.len();
            state.generation
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        let file = Arc::new(Mutex::new(file));
        let stdout = child.stdout.take().context("agent stdout")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        for (stream, closes) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, true),
            (Box::new(stderr), false),
        ] {
            let log = self.log.clone();
            let file = file.clone();
            std::thread::spawn(move || {
                // Whole reads at a time: the agent writes its log in batches, and a write to the
                // file per line would cost the CPU the connections under test share.
                let mut stream = stream;
                let mut pending = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    pending.extend_from_slice(&chunk[..n]);
                    if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
                        let complete: Vec<u8> = pending.drain(..=end).collect();
                        record(&log, &file, &complete);
                    }
                }
                if !pending.is_empty() {
                    pending.push(b'\n');
                    record(&log, &file, &pending);
                }
                if closes {
                    let (lock, cvar) = &*log;
                    let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                    if state.generation == generation {
                        state.closed = true;
                    }
                    cvar.notify_all();
                }
            });
        }
        self.child = Some(child);
        if let Err(e) = self.wait_for_message("agent ready", READY_TIMEOUT) {
            let tail = self.log_tail(30);
            self.kill9();
            bail!("agent did not become ready: {e:#}\n--- agent log ---\n{tail}");
        }
        Ok(())
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Replace the config file (the agent notices the change by itself, or use [`Agent::reload`]).
    pub fn write_config(&self, yaml: &str) -> anyhow::Result<()> {
        env::write_atomically(&self.config, yaml)
    }

    /// All log lines of the current run.
    pub fn lines(&self) -> Vec<String> {
        let state = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
        state.lines[self.offset.min(state.lines.len())..].to_vec()
    }

    /// The whole log of every run so far.
    pub fn log(&self) -> String {
        self.log
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .join("\n")
    }

    pub fn log_tail(&self, n: usize) -> String {
        let state = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
        let start = state.lines.len().saturating_sub(n);
        state.lines[start..].join("\n")
    }

    /// Number of log lines so far (to wait for something after a point).
    pub fn mark(&self) -> usize {
        self.log
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .len()
    }

    /// Wait until a log line after `mark` satisfies `pred`; returns it. Fails if the agent's
    /// output closes first or `timeout` passes.
    pub fn wait_for_line_after(
        &self,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.log;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = mark;
        loop {
            if let Some(line) = state.lines[seen.min(state.lines.len())..]
                .iter()
                .find(|l| pred(l))
            {
                return Ok(line.clone());
            }
            seen = state.lines.len();
            if state.closed {
                bail!("the agent exited");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out after {timeout:?}");
            }
            state = cvar
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Wait for a log line of this run whose message is `message`.
    pub fn wait_for_message(&self, message: &str, timeout: Duration) -> anyhow::Result<String> {
        let needle = format!("\"message\":\"{message}\"");
        self.wait_for_line_after(self.offset, timeout, |l| l.contains(&needle))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Descriptors the running agent holds (0 if it is not running).
    pub fn open_fds(&self) -> usize {
        self.pid()
            .and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map_or(0, |d| d.count())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stop the running agent where it is (`SIGSTOP`): it takes no connection and drains
    /// nothing until [`Agent::resume`], while its kernel programs go on.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Continue an agent [`Agent::pause`] stopped (`SIGCONT`).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().context("agent is not running")?;
        child.wait().context("waiting for the agent")
    }

    /// SIGHUP: reload the config.
    pub fn reload(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// Start again with the same config (after kill9 or terminate).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn()
    }

    /// Run `latch agent --config <config> --uninstall` in the node's netns.
    pub fn uninstall(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["agent", "--config"])
            .arg(&self.config)
            .arg("--uninstall");
        netns::enter(&mut cmd, &self.netns, None)?;
        let out = cmd.output().context("running latch agent --uninstall")?;
        if !out.status.success() {
            bail!("uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Run the agent binary once with this config and other arguments (e.g. to see how it fails
    /// on a bad config); returns (exit code, stdout+stderr).
    pub fn run_once(netns_path: &Path, config: &Path) -> anyhow::Result<(i32, String)> {
        let bin = env::latch_bin()?;
        let mut cmd = Command::new(bin);
        cmd.args(["agent", "--config"])
            .arg(config)
            .stdin(Stdio::null());
        netns::enter(&mut cmd, netns_path, None)?;
        let out = cmd.output().context("running latch agent")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `latch debug ARGS --socket SOCKET` (the CLI against an agent's debug socket): whether it
/// succeeded, and its stdout and stderr.
pub fn debug(socket: &Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(env::latch_bin()?)
        .arg("debug")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running latch debug")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `latch debug ARGS --json`, which must succeed, parsed.
pub fn debug_json(socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out) = debug(socket, &all)?;
    if !ok {
        bail!("latch debug {args:?} failed: {out}");
    }
    serde_json::from_str(&out).with_context(|| format!("latch debug {args:?}: not JSON: {out}"))
}
