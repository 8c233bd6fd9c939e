//! Byte splicing between a local TCP socket and the far side of a carried connection (another
//! TCP socket, or a tunnel's HTTP/2 stream): both directions at once, half-close carried across
//! (EOF on one side ends writing on the other), and an error on either side resets both, so
//! nothing is left hanging.
//!
//! Bytes move as reference-counted chunks: what is read from a socket is the very buffer handed
//! to HTTP/2, and what HTTP/2 received is written to the socket as it is, with no copy in
//! between. Read buffers follow the traffic, from [`MIN_READ`] up to [`MAX_READ`], and are taken
//! only once bytes are waiting and handed on whole with them: an idle connection holds no read
//! buffer, a bulk transfer moves in large reads.

use std::{
    io,
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures::TryFutureExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{
    chunk::{ChunkRead, ChunkWrite, poll_once, reset, write_now},
    h2stream::H2Stream,
};

/// The first read of a connection, and the smallest a read shrinks to.
pub const MIN_READ: usize = 16 * 1024;
/// The largest read, reached by reads that keep filling what they were given.
pub const MAX_READ: usize = 512 * 1024;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the far side to the local socket.
    pub a_to_b: u64,
    /// From the local socket to the far side.
    pub b_to_a: u64,
}

/// The far side of a spliced connection.
pub enum Remote {
    Tcp(TcpStream),
    /// A tunnel stream, and whatever must live as long as it is carried.
    Tunnel {
        stream: H2Stream,
        keep: Option<Box<dyn Send>>,
    },
}

impl From<TcpStream> for Remote {
    fn from(tcp: TcpStream) -> Self {
        Remote::Tcp(tcp)
    }
}

impl From<H2Stream> for Remote {
    fn from(stream: H2Stream) -> Self {
        Remote::Tunnel { stream, keep: None }
    }
}

/// Relay between `remote` and `local` until both directions have ended. `from_remote` and
/// `from_local` count the bytes read from each side as they pass. On error a TCP `remote` is
/// reset and a tunnel stream is reset by dropping it; resetting `local` is the caller's (it may
/// also stop the relay for reasons of its own).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice in the future"
)]
pub fn relay<'a>(
    remote: Remote,
    local: &'a mut TcpStream,
    from_remote: &'a AtomicU64,
    from_local: &'a AtomicU64,
) -> impl Future<Output = io::Result<Transferred>> + Send + 'a {
    // Not an `async fn`, whose arguments the future would hold twice (as passed, and moved into
    // its body): a held connection keeps this future as long as it lives.
    async move {
        let (local_read, local_write) = local.split();
        let (local_read, local_write) = (TcpReader::new(local_read), TcpWriter::new(local_write));
        match remote {
            Remote::Tcp(mut tcp) => {
                let result = {
                    let (read, write) = tcp.split();
                    both_ways(
                        TcpReader::new(read),
                        TcpWriter::new(write),
                        local_read,
                        local_write,
                        from_remote,
                        from_local,
                    )
                    .await
                };
                if result.is_err() {
                    reset(&tcp);
                }
                result
            }
            Remote::Tunnel { stream, keep } => {
                let (read, write) = stream.into_halves();
                let result = both_ways(
                    read,
                    write,
                    local_read,
                    local_write,
                    from_remote,
                    from_local,
                )
                .await;
                // The last frames (often the answer itself, with END_STREAM) are queued for the
                // HTTP/2 connection's task: let it write them, and let whatever else is waiting (the
                // client's next connection, say) go, before this task goes on to close the socket
                // and log the connection.
                crate::scheduling::yielding::behind_ready().await;
                drop(keep);
                result
            }
        }
    }
}

