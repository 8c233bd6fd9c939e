//! Servers inside pods: accept on `[::]:port` (IPv4 and IPv6) and remember every peer address.
//! The echo server reads until the client half-closes and answers with what was read; the HTTP
//! server answers one HTTP/1.1 request per connection with `200` and a body of the request's
//! method and request target (`POST /v1/pay`), and keeps every request head it read, so a test
//! sees which requests reached the application and how. Both take a thread per connection; the
//! streaming echo server ([`EchoServer::start_streaming`]) answers bytes as they arrive and holds
//! any number of connections on one thread (tokio), for benchmarks that keep thousands open.
//! These run in the test process (outside every pod cgroup); [`PodServer`] runs `latch-probe
//! serve` in the pod itself, for tests that need the kernel programs to see the server's side.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;

/// Peers of the connections accepted so far, and a signal for each new one.
#[derive(Default)]
struct Accepted {
    peers: Mutex<Vec<SocketAddr>>,
    more: Condvar,
}

impl Accepted {
    /// A connection from `peer` was accepted: remember it and say so.
    fn record(&self, peer: SocketAddr) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(unmap(peer));
        self.more.notify_all();
    }
}

pub struct EchoServer {
    listener: Arc<TcpListener>,
    accepted: Arc<Accepted>,
    heads: Heads,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The streaming server's stop signal (dropping it stops the server and closes every
    /// connection it holds).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The request heads an HTTP server has read.
type Heads = Arc<Mutex<Vec<String>>>;

/// Answer one connection.
type Handler = fn(std::net::TcpStream, &Heads);

fn echo(mut stream: std::net::TcpStream, _: &Heads) {
    let mut buf = Vec::new();
    if stream.read_to_end(&mut buf).is_ok() {
        let _ = stream.write_all(&buf);
    }
}

/// One HTTP/1.1 request (head, and a body of `Content-Length` bytes), answered and closed.
fn http(mut stream: std::net::TcpStream, heads: &Heads) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    heads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(head.clone());
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut words = head.split_whitespace();
    let body = format!(
        "{} {}",
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default()
    );
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl EchoServer {
    /// An echo server.
    pub fn start(netns_path: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(netns_path, port, echo)
    }

    /// The HTTP server described above.
    pub fn start_http(netns_path: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(netns_path, port, http)
    }

    /// The listener on `[::]:port` in the namespace.
    fn listen(netns_path: &Path, port: u16) -> anyhow::Result<TcpListener> {
        netns::in_netns(netns_path, move || {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            socket.listen(1024)?;
            Ok(TcpListener::from(socket))
        })
        .with_context(|| format!("echo server on port {port} in {}", netns_path.display()))
    }

    /// An echo server that writes back what it reads as it reads it (no wait for the client's
    /// half-close) and closes when the client does, every connection a task of one thread's
    /// tokio runtime: it holds as many connections as its descriptors allow.
    pub fn start_streaming(netns_path: &Path, port: u16) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = Arc::new(Self::listen(netns_path, port)?);
        let std_listener = listener.try_clone().context("duplicating the listener")?;
        std_listener
            .set_nonblocking(true)
            .context("making the listener nonblocking")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the echo server's runtime")?;
        let accepted = Arc::new(Accepted::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    loop {
                        let (mut stream, peer) = tokio::select! {
                            _ = &mut stopped => return,
                            accept = listener.accept() => match accept {
                                Ok(accepted) => accepted,
                                // Out of descriptors, or a connection reset before it was
                                // accepted: try again shortly.
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                    continue;
                                }
                            },
                        };
                        accepted.record(peer);
                        // Each echo goes out at once (no wait for the ACK of the last), and a
                        // request of a few KiB is read and answered whole.
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            let mut buf = [0u8; 4096];
                            loop {
                                match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => {
                                        if stream.write_all(&buf[..n]).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                        });
                    }
                });
            })
        };
        Ok(Self {
            listener,
            accepted,
            heads: Heads::default(),
            thread: Some(thread),
            stop: Some(stop),
        })
    }

    fn start_with(netns_path: &Path, port: u16, handler: Handler) -> anyhow::Result<Self> {
        let listener = Arc::new(Self::listen(netns_path, port)?);
        let accepted = Arc::new(Accepted::default());
        let heads = Heads::default();
        let thread = {
            let listener = listener.clone();
            let accepted = accepted.clone();
            let heads = heads.clone();
            std::thread::spawn(move || {
                while let Ok((stream, peer)) = listener.accept() {
                    accepted.record(peer);
                    let heads = heads.clone();
                    std::thread::spawn(move || handler(stream, &heads));
                }
            })
        };
        Ok(Self {
            listener,
            accepted,
            heads,
            thread: Some(thread),
            stop: None,
        })
    }

    /// Peers of every accepted connection so far (IPv4-mapped addresses shown as IPv4).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.accepted
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wait until the application has accepted `count` connections in all; returns whether it
    /// did within `timeout`.
    pub fn wait_accepted(&self, count: usize, timeout: Duration) -> bool {
        let peers = self
            .accepted
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (peers, _) = self
            .accepted
            .more
            .wait_timeout_while(peers, timeout, |p| p.len() < count)
            .unwrap_or_else(|p| p.into_inner());
        peers.len() >= count
    }

    /// The head (request line and header fields) of every request the HTTP server read, in the
    /// order they were read; empty for an echo server.
    pub fn request_heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn accepted(&self) -> usize {
        self.peers().len()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // The streaming server stops on its signal (its runtime then drops every connection).
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // shutdown() on a listening socket wakes a blocked accept() with an error.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `latch-probe serve` running inside a pod (its netns and cgroup): a server whose sockets are
/// the pod's own, as a real application's are. Killed and reaped on drop.
pub struct PodServer {
    child: std::process::Child,
}

impl PodServer {
    /// Start `command` (a `latch-probe serve` prepared to run in the pod) and wait until it
    /// says it listens.
    pub fn start(mut command: std::process::Command) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        let mut child = command.spawn().context("starting latch-probe serve")?;
        let stdout = child.stdout.take().context("latch-probe serve's stdout")?;
        let mut server = Self { child };
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading latch-probe serve's first line")?;
        if line.trim() != "listening" {
            let status = server.child.try_wait().ok().flatten();
            anyhow::bail!("latch-probe serve did not start (said {line:?}, exit {status:?})");
        }
        Ok(server)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
