//! The access log's sampled summary of what the kernel decided on its own: the kernel counters'
//! increase since the last summary (cached denies, inbound admissions and steering, audit events
//! dropped), beside the per-connection lines of [`super::audit`]; and a warning when the kernel
//! dropped fast-path audit events.

use std::{collections::BTreeMap, time::Duration};

use latch_common::Counter;

use crate::{sync::lock, verdicts::SharedMaps};

/// How many ticks go into one summary.
const SUMMARY_EVERY: u32 = 40;

/// Every [`SUMMARY_EVERY`] ticks, logs the counters' increase since the last summary, if any.
pub struct FastpathSummary {
    /// How often [`FastpathSummary::tick`] is called.
    tick_every: Duration,
    ticks: u32,
    last: BTreeMap<&'static str, u64>,
}

impl FastpathSummary {
    pub fn new(tick_every: Duration) -> Self {
        Self {
            tick_every,
            ticks: 0,
            last: BTreeMap::new(),
        }
    }

    pub fn tick(&mut self, maps: &SharedMaps) {
        self.ticks += 1;
        if !self.ticks.is_multiple_of(SUMMARY_EVERY) {
            return;
        }
        let Ok(counters) = lock(maps).counters() else {
            return;
        };
        let mut delta = BTreeMap::new();
        for (counter, value) in counters {
            let before = self.last.insert(counter.name(), value).unwrap_or(0);
            delta.insert(counter.name(), value.saturating_sub(before));
        }
        let dropped = delta
            .get(Counter::FastpathAuditDropped.name())
            .copied()
            .unwrap_or(0);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                interval_s = (self.tick_every * SUMMARY_EVERY).as_secs(),
                "fast-path audit events dropped (ring buffer full): those connections are \
                 missing from the Istio metrics and the access log"
            );
        }
        if delta.values().any(|d| *d > 0) {
            tracing::info!(
                target: "access",
                event = "fastpath summary",
                path = "fastpath",
                encrypted = false,
                interval_s = (self.tick_every * SUMMARY_EVERY).as_secs(),
                counters = %serde_json::to_string(&delta).unwrap_or_default(),
                "kernel fast-path activity"
            );
        }
    }
}