fn both_ways<'a>(
    remote_read: impl ChunkRead + 'a,
    remote_write: impl ChunkWrite + 'a,
    local_read: impl ChunkRead + 'a,
    local_write: impl ChunkWrite + 'a,
    from_remote: &'a AtomicU64,
    from_local: &'a AtomicU64,
) -> impl Future<Output = io::Result<Transferred>> + Send + 'a {
    // Neither an `async fn` nor `try_join!`, each of which would hold the two pumps (or their
    // arguments) twice for as long as the connection lives.
    futures::future::try_join(
        pump(remote_read, local_write, from_remote),
        pump(local_read, remote_write, from_local),
    )
    .map_ok(|(a_to_b, b_to_a)| Transferred { a_to_b, b_to_a })
}

/// Move chunks from `from` to `to` until `from` ends, then end `to`.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice in the future"
)]
fn pump<'a>(
    mut from: impl ChunkRead + 'a,
    mut to: impl ChunkWrite + 'a,
    count: &'a AtomicU64,
) -> impl Future<Output = io::Result<u64>> + Send + 'a {
    // Not an `async fn`, whose arguments the future would hold twice (see `relay`).
    async move {
        let mut total = 0;
        if to.finished() {
            // This half was ended before the relay began (a source's FIN that went out with the
            // `CONNECT`): there is nothing left to read.
            return Ok(0);
        }
        while let Some(chunk) = from.read_chunk().await? {
            let n = chunk.len();
            crate::scheduling::busy_poll::activity();
            count.fetch_add(n as u64, Ordering::Relaxed);
            // A sender that has already ended its half: its last bytes and the end go together
            // (one `DATA` frame with `END_STREAM`, or the bytes and the FIN back to back).
            let last = from.ended();
            to.write_chunk(chunk, last).await?;
            from.consumed(n);
            total += n as u64;
            if last {
                return Ok(total);
            }
        }
        to.finish().await?;
        Ok(total)
    }
}

/// Reads from a TCP socket into buffers sized by what the last reads brought.
struct TcpReader<'a> {
    io: ReadHalf<'a>,
    buf: BytesMut,
    next: usize,
    /// The last read emptied the socket, and its FIN had already arrived.
    drained_to_fin: bool,
}

impl<'a> TcpReader<'a> {
    fn new(io: ReadHalf<'a>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            next: MIN_READ,
            drained_to_fin: false,
        }
    }
}

impl ChunkRead for TcpReader<'_> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.drained_to_fin {
            return Ok(None);
        }
        // Wait for bytes before taking a buffer for them: an idle connection (most of a busy
        // node's open connections are) holds no read buffer.
        self.io.as_ref().readable().await?;
        let limit = self.next;
        self.buf.reserve(limit);
        let n = self.io.read_buf(&mut (&mut self.buf).limit(limit)).await?;
        if n == 0 {
            return Ok(None);
        }
        // A read that got less than it asked for emptied the socket; if the peer's FIN had
        // already arrived (the reactor saw it: a closed read side is never cleared), nothing
        // follows. An error or reset is left for a read to report.
        if n < limit
            && let Poll::Ready(Ok(ready)) =
                poll_once(pin!(self.io.as_ref().ready(Interest::READABLE))).await
        {
            self.drained_to_fin = ready.is_read_closed() && !ready.is_error();
        }
        self.next = next_read(self.next, n);
        // The whole buffer goes with the chunk, and is freed with it once written: nothing of it
        // stays with the reader while the connection waits for more.
        Ok(Some(std::mem::take(&mut self.buf).freeze()))
    }

    fn ended(&mut self) -> bool {
        self.drained_to_fin
    }
}

/// The size of the next read after one of `size` brought `n` bytes: twice as large if it was
/// filled, half as large if it was mostly empty.
fn next_read(size: usize, n: usize) -> usize {
    if n >= size {
        (size * 2).min(MAX_READ)
    } else if n < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

/// Writes to a TCP socket; the first write goes straight to the socket ([`write_now`]).
struct TcpWriter<'a> {
    io: WriteHalf<'a>,
    first: bool,
}

