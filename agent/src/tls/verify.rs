//! SPIFFE X.509-SVID verification with x509-parser, and the rustls verifiers built on it.
//!
//! An SVID is accepted when: every certificate of the chain is within its validity window; each
//! certificate is signed by the next one, and the last by a CA of the trust bundle (issuers must
//! be CAs; the leaf must not be one); the leaf has exactly one URI SAN, a valid SPIFFE ID whose
//! trust domain is ours. The client side also requires the server's ID to be the expected one.
//!
//! The signatures of a chain are checked once per trust bundle ([`Verified`]): a peer presents
//! the same SVID on every new connection until it rotates. Everything else is checked on every
//! use.

use std::{
    collections::HashSet,
    sync::{LazyLock, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::identity::spiffe::SpiffeUri;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, prelude::FromDer, time::ASN1Time,
};

/// The longest chain accepted (leaf + intermediates).
const MAX_CHAIN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate presented")]
    Empty,
    #[error("certificate {index} of the chain does not parse: {reason}")]
    Parse { index: usize, reason: String },
    #[error("certificate chain is longer than {MAX_CHAIN}")]
    TooLong,
    #[error("certificate {index} of the chain is not valid before {not_before}")]
    NotYetValid { index: usize, not_before: String },
    #[error("certificate {index} of the chain expired at {not_after}")]
    Expired { index: usize, not_after: String },
    #[error("the leaf must carry exactly one URI SAN, it has {0}")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN {0:?} is not a SPIFFE ID")]
    NotSpiffe(String),
    #[error("SPIFFE ID {id} is outside the trust domain {expected}")]
    TrustDomain { id: String, expected: String },
    #[error("the leaf certificate is a CA certificate")]
    LeafIsCa,
    #[error("certificate {index} of the chain is signed by a certificate that is not a CA")]
    IssuerNotCa { index: usize },
    #[error("certificate {index} of the chain is not signed by its issuer")]
    BadSignature { index: usize },
    #[error("no CA in the trust bundle issued the chain")]
    UnknownIssuer,
    #[error("the peer is {found}, expected {expected}")]
    WrongIdentity { found: String, expected: String },
}

impl VerifyError {
    fn to_tls(&self) -> TlsError {
        let e = match self {
            VerifyError::Expired { .. } => CertificateError::Expired,
            VerifyError::NotYetValid { .. } => CertificateError::NotValidYet,
            VerifyError::UnknownIssuer => CertificateError::UnknownIssuer,
            VerifyError::BadSignature { .. } => CertificateError::BadSignature,
            VerifyError::WrongIdentity { .. } => CertificateError::ApplicationVerificationFailure,
            other => {
                CertificateError::Other(rustls::OtherError(std::sync::Arc::new(other.clone())))
            }
        };
        TlsError::InvalidCertificate(e)
    }
}

fn parse(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| VerifyError::Parse {
            index,
            reason: e.to_string(),
        })
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn asn1_time(t: SystemTime) -> ASN1Time {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    ASN1Time::from_timestamp(secs as i64).unwrap_or_else(|_| ASN1Time::now())
}

