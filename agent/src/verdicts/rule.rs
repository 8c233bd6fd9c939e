//! The caching rule, one for both sides of a connection: whether a decided pair's verdict goes
//! into the kernel, and for how long. Why each condition holds: docs/policy.md, "What is cached".

use std::time::{Duration, SystemTime};

use crate::{
    identity::IdentityKey,
    state::{Snapshot, decide},
};

/// Longest life of a cached deny (bounded by `verdictTtl` too): a policy change that allows
/// the pair removes it at once, so this only bounds staleness if the nodes' views diverge.
pub const DENY_TTL: Duration = Duration::from_secs(30);

/// A connection's verdict as the deciding side gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decided {
    pub allowed: bool,
    /// The decider's own say: the policy's judgement holds for every connection of the pair
    /// (at the destination), or the destination's answer said so (at the source).
    pub cacheable: bool,
}

/// How long (`source`, `destination`, `port`)'s verdict may be cached, `None` if it may not:
/// only when neither side has a pod in `mode: tunnel` ([`decide::pair`]), only if the decider says the verdict holds for the whole pair and
/// this node's own view of the policy gives the pair the same verdict (so its next reload
/// corrects what it cached), at most `verdictTtl`; an allow no longer than the proof behind it
/// (`proof_not_after`, the earlier of the two certificates' NotAfter), a deny at most
/// [`DENY_TTL`]. STRICT ports are never cacheable unless `mtls.strictFastpath` (the policy
/// engine's judgement says so).
pub fn lifetime(
    snapshot: &Snapshot,
    source: &str,
    destination: IdentityKey,
    port: u16,
    verdict: Decided,
    proof_not_after: SystemTime,
) -> Option<Duration> {
    let dataplane = &snapshot.config.dataplane;
    if !verdict.cacheable {
        return None;
    }
    if decide::pair(snapshot, source, destination, port) != Some(verdict.allowed) {
        return None;
    }
    if !verdict.allowed {
        return Some(dataplane.verdict_ttl.min(DENY_TTL));
    }
    let left = proof_not_after.duration_since(SystemTime::now()).ok()?;
    Some(dataplane.verdict_ttl.min(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
    const LEDGER: &str = "spiffe://cluster.local/ns/prod/sa/ledger";
    const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
    const HOUR: Duration = Duration::from_secs(3600);

    /// Only frontend may reach payment.
    const FRONTEND_ONLY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payment, namespace: prod }
spec:
  selector: { matchLabels: { app: payment } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/prod/sa/frontend"] } }]
"#;

    fn snapshot(mode: &str) -> Snapshot {
        snapshot_with(mode, "")
    }

    /// The node in `mode`, payment a peer with `payment` appended to its entry (its own
    /// `dataplaneMode`), frontend a peer too.
    fn snapshot_with(mode: &str, payment: &str) -> Snapshot {
        Snapshot::from_texts(
            &format!(
                "node: {{ name: n1, address: 10.244.0.1 }}\ntrustDomain: cluster.local\n\
                 cgroupRoot: /cg\nbpfPinDir: /sys/fs/bpf/x\n\
                 dataplane: {{ mode: {mode}, verdictTtl: 5m }}\n\
                 peers:\n  - {{ name: payment, namespace: prod, serviceAccount: payment, \
                 labels: {{ app: payment }}, ips: [10.244.2.2], node: 10.244.0.2{payment} }}\n\
                 \x20 - {{ name: frontend, namespace: prod, serviceAccount: frontend, \
                 ips: [10.244.3.2], node: 10.244.0.3 }}\n"
            ),
            FRONTEND_ONLY,
        )
    }

    fn ask(
        snapshot: &Snapshot,
        source: &str,
        verdict: Decided,
        proof: Duration,
    ) -> Option<Duration> {
        let payment = crate::identity::IdentityKey::of(PAYMENT);
        lifetime(
            snapshot,
            source,
            payment,
            8080,
            verdict,
            SystemTime::now() + proof,
        )
    }

    const ALLOWED: Decided = Decided {
        allowed: true,
        cacheable: true,
    };
    const DENIED: Decided = Decided {
        allowed: false,
        cacheable: true,
    };

    #[test]
    fn an_allow_lives_for_the_ttl_or_until_its_proof_expires() {
        let s = snapshot("fastpath");
        assert_eq!(
            ask(&s, FRONTEND, ALLOWED, HOUR),
            Some(Duration::from_secs(300))
        );
        let short = ask(&s, FRONTEND, ALLOWED, Duration::from_secs(60)).expect("cached");
        assert!(
            short <= Duration::from_secs(60) && !short.is_zero(),
            "{short:?}"
        );
        assert_eq!(
            ask(&s, FRONTEND, ALLOWED, Duration::ZERO),
            None,
            "expired proof"
        );
    }

    #[test]
    fn a_deny_lives_at_most_the_deny_ttl() {
        let s = snapshot("fastpath");
        assert_eq!(ask(&s, LEDGER, DENIED, HOUR), Some(DENY_TTL));
    }

    #[test]
    fn nothing_is_cached_that_the_decider_or_this_nodes_view_does_not_back() {
        let s = snapshot("fastpath");
        let unbacked = Decided {
            allowed: true,
            cacheable: false,
        };
        assert_eq!(
            ask(&s, FRONTEND, unbacked, HOUR),
            None,
            "decider: not cacheable"
        );
        assert_eq!(ask(&s, LEDGER, ALLOWED, HOUR), None, "this node would deny");
        assert_eq!(
            ask(&s, FRONTEND, DENIED, HOUR),
            None,
            "this node would allow"
        );
    }

    #[test]
    fn a_pod_in_mode_tunnel_keeps_its_pairs_out_of_the_cache_whatever_the_nodes_mode() {
        let tunnel = snapshot_with("fastpath", ", dataplaneMode: tunnel");
        assert_eq!(
            ask(&tunnel, FRONTEND, ALLOWED, HOUR),
            None,
            "to a tunnel pod"
        );
        let fastpath = snapshot_with("tunnel", ", dataplaneMode: fastpath");
        assert_eq!(
            ask(&fastpath, FRONTEND, ALLOWED, HOUR),
            None,
            "frontend is in the node's mode: tunnel"
        );
        let both = Snapshot::from_texts(
            "node: { name: n1, address: 10.244.0.1 }\ntrustDomain: cluster.local\n\
             cgroupRoot: /cg\nbpfPinDir: /sys/fs/bpf/x\n\
             dataplane: { mode: tunnel, verdictTtl: 5m }\n\
             peers:\n  - { name: payment, namespace: prod, serviceAccount: payment, \
             labels: { app: payment }, ips: [10.244.2.2], node: 10.244.0.2, dataplaneMode: fastpath }\n\
             \x20 - { name: frontend, namespace: prod, serviceAccount: frontend, \
             ips: [10.244.3.2], node: 10.244.0.3, dataplaneMode: fastpath }\n",
            FRONTEND_ONLY,
        );
        assert_eq!(
            ask(&both, FRONTEND, ALLOWED, HOUR),
            Some(Duration::from_secs(300)),
            "both pods in fastpath on a tunnel node"
        );
    }

    #[test]
    fn mode_tunnel_caches_nothing() {
        let s = snapshot("tunnel");
        assert_eq!(ask(&s, FRONTEND, ALLOWED, HOUR), None);
        assert_eq!(ask(&s, LEDGER, DENIED, HOUR), None);
    }
}
