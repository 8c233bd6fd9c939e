//! Noticing at once that the config file or a policy file changed: inotify watches on the
//! directories that hold them (a directory, unlike a file, survives the atomic renames editors and
//! Kubernetes ConfigMap volumes use to replace files). Only finished changes count: a file
//! closed after writing, moved in or out, or deleted; a file being written is not read half-way.
//! What an event concerns is not sorted out here: [`super::FileSource`] compares the files'
//! stamps, which also catches whatever inotify cannot see (some network filesystems) at its
//! periodic check.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use tokio::io::unix::AsyncFd;

/// The inotify events that mean a file is there in its new form, or gone.
fn finished_changes() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

pub struct FileWatch {
    inotify: AsyncFd<Inotify>,
    /// The directories watched now, and their watches.
    watched: Vec<(PathBuf, WatchDescriptor)>,
    buffer: Vec<u8>,
}

impl FileWatch {
    // tokio polls a descriptor only through `AsyncFd::register`, which is unsafe.
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        let inotify = Inotify::init()?;
        // SAFETY: an `Inotify` owns its descriptor, keeps it open until it is dropped (with the
        // `AsyncFd`) and always reports the same one.
        let inotify = unsafe { AsyncFd::register(inotify) }.map_err(io::Error::from)?;
        Ok(Self {
            inotify,
            watched: Vec::new(),
            buffer: vec![0; 4096],
        })
    }

    /// Watch the directories that hold `paths` (a directory among them is watched itself),
    /// instead of what was watched before. A directory that cannot be watched (it does not
    /// exist yet) is left to the periodic check.
    pub fn watch(&mut self, paths: &[PathBuf]) {
        let dirs: BTreeSet<PathBuf> = paths.iter().filter_map(|p| directory_of(p)).collect();
        let mut watches = self.inotify.get_mut().watches();
        for (dir, wd) in self.watched.drain(..) {
            if !dirs.contains(&dir) {
                // It may be gone already, and its watch with it.
                let _ = watches.remove(wd);
            }
        }
        for dir in dirs {
            match watches.add(&dir, finished_changes()) {
                Ok(wd) => self.watched.push((dir, wd)),
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "not watching; the periodic check covers it")
                }
            }
        }
    }

    /// The directories watched now.
    pub fn watched(&self) -> Vec<&Path> {
        self.watched.iter().map(|(d, _)| d.as_path()).collect()
    }

    /// Wait until something changed in a watched directory (all events that arrived together
    /// count as one).
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable_mut().await?;
            match ready.get_inner_mut().read_events(&mut self.buffer) {
                Ok(events) => {
                    if events.count() > 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// `path` itself if it is a directory, else the directory holding it.
fn directory_of(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        return Some(path.to_owned());
    }
    match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(parent) => Some(parent.to_owned()),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports a finished change in a watched directory; a hang here fails by the test timeout.
    async fn reports(watch: &mut FileWatch, what: &str) {
        tokio::time::timeout(std::time::Duration::from_secs(30), watch.changed())
            .await
            .unwrap_or_else(|_| panic!("no event for {what}"))
            .expect("reading events");
    }

    #[tokio::test]
    async fn finished_changes_in_watched_directories_wake_it() {
        let base = std::env::temp_dir().join(format!("latch-file-watch-{}", std::process::id()));
        let policies = base.join("policies");
        std::fs::create_dir_all(&policies).expect("dirs");
        let config = base.join("node.yaml");
        std::fs::write(&config, "a").expect("config");

        let mut watch = FileWatch::new().expect("inotify");
        watch.watch(&[config.clone(), policies.clone()]);
        assert_eq!(watch.watched(), vec![base.as_path(), policies.as_path()]);

        std::fs::write(policies.join("deny.yaml"), "x").expect("write");
        reports(&mut watch, "a new policy file").await;
        let staged = base.join("node.yaml.tmp");
        std::fs::write(&staged, "b").expect("write");
        // The staged file's own close is a change in the config's directory too.
        reports(&mut watch, "the staged file").await;
        std::fs::rename(&staged, &config).expect("rename");
        reports(&mut watch, "an atomic replace").await;
        std::fs::remove_file(policies.join("deny.yaml")).expect("remove");
        reports(&mut watch, "a removed policy file").await;

        // Watching a new set drops what is no longer in it.
        watch.watch(std::slice::from_ref(&config));
        assert_eq!(watch.watched(), vec![base.as_path()]);
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
