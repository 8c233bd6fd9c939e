//! Delivering an admitted connection to the pod's application, from inside the pod's netns:
//! from the client's own address where the pod's routing allows (the delivery announced to the
//! inbound check while it lives), else from the loopback marker; with delivery sockets made
//! ahead of need ([`SPARES`]) so a delivery usually goes straight to `bind()` and `connect()`.
//! See docs/datapath.md (*Inbound*).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
};

use socket2::{Domain, SockAddr, Socket};
use tokio::net::TcpStream;

use super::{PodNetns, netns::connect};
use crate::{datapath::DeliveryMap, sync::lock};

/// Source address of connections the agent delivers to an application over IPv4 when it cannot
/// deliver them from the client's own address. Loopback sources can only originate inside the
/// pod's netns, so the inbound check trusts them.
pub const DELIVERY_MARKER_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6.
pub const DELIVERY_MARKER_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// How many delivery sockets of a family are kept ready (made again, all at once, when half of
/// them are used).
pub const SPARES: usize = 4;

/// The ports deliveries from clients' addresses take in turn (Linux's default ephemeral range).
pub const DELIVERY_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
/// Ports tried for one delivery before it fails.
const PORT_ATTEMPTS: usize = 8;

/// Connect to the application at `target` from inside the pod's netns (whose cookie is
/// `netns_cookie`), from the client's own address where the pod's routing allows it (as a
/// connection straight from the client would arrive), else from the loopback marker. The inbound
/// check lets the marker through, and a delivery from the client's address for as long as the
/// returned [`Announced`] is kept.
pub async fn deliver(
    sockets: &DeliverySockets,
    deliveries: &Arc<DeliveryMap>,
    netns_cookie: u64,
    target: SocketAddr,
    client: Option<IpAddr>,
) -> io::Result<(TcpStream, Option<Announced>)> {
    let marked = || deliveries.listener_marked(netns_cookie, target.port());
    let from = delivery_source(&sockets.netns, target, client, marked);
    let announce = |local| Announced::new(deliveries, local, target);
    sockets.connect(target, from, announce).await
}

/// A delivery from `from` to `to` announced to the inbound check (`LATCH_DELIVERIES`); withdrawn
/// when dropped, once the delivered connection has ended (while it lives its four-tuple is taken,
/// so nothing else can use the entry).
pub struct Announced {
    deliveries: Arc<DeliveryMap>,
    from: SocketAddr,
    to: SocketAddr,
}

impl Announced {
    fn new(deliveries: &Arc<DeliveryMap>, from: SocketAddr, to: SocketAddr) -> io::Result<Self> {
        deliveries.announce(from, to).map_err(io::Error::other)?;
        Ok(Self {
            deliveries: deliveries.clone(),
            from,
            to,
        })
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        if let Err(e) = self.deliveries.withdraw(self.from, self.to) {
            tracing::warn!(from = %self.from, to = %self.to, error = %e, "withdrawing an announced delivery");
        }
    }
}

/// Where a delivery to `target` comes from: the client, unless it is the pod itself (a pod
/// reaching its own address), of the other family, the pod's routing does not allow it, or the
/// application's listener carries a socket mark of its own (`marked`, asked last, since it reads
/// a kernel map: the accepted socket then keeps the listener's mark, which routes its answers out
/// of the pod instead of back to the agent, `docs/datapath.md`).
fn delivery_source(
    netns: &PodNetns,
    target: SocketAddr,
    client: Option<IpAddr>,
    marked: impl FnOnce() -> bool,
) -> IpAddr {
    match client.map(|ip| ip.to_canonical()) {
        Some(ip)
            if ip != target.ip()
                && !ip.is_loopback()
                && ip.is_ipv4() == target.is_ipv4()
                && netns.transparent_for(ip)
                && !marked() =>
        {
            ip
        }
        _ => marker(target),
    }
}

/// A delivered connection to `target` has ended: make the sockets of the next deliveries now,
/// while no connection waits for them.
pub fn delivered(sockets: &DeliverySockets, target: SocketAddr) {
    sockets.replenish(target);
}

fn marker(target: SocketAddr) -> IpAddr {
    match target.ip() {
        IpAddr::V4(_) => DELIVERY_MARKER_V4.into(),
        IpAddr::V6(_) => DELIVERY_MARKER_V6.into(),
    }
}

/// Delivery sockets of one pod's namespace: those made ahead (all of one family: the one asked
/// for last) and the turn through [`DELIVERY_PORTS`].
pub struct DeliverySockets {
    netns: Arc<PodNetns>,
    spares: Mutex<Vec<Spare>>,
    ports: AtomicU16,
}

struct Spare {
    socket: Socket,
    domain: Domain,
}

impl DeliverySockets {
    /// Sockets for deliveries in `netns`, once its routing is set up
    /// ([`PodNetns::route_deliveries`]).
    pub fn new(netns: Arc<PodNetns>) -> Self {
        Self {
            netns,
            spares: Mutex::new(Vec::new()),
            // Somewhere else after each restart, away from the last run's recent ports.
            ports: AtomicU16::new(std::process::id() as u16),
        }
    }

    fn made_ahead(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        lock(&self.spares)
    }

    /// A delivery socket: one made ahead, or a new one.
    fn socket(&self, domain: Domain) -> io::Result<Socket> {
        let spare = {
            let mut spares = self.made_ahead();
            // Only one family is kept: the one asked for last.
            spares.retain(|s| s.domain == domain);
            spares.pop()
        };
        match spare {
            Some(spare) => Ok(spare.socket),
            None => self
                .netns
                .delivery_sockets(domain, 1)?
                .pop()
                .ok_or_else(|| io::Error::other("no socket made")),
        }
    }

