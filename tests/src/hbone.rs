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
        src: latch::identity::SpiffeId::parse(&source)?,
        dst: latch::identity::SpiffeId::parse(&destination)?,
        endpoint,
        trust: 1,
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

/// One tunnel connection held open by the test: proven once with the SVID it was given, then
/// `CONNECT`s sent on it one at a time, as a source agent reusing a pooled connection would.
pub struct HeldTunnel {
    runtime: tokio::runtime::Runtime,
    sender: h2::client::SendRequest<bytes::Bytes>,
    /// Fires when the connection has ended (closed by either side, or failed).
    ended: tokio::sync::watch::Receiver<bool>,
}

impl HeldTunnel {
    /// Dial `to`'s tunnel port from `from`'s netns, prove `svid` (trusting `bundle` for the
    /// server) and start HTTP/2.
    pub fn open(
        cluster: &Cluster,
        from: PodId,
        to: PodId,
        svid: &latch::identity::ca::Svid,
        bundle: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    ) -> anyhow::Result<Self> {
        let td = cluster.trust_domain.clone();
        let destination = cluster.pod(to).spiffe_id(&td);
        let tls = latch::tls::client_config(svid, bundle, &td, &destination)?;
        let endpoint = SocketAddr::new(cluster.pod(to).ipv4.into(), TUNNEL_PORT);
        let tcp = netns::in_netns(&cluster.pod(from).netns(), move || {
            std::net::TcpStream::connect(endpoint)
                .with_context(|| format!("connecting to {endpoint}"))
        })?;
        tcp.set_nonblocking(true)?;
        // A worker thread of its own drives the connection while the test does other things.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let sender = runtime.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(endpoint.ip().into());
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {endpoint}"))?;
            let (sender, connection) = h2::client::handshake(tls)
                .await
                .with_context(|| format!("HTTP/2 with {endpoint}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
                let _ = ended_tx.send(true);
            });
            anyhow::Ok(sender)
        })?;
        Ok(Self {
            runtime,
            sender,
            ended,
        })
    }

    /// `CONNECT authority` on the held connection: the answer's status, or why the stream could
    /// not be opened or answered (the server's `GOAWAY`, a reset, the connection gone).
    pub fn connect(&mut self, authority: SocketAddr) -> Result<u16, String> {
        let sender = self.sender.clone();
        self.runtime.block_on(async move {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.to_string())
                .body(())
                .map_err(|e| e.to_string())?;
            let mut sender = sender.ready().await.map_err(|e| e.to_string())?;
            let (response, _send) = sender
                .send_request(request, false)
                .map_err(|e| e.to_string())?;
            let response = tokio::time::timeout(Duration::from_secs(20), response)
                .await
                .map_err(|_| "no answer within 20 s".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(response.status().as_u16())
        })
    }

    /// Wait until the connection has ended, at most `limit`; whether it did.
    pub fn wait_closed(&mut self, limit: Duration) -> bool {
        let mut ended = self.ended.clone();
        self.runtime.block_on(async move {
            tokio::time::timeout(limit, ended.wait_for(|ended| *ended))
                .await
                .is_ok_and(|r| r.is_ok())
        })
    }
}

/// Write `svid` as `<dir>/<namespace>/<serviceAccount>/{cert.pem,key.pem}` with `bundle_pem` as
/// `bundle.pem` (the `files` certificate source), each file renamed into place whole.
pub fn write_svid_files(
    dir: &std::path::Path,
    namespace: &str,
    service_account: &str,
    svid: &latch::identity::ca::Svid,
    bundle_pem: &str,
) -> anyhow::Result<()> {
    write_svid_parts(
        dir,
        namespace,
        service_account,
        &svid.chain_pem(),
        &svid.key_pem(),
        bundle_pem,
    )
}

/// [`write_svid_files`] with each part given as PEM text.
pub fn write_svid_parts(
    dir: &std::path::Path,
    namespace: &str,
    service_account: &str,
    cert_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> anyhow::Result<()> {
    let base = dir.join(namespace).join(service_account);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    for (name, text) in [
        ("bundle.pem", bundle_pem),
        ("cert.pem", cert_pem),
        ("key.pem", key_pem),
    ] {
        let path = base.join(name);
        let staged = base.join(format!(".{name}.new"));
        std::fs::write(&staged, text).with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, &path)
            .with_context(|| format!("renaming into {}", path.display()))?;
    }
    Ok(())
}
