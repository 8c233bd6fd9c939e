//! Mutual TLS between agents: rustls configurations (TLS 1.3 only, ring provider) whose
//! certificate verifiers are SPIFFE-aware ([`verify`]): the chain must verify to the trust
//! bundle, the leaf must carry exactly one `spiffe://` URI SAN in our trust domain and be within
//! its validity window; the client also checks that the server is the destination workload.

pub mod verify;

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, crypto::CryptoProvider, pki_types::CertificateDer, version::TLS13,
};

use crate::identity::ca::Svid;
pub use verify::{
    SpiffeClientVerifier, SpiffeServerVerifier, VerifyError, peer_identity, verify_svid,
};

/// ALPN of the HBONE tunnel (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("building the TLS configuration for {identity}: {source}")]
    Rustls {
        identity: String,
        #[source]
        source: rustls::Error,
    },
}

/// Client side: present `svid`, accept only a server proving `expected_server`.
pub fn client_config(
    svid: &Svid,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    expected_server: &str,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let err = |source| TlsConfigError::Rustls {
        identity: svid.spiffe_id.clone(),
        source,
    };
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        trust_domain,
        expected_server,
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
        .map_err(err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Server side: present `svid`, require a client certificate that is a valid SVID of our trust
/// domain (who it is, is for policy to decide).
pub fn server_config(
    svid: &Svid,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let err = |source| TlsConfigError::Rustls {
        identity: svid.spiffe_id.clone(),
        source,
    };
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, trust_domain));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .map_err(err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
