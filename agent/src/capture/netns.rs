//! Making sockets inside a pod's network namespace. Sockets keep the namespace they were created
//! in, so the rest of the agent (tokio, in the node's namespace) uses them as usual once they
//! exist. Whatever must happen inside the namespace (making sockets, opening listeners, the
//! pod's delivery routing) is done by the calling thread itself, which enters the namespace for
//! those few system calls and returns at once ([`PodNetns::run_inside`]): a connection never
//! waits for a thread hop, and a pod costs the agent no thread of its own. Delivery sockets
//! (transparent and marked where the pod's routing allows, see [`super::transparent`]) are made
//! here for deliveries.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use latch_common::DELIVERY_MARK;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::transparent::{self, Transparent};

/// A pod's network namespace, held open (its file) for entering it from any thread.
pub struct PodNetns {
    namespace: Namespace,
}

/// The namespace itself, for entering it from other threads.
struct Namespace {
    path: PathBuf,
    file: File,
    /// Which families' deliveries may come from the client's own address, once set up.
    transparent: OnceLock<Transparent>,
}

/// The agent's own network namespace, for returning to it.
fn home_netns() -> io::Result<&'static File> {
    static HOME: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    // Threads live in the agent's namespace but while one is inside a pod's ([`Entered`], never
    // nested), and this is asked before entering: the calling thread's own namespace names it.
    // Not the process's (`/proc/self`, the main thread's), which may be inside a pod's just now.
    const OWN: &str = "/proc/thread-self/ns/net";
    let file = File::open(OWN).map_err(|e| annotate(e, "opening", Path::new(OWN)))?;
    Ok(HOME.get_or_init(|| file))
}