impl<'a> TcpWriter<'a> {
    fn new(io: WriteHalf<'a>) -> Self {
        Self { io, first: true }
    }
}

impl ChunkWrite for TcpWriter<'_> {
    async fn write_chunk(&mut self, chunk: Bytes, last: bool) -> io::Result<()> {
        let mut rest = &chunk[..];
        if std::mem::take(&mut self.first) {
            rest = &rest[write_now(self.io.as_ref(), rest)?..];
        }
        if !rest.is_empty() {
            self.io.write_all(rest).await?;
        }
        if last {
            self.finish().await?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::TcpListener;

    use crate::tunnel::chunk::take_now;

    /// Splice `remote` and the TCP socket `local` without a tracker (the agent splices through
    /// [`crate::tunnel::tracked::Tracked::splice`]), resetting `local` too on error.
    pub(crate) async fn splice(
        remote: impl Into<Remote>,
        mut local: TcpStream,
    ) -> io::Result<Transferred> {
        let (from_remote, from_local) = (AtomicU64::new(0), AtomicU64::new(0));
        let result = relay(remote.into(), &mut local, &from_remote, &from_local).await;
        if result.is_err() {
            reset(&local);
        }
        result
    }

    /// A connected (client, accepted) pair of TCP sockets on `listener`.
    pub(crate) async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("bound");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn fresh_sockets_are_read_and_written_directly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (client, accepted) = pair(&listener).await;
        assert_eq!(
            take_now(&accepted, 64).expect("read"),
            None,
            "nothing waiting"
        );
        assert_eq!(write_now(&client, b"hello").expect("write"), 5);
        // Loopback delivers within the sending call: what was written is waiting.
        socket2::SockRef::from(&client)
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let first = take_now(&accepted, 3).expect("read").expect("waiting");
        assert_eq!(&first[..], b"hel", "at most the limit");
        let rest = take_now(&accepted, 64).expect("read").expect("waiting");
        assert_eq!(&rest[..], b"lo", "what was left, nothing more");
        assert_eq!(
            take_now(&accepted, 64).expect("read").map(|c| c.len()),
            Some(0),
            "end of stream"
        );
    }

    #[tokio::test]
    async fn carries_bytes_and_half_close_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut client, agent_in) = pair(&listener).await;
        let (agent_out, mut server) = pair(&listener).await;
        let relay = tokio::spawn(splice(agent_in, agent_out));

        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"ping");

        server
            .write_all(b"pong")
            .await
            .expect("write back after peer's half-close");
        server.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"pong");

        let moved = relay.await.expect("join").expect("splice");
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 4,
                b_to_a: 4
            }
        );
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (client, agent_in) = pair(&listener).await;
        let (agent_out, mut server) = pair(&listener).await;
        let relay = tokio::spawn(splice(agent_in, agent_out));
        reset(&client);
        drop(client);
        relay
            .await
            .expect("join")
            .expect_err("the reset is an error");
        let mut buf = [0u8; 1];
        let read = server.read(&mut buf).await;
        assert_eq!(
            read.expect_err("RST, not FIN").kind(),
            io::ErrorKind::ConnectionReset
        );
    }

    /// Block until the peer's FIN has reached `stream` (`POLLRDHUP`), so that the reactor's
    /// next look at it sees the FIN together with whatever bytes came before. (A socket from
    /// tokio's `accept` may start out marked readable, without the FIN, hence sockets accepted
    /// with std and registered once the FIN is there.)
    fn until_fin_arrived(stream: &TcpStream) {
        use nix::poll::{PollFd, PollFlags, poll};
        use std::os::fd::AsFd as _;
        // nix has no name for POLLRDHUP.
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let mut fd = [PollFd::new(stream.as_fd(), rdhup)];
        let n = poll(&mut fd, 10_000u16).expect("poll");
        assert_eq!(n, 1, "the FIN arrives");
    }

    #[tokio::test]
    async fn a_drained_socket_whose_fin_has_arrived_has_ended_without_another_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut peer, mut accepted) = pair(&listener).await;
        peer.write_all(b"more").await.expect("write");
        accepted.readable().await.expect("readable");
        let (read, _) = accepted.split();
        let mut reader = TcpReader::new(read);
        assert_eq!(
            reader.read_chunk().await.expect("read").as_deref(),
            Some(&b"more"[..])
        );
        assert!(!reader.ended(), "no FIN yet: more may follow");

        peer.write_all(b"last").await.expect("write");
        peer.shutdown().await.expect("half-close");
        until_fin_arrived(reader.io.as_ref());
        reader.io.as_ref().readable().await.expect("readable");
        assert_eq!(
            reader.read_chunk().await.expect("read").as_deref(),
            Some(&b"last"[..])
        );
        assert!(reader.ended(), "the FIN had arrived behind the bytes read");
        assert_eq!(reader.read_chunk().await.expect("read"), None);
    }

    /// A [`ChunkWrite`] that records what it was asked to do.
    #[derive(Default)]
    struct Recorded {
        chunks: Vec<(Bytes, bool)>,
        finished: usize,
        /// Ended before the relay began.
        ended_before: bool,
    }

    impl ChunkWrite for &mut Recorded {
        async fn write_chunk(&mut self, chunk: Bytes, last: bool) -> io::Result<()> {
            self.chunks.push((chunk, last));
            Ok(())
        }
        async fn finish(&mut self) -> io::Result<()> {
            self.finished += 1;
            Ok(())
        }
        fn finished(&self) -> bool {
            self.ended_before
        }
    }

    #[tokio::test]
    async fn a_half_ended_before_the_relay_began_is_not_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut peer, mut accepted) = pair(&listener).await;
        peer.write_all(b"late").await.expect("write");
        let mut to = Recorded {
            ended_before: true,
            ..Recorded::default()
        };
        let count = AtomicU64::new(0);
        let (read, _) = accepted.split();
        let moved = pump(TcpReader::new(read), &mut to, &count)
            .await
            .expect("pump");
        assert_eq!(moved, 0);
        assert!(
            to.chunks.is_empty() && to.finished == 0,
            "nothing passed on"
        );
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.expect("still there");
        assert_eq!(&buf, b"late", "the socket was not read");
    }

    #[tokio::test]
    async fn a_senders_last_bytes_and_its_end_are_passed_on_together() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            std::net::TcpStream::connect(listener.local_addr().expect("bound")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        std::io::Write::write_all(&mut peer, b"answer").expect("write");
        peer.shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        accepted.set_nonblocking(true).expect("non-blocking");
        let mut accepted = TcpStream::from_std(accepted).expect("register");
        until_fin_arrived(&accepted);
        accepted.readable().await.expect("readable");
        let (read, _) = accepted.split();
        let mut to = Recorded::default();
        let count = AtomicU64::new(0);
        let moved = pump(TcpReader::new(read), &mut to, &count)
            .await
            .expect("pump");
        assert_eq!(moved, 6);
        assert_eq!(to.chunks, vec![(Bytes::from_static(b"answer"), true)]);
        assert_eq!(to.finished, 0, "ended with the last chunk, not after it");
    }

    #[test]
    fn reads_grow_while_they_fill_and_shrink_when_they_do_not() {
        let mut size = MIN_READ;
        while size < MAX_READ {
            let grown = next_read(size, size);
            assert_eq!(grown, size * 2);
            size = grown;
        }
        assert_eq!(next_read(MAX_READ, MAX_READ), MAX_READ, "capped");
        assert_eq!(
            next_read(MAX_READ, MAX_READ / 2),
            MAX_READ,
            "half full: kept"
        );
        assert_eq!(
            next_read(MAX_READ, 100),
            MAX_READ / 2,
            "mostly empty: halved"
        );
        assert_eq!(next_read(MIN_READ, 1), MIN_READ, "never below the minimum");
    }
}
