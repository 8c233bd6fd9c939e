//! The config file as a [`Source`]: the file and the policy files it names, noticed at once
//! through inotify ([`FileWatch`]) and in any case by comparing their stamps (time and size) at
//! a periodic check, for filesystems inotify does not see into (docs/config.md).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::time::Interval;

use super::{
    contract::{Source, restart_only_unchanged},
    file_watch::FileWatch,
};
use crate::{
    config::Config,
    state::{Snapshot, policy_paths},
};

/// Modification time and length: enough to notice an edit or a replaced file.
type Stamp = Option<(SystemTime, u64)>;

/// The config file and its policy files. Must be made inside the tokio runtime.
pub struct FileSource {
    config_path: PathBuf,
    /// The policy paths the state in force names.
    policy_paths: Vec<PathBuf>,
    /// `None` without inotify: the periodic check alone notices changes.
    files: Option<FileWatch>,
    /// The periodic check.
    check: Interval,
    /// The stamps when the desired state was last loaded.
    last_seen: Vec<(PathBuf, Stamp)>,
}

impl FileSource {
    /// The config file at `config_path`, checked every `check_every`.
    pub fn new(config_path: &Path, check_every: Duration) -> Self {
        let files = match FileWatch::new() {
            Ok(files) => Some(files),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify; config and policy changes are noticed by the periodic check only");
                None
            }
        };
        Self {
            config_path: config_path.to_owned(),
            policy_paths: Vec::new(),
            files,
            check: tokio::time::interval(check_every),
            last_seen: Vec::new(),
        }
    }

    /// What the files are now counts as seen: only a later change resolves
    /// [`Source::changed`] (for a source that reads the config file itself and uses this one
    /// only to notice changes).
    pub fn seen(&mut self) {
        self.last_seen = self.stamps();
    }

    /// Stamps of the config file and of every policy file and directory it names.
    fn stamps(&self) -> Vec<(PathBuf, Stamp)> {
        let mut out = vec![(self.config_path.clone(), file_stamp(&self.config_path))];
        for path in &self.policy_paths {
            stamps_under(path, &mut out);
        }
        out
    }
}

impl Source for FileSource {
    fn origin(&self) -> &Path {
        &self.config_path
    }

    async fn initial(&mut self, config: Config) -> anyhow::Result<Snapshot> {
        self.policy_paths = policy_paths(&self.config_path, &config);
        self.seen();
        Snapshot::from_config(&self.config_path, config)
    }

    async fn changed(&mut self) -> &'static str {
        loop {
            let trigger = tokio::select! {
                // A file event before the periodic check, should both be ready.
                biased;
                changed = next_change(&mut self.files) => {
                    if let Err(e) = changed {
                        tracing::warn!(error = %e, "reading inotify events; the periodic check goes on");
                        self.files = None;
                    }
                    "config or policy file changed"
                }
                _ = self.check.tick() => "config or policy file changed (periodic check)",
            };
            if self.stamps() != self.last_seen {
                return trigger;
            }
        }
    }

    fn load(&mut self, current: &Snapshot) -> anyhow::Result<Snapshot> {
        self.seen();
        let config = Config::load(&self.config_path)?;
        restart_only_unchanged(&self.config_path, &current.config, &config)?;
        Snapshot::from_config(&self.config_path, config)
    }

    fn follow(&mut self, current: &Snapshot) {
        self.policy_paths = policy_paths(&self.config_path, &current.config);
        if let Some(files) = &mut self.files {
            let mut paths = vec![self.config_path.clone()];
            paths.extend(self.policy_paths.iter().cloned());
            files.watch(&paths);
        }
    }
}

fn file_stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Stamps of `path` and, for a directory, of each entry in it (files added, removed or edited).
fn stamps_under(path: &Path, out: &mut Vec<(PathBuf, Stamp)>) {
    out.push((path.to_owned(), file_stamp(path)));
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for name in names {
            out.push((name.clone(), file_stamp(&name)));
        }
    }
}

/// The next change `files` reports; never, without inotify.
async fn next_change(files: &mut Option<FileWatch>) -> std::io::Result<()> {
    match files {
        Some(files) => files.changed().await,
        None => std::future::pending().await,
    }
}
