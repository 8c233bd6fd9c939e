//! The connections the agent is carrying right now — tunneled (either side of HBONE) or
//! plaintext delivered to an application — with who is talking to whom, live byte counts and
//! age, and the means to close the ones the current policy no longer allows.
//!
//! A carried connection registers itself ([`Tracker::register`]), is counted in the metrics as
//! opened ([`Tracked::count_opened`], once its first bytes have moved) and relays its bytes with
//! [`Tracked::splice`], which counts them as they pass and stops, resetting the local socket,
//! when the tracker closes it ([`Tracker::close_where`]). Dropping the [`Tracked`] handle removes
//! the entry (and counts the connection closed, if it was counted opened).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{
    chunk::reset,
    splice::{Remote, Transferred, relay},
};
use crate::{conn::ConnInfo, metrics::Metrics, sync::lock};

/// A point-in-time view of one carried connection.
#[derive(Clone, Debug)]
pub struct ConnSnapshot {
    pub info: ConnInfo,
    /// Bytes from the source to the destination so far.
    pub sent: u64,
    /// Bytes from the destination back to the source so far.
    pub received: u64,
    pub age: Duration,
}

struct Entry {
    info: ConnInfo,
    started: Instant,
    counters: Arc<Counters>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// The registry of carried connections (cheap to clone). With [`Tracker::with_metrics`], every
/// connection is also counted in Istio's TCP metrics when it opens and closes.
#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<Mutex<TrackerInner>>,
    /// Woken whenever a connection's handle is dropped.
    ended: Arc<tokio::sync::Notify>,
    metrics: Option<Metrics>,
}

#[derive(Default)]
struct TrackerInner {
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_metrics(metrics: Metrics) -> Self {
        Self {
            inner: Arc::default(),
            ended: Arc::default(),
            metrics: Some(metrics),
        }
    }

    /// Start tracking a connection; it stays listed until the returned handle is dropped.
    pub fn register(&self, info: ConnInfo) -> Tracked {
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.entries.insert(
            id,
            Entry {
                info,
                started: Instant::now(),
                counters: counters.clone(),
                cancel: cancel.clone(),
            },
        );
        Tracked {
            id,
            tracker: self.clone(),
            counters,
            cancel,
            opened: AtomicBool::new(false),
        }
    }

