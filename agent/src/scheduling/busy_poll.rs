//! Busy polling after data-path activity (`dataplane.busyPoll`): for a window after each event
//! ([`activity`], or bytes moved on a [`Traffic`] socket) the runtime's worker keeps polling for
//! I/O instead of sleeping, so the answer it waits for is picked up without a wake-up.
//!
//! Only while it pays: the poller learns how the worker's idle stretches end. An idle stretch
//! starts when the worker runs out of work (it parks, [`worker_idle`], or a polling round passes
//! with no activity) and ends at the next activity; it pays when it ends within the window, where
//! polling would have caught the event instead of a wake-up. Windows start only while most recent
//! stretches paid ([`PAYS`]): a closed loop of requests, each answered and the next sent within
//! the window, keeps the worker polling; a request every millisecond, whose idle gap outlasts the
//! window, does not, since there each window would end empty and cost its whole length. Why, and
//! what it costs: `docs/config.md` (`busyPoll`); the measurements: `docs/benchmarks.md`.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

/// Keeps the current runtime polling for a window after each [`BusyPoll::activity`].
pub struct BusyPoll {
    epoch: Instant,
    /// The window in nanoseconds; zero turns polling off.
    window: AtomicU64,
    /// Nanoseconds after `epoch` until which the worker keeps polling.
    until: AtomicU64,
    /// The polling task is waiting for activity (and must be woken for it).
    parked: AtomicBool,
    wake: Notify,
    /// Polls made while kept busy.
    rounds: AtomicU64,
    /// Nanoseconds spent kept busy, over finished windows.
    busy: AtomicU64,
    /// Nanoseconds after `epoch` at which the worker ran out of work; 0 while it has work.
    idle_since: AtomicU64,
    /// Of the recent idle stretches, the share (in [`ONE`]ths, a moving average over about
    /// [`MEMORY`] stretches) that ended within the window.
    payoff: AtomicU32,
    /// Start windows only while they pay; otherwise after every activity.
    adaptive: AtomicBool,
    /// Idle stretches that ended within the window, and those that outlasted it.
    paid: AtomicU64,
    unpaid: AtomicU64,
}

/// The unit of [`BusyPoll::payoff`]: every stretch paid.
const ONE: u32 = 1024;

/// Windows start while at least this share of recent idle stretches (in [`ONE`]ths) ended within
/// the window: seven in eight. A closed loop of connections or requests pays nearly always. At one
/// request per millisecond on a connection, half the stretches (the wait for the answer) pay and
/// half (the wait for the next request) do not; at a thousand new connections per second about
/// four in five pay (the waits within a connection), and each that does not costs a whole window
/// of polling, more than the wake-ups the others save (`docs/benchmarks.md`, load).
pub const PAYS: u32 = ONE * 7 / 8;

/// The moving average's memory, in idle stretches: two stretches over the window in a row after
/// a run that paid leave polling on, three turn it off, and about six that pay turn it back on.
const MEMORY: u32 = 16;

