//! Accept loops that outlast running out of descriptors: after `EMFILE`, `ENFILE`, `ENOBUFS` or
//! `ENOMEM` a loop's [`Backoff`] waits before its next `accept()` ([`MIN_DELAY`], doubling up to
//! [`MAX_DELAY`]) instead of spinning, and logs at most once per [`WARN_EVERY`] per listener
//! ([`Tally`]). Why: `docs/security.md` (Resource exhaustion).

use std::{fmt::Display, io, time::Duration};

use tokio::time::Instant;

/// The wait after the first failure for lack of resources.
pub const MIN_DELAY: Duration = Duration::from_millis(5);
/// The longest wait between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// At most one warning line per listener in this time.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether an `accept()` error means the process or the kernel is out of something the next
/// attempt needs too (so retrying at once would spin), rather than a problem of one connection.
pub fn out_of_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Counts events and says when one log line may summarise them: at the first event, then at
/// most once per `every`. Time is tokio's clock.
#[derive(Debug)]
pub struct Tally {
    every: Duration,
    /// Events since the last line.
    count: u64,
    last_line: Option<Instant>,
}

impl Tally {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            count: 0,
            last_line: None,
        }
    }

    /// Count one event; `Some(n)` when a line is due now, saying that `n` events happened since
    /// the last one (this one included).
    pub fn add(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .last_line
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// What one accept loop does about failed accepts (see the module's documentation).
#[derive(Debug)]
pub struct Backoff {
    /// Names the listener in log lines.
    listener: String,
    /// The next wait after a failure for lack of resources.
    delay: Duration,
    /// Failures since the last success.
    failing: u64,
    warnings: Tally,
}

impl Backoff {
    pub fn new(listener: impl Display) -> Self {
        Self {
            listener: listener.to_string(),
            delay: MIN_DELAY,
            failing: 0,
            warnings: Tally::new(WARN_EVERY),
        }
    }

    /// An `accept()` failed with `error`: warn (at most once per [`WARN_EVERY`]) and, if the
    /// process or the kernel is out of resources, wait before the next attempt.
    pub async fn failed(&mut self, error: &io::Error) {
        self.failing += 1;
        let wait = out_of_resources(error).then_some(self.delay);
        if let Some(failed) = self.warnings.add() {
            tracing::warn!(
                listener = %self.listener,
                failed,
                error = %error,
                backoff_ms = wait.map_or(0, |w| w.as_millis() as u64),
                "accepts failed"
            );
        }
        if let Some(wait) = wait {
            self.delay = (self.delay * 2).min(MAX_DELAY);
            tokio::time::sleep(wait).await;
        }
    }

    /// An `accept()` succeeded: after failures, say once that the listener accepts again.
    pub fn accepted(&mut self) {
        if self.failing == 0 {
            return;
        }
        tracing::info!(listener = %self.listener, failed = self.failing, "accepting again");
        self.failing = 0;
        self.delay = MIN_DELAY;
    }

    /// The next connection `accept` brings: a failed accept (`EMFILE` and friends) backs off
    /// and tries again, so the loop keeps serving without spinning.
    pub async fn next<T, Fut>(&mut self, mut accept: impl FnMut() -> Fut) -> T
    where
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(accepted) => {
                    self.accepted();
                    return accepted;
                }
                Err(e) => self.failed(&e).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exhaustion_errors_make_the_loop_wait() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EPERM, libc::EPROTO, libc::EINTR] {
            assert!(!out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tally_summarises_at_most_once_per_interval() {
        let mut tally = Tally::new(Duration::from_secs(10));
        assert_eq!(tally.add(), Some(1), "the first event is reported at once");
        assert_eq!(tally.add(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(tally.add(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            tally.add(),
            Some(3),
            "the next line counts everything since"
        );
        assert_eq!(tally.add(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_doubles_up_to_its_limit_and_starts_over_after_a_success() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut backoff = Backoff::new("test");
        let mut waits = Vec::new();
        for _ in 0..10 {
            let before = Instant::now();
            backoff.failed(&emfile).await;
            waits.push(Instant::now() - before);
        }
        // Whole milliseconds: the timer wheel's resolution.
        let waits: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000],
            "waits after successive failures"
        );
        backoff.accepted();
        let before = Instant::now();
        backoff.failed(&emfile).await;
        assert_eq!((Instant::now() - before).as_millis(), MIN_DELAY.as_millis());
        let before = Instant::now();
        backoff
            .failed(&io::Error::from_raw_os_error(libc::ECONNABORTED))
            .await;
        assert_eq!(Instant::now() - before, Duration::ZERO, "no wait");
    }
}
