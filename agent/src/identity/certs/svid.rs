//! One identity's SVID as the store holds it ([`Current`]), what can go wrong getting one
//! ([`CertError`]), and the rules about time every source and the store share: when an SVID is
//! due for rotation, how long it has left.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{pki_types::CertificateDer, sign::CertifiedKey};

use crate::{
    identity::ca::{CaError, Svid},
    tls::certified_key,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("no certificate source is configured for {0} (set `certificates`)")]
    NoSource(String),
    #[error("the signing key of {identity} is not usable: {why}")]
    Key { identity: String, why: String },
}

/// Which trust bundle an identity's connections were proven under: equal epochs, equal
/// bundles. Never 0 for a bundle in force.
pub type TrustEpoch = u64;

/// One identity's current SVID, ready for rustls.
#[derive(Clone)]
pub struct Current {
    pub svid: Arc<Svid>,
    pub certified: Arc<CertifiedKey>,
    pub bundle: Arc<Vec<CertificateDer<'static>>>,
    /// The epoch of `bundle`.
    pub trust: TrustEpoch,
    /// Modification times of the files it came from (`files` source).
    pub(super) stamps: Vec<Option<SystemTime>>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("svid", &self.svid)
            .finish_non_exhaustive()
    }
}

/// `<namespace>/<serviceAccount>` of a Kubernetes-form SPIFFE ID.
pub(super) fn ns_sa(spiffe_id: &str) -> Option<(String, String)> {
    let id = crate::identity::SpiffeId::parse(spiffe_id).ok()?;
    id.kubernetes()
        .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
}

pub(super) fn certified(svid: &Svid) -> Result<Arc<CertifiedKey>, CertError> {
    certified_key(svid).map_err(|e| CertError::Key {
        identity: svid.spiffe_id.clone(),
        why: e.to_string(),
    })
}

pub(super) fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// When half of the lifetime (from when it was issued to NotAfter) has passed: time to rotate.
pub fn rotation_at(svid: &Svid) -> SystemTime {
    let start = svid.issued_at.max(svid.not_before);
    let lifetime = svid
        .not_after
        .duration_since(start)
        .unwrap_or(Duration::ZERO);
    start + lifetime / 2
}

pub fn rotation_due(svid: &Svid, now: SystemTime) -> bool {
    now >= rotation_at(svid)
}

/// Seconds from `now` until `not_after`, negative once it has passed.
pub fn seconds_left(not_after: SystemTime, now: SystemTime) -> f64 {
    match not_after.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
