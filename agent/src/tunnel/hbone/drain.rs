//! Draining the node's tunnels when the agent stops (SIGTERM): every tunnel server connection
//! gets `GOAWAY` (no new streams; those it carries go on), and the agent waits, up to a limit,
//! for the streams still open on either side (server connections, the client's tunneled
//! connections) to finish before it exits, as ztunnel drains. A pod's own drain
//! ([`Drain::child`]) starts when the agent stops serving the pod (it left, or its listeners
//! were replaced): its server connections get `GOAWAY` too, so clients dial its new listener
//! instead of streaming into a connection proven for what is gone. See `docs/tunnel.md`
//! (*HBONE*).

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// How long a drain waits for open streams before the agent exits anyway (ztunnel's default
/// termination deadline; Kubernetes waits `terminationGracePeriodSeconds`, 30 s in `deploy/`,
/// before it kills the process).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One drain's state: whether it has started, and how many tunnel server connections and client
/// streams are open. The agent's is [`Drain::node`]; tests make their own.
#[derive(Clone)]
pub struct Drain(Arc<Inner>);

struct Inner {
    started: watch::Sender<bool>,
    open: watch::Sender<usize>,
    /// The drain this one is part of: it starts this one too, and counts what this one counts.
    parent: Option<Drain>,
}

/// What a drain found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Server connections and client streams still open at the limit (0: all finished).
    pub left: usize,
    /// How long it waited.
    pub waited: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(Inner {
            started: watch::Sender::new(false),
            open: watch::Sender::new(0),
            parent: None,
        }))
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's drain: every tunnel server connection and client stream counts in it
    /// unless made with another.
    pub fn node() -> Self {
        static NODE: LazyLock<Drain> = LazyLock::new(Drain::new);
        NODE.clone()
    }

    /// A drain of part of this one (a pod's tunnel server connections): it starts when this one
    /// starts or on its own ([`Self::start`]), and what it counts is counted here too.
    pub fn child(&self) -> Self {
        Self(Arc::new(Inner {
            started: watch::Sender::new(false),
            open: watch::Sender::new(0),
            parent: Some(self.clone()),
        }))
    }

    /// Start the drain without waiting for it (a pod the agent no longer serves).
    pub fn start(&self) {
        self.0.started.send_replace(true);
    }

    /// Count a server connection or client stream as open until the guard drops.
    pub(super) fn open(&self) -> Open {
        self.0.open.send_modify(|n| *n += 1);
        Open {
            drain: self.clone(),
            _in_parent: self.0.parent.as_ref().map(|p| Box::new(p.open())),
        }
    }

    /// Resolves once the drain has started (at once if it has), or the one it is part of.
    pub(super) async fn started(&self) {
        let mut own = self.0.started.subscribe();
        // The senders live as long as `self`: waiting cannot fail.
        match &self.0.parent {
            None => {
                let _ = own.wait_for(|s| *s).await;
            }
            Some(parent) => {
                let mut parents = parent.0.started.subscribe();
                tokio::select! {
                    _ = own.wait_for(|s| *s) => {}
                    _ = parents.wait_for(|s| *s) => {}
                }
            }
        }
    }

    /// Start the drain (server connections send `GOAWAY`) and wait until nothing is open, at
    /// most `limit`.
    pub async fn run(&self, limit: Duration) -> Drained {
        let begun = Instant::now();
        self.0.started.send_replace(true);
        let mut open = self.0.open.subscribe();
        let finished = tokio::time::timeout(limit, open.wait_for(|n| *n == 0))
            .await
            .is_ok();
        let left = if finished { 0 } else { *open.borrow() };
        Drained {
            left,
            waited: begun.elapsed(),
        }
    }

    /// [`Self::run`] for the agent's exit, logged.
    pub async fn on_exit(&self, limit: Duration) {
        let open = *self.0.open.borrow();
        tracing::info!(
            open,
            limit = ?limit,
            "draining the tunnels: GOAWAY on every server connection, open streams may finish"
        );
        let drained = self.run(limit).await;
        if drained.left == 0 {
            tracing::info!(waited = ?drained.waited, "tunnels drained");
        } else {
            tracing::warn!(left = drained.left, waited = ?drained.waited, "tunnels not drained in time; the streams still open are cut");
        }
    }
}

/// A server connection or client stream counted as open in a [`Drain`] (and in the drain it is
/// part of).
pub(super) struct Open {
    drain: Drain,
    _in_parent: Option<Box<Open>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.drain.0.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_what_is_open_and_no_longer() {
        let drain = Drain::new();
        let open = drain.open();
        let started = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await }
        });
        let running = tokio::spawn({
            let drain = drain.clone();
            async move { drain.run(Duration::from_secs(3600)).await }
        });
        started.await.expect("the drain started");
        assert!(!running.is_finished(), "a stream is still open");
        drop(open);
        let drained = running.await.expect("join");
        assert_eq!(drained.left, 0);
    }

    #[tokio::test]
    async fn a_pods_drain_starts_alone_or_with_the_nodes_and_counts_in_both() {
        let node = Drain::new();
        let pod = node.child();
        let open = pod.open();
        pod.start();
        pod.started().await;
        assert!(
            !*node.0.started.borrow(),
            "a pod's drain leaves the node's alone"
        );
        assert_eq!(
            *node.0.open.borrow(),
            1,
            "the node counts the pod's connection"
        );
        drop(open);
        assert_eq!(*node.0.open.borrow(), 0);

        let other = node.child();
        let waiting = tokio::spawn({
            let other = other.clone();
            async move { other.started().await }
        });
        assert!(node.run(Duration::from_secs(1)).await.left == 0);
        waiting.await.expect("the node's drain starts every pod's");
    }

    #[tokio::test]
    async fn a_drain_that_times_out_says_what_was_left() {
        let drain = Drain::new();
        let _open = [drain.open(), drain.open()];
        let drained = drain.run(Duration::from_millis(1)).await;
        assert_eq!(drained.left, 2);
    }
}