    /// Every carried connection, oldest first.
    pub fn snapshot(&self) -> Vec<ConnSnapshot> {
        let inner = lock(&self.inner);
        let mut all: Vec<(u64, ConnSnapshot)> = inner
            .entries
            .iter()
            .map(|(id, e)| {
                (
                    *id,
                    ConnSnapshot {
                        info: e.info.clone(),
                        sent: e.counters.sent.load(Ordering::Relaxed),
                        received: e.counters.received.load(Ordering::Relaxed),
                        age: e.started.elapsed(),
                    },
                )
            })
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// Number of carried connections.
    pub fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait until every connection closed so far ([`Tracker::close_where`], [`Tracked::close`])
    /// has ended, at most `limit`; whether they all had.
    pub async fn closed_ended(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !lock(&self.inner)
                .entries
                .values()
                .any(|e| e.cancel.is_cancelled())
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    /// Close every connection for which `pred` holds; returns how many were closed.
    pub fn close_where(&self, pred: impl Fn(&ConnInfo) -> bool) -> usize {
        let inner = lock(&self.inner);
        let mut closed = 0;
        for entry in inner.entries.values() {
            if !entry.cancel.is_cancelled() && pred(&entry.info) {
                entry.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// One tracked connection. Dropping it removes the entry.
pub struct Tracked {
    id: u64,
    tracker: Tracker,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    /// Counted in the metrics as opened.
    opened: AtomicBool,
}

impl Tracked {
    /// Close this connection as [`Tracker::close_where`] would.
    pub fn close(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let entry = lock(&self.tracker.inner).entries.remove(&self.id);
        self.tracker.ended.notify_waiters();
        if let (Some(metrics), Some(entry), true) = (
            &self.tracker.metrics,
            entry,
            self.opened.load(Ordering::Relaxed),
        ) {
            // Istio counts bytes sent in the response (to the client) and received in the
            // request (from the client).
            let (from_source, to_source) = self.totals();
            metrics.connection_closed(&metrics.labels_of(&entry.info), to_source, from_source);
        }
    }
}

impl Tracked {
    /// Count the connection as opened in the metrics (once; a connection never counted opened
    /// is not counted closed either).
    pub fn count_opened(&self) {
        let Some(metrics) = &self.tracker.metrics else {
            return;
        };
        if self.opened.swap(true, Ordering::Relaxed) {
            return;
        }
        // The labels are derived outside the tracker's lock (they read the state in force).
        let info = lock(&self.tracker.inner)
            .entries
            .get(&self.id)
            .map(|e| e.info.clone());
        if let Some(info) = info {
            metrics.connection_opened(&metrics.labels_of(&info));
        }
    }

    /// Has the tracker closed this connection?
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Wait until the tracker closes this connection.
    pub async fn closed(&self) {
        self.cancel.cancelled().await
    }

    /// Bytes (sent, received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.counters.sent.load(Ordering::Relaxed),
            self.counters.received.load(Ordering::Relaxed),
        )
    }

    /// `stream`, counting the bytes read from it as sent (source to destination) or received.
    pub fn counted<S>(&self, stream: S, which: Which) -> Counted<S> {
        Counted {
            inner: stream,
            counters: self.counters.clone(),
            which,
        }
    }

    /// Relay between `remote` (the side towards the other agent, or the plaintext client) and
    /// `local` (a TCP socket of a local workload) until both directions end, counting bytes as
    /// they pass. `local_is_source` says which way is "sent". If the tracker closes the
    /// connection, `local` is reset and `remote` dropped; that ends in an error.
    pub fn splice(
        &self,
        remote: impl Into<Remote>,
        mut local: TcpStream,
        local_is_source: bool,
    ) -> impl Future<Output = io::Result<Transferred>> + Send + '_ {
        let remote = remote.into();
        let (from_remote, from_local) = if local_is_source {
            (&self.counters.received, &self.counters.sent)
        } else {
            (&self.counters.sent, &self.counters.received)
        };
        // Not an `async fn`, whose arguments the future would hold twice (see `relay`).
        async move {
            let result = tokio::select! {
                r = relay(remote, &mut local, from_remote, from_local) => r,
                () = self.cancel.cancelled() => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed by the agent: no longer allowed",
                )),
            };
            if result.is_err() {
                reset(&local);
            }
            result
        }
    }
}

/// Which byte counter a read adds to.
#[derive(Clone, Copy, Debug)]
pub enum Which {
    /// Source to destination.
    Sent,
    /// Destination back to the source.
    Received,
}

/// A stream that counts the bytes read from it.
pub struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
    which: Which,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let counter = match self.which {
                Which::Sent => &self.counters.sent,
                Which::Received => &self.counters.received,
            };
            counter.fetch_add(n, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conn::Direction, identity::SpiffeId, tunnel::splice::tests::pair};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    fn info() -> ConnInfo {
        ConnInfo {
            source: Some(SpiffeId::valid(
                "spiffe://cluster.local/ns/prod/sa/frontend",
            )),
            destination: SpiffeId::valid("spiffe://cluster.local/ns/prod/sa/payment"),
            destination_address: "10.244.2.2:8080".parse().expect("addr"),
            source_ip: None,
            direction: Direction::Inbound,
            path: crate::conn::Via::Tunnel,
            workload: "prod/payment-1".into(),
        }
    }

    #[tokio::test]
    async fn counts_bytes_lists_and_unlists() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut client, remote) = pair(&listener).await;
        let (local, mut app) = pair(&listener).await;
        let tracker = Tracker::new();
        let tracked = tracker.register(info());
        let relay = tokio::spawn(async move { tracked.splice(remote, local, false).await });

        client.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        app.read_exact(&mut got).await.expect("app reads");
        app.write_all(b"hi").await.expect("app writes");
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.expect("client reads");
        let listed = tracker.snapshot();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].sent, listed[0].received), (5, 2));

        client.shutdown().await.expect("close");
        app.shutdown().await.expect("close");
        relay.await.expect("join").expect("relay");
        assert!(tracker.is_empty(), "the entry goes with the connection");
    }

    #[tokio::test]
    async fn close_where_resets_the_local_side() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (_client, remote) = pair(&listener).await;
        let (local, mut app) = pair(&listener).await;
        let tracker = Tracker::new();
        let tracked = tracker.register(info());
        let relay = tokio::spawn(async move { tracked.splice(remote, local, false).await });
        assert_eq!(
            tracker.close_where(|i| i
                .source
                .as_ref()
                .is_some_and(|s| s.as_str().ends_with("/sa/other"))),
            0
        );
        assert_eq!(
            tracker.close_where(|i| i
                .source
                .as_ref()
                .is_some_and(|s| s.as_str().ends_with("/sa/frontend"))),
            1
        );
        let err = relay.await.expect("join").expect_err("closed by the agent");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        let mut buf = [0u8; 1];
        let read = app.read(&mut buf).await;
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "the application sees a reset, got {read:?}"
        );
        assert!(tracker.is_empty());
    }
}
