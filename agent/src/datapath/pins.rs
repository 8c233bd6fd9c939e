//! Removing what the agent pinned: a link is detached before its pin goes.

use std::{fs, path::Path};

use super::{error::DatapathError, syscall};

/// Detach a pinned link synchronously (a stale one may already be detached), then remove the
/// pin. For a pinned map, only the pin is removed.
pub(super) fn detach_and_unpin(path: &Path) -> Result<(), DatapathError> {
    if let Ok(fd) = syscall::obj_get(path) {
        // EINVAL: not a link (a map pin) or already detached; either way nothing to do.
        let _ = syscall::link_detach(&fd);
    }
    fs::remove_file(path)
        .or_else(ignore_not_found)
        .map_err(|e| DatapathError::io("unpinning", path, e))
}

pub(super) fn ignore_not_found(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}
