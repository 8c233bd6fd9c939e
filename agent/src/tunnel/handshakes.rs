//! TLS handshakes in progress on the tunnel listeners, counted per source address.
//!
//! Until its handshake completes, a connection to a tunnel port has proven nothing: anyone who
//! can reach a pod may open one, and each holds one of the agent's descriptors. The handshake
//! has a deadline (`tunnel.handshakeTimeout`), and one source address may have at most
//! `tunnel.maxHandshakesPerSource` handshakes in progress across all of the node's tunnel
//! listeners; a connection beyond that is reset as soon as it is accepted. So one source holds
//! at most that many descriptors of the agent's, each for at most the deadline, whatever it
//! opens, and connections from other sources are not kept waiting behind them. Refusals are
//! logged at most once per [`crate::accept::WARN_EVERY`], with their number.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    accept::{Tally, WARN_EVERY},
    sync::lock,
};

/// The handshakes in progress of every source, shared by the node's tunnel listeners.
#[derive(Clone, Debug)]
pub struct Handshakes(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    in_progress: HashMap<IpAddr, usize>,
    refused: Tally,
}

impl Default for Handshakes {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(State {
            in_progress: HashMap::new(),
            refused: Tally::new(WARN_EVERY),
        })))
    }
}

impl Handshakes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a handshake from `source` if it has fewer than `limit` in progress; it counts until
    /// the returned [`InProgress`] is dropped. `None` (refused, and counted for the log) if not.
    pub fn start(&self, source: IpAddr, limit: usize) -> Option<InProgress> {
        let source = source.to_canonical();
        let mut state = lock(&self.0);
        let count = state.in_progress.entry(source).or_default();
        if *count >= limit {
            if let Some(refused) = state.refused.add() {
                tracing::warn!(
                    %source,
                    limit,
                    refused,
                    "tunnel connections closed: too many TLS handshakes in progress from one source"
                );
            }
            return None;
        }
        *count += 1;
        Some(InProgress {
            handshakes: self.clone(),
            source,
        })
    }

    /// Handshakes in progress from `source`.
    pub fn in_progress(&self, source: IpAddr) -> usize {
        let state = lock(&self.0);
        state
            .in_progress
            .get(&source.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

/// One handshake in progress; it ends when this is dropped.
#[derive(Debug)]
pub struct InProgress {
    handshakes: Handshakes,
    source: IpAddr,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut state = lock(&self.handshakes.0);
        if let Some(count) = state.in_progress.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                state.in_progress.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_has_at_most_its_limit_in_progress_and_others_are_not_affected() {
        let handshakes = Handshakes::new();
        let attacker: IpAddr = "10.244.1.9".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.244.1.9".parse().expect("ip");
        let other: IpAddr = "10.244.1.2".parse().expect("ip");
        let held: Vec<_> = (0..3)
            .map(|_| handshakes.start(attacker, 3).expect("within the limit"))
            .collect();
        assert!(handshakes.start(attacker, 3).is_none(), "beyond the limit");
        assert!(
            handshakes.start(mapped, 3).is_none(),
            "the same source seen by a dual-stack listener"
        );
        let _other = handshakes.start(other, 3).expect("another source");
        assert_eq!(handshakes.in_progress(attacker), 3);
        drop(held);
        assert_eq!(handshakes.in_progress(attacker), 0, "all ended");
        let _again = handshakes.start(attacker, 3).expect("room again");
        assert_eq!(handshakes.in_progress(other), 1);
    }
}
