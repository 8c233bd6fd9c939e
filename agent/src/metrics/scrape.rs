//! The running agent's [`ScrapeSource`]: what the metrics endpoint reads at each scrape.

use std::{sync::Arc, time::SystemTime};

use super::{ScrapeSnapshot, ScrapeSource};
use crate::{
    debug::agent::Published,
    identity::certs::{self, CertStore},
    scheduling::busy_poll,
    sync::lock,
    verdicts::{SharedMaps, VerdictCache},
};

/// Kernel counters, the verdict cache's size, certificate expiry, busy polling and the
/// workloads not served, read when scraped.
pub fn agent_source(
    maps: SharedMaps,
    cache: VerdictCache,
    certs: Arc<CertStore>,
    published: Published,
) -> ScrapeSource {
    Box::new(move || {
        let kernel_counters = lock(&maps).counters().unwrap_or_default();
        // From the agent's own record: a scrape never walks the kernel's million buckets
        // while connections wait for the maps.
        let cache_entries = cache.len() as u64;
        let now = SystemTime::now();
        let cert_expiry = certs
            .identities()
            .into_iter()
            .filter_map(|id| {
                let not_after = certs.current(&id)?.svid.not_after;
                Some((id, certs::seconds_left(not_after, now)))
            })
            .collect();
        let (api_failing, refused_policies) = published.source_health();
        ScrapeSnapshot {
            kernel_counters,
            cache_entries,
            cert_expiry,
            busy_poll_seconds: busy_poll::busy().as_secs_f64(),
            busy_poll_stretches: busy_poll::stretches(),
            failed_workloads: published.failed_workloads() as u64,
            api_failing: published.has_source().then_some(api_failing),
            refused_policies: refused_policies as u64,
        }
    })
}