impl BusyPoll {
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            window: AtomicU64::new(nanos(window)),
            until: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            wake: Notify::new(),
            rounds: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            payoff: AtomicU32::new(ONE),
            adaptive: AtomicBool::new(true),
            paid: AtomicU64::new(0),
            unpaid: AtomicU64::new(0),
        })
    }

    /// Change the window; zero stops polling after the current window.
    pub fn set_window(&self, window: Duration) {
        self.window.store(nanos(window), Ordering::Relaxed);
    }

    /// The data path just handled an event: keep polling for the next one for a window, if
    /// polling has been paying.
    pub fn activity(&self) {
        let window = self.window.load(Ordering::Relaxed);
        if window == 0 {
            return;
        }
        let now = self.now();
        if self.idle_since.load(Ordering::Relaxed) != 0 {
            let since = self.idle_since.swap(0, Ordering::Relaxed);
            if since != 0 {
                self.learn(now.saturating_sub(since) < window);
            }
        }
        if !self.pays() {
            return;
        }
        self.until.store(now + window, Ordering::Relaxed);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// The worker ran out of work: an idle stretch starts (unless one already has).
    pub fn idle(&self) {
        self.idle_at(self.now());
    }

    /// As [`Self::idle`], at `now` (already read by the caller).
    fn idle_at(&self, now: u64) {
        let _ =
            self.idle_since
                .compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// An idle stretch ended, within the window (`paid`) or not.
    fn learn(&self, paid: bool) {
        let payoff = self.payoff.load(Ordering::Relaxed);
        let next = payoff - payoff / MEMORY + if paid { ONE / MEMORY } else { 0 };
        self.payoff.store(next, Ordering::Relaxed);
        let counter = if paid { &self.paid } else { &self.unpaid };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether to start windows only while they pay (the default), or after every activity.
    pub fn set_adaptive(&self, adaptive: bool) {
        self.adaptive.store(adaptive, Ordering::Relaxed);
    }

    /// Whether windows start: recent idle stretches say polling pays, or it is not adaptive.
    pub fn pays(&self) -> bool {
        !self.adaptive.load(Ordering::Relaxed) || self.payoff.load(Ordering::Relaxed) >= PAYS
    }

    /// Idle stretches so far that ended within the window, and those that outlasted it.
    pub fn stretches(&self) -> (u64, u64) {
        (
            self.paid.load(Ordering::Relaxed),
            self.unpaid.load(Ordering::Relaxed),
        )
    }

    /// Whether the worker is being kept polling right now.
    pub fn is_polling(&self) -> bool {
        !self.parked.load(Ordering::Acquire) && self.now() < self.until.load(Ordering::Relaxed)
    }

    /// How many times the worker polled while kept busy.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Time the worker spent kept busy (windows that have ended).
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy.load(Ordering::Relaxed))
    }

    /// The polling task: spawn it once on the runtime to keep polling.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.parked.store(true, Ordering::Release);
            if self.now() >= self.until.load(Ordering::Relaxed) {
                self.wake.notified().await;
            } else {
                // Activity came in between the last check and parking: no wake-up was sent.
                self.parked.store(false, Ordering::Release);
            }
            let started = self.now();
            // The window's end when last seen: unchanged over a whole round means that round
            // (every task that was ready, then a poll for I/O) brought no activity.
            let mut seen = self.until.load(Ordering::Relaxed);
            loop {
                // Let any other thread that is ready run on this CPU, then hand the worker back
                // to the runtime: with a yielded task it polls for I/O with a zero timeout and
                // runs whatever became ready before coming back here.
                std::thread::yield_now();
                tokio::task::yield_now().await;
                self.rounds.fetch_add(1, Ordering::Relaxed);
                let until = self.until.load(Ordering::Relaxed);
                let now = self.now();
                if now >= until {
                    break;
                }
                if until == seen {
                    self.idle_at(now);
                }
                seen = until;
            }
            self.busy
                .fetch_add(self.now().saturating_sub(started), Ordering::Relaxed);
        }
    }

    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// End the current window now, as if its time had run out.
    #[cfg(test)]
    fn run_out(&self) {
        self.until.store(0, Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The agent's poller, once [`install`] has run.
static AGENT: OnceLock<Arc<BusyPoll>> = OnceLock::new();

/// Start the agent's poller on the current runtime (the first call only; later calls change the
/// window and whether it adapts).
pub fn install(window: Duration, adaptive: bool) {
    let mut created = None;
    let poller = AGENT.get_or_init(|| {
        let poller = BusyPoll::new(window);
        created = Some(poller.clone());
        poller
    });
    poller.set_window(window);
    poller.set_adaptive(adaptive);
    if let Some(poller) = created {
        tokio::spawn(poller.run());
    }
}

/// Time the agent's worker spent busy polling so far (for `latch_busy_poll_seconds_total`).
pub fn busy() -> Duration {
    AGENT.get().map_or(Duration::ZERO, |poller| poller.busy())
}

/// The runtime's worker is about to sleep for want of work (the runtime's `on_thread_park`
/// hook): an idle stretch starts for the agent's poller.
pub fn worker_idle() {
    if let Some(poller) = AGENT.get() {
        poller.idle();
    }
}

/// Idle stretches of the agent's worker that ended within the window and those that outlasted
/// it (for `latch_busy_poll_idle_stretches_total`).
pub fn stretches() -> (u64, u64) {
    AGENT.get().map_or((0, 0), |poller| poller.stretches())
}

/// Note data-path activity for the agent's poller (nothing before [`install`]).
pub fn activity() {
    if let Some(poller) = AGENT.get() {
        poller.activity();
    }
}

/// A socket whose every read or write of some bytes is data-path activity: the TLS connections
/// between agents. A tunnel's first connection is a TLS handshake, whose flights are hundreds of
/// microseconds of cryptography apart on each side; without this, the worker waiting for the
/// next flight would have stopped polling and be woken for it.
pub struct Traffic<S> {
    io: S,
    poller: Option<Arc<BusyPoll>>,
}

impl<S> Traffic<S> {
    /// `io`, its traffic noted for the agent's poller (nothing before [`install`]).
    pub fn new(io: S) -> Self {
        Self::noted_by(io, AGENT.get().cloned())
    }

    fn noted_by(io: S, poller: Option<Arc<BusyPoll>>) -> Self {
        Self { io, poller }
    }

    fn note<T>(&self, moved: bool, result: T) -> T {
        if moved && let Some(poller) = &self.poller {
            poller.activity();
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Traffic<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        let moved = matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        self.note(moved, read)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Traffic<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(wrote(&written), written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(wrote(&written), written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A write that sent something is activity: the answer to it is what comes next.
fn wrote(written: &Poll<io::Result<usize>>) -> bool {
    matches!(written, Poll::Ready(Ok(n)) if *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wait (yielding, never sleeping) until `cond` holds; fail after `limit`.
    async fn until(limit: Duration, mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(limit, async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition not reached in time");
    }

    /// A window no test outlasts: whether it is still open never depends on how fast the
    /// test runs. Tests end windows with [`BusyPoll::run_out`].
    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(flavor = "current_thread")]
    async fn polls_after_activity_and_parks_when_the_window_has_passed() {
        let poller = BusyPoll::new(LONG);
        tokio::spawn(poller.clone().run());
        until(Duration::from_secs(5), || {
            poller.parked.load(Ordering::Acquire)
        })
        .await;
        assert!(!poller.is_polling(), "no activity yet");

        poller.activity();
        assert!(poller.is_polling(), "activity starts a window");
        // The task wakes and keeps the worker polling; the window then runs out with nothing new.
        until(Duration::from_secs(5), || poller.rounds() > 0).await;
        poller.run_out();
        until(Duration::from_secs(5), || {
            poller.parked.load(Ordering::Acquire)
        })
        .await;
        assert!(!poller.is_polling());
        assert!(
            poller.busy() > Duration::ZERO,
            "the window's time is counted"
        );
        let rounds = poller.rounds();
        tokio::task::yield_now().await;
        assert_eq!(poller.rounds(), rounds, "parked: no more polling");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn traffic_both_ways_is_activity() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        // A window far longer than the test: each activity moves its end, whatever the timing.
        let poller = BusyPoll::new(Duration::from_secs(3600));
        let window_end = || poller.until.load(Ordering::Relaxed);
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Traffic::noted_by(near, Some(poller.clone()));

        let before = window_end();
        near.write_all(b"ping").await.expect("write");
        let after_write = window_end();
        assert!(after_write > before, "a write starts a window");

        far.write_all(b"pong").await.expect("far write");
        assert_eq!(
            window_end(),
            after_write,
            "bytes waiting are not activity yet"
        );
        let mut buf = [0u8; 4];
        near.read_exact(&mut buf).await.expect("read");
        let after_read = window_end();
        assert!(after_read > after_write, "a read starts a window");

        drop(far);
        assert_eq!(near.read(&mut buf).await.expect("end"), 0);
        assert_eq!(
            window_end(),
            after_read,
            "the end of the stream moves no bytes"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_zero_window_never_polls() {
        let poller = BusyPoll::new(Duration::ZERO);
        tokio::spawn(poller.clone().run());
        poller.activity();
        assert!(!poller.is_polling());

        poller.set_window(LONG);
        poller.activity();
        assert!(
            poller.is_polling(),
            "a window set later applies to the next activity"
        );
        poller.set_window(Duration::ZERO);
        poller.run_out();
        until(Duration::from_secs(5), || {
            poller.parked.load(Ordering::Acquire)
        })
        .await;
        let rounds = poller.rounds();
        poller.activity();
        assert!(!poller.is_polling());
        tokio::task::yield_now().await;
        assert_eq!(poller.rounds(), rounds);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn windows_stop_once_idle_stretches_outlast_them_and_start_again_when_they_pay() {
        let poller = BusyPoll::new(LONG);
        assert!(poller.pays(), "a new poller polls");
        // Idle stretches longer than the window: the wait for the next request at a low rate.
        for _ in 0..3 {
            poller.learn(false);
        }
        assert!(
            !poller.pays(),
            "three unpaid stretches in a row stop polling"
        );
        poller.activity();
        assert!(
            !poller.is_polling(),
            "no window starts while polling does not pay"
        );

        // Stretches that end within the window, as the worker parks and wakes (the runtime's
        // `on_thread_park` hook calls `idle`): every one is learned, with or without polling.
        let mut stretches = 0;
        while !poller.pays() {
            poller.idle();
            poller.activity();
            stretches += 1;
            assert!(
                stretches < 16,
                "paid stretches never turned polling back on"
            );
        }
        assert_eq!(poller.stretches(), (stretches, 3));
        poller.activity();
        assert!(poller.is_polling(), "polling pays again: windows start");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_polling_round_without_activity_starts_an_idle_stretch() {
        let poller = BusyPoll::new(LONG);
        tokio::spawn(poller.clone().run());
        poller.activity();
        until(Duration::from_secs(5), || {
            poller.idle_since.load(Ordering::Relaxed) != 0
        })
        .await;
        assert_eq!(poller.stretches(), (0, 0));
        poller.activity();
        assert_eq!(
            poller.stretches(),
            (1, 0),
            "caught within the window: it paid"
        );
        assert_eq!(poller.idle_since.load(Ordering::Relaxed), 0);
        poller.run_out();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_adapting_every_activity_starts_a_window() {
        let poller = BusyPoll::new(LONG);
        poller.set_adaptive(false);
        for _ in 0..MEMORY * 2 {
            poller.learn(false);
        }
        poller.activity();
        assert!(poller.is_polling());
    }
}
