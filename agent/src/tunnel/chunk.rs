//! The I/O words the relay ([`super::splice`]), the HTTP/2 stream ([`super::h2stream`]) and the
//! held answer ([`super::answer`]) share: reading and writing whole chunks, HTTP/2 errors as I/O
//! errors, and non-waiting reads and writes on a TCP socket.

use std::{
    future::{Future, poll_fn},
    io,
    pin::Pin,
    task::Poll,
};

use bytes::Bytes;
use tokio::net::TcpStream;

/// Where a relay reads chunks from.
pub(crate) trait ChunkRead: Send {
    /// The next chunk; `None` once the sender has ended its half.
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// The sender is known to have ended its half after the chunk just read (known without
    /// another read): that chunk was the last.
    fn ended(&mut self) -> bool {
        false
    }
    /// `n` bytes of what was read have been written on: the sender may send more.
    fn consumed(&mut self, _n: usize) {}
}

/// Where a relay writes chunks to.
pub(crate) trait ChunkWrite: Send {
    /// Write `chunk`; with `last`, end this half right after it (as [`ChunkWrite::finish`]).
    fn write_chunk(
        &mut self,
        chunk: Bytes,
        last: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// End this half (FIN, or `END_STREAM`).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// This half has already been ended.
    fn finished(&self) -> bool {
        false
    }
}

/// Poll `future` once: whatever it can do without waiting is done, and its output if that was
/// all. Used to move a connection's first bytes before the bookkeeping that goes with them.
pub async fn poll_once<F: Future + ?Sized>(mut future: Pin<&mut F>) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

/// An HTTP/2 error as the I/O error a relay acts on: a reset stream is `ConnectionReset`.
pub fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// Write what the socket takes right now (0 bytes if it would block), without waiting for the
/// reactor to have reported it writable. A socket that was just connected or accepted is
/// writable, but tokio only learns so at its next poll of the I/O driver; going through it, the
/// first bytes of a connection (a request the application is waiting for) would wait behind
/// whatever else is ready to run.
pub(crate) fn write_now(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    use std::io::Write as _;
    match (&*socket2::SockRef::from(stream)).write(buf) {
        Ok(n) => Ok(n),
        Err(e) if would_block(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The most one [`take_now`] or [`try_take`] reads.
const TAKE_MOST: usize = 16 * 1024;

thread_local! {
    /// Each thread's buffer for [`take`]: written by the kernel, copied out at once.
    static TAKE_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; TAKE_MOST]);
}

/// Take what is already waiting on the socket (at most `limit` bytes, and at most
/// [`TAKE_MOST`]), without waiting for the reactor to have reported it readable (see
/// [`write_now`]), as a chunk of exactly the bytes read: a connection that keeps the chunk holds
/// those bytes, not a read buffer around them. `None` if nothing is waiting, an empty chunk at
/// end of stream.
pub(crate) fn take_now(stream: &TcpStream, limit: usize) -> io::Result<Option<Bytes>> {
    nothing_if_would_block(take(stream, limit))
}

/// Same as [`take_now`], once the reactor has reported `stream` readable: a socket found empty
/// is marked not ready again, so that the next wait for it waits.
pub(crate) fn try_take(stream: &TcpStream, limit: usize) -> io::Result<Option<Bytes>> {
    nothing_if_would_block(stream.try_io(tokio::io::Interest::READABLE, || take(stream, limit)))
}

/// One `recv` into the thread's buffer, copied out as a chunk of its own size.
fn take(stream: &TcpStream, limit: usize) -> io::Result<Bytes> {
    use std::io::Read as _;
    TAKE_BUF.with_borrow_mut(|buf| {
        let room = &mut buf[..limit.min(TAKE_MOST)];
        let n = (&*socket2::SockRef::from(stream)).read(room)?;
        Ok(Bytes::copy_from_slice(&room[..n]))
    })
}

fn nothing_if_would_block(read: io::Result<Bytes>) -> io::Result<Option<Bytes>> {
    match read {
        Ok(chunk) => Ok(Some(chunk)),
        Err(e) if would_block(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Make the coming close send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