/// The URI SANs of a certificate.
fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Verify an SVID chain (leaf first) against `bundle` at `now`; returns the SPIFFE ID.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &[CertificateDer<'_>],
    trust_domain: &str,
    now: SystemTime,
) -> Result<String, VerifyError> {
    if chain.is_empty() {
        return Err(VerifyError::Empty);
    }
    if chain.len() > MAX_CHAIN {
        return Err(VerifyError::TooLong);
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse(i, der))
        .collect::<Result<Vec<_>, _>>()?;
    let at = asn1_time(now);
    for (index, cert) in certs.iter().enumerate() {
        let validity = cert.validity();
        if at < validity.not_before {
            return Err(VerifyError::NotYetValid {
                index,
                not_before: validity.not_before.to_string(),
            });
        }
        if at > validity.not_after {
            return Err(VerifyError::Expired {
                index,
                not_after: validity.not_after.to_string(),
            });
        }
    }

    let leaf = &certs[0];
    if is_ca(leaf) {
        return Err(VerifyError::LeafIsCa);
    }
    let uris = uri_sans(leaf);
    if uris.len() != 1 {
        return Err(VerifyError::UriSanCount(uris.len()));
    }
    let id = uris[0].clone();
    let parsed = SpiffeUri::parse(&id).map_err(|_| VerifyError::NotSpiffe(id.clone()))?;
    if parsed.trust_domain() != trust_domain {
        return Err(VerifyError::TrustDomain {
            id,
            expected: trust_domain.to_owned(),
        });
    }

    let key = Verified::key(chain, bundle);
    if VERIFIED.contains(&key) {
        return Ok(id);
    }
    #[cfg(test)]
    SIGNATURE_CHECKS.with(|n| n.set(n.get() + 1));
    // Each certificate signed by the next; the last by a bundle CA.
    for index in 0..certs.len() {
        let cert = &certs[index];
        if let Some(issuer) = certs.get(index + 1) {
            if !is_ca(issuer) {
                return Err(VerifyError::IssuerNotCa { index });
            }
            cert.verify_signature(Some(issuer.public_key()))
                .map_err(|_| VerifyError::BadSignature { index })?;
            continue;
        }
        let anchored = bundle.iter().enumerate().any(|(i, der)| {
            parse(i, der).is_ok_and(|ca| {
                is_ca(&ca)
                    && ca.subject().as_raw() == cert.issuer().as_raw()
                    && cert.verify_signature(Some(ca.public_key())).is_ok()
            })
        });
        if !anchored {
            return Err(VerifyError::UnknownIssuer);
        }
    }
    VERIFIED.insert(key);
    Ok(id)
}

/// Chains whose signatures were found good, each with the trust bundle it was anchored to, as
/// SHA-256 digests of both. Checking an SVID's signatures again proves nothing new (the answer
/// depends only on those bytes) and costs 64–72 µs of ECDSA P-256 on the development VM, on
/// each side of every new tunnel connection; a chain seen before takes 4 µs. Validity dates,
/// the leaf's SAN and the trust domain do not go through here and are checked every time. A
/// changed bundle makes every key new; the set is emptied when it reaches [`Verified::MOST`].
struct Verified(Mutex<HashSet<[u8; 32]>>);

static VERIFIED: LazyLock<Verified> = LazyLock::new(|| Verified(Mutex::default()));

#[cfg(test)]
thread_local! {
    /// Chains whose signatures this thread checked (each test counts its own).
    pub(super) static SIGNATURE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Verified {
    const MOST: usize = 4096;

    fn key(chain: &[CertificateDer<'_>], bundle: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for certs in [chain, bundle] {
            digest.update(&(certs.len() as u64).to_be_bytes());
            for der in certs {
                digest.update(&(der.len() as u64).to_be_bytes());
                digest.update(der);
            }
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.finish().as_ref());
        key
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.seen().contains(key)
    }

    fn insert(&self, key: [u8; 32]) {
        let mut seen = self.seen();
        if seen.len() >= Self::MOST {
            seen.clear();
        }
        seen.insert(key);
    }
}

/// The SPIFFE ID of a peer whose chain the verifiers already accepted.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = parse(0, chain.first()?).ok()?;
    let uris = uri_sans(&leaf);
    (uris.len() == 1).then(|| uris[0].clone())
}

fn system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The handshake-signature methods both verifiers share: TLS 1.2 refused, TLS 1.3 checked with
/// the ring provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            tls12_refused()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

fn tls12_refused() -> Result<HandshakeSignatureValid, TlsError> {
    Err(TlsError::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Client side: the server must present a valid SVID of exactly `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: String,
    expected: String,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: Vec<CertificateDer<'static>>, trust_domain: &str, expected: &str) -> Self {
        Self {
            bundle,
            trust_domain: trust_domain.to_owned(),
            expected: expected.to_owned(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = verify_svid(&chain, &self.bundle, &self.trust_domain, system_time(now))
            .map_err(|e| e.to_tls())?;
        if id != self.expected {
            return Err(VerifyError::WrongIdentity {
                found: id,
                expected: self.expected.clone(),
            }
            .to_tls());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Server side: the client must present a valid SVID of our trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Vec<CertificateDer<'static>>, trust_domain: &str) -> Self {
        Self {
            bundle,
            trust_domain: trust_domain.to_owned(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        verify_svid(&chain, &self.bundle, &self.trust_domain, system_time(now))
            .map(|_| ClientCertVerified::assertion())
            .map_err(|e| e.to_tls())
    }

    handshake_signatures!();
}
