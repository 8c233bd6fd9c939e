//! The agent's current view of the world: the config it runs with, the registry built from it
//! and the policies it names. Replaced as a whole on a successful reload; readers take a cheap
//! snapshot.

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
pub struct SharedState(Arc<RwLock<Arc<Snapshot>>>);

impl SharedState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(snapshot))))
    }

    pub fn get(&self) -> Arc<Snapshot> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
    }
}
