//! Mutual TLS between agents: rustls configurations (TLS 1.3 only, aws-lc-rs provider: [`crypto_provider`]) whose
//! certificate verifiers are SPIFFE-aware ([`verify`]): the chain must verify to the trust
//! bundle under the X.509-SVID profile ([`profile`], [`names`]), the leaf must carry exactly one
//! `spiffe://` URI SAN in our trust domain, and every certificate must be within its validity
//! window; the client also checks that the server is the destination workload. The tunnel's
//! handshakes, and what they proved about the peer, are in [`handshake`].

pub mod error;
pub mod handshake;
mod names;
mod profile;
pub mod verify;

use std::sync::{Arc, OnceLock};

use rustls::{
    ClientConfig, ServerConfig, client::ResolvesClientCert, crypto::CryptoProvider,
    pki_types::CertificateDer, server::ResolvesServerCert, sign::CertifiedKey, version::TLS13,
};

use crate::identity::ca::Svid;
pub use verify::{
    CertRef, Position, Problem, Role, SpiffeClientVerifier, SpiffeServerVerifier, VerifyError,
    peer_identity, svid_identity, verify_svid,
};

/// ALPN of the HBONE tunnel (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// The agent's cryptography: rustls on aws-lc-rs, its cipher suites and signature algorithms as
/// they come, and the key exchanges in an order of the agent's own: X25519 first (what every
/// Latch agent and a default ztunnel offer, one round trip), then the X25519MLKEM768 hybrid (a
/// ztunnel with `COMPLIANCE_POLICY=pqc` offers only that, and is answered), then the NIST
/// curves. Named here, not left to rustls's defaults, which a feature enabled anywhere in the
/// build (`prefer-post-quantum`) would reorder.
pub fn crypto_provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    CryptoProvider {
        kx_groups: vec![
            kx_group::X25519,
            kx_group::X25519MLKEM768,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        ..default_provider()
    }
}

/// [`crypto_provider`], built once and shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(crypto_provider())).clone()
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

/// Client side: present the certificate `resolver` gives (the current SVID of the source), and
/// accept only a server proving `expected_server`.
pub fn client_config_with(
    resolver: Arc<dyn ResolvesClientCert>,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    expected_server: &str,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        trust_domain,
        expected_server,
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|source| TlsConfigError::Rustls {
            identity: expected_server.to_owned(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Never resume: a resumed session skips the verifier, and with it the SPIFFE checks against
    // the current trust bundle.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server side: present the certificate `resolver` gives (the current SVID of the destination
/// workload), and require a client certificate that is a valid SVID of our trust domain (who it
/// is, is for policy to decide).
pub fn server_config_with(
    resolver: Arc<dyn ResolvesServerCert>,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, trust_domain));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|source| TlsConfigError::Rustls {
            identity: trust_domain.to_owned(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session tickets: clients never resume (see `client_config_with`), so issuing them would
    // only cost two messages and a stored session per connection.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Load an SVID's key for signing handshakes.
pub fn certified_key(svid: &Svid) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let key = provider()
        .key_provider
        .load_private_key(svid.key.clone_key())
        .map_err(|source| TlsConfigError::Rustls {
            identity: svid.spiffe_id.clone(),
            source,
        })?;
    Ok(Arc::new(CertifiedKey::new(svid.chain.clone(), key)))
}

/// A fixed certificate, for both sides of a handshake.
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// [`client_config_with`] presenting a fixed SVID.
pub fn client_config(
    svid: &Svid,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    expected_server: &str,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let fixed = Arc::new(FixedCert(certified_key(svid)?));
    client_config_with(fixed, bundle, trust_domain, expected_server)
}

/// [`server_config_with`] presenting a fixed SVID.
pub fn server_config(
    svid: &Svid,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let fixed = Arc::new(FixedCert(certified_key(svid)?));
    server_config_with(fixed, bundle, trust_domain)
}

#[cfg(test)]
mod tests;