/// While alive, the calling thread is inside another network namespace; dropping it returns the
/// thread to the agent's. Never held across an `.await`.
struct Entered(&'static File);

impl Entered {
    fn enter(netns: &File) -> io::Result<Self> {
        let home = home_netns()?;
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(Self(home))
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(self.0, nix::sched::CloneFlags::CLONE_NEWNET) {
            // A thread left in a pod's namespace would make later sockets there: never go on.
            eprintln!("latch: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
    }
}

impl PodNetns {
    /// Open the netns at `path` (e.g. `/run/netns/pod-a`), and check that it can be entered.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| annotate(e, "opening netns", path))?;
        drop(Entered::enter(&file).map_err(|e| annotate(e, "entering netns", path))?);
        Ok(Self {
            namespace: Namespace {
                path: path.to_owned(),
                file,
                transparent: OnceLock::new(),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.namespace.path
    }

    /// Run `f` on the calling thread inside the namespace, and return to the agent's. For a few
    /// quick system calls: the thread is not the agent's to use while inside.
    pub fn run_inside<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let _inside = Entered::enter(&self.namespace.file)
            .map_err(|e| annotate(e, "entering netns", &self.namespace.path))?;
        Ok(f())
    }

    /// Set up the pod's routing for deliveries from the clients' own addresses (see
    /// [`super::transparent`]), once per netns; until then, and for a family where that fails,
    /// deliveries come from the loopback marker.
    pub fn route_deliveries(&self) -> io::Result<Transparent> {
        if let Some(installed) = self.namespace.transparent.get() {
            return Ok(*installed);
        }
        let installed = self.run_inside(|| transparent::install(&self.namespace.path))?;
        let installed = *self.namespace.transparent.get_or_init(|| installed);
        Ok(installed)
    }

    /// Whether a delivery from `ip` can come from that address itself.
    pub fn transparent_for(&self, ip: IpAddr) -> bool {
        self.namespace.routing().covers(ip)
    }

    /// Connect to `dst` from inside the namespace, from the address the kernel picks (the pod's
    /// own, for a tunnel to another pod).
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.namespace.socket(Domain::for_address(dst), false)?;
        connect(socket, dst).await
    }

    /// Whether deliveries of `domain` may come from clients' addresses.
    pub(super) fn transparent(&self, domain: Domain) -> bool {
        self.namespace.transparent(domain)
    }

    /// `n` new delivery sockets of `domain`, made with one visit to the namespace.
    pub(super) fn delivery_sockets(&self, domain: Domain, n: usize) -> io::Result<Vec<Socket>> {
        self.namespace.sockets(domain, true, n)
    }
}

/// Connect `socket` to `dst`. A connection the kernel completed within `connect()` itself (the
/// pod's own application, over loopback) is used at once, without a round through the reactor.
pub(super) async fn connect(socket: Socket, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    match socket.connect(&SockAddr::from(dst)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if stream.peer_addr().is_err() {
        // Still connecting: writable once it is done, either way.
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        stream.peer_addr()?;
    }
    Ok(stream)
}

impl Namespace {
    /// What the pod's routing allows (nothing before it is set up).
    fn routing(&self) -> Transparent {
        self.transparent.get().copied().unwrap_or_default()
    }

    /// Whether deliveries of `domain` may come from clients' addresses.
    fn transparent(&self, domain: Domain) -> bool {
        self.routing().family(domain == Domain::IPV6)
    }

    /// A new TCP socket of `domain` inside the namespace; for a delivery, set up as
    /// [`Self::sockets`] says.
    fn socket(&self, domain: Domain, delivery: bool) -> io::Result<Socket> {
        self.sockets(domain, delivery, 1)?
            .pop()
            .ok_or_else(|| io::Error::other("no socket made"))
    }

    /// `n` new TCP sockets of `domain` inside the namespace (entered once for all of them). A
    /// delivery socket is transparent and marked where the pod's routing allows, to bind the
    /// client's address (see [`PodNetns::deliver`]); else it gets its port from `connect()`,
    /// unique per 4-tuple rather than per address (no port search at `bind()` time).
    fn sockets(&self, domain: Domain, delivery: bool, n: usize) -> io::Result<Vec<Socket>> {
        let sockets = {
            let _inside = Entered::enter(&self.file)
                .map_err(|e| annotate(e, "entering netns", &self.path))?;
            // Non-blocking from the start: no fcntl() calls on the connection path.
            (0..n)
                .map(|_| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))
                .collect::<io::Result<Vec<_>>>()?
        };
        let transparent = delivery && self.transparent(domain);
        for socket in &sockets {
            socket.set_tcp_nodelay(true)?;
            if transparent {
                if domain == Domain::IPV6 {
                    socket.set_ip_transparent_v6(true)?;
                } else {
                    socket.set_ip_transparent_v4(true)?;
                }
                socket.set_mark(DELIVERY_MARK)?;
                // Its port is chosen by the agent; one held in `TIME_WAIT` may be bound again
                // (`connect()` still refuses a four-tuple in use).
                socket.set_reuse_address(true)?;
                // Its packets go over loopback anyway; bound there, its four-tuple counts as
                // loopback traffic, which `tcp_tw_reuse`'s default lets a new connection take
                // over from `TIME_WAIT` (by address alone, ours would not on every kernel).
                socket.bind_device(Some(b"lo"))?;
            } else if delivery {
                // Best effort: without it, bind() picks the port.
                let _ = nix::sys::socket::setsockopt(
                    socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                );
            }
        }
        Ok(sockets)
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::mpsc};

    use super::*;

    /// A network namespace of the test's own, shaped like a pod's: loopback up and the pod's
    /// address on `eth0` (one end of a veth pair whose other end stays inside). It lives as long
    /// as the thread that made it, which waits for this to be dropped.
    struct ScratchPod {
        /// The namespace, as the thread's entry in `/proc`.
        path: PathBuf,
        done: Option<mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl ScratchPod {
        /// A pod with `address`, and its application's listener on `app`.
        fn new(address: &'static str, app: SocketAddr) -> (Self, std::net::TcpListener) {
            let (made_tx, made_rx) = mpsc::channel();
            let (done, until) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("new netns");
                // Children start in this thread's namespace.
                for args in [
                    &["link", "set", "lo", "up"][..],
                    &[
                        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                    ],
                    &["addr", "add", address, "dev", "eth0"],
                    &["link", "set", "eth0", "up"],
                    &["link", "set", "peer0", "up"],
                ] {
                    let status = std::process::Command::new("ip").args(args).status();
                    assert!(status.expect("ip").success(), "ip {args:?}");
                }
                let listener = std::net::TcpListener::bind(app).expect("application listens");
                let path = format!(
                    "/proc/{}/task/{}/ns/net",
                    std::process::id(),
                    nix::unistd::gettid()
                );
                made_tx.send((PathBuf::from(path), listener)).expect("send");
                let _ = until.recv();
            });
            let (path, listener) = made_rx.recv().expect("scratch pod made");
            let pod = Self {
                path,
                done: Some(done),
                thread: Some(thread),
            };
            (pod, listener)
        }

        /// Whether the pod holds the connection from `local` to `remote` in `TIME_WAIT`.
        fn in_time_wait(&self, local: SocketAddr, remote: SocketAddr) -> bool {
            let hex = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => {
                    format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port())
                }
                IpAddr::V6(_) => unreachable!("IPv4 only"),
            };
            let (local, remote) = (hex(local), hex(remote));
            let table = self
                .path
                .parent()
                .expect("task dir")
                .parent()
                .expect("task");
            std::fs::read_to_string(table.join("net/tcp"))
                .expect("the pod's TCP table")
                .lines()
                .skip(1)
                .any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.get(1..4) == Some(&[local.as_str(), remote.as_str(), "06"][..])
                })
        }
    }

    impl Drop for ScratchPod {
        fn drop(&mut self) {
            self.done.take();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// A client's port is delivered again while its last delivered connection is still in
    /// `TIME_WAIT`, on either side: after the ephemeral range has turned once, every port the
    /// agent chooses is one it used before.
    #[tokio::test]
    async fn a_four_tuple_in_time_wait_is_delivered_again() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let app: SocketAddr = "10.244.77.2:8080".parse().expect("address");
        let (pod, listener) = ScratchPod::new("10.244.77.2/24", app);
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let netns = std::sync::Arc::new(PodNetns::open(&pod.path).expect("netns"));
        let routing = netns.route_deliveries().expect("routing");
        let sockets = crate::capture::delivery::DeliverySockets::new(netns.clone());
        assert_eq!(routing, Transparent { v4: true, v6: true });
        let client = IpAddr::from([10, 244, 9, 9]);
        assert!(netns.transparent_for(client));

        for (turn, agent_closes_first) in [(1000u16, true), (2000, false)] {
            let port = crate::capture::delivery::DELIVERY_PORTS.start() + turn;
            let from = SocketAddr::new(client, port);
            let mut delivered = Vec::new();
            for attempt in ["first", "again"] {
                sockets.set_turn(turn);
                let (mut delivery, announced) = sockets
                    .connect(app, client, Ok::<_, io::Error>)
                    .await
                    .expect("delivered");
                assert_eq!(announced, Some(from), "{attempt}: announced");
                let (mut accepted, peer) = listener.accept().await.expect("accept");
                delivered.push(peer);
                delivery.write_all(b"x").await.expect("write");
                let mut byte = [0u8; 1];
                accepted.read_exact(&mut byte).await.expect("read");
                // Whoever closes first ends in TIME_WAIT once the other has closed too.
                let (mut first, mut last, waiting) = if agent_closes_first {
                    (delivery, accepted, (from, app))
                } else {
                    (accepted, delivery, (app, from))
                };
                first.shutdown().await.expect("shutdown");
                assert_eq!(last.read(&mut byte).await.expect("read the end"), 0);
                drop(first);
                drop(last);
                let mut checks = 0;
                while !pod.in_time_wait(waiting.0, waiting.1) {
                    checks += 1;
                    assert!(checks < 10_000, "{attempt}: never in TIME_WAIT");
                    tokio::task::yield_now().await;
                }
            }
            assert_eq!(
                delivered,
                [from, from],
                "agent closing first: {agent_closes_first}; the same four-tuple both times"
            );
        }
    }
}
