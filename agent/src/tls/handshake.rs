//! The tunnel's TLS handshakes, client and server side, and what each proved about the peer: its
//! chain as verified, the validity of its certificate and (server side) its SPIFFE ID. Whether a
//! chain is accepted is the verifiers' to decide ([`super::verify`]); how long the proof holds,
//! see `docs/tunnel.md` (*How long a proof holds*).

use std::{
    io,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, ServerName},
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::peer_identity;
use crate::identity::SpiffeId;

/// The peer's chain as its handshake verified it, and the validity of its certificate.
pub struct PeerChain {
    pub chain: Vec<CertificateDer<'static>>,
    /// NotBefore of the peer's certificate (UNIX_EPOCH if there is none: an expired proof).
    pub not_before: SystemTime,
    /// NotAfter of the peer's certificate (UNIX_EPOCH if there is none: an expired proof).
    pub not_after: SystemTime,
}

impl PeerChain {
    fn of(certs: Option<&[CertificateDer<'_>]>) -> Self {
        let chain: Vec<CertificateDer<'static>> = certs
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (not_before, not_after) = chain
            .first()
            .map(validity)
            .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
        Self {
            chain,
            not_before,
            not_after,
        }
    }
}

/// A client the server's handshake verified: its SPIFFE ID and its chain.
pub struct ProvenClient {
    pub identity: SpiffeId,
    pub peer: PeerChain,
}

/// TLS as the client with `config` (whose verifier checks the server's identity) over `io`, to
/// the server at `server`.
pub async fn connect<S>(
    config: Arc<ClientConfig>,
    server: IpAddr,
    io: S,
) -> io::Result<(client::TlsStream<S>, PeerChain)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The server name is not used for verification (the SPIFFE verifier checks the identity);
    // it is only sent as SNI.
    let name = ServerName::IpAddress(server.into());
    let tls = TlsConnector::from(config).connect(name, io).await?;
    let peer = PeerChain::of(tls.get_ref().1.peer_certificates());
    Ok((tls, peer))
}

/// TLS as the server with `config` (which verifies the client's certificate) over `io`; a
/// client whose certificate names no SPIFFE ID is refused.
pub async fn accept<S>(
    config: Arc<ServerConfig>,
    io: S,
) -> io::Result<(server::TlsStream<S>, ProvenClient)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = TlsAcceptor::from(config).accept(io).await?;
    let peer = PeerChain::of(tls.get_ref().1.peer_certificates());
    let Some(identity) = peer_identity(&peer.chain) else {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "client has no SPIFFE identity",
        ));
    };
    Ok((tls, ProvenClient { identity, peer }))
}

/// NotAfter of a certificate (UNIX_EPOCH if it does not parse: an expired proof).
pub fn not_after(cert: &CertificateDer<'_>) -> SystemTime {
    validity(cert).1
}

/// NotBefore and NotAfter of a certificate (both UNIX_EPOCH if it does not parse: an expired
/// proof).
pub fn validity(cert: &CertificateDer<'_>) -> (SystemTime, SystemTime) {
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| (time(c.validity().not_before), time(c.validity().not_after)))
        .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH))
}
