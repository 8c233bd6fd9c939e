//! The agent's current view of the world: the config it runs with, the registry built from it
//! and the policies it names. Replaced as a whole on a successful reload; readers take a cheap
//! snapshot.
//!
//! Every snapshot put in place gets the next generation number. A decision made under one
//! generation can tell whether a newer one has been committed since ([`SharedState::generation`]):
//! the verdict cache refuses a verdict decided under an older generation, and a carried
//! connection decided under one is judged again, so nothing decided under the old state slips
//! past the revocation that follows a reload.

use std::sync::{Arc, RwLock};

use crate::{config::Config, identity::Registry, policy::PolicySet};

/// One consistent config + registry + policy set.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub registry: Registry,
    pub policies: PolicySet,
}

/// Shared, swappable snapshot.
#[derive(Clone)]
pub struct SharedState(Arc<RwLock<Current>>);

struct Current {
    snapshot: Arc<Snapshot>,
    generation: u64,
}

impl SharedState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self(Arc::new(RwLock::new(Current {
            snapshot: Arc::new(snapshot),
            generation: 1,
        })))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self) -> Arc<Snapshot> {
        self.read().snapshot.clone()
    }

    /// The snapshot in force and its generation, read together.
    pub fn current(&self) -> (Arc<Snapshot>, u64) {
        let current = self.read();
        (current.snapshot.clone(), current.generation)
    }

    /// The generation of the snapshot in force.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Keep the snapshot in force but start a new generation: what was proven under the old
    /// one (a trust bundle since replaced) is not cached, and carried connections decided
    /// under it are judged again.
    pub fn renew(&self) {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        current.generation += 1;
    }

    /// Put `snapshot` in force, as the next generation.
    pub fn replace(&self, snapshot: Snapshot) {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        current.snapshot = Arc::new(snapshot);
        current.generation += 1;
    }
}

/// The state a decision was made under: its generation, and the shared state to compare it with.
#[derive(Clone)]
pub struct DecidedUnder {
    state: SharedState,
    generation: u64,
}

impl DecidedUnder {
    /// The snapshot in force now, to decide with, and the mark of that decision.
    pub fn now(state: &SharedState) -> (Arc<Snapshot>, Self) {
        let (snapshot, generation) = state.current();
        (
            snapshot,
            Self {
                state: state.clone(),
                generation,
            },
        )
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The snapshot in force, if a newer one than the decision's has been committed since.
    pub fn newer(&self) -> Option<Arc<Snapshot>> {
        let (snapshot, generation) = self.state.current();
        (generation != self.generation).then_some(snapshot)
    }
}
