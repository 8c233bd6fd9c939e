//! Byte splicing between two TCP streams: both directions at once, half-close carried across
//! (EOF on one side shuts down writing on the other), and an error on either side resets both,
//! so nothing is left hanging.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Relay buffer per direction: large enough that bulk transfers move in few reads and writes
/// (tokio's default is 8 KiB).
pub const BUFFER: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Relay until both directions are closed. On error, both sockets are closed with RST.
pub async fn splice(mut a: TcpStream, mut b: TcpStream) -> std::io::Result<Transferred> {
    let result = relay(&mut a, &mut b).await;
    if result.is_err() {
        reset(&a);
        reset(&b);
    }
    result
}

/// The same between any stream (a tunnel stream) and a TCP socket, which is reset on error
/// (dropping the tunnel stream resets it at the HTTP/2 level).
pub async fn splice_io<A>(mut a: A, mut b: TcpStream) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    let result = relay(&mut a, &mut b).await;
    if result.is_err() {
        reset(&b);
    }
    result
}

async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (a_to_b, b_to_a) = tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await?;
    Ok(Transferred { a_to_b, b_to_a })
}

/// Make the coming close send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A connected (client, accepted) pair of TCP sockets on `listener`.
    pub(crate) async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("bound");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
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
}
