//! One HTTP/2 stream used as a byte stream: what a tunneled connection is once the `CONNECT` is
//! answered. Writes take only the send window the peer has granted (so a slow reader holds the
//! writer back instead of filling memory), reads give the window back as the bytes are consumed,
//! shutdown sends `END_STREAM` (a half-close), and a `RST_STREAM` from the peer is an error
//! (`ConnectionReset`), so the splice on this side resets its TCP socket too. Dropping the stream
//! before both sides ended it resets it (`CANCEL`).
//!
//! Both halves are used directly in the task that relays them (no channel to a helper task in
//! between), which keeps a tunneled connection's bytes to one wake-up per hop.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::splice::{ChunkRead, ChunkWrite};

/// A tunneled connection's HTTP/2 stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
    /// `END_STREAM` has been sent.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
        }
    }

    /// The two halves, for a relay that moves whole chunks (see [`super::splice`]).
    pub(crate) fn into_halves(self) -> (H2Reader, H2Writer) {
        (
            H2Reader {
                recv: self.recv,
                unread: self.unread,
            },
            H2Writer {
                send: self.send,
                shut: self.shut,
            },
        )
    }

    /// Mark this side's half as already ended (its `END_STREAM` was sent before the stream was
    /// handed over), so a later shutdown sends nothing.
    pub fn send_ended(mut self, ended: bool) -> Self {
        self.shut |= ended;
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

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                // END_STREAM: the peer half-closed.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = self.unread.len().min(out.remaining());
        out.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        // The window is given back only for what the reader has taken.
        let _ = self.recv.flow_control().release_capacity(n);
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
        self.send.reserve_capacity(buf.len());
        let mut capacity = self.send.capacity();
        while capacity == 0 {
            capacity = match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed for sending",
                    )));
                }
            };
        }
        let n = capacity.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The HTTP/2 connection's task writes queued frames out as soon as it is woken.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The receiving half of a tunnel stream.
pub(crate) struct H2Reader {
    recv: RecvStream,
    unread: Bytes,
}

impl ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.unread.is_empty() {
            return Ok(Some(std::mem::take(&mut self.unread)));
        }
        loop {
            match poll_fn(|cx| self.recv.poll_data(cx)).await {
                None => return Ok(None),
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => return Ok(Some(data)),
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Ok(None),
                Some(Err(e)) => return Err(io_error(e)),
            }
        }
    }

    fn consumed(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

/// The sending half of a tunnel stream.
pub(crate) struct H2Writer {
    send: SendStream<Bytes>,
    shut: bool,
}

impl ChunkWrite for H2Writer {
    /// Send `chunk` in pieces as large as the peer's window allows.
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.send.reserve_capacity(chunk.len());
            let capacity = poll_fn(|cx| {
                let now = self.send.capacity();
                if now > 0 {
                    return Poll::Ready(Ok(now));
                }
                match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(n)) => Poll::Ready(Ok(n)),
                    Some(Err(e)) => Poll::Ready(Err(io_error(e))),
                    None => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed for sending",
                    ))),
                }
            })
            .await?;
            if capacity == 0 {
                continue;
            }
            let piece = chunk.split_to(capacity.min(chunk.len()));
            self.send.send_data(piece, false).map_err(io_error)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        if !self.shut {
            self.shut = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Ok(())
    }
}
