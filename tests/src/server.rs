//! Echo servers inside pods: accept on `[::]:port` (IPv4 and IPv6), read until the client
//! half-closes, answer with what was read, and remember every peer address.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;

pub struct EchoServer {
    listener: Arc<TcpListener>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<std::thread::JoinHandle<()>>,
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

impl EchoServer {
    pub fn start(netns_path: &Path, port: u16) -> anyhow::Result<Self> {
        let listener = netns::in_netns(netns_path, move || {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            socket.listen(1024)?;
            Ok(TcpListener::from(socket))
        })
        .with_context(|| format!("echo server on port {port} in {}", netns_path.display()))?;
        let listener = Arc::new(listener);
        let peers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let listener = listener.clone();
            let peers = peers.clone();
            std::thread::spawn(move || {
                while let Ok((mut stream, peer)) = listener.accept() {
                    peers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(unmap(peer));
                    std::thread::spawn(move || {
                        let mut buf = Vec::new();
                        if stream.read_to_end(&mut buf).is_ok() {
                            let _ = stream.write_all(&buf);
                        }
                    });
                }
            })
        };
        Ok(Self {
            listener,
            peers,
            thread: Some(thread),
        })
    }

    /// Peers of every accepted connection so far (IPv4-mapped addresses shown as IPv4).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn accepted(&self) -> usize {
        self.peers().len()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // shutdown() on a listening socket wakes a blocked accept() with an error.
        // SAFETY: valid fd owned by the listener.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
