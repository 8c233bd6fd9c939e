//! A `CONNECT` of the test's choosing through a real tunnel, for attacks the source agent would
//! never carry (any authority, loopback included): an SVID minted from the cluster's development
//! CA for a pod's identity, a TCP connection made inside that pod's netns to the destination
//! pod's tunnel port, and the agent's own HBONE client (`latch::tunnel::hbone`) over it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use latch::{
    identity::ca::DevCa,
    tunnel::hbone::{Dial, PoolKey, TunnelClient, TunnelError},
};

use crate::{PodId, cluster::Cluster, netns};

/// The tunnel port of every test agent.
pub const TUNNEL_PORT: u16 = 15008;

/// Send `CONNECT authority` as `from` (its identity, from its netns) to `to`'s tunnel port and
/// return the answer's status code (200 if admitted).
pub fn connect_status(
    cluster: &Cluster,
    from: PodId,
    to: PodId,
    authority: SocketAddr,
) -> anyhow::Result<u16> {
    let ca_dir = cluster.ca_dir();
    let ca = DevCa::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))?;
    let td = cluster.trust_domain.clone();
    let source = cluster.pod(from).spiffe_id(&td);
    let destination = cluster.pod(to).spiffe_id(&td);
    let svid = ca.mint(&source, Duration::from_secs(3600))?;
    let tls = latch::tls::client_config(&svid, vec![ca.certificate().clone()], &td, &destination)?;
    let endpoint = SocketAddr::new(cluster.pod(to).ipv4.into(), TUNNEL_PORT);
    let tcp = netns::in_netns(&cluster.pod(from).netns(), move || {
        std::net::TcpStream::connect(endpoint).with_context(|| format!("connecting to {endpoint}"))
    })?;
    tcp.set_nonblocking(true)?;
    let key = PoolKey {
        src: source,
        dst: destination,
        endpoint,
    };
    let dial = move || Dial {
        tcp: Box::pin(async move { tokio::net::TcpStream::from_std(tcp) }),
        tls: Ok(tls),
        client_not_after: svid.not_after,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opened = runtime.block_on(TunnelClient::new().open(&key, authority, None, dial, None));
    match opened {
        Ok(_) => Ok(200),
        Err(TunnelError::Refused { status, .. }) => Ok(status.as_u16()),
        Err(e) => bail!("CONNECT {authority} through {endpoint}: {e}"),
    }
}
