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
    chunk::{ChunkRead, ChunkWrite, io_error},
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

    /// The peer's `END_STREAM` came with (or right after) the bytes just read.
    fn ended(&mut self) -> bool {
        self.unread.is_empty() && self.recv.is_end_stream()
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

    fn send(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        self.shut |= end;
        self.stream()?.send_data(data, end).map_err(io_error)
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
    /// Send `chunk` in pieces as large as the peer's window allows; with `last`, the final
    /// piece carries `END_STREAM`.
    async fn write_chunk(&mut self, mut chunk: Bytes, last: bool) -> io::Result<()> {
        while !chunk.is_empty() {
            let room = poll_fn(|cx| self.poll_room(cx, chunk.len())).await?;
            let piece = chunk.split_to(room);
            self.send(piece, last && chunk.is_empty())?;
        }
        if last {
            // Sent with the final piece above; on its own only for an empty chunk.
            self.end()?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.end()
    }

    fn finished(&self) -> bool {
        self.shut
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
        writer.send(Bytes::copy_from_slice(&buf[..n]), false)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::{Method, Request, Response};

    /// The two ends of one `CONNECT` stream between an HTTP/2 client and server over an
    /// in-memory pipe: (the client's side, the server's side).
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            let (request, mut respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("a good stream");
            let send = respond
                .send_response(Response::new(()), false)
                .expect("200");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            H2Stream::new(send, request.into_body())
        });
        let (sender, connection) = h2::client::handshake(client_io)
            .await
            .expect("client handshake");
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.244.1.2:80")
            .body(())
            .expect("request");
        let (response, send) = sender
            .ready()
            .await
            .expect("ready")
            .send_request(request, false)
            .expect("CONNECT");
        let response = response.await.expect("answer");
        let client = H2Stream::new(send, response.into_body());
        (client, server.await.expect("server side"))
    }

    #[tokio::test]
    async fn the_last_chunk_carries_end_stream_and_the_reader_knows_it_came_with_it() {
        let (client, server) = stream_pair().await;
        let (_, mut writer) = client.into_halves();
        let (mut reader, _) = server.into_halves();

        writer
            .write_chunk(Bytes::from_static(b"first"), false)
            .await
            .expect("write");
        assert_eq!(
            reader.read_chunk().await.expect("read").as_deref(),
            Some(&b"first"[..])
        );
        assert!(
            !reader.ended(),
            "more may follow a chunk that was not the last"
        );

        writer
            .write_chunk(Bytes::from_static(b"last"), true)
            .await
            .expect("write the last");
        assert!(writer.finished(), "the last chunk ended the half");
        assert_eq!(
            reader.read_chunk().await.expect("read").as_deref(),
            Some(&b"last"[..])
        );
        assert!(reader.ended(), "END_STREAM came with the last bytes");
        assert_eq!(reader.read_chunk().await.expect("read"), None);
        writer
            .finish()
            .await
            .expect("a second end sends nothing and is no error");
    }
}
