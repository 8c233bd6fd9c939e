//! The mTLS mode of a workload port, from PeerAuthentication, with Istio's precedence:
//! the workload's own policy (selector matching, in its namespace) for that port
//! (`portLevelMtls`), then its mode; then the namespace-wide policy (no selector); then the
//! mesh-wide policy (root namespace, no selector); then the default (PERMISSIVE unless set with
//! [`PolicySet::with_default_mtls`]). `UNSET` (or no mode) defers to the next level.
//!
//! When several policies exist at one level the oldest (`metadata.creationTimestamp`) decides,
//! as in Istio; policies without one (hand-written files) come after, by name.

use super::{
    PolicySet,
    compile::PeerAuthPolicy,
    decision::{MtlsMode, PolicyRef, Target},
};

impl PolicySet {
    /// Whether the workload-level PeerAuthentication of `target` sets modes per port.
    pub(crate) fn mtls_port_sensitive(&self, target: &Target) -> bool {
        let inner = &*self.inner;
        let Some(bucket) = inner.peer_index.bucket(target.namespace) else {
            return false;
        };
        let mut selected = Vec::new();
        bucket.selected(
            target.labels,
            |id| &inner.peer[id as usize].selector,
            &mut selected,
        );
        selected
            .iter()
            .min()
            .is_some_and(|id| !inner.peer[*id as usize].port_modes.is_empty())
    }

    /// The mTLS mode for `port` of `target`, and the PeerAuthentication that set it (`None`
    /// for the default).
    pub fn mtls_mode(&self, target: &Target, port: u16) -> (MtlsMode, Option<PolicyRef>) {
        let inner = &*self.inner;
        let policy = |id: &u32| &inner.peer[*id as usize];
        let found =
            |p: &PeerAuthPolicy, mode: Option<MtlsMode>| mode.map(|m| (m, Some(p.reference())));
        if let Some(bucket) = inner.peer_index.bucket(target.namespace) {
            let mut selected = Vec::new();
            bucket.selected(
                target.labels,
                |id| &inner.peer[id as usize].selector,
                &mut selected,
            );
            if let Some(p) = selected.iter().min().map(policy) {
                let port_mode = p.port_modes.get(&port).copied().flatten();
                if let Some(hit) = found(p, port_mode.or(p.mode)) {
                    return hit;
                }
            }
            if let Some(hit) = bucket
                .wide
                .first()
                .map(policy)
                .and_then(|p| found(p, p.mode))
            {
                return hit;
            }
        }
        if let Some(bucket) = inner.peer_index.bucket(&inner.root_namespace)
            && let Some(hit) = bucket
                .wide
                .first()
                .map(policy)
                .and_then(|p| found(p, p.mode))
        {
            return hit;
        }
        (inner.default_mtls, None)
    }
}
