//! The destination's `200` to a `CONNECT`, held back so that it leaves with the application's first
//! bytes (or its end), or on its own once [`ANSWER_WITHIN`] has passed; nothing the application
//! sends waits for it. Held answers share one [`AnswerClock`] per HTTP/2 connection instead of a
//! timer each. Why: `docs/tunnel.md` (HBONE).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use bytes::Bytes;
use h2::{SendStream, server::SendResponse};
use hyper::Response;

use super::chunk::io_error;
use crate::sync::lock;

/// The longest a `200` waits for the application's first bytes.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1);

/// A `200` not sent yet, held by the stream's writer; a timer sends it at the latest.
pub struct PendingAnswer {
    shared: Arc<Shared>,
}

/// Starts the countdown of a [`PendingAnswer`]. The destination starts it once the `CONNECT`'s
/// early data is on its way to the application, so that it is not among what those bytes wait
/// for.
pub struct AnswerTimer {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
}

/// Sends the held answers of one HTTP/2 connection whose time is up (cheap to clone).
#[derive(Clone, Default)]
pub struct AnswerClock {
    inner: Arc<ClockInner>,
}

#[derive(Default)]
struct ClockInner {
    /// Held answers in the order they were held, with when each is due.
    held: Mutex<VecDeque<(Instant, Weak<Shared>)>>,
    /// An answer was held while none were.
    started: Notify,
}

enum State {
    Waiting(SendResponse<Bytes>, Response<()>),
    Sent(SendStream<Bytes>),
    /// Sending failed (the stream or connection is gone); the writer reports it.
    Failed(h2::Error),
    /// The writer took the stream.
    Taken,
}

impl PendingAnswer {
    /// Hold `response` back; it is sent at the latest [`ANSWER_WITHIN`] after the returned
    /// timer is started.
    pub fn new(respond: SendResponse<Bytes>, response: Response<()>) -> (Self, AnswerTimer) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::Waiting(respond, response)),
        });
        (
            Self {
                shared: shared.clone(),
            },
            AnswerTimer { shared },
        )
    }

    /// The stream to send on: the answer goes out now if it has not yet.
    pub fn take(&self) -> std::io::Result<SendStream<Bytes>> {
        self.shared.send();
        let mut state = lock(&self.shared.state);
        match std::mem::replace(&mut *state, State::Taken) {
            State::Sent(send) => Ok(send),
            State::Failed(e) => Err(io_error(e)),
            State::Waiting(..) | State::Taken => Err(std::io::Error::other(
                "the CONNECT's answer was already taken",
            )),
        }
    }
}

impl AnswerTimer {
    /// Have `clock` send the answer [`ANSWER_WITHIN`] from now (or up to that much later)
    /// unless it has gone by then.
    pub fn start(self, clock: &AnswerClock) {
        if !matches!(*lock(&self.shared.state), State::Waiting(..)) {
            return;
        }
        let due = Instant::now() + ANSWER_WITHIN;
        let mut held = lock(&clock.inner.held);
        held.push_back((due, Arc::downgrade(&self.shared)));
        if held.len() == 1 {
            clock.inner.started.notify_one();
        }
    }
}

impl AnswerClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Send the held answers as their time comes; never returns. Run it beside the
    /// connection's other work (its ticks are at least [`ANSWER_WITHIN`] apart, and it sleeps
    /// while no answer is held).
    pub async fn run(&self) {
        loop {
            let first_due = lock(&self.inner.held).front().map(|(due, _)| *due);
            let Some(first_due) = first_due else {
                self.inner.started.notified().await;
                continue;
            };
            if first_due > Instant::now() {
                tokio::time::sleep_until(first_due).await;
            }
            let now = Instant::now();
            let due: Vec<Weak<Shared>> = {
                let mut held = lock(&self.inner.held);
                let n = held.iter().take_while(|(due, _)| *due <= now).count();
                held.drain(..n).map(|(_, answer)| answer).collect()
            };
            for answer in due {
                if let Some(answer) = answer.upgrade() {
                    answer.send();
                }
            }
            // The next tick no sooner than that: one timer per tick, not one per answer.
            if !lock(&self.inner.held).is_empty() {
                tokio::time::sleep_until(now + ANSWER_WITHIN).await;
            }
        }
    }
}

impl Drop for PendingAnswer {
    /// A relay that ends (in an error) before the application sent anything still answers
    /// `200`, since the application was connected; the stream, dropped unfinished, is then reset.
    fn drop(&mut self) {
        self.shared.send();
    }
}

impl Shared {
    /// Send the answer now if it has not gone yet.
    fn send(&self) {
        let mut state = lock(&self.state);
        if let State::Waiting(..) = *state
            && let State::Waiting(mut respond, response) =
                std::mem::replace(&mut *state, State::Taken)
        {
            *state = match respond.send_response(response, false) {
                Ok(send) => State::Sent(send),
                Err(e) => State::Failed(e),
            };
        }
    }
}
