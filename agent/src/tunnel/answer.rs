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
    state: Arc<Mutex<State>>,
    timer: tokio::task::AbortHandle,
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
    /// Hold `response` back; it is sent at the latest [`ANSWER_WITHIN`] from now.
    pub fn new(respond: SendResponse<Bytes>, response: Response<()>) -> Self {
        let state = Arc::new(Mutex::new(State::Waiting(respond, response)));
        let timer = {
            let state = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ANSWER_WITHIN).await;
                send(&state);
            })
            .abort_handle()
        };
        Self { state, timer }
    }

    /// The stream to send on: the answer goes out now if it has not yet.
    pub fn take(&self) -> std::io::Result<SendStream<Bytes>> {
        self.timer.abort();
        send(&self.state);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, State::Taken) {
            State::Sent(send) => Ok(send),
            State::Failed(e) => Err(io_error(e)),
            State::Waiting(..) | State::Taken => Err(std::io::Error::other(
                "the CONNECT's answer was already taken",
            )),
        }
    }
}

impl Drop for PendingAnswer {
    /// A relay that ends (in an error) before the application sent anything still answers
    /// `200`, since the application was connected; the stream, dropped unfinished, is then reset.
    fn drop(&mut self) {
        self.timer.abort();
        send(&self.state);
    }
}

/// Send the answer now if it has not gone yet.
fn send(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    if let State::Waiting(..) = *state
        && let State::Waiting(mut respond, response) = std::mem::replace(&mut *state, State::Taken)
    {
        *state = match respond.send_response(response, false) {
            Ok(send) => State::Sent(send),
            Err(e) => State::Failed(e),
        };
    }
}
