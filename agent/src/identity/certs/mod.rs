//! The store of current SVIDs, one per local identity, from an [`SvidSource`] ([`source`]:
//! `dev-ca`, `files`),
//! each replaced atomically ([`CertStore::resolver`] gives rustls the current one at every
//! handshake). Each identity's trust bundle has a [`TrustEpoch`], new only when the bundle changes,
//! so the agent can tell what an old bundle proved ([`CertStore::take_trust_changes`]). The
//! sources and their rules: `docs/tunnel.md` (Certificates, How long a proof holds).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use rustls::sign::CertifiedKey;

mod source;
mod svid;

pub use source::{Source, SvidSource};
pub use svid::{CertError, Current, TrustEpoch, rotation_at, rotation_due, seconds_left};

use crate::sync::lock;

pub struct CertStore {
    /// `None` when the config has no `certificates` (then the node has no workloads).
    source: Option<Box<dyn SvidSource>>,
    trust_domain: String,
    current: RwLock<HashMap<String, Current>>,
    /// The last epoch given to a bundle.
    epochs: AtomicU64,
    /// Identities whose bundle changed since [`CertStore::take_trust_changes`] was last called.
    trust_changed: Mutex<Vec<String>>,
    /// Bumped by [`CertStore::announce_trust_change`]: tunnel connections watch it.
    announce: tokio::sync::watch::Sender<u64>,
}

impl CertStore {
    /// A store of the SVIDs `source` (a `certificates` section) issues.
    pub fn new(source: Option<Source>, trust_domain: &str) -> Self {
        Self::with_source(
            source.map(|s| Box::new(s) as Box<dyn SvidSource>),
            trust_domain,
        )
    }

    /// A store of the SVIDs any [`SvidSource`] issues.
    pub fn with_source(source: Option<Box<dyn SvidSource>>, trust_domain: &str) -> Self {
        Self {
            source,
            trust_domain: trust_domain.to_owned(),
            current: RwLock::new(HashMap::new()),
            epochs: AtomicU64::new(0),
            trust_changed: Mutex::new(Vec::new()),
            announce: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The epoch of `spiffe_id`'s trust bundle in force (`None` without an SVID).
    pub fn trust(&self, spiffe_id: &str) -> Option<TrustEpoch> {
        crate::sync::read(&self.current)
            .get(spiffe_id)
            .map(|c| c.trust)
    }

    /// The identities whose trust bundle changed since the last call (a rotation that brought
    /// another bundle); each once.
    pub fn take_trust_changes(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.trust_changed))
    }

    /// Tell every watcher of [`CertStore::trust_changes`] that a bundle changed (after what the
    /// old bundles proved has been revoked).
    pub fn announce_trust_change(&self) {
        self.announce.send_modify(|n| *n += 1);
    }

    /// Changes when a trust bundle changed: tunnel connections then check whether what they
    /// were proven under is still in force.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.announce.subscribe()
    }

    /// The current SVID of `spiffe_id`, if it has one.
    pub fn current(&self, spiffe_id: &str) -> Option<Current> {
        crate::sync::read(&self.current).get(spiffe_id).cloned()
    }

    /// Identities with an SVID.
    pub fn identities(&self) -> Vec<String> {
        let mut ids: Vec<String> = crate::sync::read(&self.current).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Make sure every identity in `ids` has an SVID.
    pub fn ensure(&self, ids: &[String]) -> Result<(), CertError> {
        for id in ids {
            if self.current(id).is_none() {
                let fresh = self.obtain(id)?;
                self.install(id, fresh);
            }
        }
        Ok(())
    }

    /// Forget the SVIDs of identities not in `ids`.
    pub fn retain(&self, ids: &[String]) {
        crate::sync::write(&self.current).retain(|id, _| ids.contains(id));
    }

    /// Rotate what is due (dev-ca: past half-life; files: changed on disk). Returns the
    /// identities that got a new SVID; errors are per identity and leave the old SVID in place.
    pub fn refresh(&self, now: SystemTime) -> (Vec<String>, Vec<(String, CertError)>) {
        let (mut rotated, mut failed) = (Vec::new(), Vec::new());
        for id in self.identities() {
            let Some(current) = self.current(&id) else {
                continue;
            };
            let due = self
                .source
                .as_ref()
                .is_some_and(|source| source.due(&id, &current, now));
            if !due {
                continue;
            }
            match self.obtain(&id) {
                Ok(fresh) => {
                    self.install(&id, fresh);
                    rotated.push(id);
                }
                Err(e) => failed.push((id, e)),
            }
        }
        (rotated, failed)
    }

    /// Put `fresh` in force for `id`. Its bundle keeps the epoch of the one it replaces if they
    /// are the same certificates; otherwise it gets a new epoch and, if it replaces another
    /// bundle, `id` is recorded as changed.
    fn install(&self, id: &str, mut fresh: Current) {
        let mut current = crate::sync::write(&self.current);
        let changed = match current.get(id) {
            Some(old) if old.bundle == fresh.bundle => {
                fresh.bundle = old.bundle.clone();
                fresh.trust = old.trust;
                false
            }
            old => {
                fresh.trust = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
                old.is_some()
            }
        };
        tracing::info!(
            identity = id,
            serial = %fresh.svid.serial,
            not_after = ?fresh.svid.not_after,
            trust_bundle_changed = changed,
            "certificate in place"
        );
        current.insert(id.to_owned(), fresh);
        drop(current);
        if changed {
            lock(&self.trust_changed).push(id.to_owned());
        }
    }

    fn obtain(&self, id: &str) -> Result<Current, CertError> {
        match &self.source {
            None => Err(CertError::NoSource(id.to_owned())),
            Some(source) => source.issue(id, &self.trust_domain),
        }
    }

    /// A rustls certificate resolver that always returns `id`'s current SVID.
    pub fn resolver(self: &Arc<Self>, id: &str) -> Arc<CurrentCert> {
        Arc::new(CurrentCert {
            store: self.clone(),
            id: id.to_owned(),
        })
    }
}

/// Resolves to the current certificate of one identity, for both sides of a handshake.
pub struct CurrentCert {
    store: Arc<CertStore>,
    id: String,
}

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CurrentCert({})", self.id)
    }
}

impl CurrentCert {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id).map(|c| c.certified)
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
