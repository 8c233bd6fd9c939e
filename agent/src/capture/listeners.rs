//! The listeners the agent holds inside one pod's network namespace:
//! - capture: `127.0.0.1:<capture>` and `[::1]:<capture>`, where `connect4/6` send the pod's
//!   outbound connections; the listener a connection arrives on tells the agent which workload is
//!   calling (no trust in source addresses);
//! - inbound: `[::]:<inbound>` (dual-stack), where the `sk_lookup` check steers inbound
//!   connections that have no fresh verdict; the runtime marks it as the agent's in
//!   `LATCH_AGENT_LISTENERS` (`KernelMaps::mark_agent_listener`), which every connection it
//!   accepts inherits, so that `sock_ops` does not take one for a connection the check admitted
//!   straight to the application (fast-path audit);
//! - tunnel: `[::]:<tunnel>` (dual-stack), where other agents open HBONE tunnels to this pod.
//!
//! Their ports are the agent's own in every pod: [`own_listener`] names them, and the agent
//! never delivers a connection to one (it would arrive at the agent again, be delivered again,
//! and so on, a connection and a decision each time round).

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpListener;

use super::PodNetns;
use crate::{config::Ports, datapath::system};

/// Which of the agent's listeners in a pod `port` belongs to (`capture`, `inbound`, `tunnel`),
/// if any.
pub fn own_listener(ports: &Ports, port: u16) -> Option<&'static str> {
    [
        (ports.capture, "capture"),
        (ports.inbound, "inbound"),
        (ports.tunnel, "tunnel"),
    ]
    .into_iter()
    .find_map(|(own, name)| (own == port).then_some(name))
}

/// The reason logged for refusing a connection to `port`, one of the agent's own listeners'.
pub fn own_port_refusal(listener: &str, port: u16) -> String {
    format!("port {port} is the agent's own ({listener} listener); never delivered")
}

pub struct PodListeners {
    pub capture_v4: TcpListener,
    /// Absent when the pod has no IPv6 loopback.
    pub capture_v6: Option<TcpListener>,
    pub inbound: TcpListener,
    pub tunnel: TcpListener,
    /// Cookie of the pod's network namespace (matches `bpf_get_netns_cookie` in the kernel).
    pub netns_cookie: u64,
}

const BACKLOG: i32 = 4096;

/// A listener on `addr`.
fn listen(addr: SocketAddr, dual_stack: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it (Linux): no setsockopt() per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl PodListeners {
    /// Open the listeners inside the pod's namespace.
    pub fn open(
        netns: &PodNetns,
        capture_port: u16,
        inbound_port: u16,
        tunnel_port: u16,
    ) -> io::Result<Self> {
        let path = netns.path().display().to_string();
        let (v4, v6, inbound, tunnel) = netns.run_inside(|| {
            let any = |port| {
                listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)
                    .or_else(|_| listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false))
            };
            let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, capture_port)), false);
            let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, capture_port)), false);
            (v4, v6, any(inbound_port), any(tunnel_port))
        })?;
        let with_ctx =
            |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} in {path}: {e}"));
        let v4 = v4.map_err(|e| with_ctx("capture listener 127.0.0.1", e))?;
        let inbound = inbound.map_err(|e| with_ctx("inbound listener", e))?;
        let tunnel = tunnel.map_err(|e| with_ctx("tunnel listener", e))?;
        let v6 = match v6 {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(netns = path, error = %e, "no IPv6 capture listener; IPv6 redirects in this pod will be refused");
                None
            }
        };
        let netns_cookie = system::netns_cookie(&v4).map_err(|e| with_ctx("SO_NETNS_COOKIE", e))?;
        Ok(Self {
            capture_v4: TcpListener::from_std(v4)?,
            capture_v6: v6.map(TcpListener::from_std).transpose()?,
            inbound: TcpListener::from_std(inbound)?,
            tunnel: TcpListener::from_std(tunnel)?,
            netns_cookie,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_ports_are_named() {
        let ports = Ports {
            capture: 15001,
            inbound: 15006,
            tunnel: 15008,
        };
        assert_eq!(own_listener(&ports, 15001), Some("capture"));
        assert_eq!(own_listener(&ports, 15006), Some("inbound"));
        assert_eq!(own_listener(&ports, 15008), Some("tunnel"));
        for other in [8080, 15000, 15007, 15020] {
            assert_eq!(own_listener(&ports, other), None, "{other}");
        }
    }

    /// Accepted sockets inherit `TCP_NODELAY`: no `setsockopt()` per connection.
    #[test]
    fn accepted_connections_inherit_no_delay() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listener = listen(addr, false).expect("listen");
        let addr = listener.local_addr().expect("bound");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        listener.set_nonblocking(false).expect("blocking");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }
}
