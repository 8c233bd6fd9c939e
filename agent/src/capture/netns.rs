//! Making sockets inside a pod's network namespace. Sockets keep the namespace they were created
//! in, so the rest of the agent (tokio, in the node's namespace) uses them as usual once they
//! exist. Listeners are opened by a thread that lives in the namespace ([`NetnsWorker::run`]);
//! outbound sockets on the connection path are made by the calling thread itself, which enters
//! the namespace for the one `socket()` call and returns at once ([`NetnsWorker::connect`]), so a
//! connection never waits for a thread hop. Sockets bound to a fixed local address (deliveries
//! to the pod's application) are made ahead of need ([`SPARES`]) when a delivered connection
//! ends, so the next delivery usually finds one ready and goes straight to `connect()`.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError, mpsc},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// How many sockets bound to a fixed local address are kept ready (made again, all at once,
/// when half of them are used).
pub const SPARES: usize = 4;

/// Handle on the worker thread of one network namespace. The thread exits when this is dropped.
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    namespace: Namespace,
}

/// The namespace itself, for entering it from other threads.
struct Namespace {
    path: PathBuf,
    file: File,
    /// Sockets made ahead, all for the same family and local address.
    spares: Mutex<Vec<Spare>>,
}

struct Spare {
    socket: Socket,
    domain: Domain,
    bind: SocketAddr,
}

/// The agent's own network namespace, for returning to it.
fn home_netns() -> io::Result<&'static File> {
    static HOME: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    // Every thread but the netns workers lives in the agent's namespace; the process's entry
    // (its main thread's) names it.
    let file = File::open("/proc/self/ns/net")
        .map_err(|e| annotate(e, "opening", Path::new("/proc/self/ns/net")))?;
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

impl NetnsWorker {
    /// Start a thread inside the netns at `path` (e.g. `/run/netns/pod-a`).
    pub fn spawn(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| annotate(e, "opening netns", path))?;
        let netns = file
            .try_clone()
            .map_err(|e| annotate(e, "duplicating the fd of netns", path))?;
        home_netns()?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let name = format!(
            "netns-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        std::thread::Builder::new().name(name).spawn(move || {
            let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                for job in inbox {
                    job();
                }
            }
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns worker thread died"))?
            .map_err(|e| annotate(e, "entering netns", path))?;
        Ok(Self {
            jobs,
            namespace: Namespace {
                path: path.to_owned(),
                file: netns,
                spares: Mutex::new(Vec::new()),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.namespace.path
    }

    /// Run `f` inside the namespace and wait for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("netns worker dropped a job"))
    }

    /// Same as [`NetnsWorker::run`], from synchronous code.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns worker dropped a job"))
    }