    /// Make [`DELIVERY_PORTS`]' `turn`th port the next one.
    #[cfg(test)]
    pub fn set_turn(&self, turn: u16) {
        self.ports.store(turn, Ordering::Relaxed);
    }

    /// The next port of [`DELIVERY_PORTS`].
    fn next_port(&self) -> u16 {
        let span = DELIVERY_PORTS.end() - DELIVERY_PORTS.start() + 1;
        DELIVERY_PORTS.start() + self.ports.fetch_add(1, Ordering::Relaxed) % span
    }

    /// Deliver a connection to the application at `dst` from `from`: the client's address where
    /// [`PodNetns::transparent_for`] it, else a loopback marker. A delivery from a client's address
    /// is passed to `announce` with its port before it connects; what that returns (dropped
    /// should this attempt fail) comes back with the connection.
    ///
    /// Where the family is transparent the port is chosen here, from [`DELIVERY_PORTS`] in turn
    /// (`bind()` finding a free port itself would search ever longer among the ports its earlier
    /// connections hold in `TIME_WAIT`); a four-tuple still in use makes it try the next one.
    /// Otherwise `connect()` picks it.
    pub async fn connect<A>(
        &self,
        dst: SocketAddr,
        from: IpAddr,
        announce: impl Fn(SocketAddr) -> io::Result<A>,
    ) -> io::Result<(TcpStream, Option<A>)> {
        let domain = Domain::for_address(dst);
        let bind = |socket: &Socket, local: SocketAddr| {
            socket.bind(&SockAddr::from(local)).map_err(|e| {
                io::Error::new(e.kind(), format!("binding a delivery to {local}: {e}"))
            })
        };
        if !self.netns.transparent(domain) {
            let socket = self.socket(domain)?;
            bind(&socket, SocketAddr::new(from, 0))?;
            return Ok((connect(socket, dst).await?, None));
        }
        for _ in 0..PORT_ATTEMPTS {
            let socket = self.socket(domain)?;
            let local = SocketAddr::new(from, self.next_port());
            match bind(&socket, local) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                other => other?,
            }
            let announced = if from.is_loopback() {
                None
            } else {
                Some(announce(local)?)
            };
            match connect(socket, dst).await {
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => continue,
                connected => return Ok((connected?, announced)),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("no free port from {from} to {dst} in {PORT_ATTEMPTS} tries"),
        ))
    }

    /// Make delivery sockets for `dst`'s family ahead of need, up to [`SPARES`], once half or
    /// more are used, all with one visit to the namespace. Called once a delivered connection
    /// has ended, when no one waits for the netns.
    pub fn replenish(&self, dst: SocketAddr) {
        let domain = Domain::for_address(dst);
        let left = self.made_ahead().len();
        if left > SPARES / 2 {
            return;
        }
        match self.netns.delivery_sockets(domain, SPARES - left) {
            Ok(made) => self
                .made_ahead()
                .extend(made.into_iter().map(|socket| Spare { socket, domain })),
            Err(e) => {
                tracing::warn!(netns = %self.netns.path().display(), error = %e, "making spare sockets")
            }
        }
    }

    /// How many delivery sockets are ready for `dst`'s family.
    #[cfg(test)]
    pub fn spares(&self, dst: SocketAddr) -> usize {
        let domain = Domain::for_address(dst);
        self.made_ahead()
            .iter()
            .filter(|s| s.domain == domain)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[tokio::test]
    async fn deliveries_use_sockets_made_ahead() {
        // The agent's own namespace stands in for a pod's (its routing is left alone: no
        // `route_deliveries`, so deliveries are plain sockets bound to the marker).
        let netns = Arc::new(PodNetns::open(Path::new("/proc/self/ns/net")).expect("netns"));
        let sockets = DeliverySockets::new(netns.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dst = listener.local_addr().expect("address");
        let marker = IpAddr::from([127, 0, 0, 6]);
        let never = |_| -> io::Result<()> { panic!("a delivery from the marker is not announced") };
        assert!(!netns.transparent_for(marker), "not set up");
        assert_eq!(sockets.spares(dst), 0, "none before the first");

        let (first, _) = sockets.connect(dst, marker, never).await.expect("connect");
        assert_eq!(sockets.spares(dst), 0, "made on the way");
        sockets.replenish(dst);
        assert_eq!(sockets.spares(dst), SPARES);
        let mut connections = vec![first];
        for taken in 1..=SPARES + 1 {
            let (stream, _) = sockets.connect(dst, marker, never).await.expect("connect");
            assert_eq!(
                sockets.spares(dst),
                SPARES.saturating_sub(taken),
                "one taken each time, while there are any"
            );
            connections.push(stream);
        }
        sockets.replenish(dst);
        assert_eq!(sockets.spares(dst), SPARES, "all used: made again");
        connections.push(
            sockets
                .connect(dst, marker, never)
                .await
                .expect("connect")
                .0,
        );
        sockets.replenish(dst);
        assert_eq!(
            sockets.spares(dst),
            SPARES - 1,
            "more than half left: nothing made"
        );
        let ours: Vec<SocketAddr> = connections
            .iter()
            .map(|c| c.local_addr().expect("local"))
            .collect();
        for _ in &ours {
            let (_accepted, peer) = listener.accept().await.expect("accept");
            assert_eq!(peer.ip(), marker, "from the marker");
            assert!(ours.contains(&peer), "accepted one of ours: {peer}");
        }
        let v6: SocketAddr = "[::1]:9".parse().expect("v6");
        assert_eq!(sockets.spares(v6), 0, "kept only for the family asked for");
    }
}
