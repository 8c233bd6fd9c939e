//! Taking a lock whatever became of its last holder.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Lock `m` even if a holder panicked: every update under the agent's locks is whole, so a panic
/// leaves nothing half-written, and refusing the lock would only spread that one panic.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
