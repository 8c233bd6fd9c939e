//! Making sockets inside a pod's network namespace. Sockets keep the namespace they were created
//! in, so the rest of the agent (tokio, in the node's namespace) uses them as usual once they
//! exist. Listeners are opened by a thread that lives in the namespace ([`NetnsWorker::run`]);
//! outbound sockets on the connection path are made by the calling thread itself, which enters
//! the namespace for the one `socket()` call and returns at once ([`NetnsWorker::connect`]), so a
//! connection never waits for a thread hop.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::mpsc,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// Handle on the worker thread of one network namespace. The thread exits when this is dropped.
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    /// The namespace itself, for entering it from other threads.
    netns: File,
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
            path: path.to_owned(),
            netns,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        let socket = {
            let _inside = Entered::enter(&self.netns)
                .map_err(|e| annotate(e, "entering netns", &self.path))?;
            // Non-blocking from the start: no fcntl() calls on the connection path.
            Socket::new(
                Domain::for_address(dst),
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?
        };
        socket.set_tcp_nodelay(true)?;
        if let Some(local) = bind {
            // The port is chosen by connect(), unique per 4-tuple rather than per address: no
            // port search at bind() time, and deliveries to different application ports share
            // the marker address's ports.
            if local.port() == 0 {
                // Best effort: without it, bind() picks the port as before.
                let _ = nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                );
            }
            socket.bind(&SockAddr::from(local))?;
        }
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
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
