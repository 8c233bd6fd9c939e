//! One HTTP/2 stream used as a byte stream: what a tunneled connection is once the `CONNECT` is
//! answered. Writes take only the send window the peer has granted (so a slow reader holds the
//! writer back instead of filling memory), reads give the window back as the bytes are consumed,
//! shutdown sends `END_STREAM` (a half-close), and a `RST_STREAM` from the peer is an error
//! (`ConnectionReset`), so the splice on this side resets its TCP socket too. Dropping the stream
//! before both sides ended it resets it (`CANCEL`).
//!
//! The stream is read and written directly by the task that relays it (no channel to a helper
//! task in between): as whole chunks by the splice ([`H2Stream::into_halves`]), or through
//! `AsyncRead`/`AsyncWrite` by the HTTP/1.1 enforcement.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    answer::PendingAnswer,
    splice::{ChunkRead, ChunkWrite},
};

/// A tunneled connection's HTTP/2 stream.
pub struct H2Stream {
    reader: H2Reader,
    writer: H2Writer,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self::with_sender(Sender::Open(send), recv)
    }

    /// A stream whose `200` has not been sent yet: it goes with the first bytes written (or the
    /// shutdown), or on its own when its timer runs out ([`PendingAnswer`]).
    pub fn answering(answer: PendingAnswer, recv: RecvStream) -> Self {
        Self::with_sender(Sender::Pending(answer), recv)
    }

    fn with_sender(send: Sender, recv: RecvStream) -> Self {
        Self {
            reader: H2Reader {
                recv,
                unread: Bytes::new(),
            },
            writer: H2Writer { send, shut: false },
        }
    }

    /// The two halves, for a relay that moves whole chunks (see [`super::splice`]).
    pub(crate) fn into_halves(self) -> (H2Reader, H2Writer) {
        (self.reader, self.writer)
    }

    /// Mark this side's half as already ended (its `END_STREAM` was sent before the stream was
    /// handed over), so a later shutdown sends nothing.
    pub fn send_ended(mut self, ended: bool) -> Self {
        self.writer.shut |= ended;
        self
    }
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

/// The receiving half of a tunnel stream.
pub(crate) struct H2Reader {
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
}

impl H2Reader {
    /// The next received bytes; `None` once the peer ended its half (`END_STREAM`, or a reset
    /// with `NO_ERROR`).
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.unread))));
        }
        loop {
            let chunk = match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => Ok(Some(data)),
                None => Ok(None),
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => Ok(None),
                Some(Err(e)) => Err(io_error(e)),
            };
            return Poll::Ready(chunk);
        }
    }

    /// `n` bytes have been taken: the window is given back only for those.
    fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn consumed(&mut self, n: usize) {
        self.release(n);
    }
}

/// The sending half of a tunnel stream.
pub(crate) struct H2Writer {
    send: Sender,
    /// `END_STREAM` has been sent.
    shut: bool,
}

/// What the writer sends on.
enum Sender {
    Open(SendStream<Bytes>),
    /// The `CONNECT`'s answer is still held back.
    Pending(PendingAnswer),
}

impl H2Writer {
    /// The stream to send on, sending the held-back answer first if there is one.
    fn stream(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        if let Sender::Pending(answer) = &self.send {
            self.send = Sender::Open(answer.take()?);
        }
        match &mut self.send {
            Sender::Open(send) => Ok(send),
            Sender::Pending(_) => unreachable!("replaced just above"),
        }
    }

    /// Room to send up to `wanted` bytes: the window the peer has granted, at least one byte.
    fn poll_room(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        let send = self.stream()?;
        send.reserve_capacity(wanted);
        loop {
            let now = send.capacity();
            if now > 0 {
                return Poll::Ready(Ok(now.min(wanted)));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed for sending",
                    )));
                }
            }
        }
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.stream()?.send_data(data, false).map_err(io_error)
    }

    /// Send `END_STREAM`, once.
    fn end(&mut self) -> io::Result<()> {
        if !self.shut {
            self.shut = true;
            let send = self.stream()?;
            send.reserve_capacity(0);
            send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Ok(())
    }
}

impl ChunkWrite for H2Writer {
    /// Send `chunk` in pieces as large as the peer's window allows.
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            let room = poll_fn(|cx| self.poll_room(cx, chunk.len())).await?;
            self.send(chunk.split_to(room))?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.end()
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let reader = &mut self.reader;
        let Some(mut data) = ready!(reader.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = data.len().min(out.remaining());
        out.put_slice(&data[..n]);
        data.advance(n);
        reader.unread = data;
        reader.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let writer = &mut self.writer;
        let n = ready!(writer.poll_room(cx, buf.len()))?;
        writer.send(Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The HTTP/2 connection's task writes queued frames out as soon as it is woken.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.writer.end())
    }
}
