//! Per-pod listeners inside each pod's network namespace, and what happens to the connections
//! they accept.
//!
//! - [`netns`]: entering a pod's netns from the calling thread, to make sockets there.
//! - [`listeners`]: the capture (15001, loopback) and inbound (15006) listeners of one pod.
//! - [`outbound`]: a redirected connection: find its original destination, tunnel it, cache the
//!   pair's verdict when the destination says it may be cached.
//! - [`inbound`]: a steered plaintext inbound connection: PeerAuthentication, then policy.
//! - [`tunneled`]: the destination side of HBONE: policy for the verified source, then delivery.
//! - [`delivery`]: connecting an admitted connection to the pod's application.
//! - [`transparent`]: the pod's routing that lets deliveries come from the client's address.
//! - [`carry`]: relaying an admitted connection (splice or per-request HTTP), tracked and logged.
//! - [`pod`]: the context one pod's listeners share.

pub mod carry;
pub mod delivery;
pub mod inbound;
pub mod listeners;
pub mod netns;
pub mod outbound;
pub mod pod;
pub mod transparent;
pub mod tunneled;

pub use listeners::PodListeners;
pub use netns::PodNetns;
pub use pod::PodContext;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

/// `addr` with an IPv4-mapped IPv6 address shown as IPv4 (dual-stack listeners see those).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Accept on `listener` until the task is aborted, handling each connection in its own task;
/// failed accepts back off (see [`crate::accept`]).
pub async fn accept_loop<C, F, Fut>(listener: TcpListener, ctx: Arc<C>, workload: String, handle: F)
where
    C: Send + Sync + 'static,
    F: Fn(TcpStream, SocketAddr, Arc<C>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener
        .local_addr()
        .map_or_else(|e| format!("unknown address ({e})"), |a| a.to_string());
    let mut backoff = crate::accept::Backoff::new(format_args!("{workload} {local}"));
    loop {
        let (stream, peer) = backoff.next(|| listener.accept()).await;
        crate::scheduling::busy_poll::activity();
        tokio::spawn(handle(stream, peer, ctx.clone()));
        // The new connection first: the next accept() finds nothing more often than not, and
        // that system call need not come before the connection's own.
        tokio::task::yield_now().await;
    }
}
