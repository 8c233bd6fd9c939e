//! A thread that has entered a pod's network namespace and runs socket-creating jobs there.
//! Sockets keep the namespace they were created in, so the rest of the agent (tokio, in the node's
//! namespace) uses them as usual once they exist.

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
}

impl NetnsWorker {
    /// Start a thread inside the netns at `path` (e.g. `/run/netns/pod-a`).
    pub fn spawn(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| annotate(e, "opening netns", path))?;
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

    /// Connect to `dst` from inside the namespace, optionally from a fixed local address.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        bind: Option<SocketAddr>,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                if let Some(local) = bind {
                    socket.bind(&SockAddr::from(local))?;
                }
                Ok(socket)
            })
            .await??;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        socket.connect(dst).await
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