    /// Connect to `dst` from inside the namespace, optionally from a fixed local address. A
    /// connection the kernel completed within `connect()` itself (the pod's own application,
    /// over loopback) is used at once, without a round through the reactor.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        bind: Option<SocketAddr>,
    ) -> io::Result<tokio::net::TcpStream> {
        let domain = Domain::for_address(dst);
        let socket = match bind {
            Some(bind) => match self.namespace.take_spare(domain, bind) {
                Some(socket) => socket,
                None => self.namespace.socket(domain, Some(bind))?,
            },
            None => self.namespace.socket(domain, None)?,
        };
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

    /// Make sockets for connections from `bind` to `dst`'s family ahead of need, up to
    /// [`SPARES`]. Called once a delivered connection has ended, when no one waits for the
    /// worker.
    pub fn replenish(&self, dst: SocketAddr, bind: SocketAddr) {
        if let Err(e) = self.namespace.replenish(Domain::for_address(dst), bind) {
            tracing::warn!(netns = %self.namespace.path.display(), error = %e, "making spare sockets");
        }
    }

    /// How many sockets are ready for connections from `bind` to `dst`'s family.
    #[cfg(test)]
    pub fn spares(&self, dst: SocketAddr, bind: SocketAddr) -> usize {
        let domain = Domain::for_address(dst);
        lock(&self.namespace.spares)
            .iter()
            .filter(|s| s.domain == domain && s.bind == bind)
            .count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Namespace {
    /// A new TCP socket of `domain` inside the namespace, optionally bound to `bind`.
    fn socket(&self, domain: Domain, bind: Option<SocketAddr>) -> io::Result<Socket> {
        self.sockets(domain, bind, 1)?
            .pop()
            .ok_or_else(|| io::Error::other("no socket made"))
    }

    /// `n` new TCP sockets of `domain` inside the namespace (entered once for all of them),
    /// optionally bound to `bind`.
    fn sockets(
        &self,
        domain: Domain,
        bind: Option<SocketAddr>,
        n: usize,
    ) -> io::Result<Vec<Socket>> {
        let sockets = {
            let _inside = Entered::enter(&self.file)
                .map_err(|e| annotate(e, "entering netns", &self.path))?;
            // Non-blocking from the start: no fcntl() calls on the connection path.
            (0..n)
                .map(|_| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))
                .collect::<io::Result<Vec<_>>>()?
        };
        for socket in &sockets {
            socket.set_tcp_nodelay(true)?;
            if let Some(local) = bind {
                // The port is chosen by connect(), unique per 4-tuple rather than per address:
                // no port search at bind() time, and deliveries to different application ports
                // share the marker address's ports.
                if local.port() == 0 {
                    // Best effort: without it, bind() picks the port as before.
                    let _ = nix::sys::socket::setsockopt(
                        socket,
                        nix::sys::socket::sockopt::IpBindAddressNoPort,
                        &true,
                    );
                }
                socket.bind(&SockAddr::from(local))?;
            }
        }
        Ok(sockets)
    }

    /// A socket made ahead for `bind`, if one is ready.
    fn take_spare(&self, domain: Domain, bind: SocketAddr) -> Option<Socket> {
        let mut spares = lock(&self.spares);
        // Only one family and local address is kept: the one asked for last.
        spares.retain(|s| s.domain == domain && s.bind == bind);
        spares.pop().map(|s| s.socket)
    }

    /// Make spares for `bind` up to [`SPARES`] once half or more are used, all with one visit to
    /// the namespace.
    fn replenish(&self, domain: Domain, bind: SocketAddr) -> io::Result<()> {
        let left = lock(&self.spares).len();
        if left > SPARES / 2 {
            return Ok(());
        }
        let made = self.sockets(domain, Some(bind), SPARES - left)?;
        lock(&self.spares).extend(made.into_iter().map(|socket| Spare {
            socket,
            domain,
            bind,
        }));
        Ok(())
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[tokio::test]
    async fn deliveries_use_sockets_made_ahead() {
        // The agent's own namespace stands in for a pod's.
        let worker = NetnsWorker::spawn(Path::new("/proc/self/ns/net")).expect("worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dst = listener.local_addr().expect("address");
        let marker: SocketAddr = "127.0.0.6:0".parse().expect("marker");
        assert_eq!(worker.spares(dst, marker), 0, "none before the first");

        let first = worker.connect(dst, Some(marker)).await.expect("connect");
        assert_eq!(worker.spares(dst, marker), 0, "made on the way");
        worker.replenish(dst, marker);
        assert_eq!(worker.spares(dst, marker), SPARES);
        let mut connections = vec![first];
        for taken in 1..=SPARES + 1 {
            let stream = worker.connect(dst, Some(marker)).await.expect("connect");
            assert_eq!(
                worker.spares(dst, marker),
                SPARES.saturating_sub(taken),
                "one taken each time, while there are any"
            );
            connections.push(stream);
        }
        worker.replenish(dst, marker);
        assert_eq!(worker.spares(dst, marker), SPARES, "all used: made again");
        connections.push(worker.connect(dst, Some(marker)).await.expect("connect"));
        worker.replenish(dst, marker);
        assert_eq!(
            worker.spares(dst, marker),
            SPARES - 1,
            "more than half left: nothing made"
        );
        let ours: Vec<SocketAddr> = connections
            .iter()
            .map(|c| c.local_addr().expect("local"))
            .collect();
        for _ in &ours {
            let (_accepted, peer) = listener.accept().await.expect("accept");
            assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 6]), "from the marker");
            assert!(ours.contains(&peer), "accepted one of ours: {peer}");
        }
        let v6: SocketAddr = "[::1]:9".parse().expect("v6");
        assert_eq!(
            worker.spares(v6, "[::1]:0".parse().expect("v6 marker")),
            0,
            "kept only for the family and address asked for"
        );
    }
}
