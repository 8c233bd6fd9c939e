//! The destination's `200` to a `CONNECT`, held back for a moment so that it leaves with the
//! application's first bytes. By the time the `200` can be sent the application is connected and
//! has the source's early data (`hbone` sends the request behind the `CONNECT`), so its answer
//! usually follows within microseconds; sent alone, the `200` would be a TLS record, a packet
//! and a wake-up of the source agent of its own, just ahead of the data. The `200` goes out with
//! the first bytes, or the end, that the application sends, or on its own once [`ANSWER_WITHIN`]
//! has passed, whichever comes first; nothing the application sends ever waits for it. The
//! source waits for the `200` only to send more than its early data, and then at most that long.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use h2::{SendStream, server::SendResponse};
use hyper::Response;

use super::h2stream::io_error;

/// The longest a `200` waits for the application's first bytes.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1);

/// A `200` not sent yet, held by the stream's writer; a timer sends it at the latest.
pub struct PendingAnswer {
    shared: Arc<Shared>,
}

/// Starts the timer of a [`PendingAnswer`]. The destination starts it once the `CONNECT`'s
/// early data is on its way to the application, so that setting a timer is not among what
/// those bytes wait for.
pub struct AnswerTimer {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    timer: Mutex<Option<tokio::task::AbortHandle>>,
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
            timer: Mutex::new(None),
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
        self.shared.stop_timer();
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
    /// Send the answer [`ANSWER_WITHIN`] from now unless it has gone by then.
    pub fn start(self) {
        if !matches!(*lock(&self.shared.state), State::Waiting(..)) {
            return;
        }
        let shared = self.shared.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(ANSWER_WITHIN).await;
            shared.send();
        });
        // Sending after the answer went is harmless; the handle only saves a wake-up.
        *lock(&self.shared.timer) = Some(timer.abort_handle());
    }
}

impl Drop for PendingAnswer {
    /// A relay that ends (in an error) before the application sent anything still answers
    /// `200`, since the application was connected; the stream, dropped unfinished, is then reset.
    fn drop(&mut self) {
        self.shared.stop_timer();
        self.shared.send();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn stop_timer(&self) {
        if let Some(timer) = lock(&self.timer).take() {
            timer.abort();
        }
    }

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
