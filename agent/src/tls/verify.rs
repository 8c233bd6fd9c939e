//! SPIFFE X.509-SVID path verification with x509-parser, and the rustls verifiers built on it: a
//! chain (leaf first) is walked to an anchor of the bundle with the per-certificate rules of
//! [`profile`] and the name constraints of [`names`]. What needs the bundle or a signature is
//! checked once per (role, chain, bundle) and remembered ([`Verified`]); dates and the chain's own
//! certificates are checked on every use. The rules, one by one: `docs/tunnel.md` (Verification).

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::identity::SpiffeId;
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

pub use super::error::{CertRef, MAX_CHAIN, Position, Problem, VerifyError};
pub use super::profile::Role;
use super::{names, profile};

impl VerifyError {
    fn to_tls(&self) -> TlsError {
        // The detailed error (which certificate, which rule) is what the handshake error says.
        TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(self.clone()),
        )))
    }
}

/// Parse one DER certificate, refusing bytes after it.
fn parse(position: Position, der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    let fail = |reason: String| VerifyError::Parse { position, reason };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| fail(e.to_string()))?;
    if !rest.is_empty() {
        return Err(fail(format!("{} bytes after the certificate", rest.len())));
    }
    Ok(cert)
}

fn asn1_time(t: SystemTime) -> ASN1Time {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    ASN1Time::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or_else(|_| ASN1Time::now())
}

/// The URI SANs of a certificate (those that decode; [`profile::check_encoding`] refuses a SAN
/// with a name that does not).
fn uri_sans<'c>(cert: &'c X509Certificate<'_>) -> Vec<&'c str> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The SPIFFE ID of an SVID leaf: its only URI SAN, a SPIFFE ID with a path (SPIFFE X509-SVID
/// §3.1 and §5.2), in `trust_domain`.
fn leaf_identity(leaf: &X509Certificate<'_>, trust_domain: &str) -> Result<String, Problem> {
    let uris = uri_sans(leaf);
    let [uri] = uris.as_slice() else {
        return Err(Problem::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(|e| Problem::NotSpiffe {
        reason: e.to_string(),
    })?;
    if id.path().is_empty() {
        return Err(Problem::SpiffeIdWithoutPath((*uri).to_owned()));
    }
    if id.trust_domain() != trust_domain {
        return Err(Problem::TrustDomain {
            id: (*uri).to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    Ok((*uri).to_owned())
}

/// The SPIFFE ID a DER X.509-SVID leaf names, checked as [`verify_svid`] checks the leaf's
/// identity (exactly one URI SAN, a SPIFFE ID with a path, in `trust_domain`), without its
/// chain. Never panics, whatever the bytes: a fuzz target's entry point.
pub fn svid_identity(der: &[u8], trust_domain: &str) -> Result<String, VerifyError> {
    let leaf = parse(Position::Leaf, der)?;
    if let Ok(Some(san)) = leaf.subject_alternative_name()
        && !profile::all_decode(&san.value.general_names)
    {
        return Err(VerifyError::refused(
            Position::Leaf,
            &leaf,
            Problem::MalformedExtension {
                name: "subjectAltName",
                reason: "a name does not decode".into(),
            },
        ));
    }
    leaf_identity(&leaf, trust_domain).map_err(|p| VerifyError::refused(Position::Leaf, &leaf, p))
}

/// The chain and the bundle as byte slices. A peer may send the root as well: a copy of a
/// bundle CA on top of the chain is that anchor itself, and taken off.
fn as_bytes<'c, 'b, C: AsRef<[u8]>, B: AsRef<[u8]>>(
    chain: &'c [C],
    bundle: &'b [B],
) -> (Vec<&'c [u8]>, Vec<&'b [u8]>) {
    let mut chain: Vec<&[u8]> = chain.iter().map(AsRef::as_ref).collect();
    let bundle: Vec<&[u8]> = bundle.iter().map(AsRef::as_ref).collect();
    if chain.len() > 1 && chain.last().is_some_and(|top| bundle.contains(top)) {
        chain.pop();
    }
    (chain, bundle)
}

/// Verify an SVID chain (leaf first, DER) for `role` against the CA certificates of `bundle` at
/// `now`; returns the SPIFFE ID. Never panics, whatever the bytes: a fuzz target's entry point.
pub fn verify_svid<C: AsRef<[u8]>, B: AsRef<[u8]>>(
    chain: &[C],
    bundle: &[B],
    trust_domain: &str,
    role: Role,
    now: SystemTime,
) -> Result<String, VerifyError> {
    let (chain, bundle) = as_bytes(chain, bundle);
    if chain.is_empty() {
        return Err(VerifyError::Empty);
    }
    if chain.len() > MAX_CHAIN {
        return Err(VerifyError::TooLong(chain.len()));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse(Position::in_chain(i), der))
        .collect::<Result<Vec<_>, _>>()?;
    let at = asn1_time(now);
    for (index, cert) in certs.iter().enumerate() {
        let position = Position::in_chain(index);
        let checked = profile::check_window(cert, at)
            .and_then(|()| profile::check_encoding(cert, index > 0))
            .and_then(|()| match index {
                0 => profile::check_leaf(cert, role),
                n => profile::check_issuer(cert, n - 1, role),
            });
        checked.map_err(|problem| VerifyError::refused(position, cert, problem))?;
    }
    let leaf = &certs[0];
    let id = leaf_identity(leaf, trust_domain)
        .map_err(|problem| VerifyError::refused(Position::Leaf, leaf, problem))?;

    let key = Verified::key(role, &chain, &bundle);
    if VERIFIED.anchor_window(&key).is_some_and(|w| w.contains(at)) {
        return Ok(id);
    }
    #[cfg(test)]
    SIGNATURE_CHECKS.with(|n| n.set(n.get() + 1));
    let window = verify_path(&certs, &bundle, role, at)?;
    VERIFIED.insert(key, window);
    Ok(id)
}

/// What a chain's own certificates cannot say alone: each is issued and signed by the next,
/// the top one by a CA of the bundle fit to be the anchor, and every CA's name constraints
/// hold below it. Returns the anchor's validity window.
fn verify_path(
    certs: &[X509Certificate<'_>],
    bundle: &[&[u8]],
    role: Role,
    at: ASN1Time,
) -> Result<Window, VerifyError> {
    for (index, pair) in certs.windows(2).enumerate() {
        let [cert, issuer] = pair else { continue };
        let position = Position::in_chain(index);
        let by = Position::in_chain(index + 1);
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(VerifyError::refused(
                position,
                cert,
                Problem::IssuerMismatch {
                    issuer: cert.issuer().to_string(),
                    by,
                },
            ));
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| VerifyError::refused(position, cert, Problem::BadSignature { by }))?;
    }
    let below = |upto: usize| {
        certs[..upto]
            .iter()
            .enumerate()
            .map(|(i, c)| (Position::in_chain(i), c))
    };
    for (index, ca) in certs.iter().enumerate().skip(1) {
        names::check(ca, Position::in_chain(index), below(index))?;
    }
    anchor(certs, bundle, role, at)
}

/// Find the bundle CA that issued the top of the chain and check it as the trust anchor. When
/// none fits, the refusal of a CA that did sign the chain (or, failing that, of a CA of the
/// right name whose signature could not be checked) is more telling than "unknown issuer".
fn anchor(
    certs: &[X509Certificate<'_>],
    bundle: &[&[u8]],
    role: Role,
    at: ASN1Time,
) -> Result<Window, VerifyError> {
    let top_index = certs.len() - 1;
    let top = &certs[top_index];
    let mut refusal: Option<(bool, VerifyError)> = None;
    for der in bundle {
        let Ok(ca) = parse(Position::Anchor, der) else {
            continue;
        };
        if ca.subject().as_raw() != top.issuer().as_raw() {
            continue;
        }
        let signed = top.verify_signature(Some(ca.public_key())).is_ok();
        let checked = profile::check_encoding(&ca, true)
            .and_then(|()| profile::check_issuer(&ca, top_index, role))
            .and_then(|()| profile::check_window(&ca, at))
            .map_err(|problem| VerifyError::refused(Position::Anchor, &ca, problem))
            .and_then(|()| {
                names::check(
                    &ca,
                    Position::Anchor,
                    certs
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (Position::in_chain(i), c)),
                )
            });
        match (signed, checked) {
            (true, Ok(())) => return Ok(Window::of(&ca)),
            (false, Ok(())) => {}
            (signed, Err(e)) => {
                if refusal
                    .as_ref()
                    .is_none_or(|(was_signed, _)| signed && !was_signed)
                {
                    refusal = Some((signed, e));
                }
            }
        }
    }
    Err(refusal.map(|(_, e)| e).unwrap_or_else(|| {
        VerifyError::refused(
            Position::in_chain(top_index),
            top,
            Problem::UnknownIssuer {
                issuer: top.issuer().to_string(),
            },
        )
    }))
}

/// A trust anchor's validity window, in seconds since the epoch.
#[derive(Debug, Clone, Copy)]
struct Window {
    not_before: i64,
    not_after: i64,
}

impl Window {
    fn of(cert: &X509Certificate<'_>) -> Self {
        Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        }
    }

    fn contains(&self, at: ASN1Time) -> bool {
        (self.not_before..=self.not_after).contains(&at.timestamp())
    }
}

/// Paths found good, keyed by a SHA-256 of the role, the chain and the trust bundle, with the
/// validity window of the anchor they were found under. Checking them again proves nothing
/// new (the answer depends only on those bytes, and on the date, which is checked every time),
/// and costs 64–72 µs of ECDSA P-256 on the development VM, on each side of every new tunnel
/// connection; a chain seen before takes a few µs. The dates, the chain's own certificates
/// (profile, encoding, algorithms, keys) and the leaf's SPIFFE ID do not go through here and
/// are checked every time; an anchor past its window sends the path through in full again. A
/// changed bundle makes every key new; a path refused for any reason is never remembered; the
/// map is emptied when it reaches [`Verified::MOST`].
struct Verified(Mutex<HashMap<[u8; 32], Window>>);

static VERIFIED: LazyLock<Verified> = LazyLock::new(|| Verified(Mutex::default()));

#[cfg(test)]
thread_local! {
    /// Paths this thread verified in full (each test counts its own).
    pub(super) static SIGNATURE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Whether a path is remembered as good (for tests of the cache).
#[cfg(test)]
pub(super) fn remembered<C: AsRef<[u8]>, B: AsRef<[u8]>>(
    role: Role,
    chain: &[C],
    bundle: &[B],
) -> bool {
    let (chain, bundle) = as_bytes(chain, bundle);
    VERIFIED
        .anchor_window(&Verified::key(role, &chain, &bundle))
        .is_some()
}

impl Verified {
    const MOST: usize = 4096;

    fn key(role: Role, chain: &[&[u8]], bundle: &[&[u8]]) -> [u8; 32] {
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        digest.update(&[role.tag()]);
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

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Window>> {
        crate::sync::lock(&self.0)
    }

    fn anchor_window(&self, key: &[u8; 32]) -> Option<Window> {
        self.seen().get(key).copied()
    }

    fn insert(&self, key: [u8; 32], window: Window) {
        let mut seen = self.seen();
        if seen.len() >= Self::MOST {
            seen.clear();
        }
        seen.insert(key, window);
    }
}

/// The SPIFFE ID of a peer whose chain the verifiers already accepted.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = parse(Position::Leaf, chain.first()?).ok()?;
    match uri_sans(&leaf).as_slice() {
        [uri] => SpiffeId::parse(uri).ok(),
        _ => None,
    }
}

fn system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    super::provider().signature_verification_algorithms
}

/// The handshake-signature methods both verifiers share: TLS 1.2 refused, TLS 1.3 checked with
/// the provider's algorithms ([`super::provider`]).
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
        let id = verify_svid(
            &chain,
            &self.bundle,
            &self.trust_domain,
            Role::Server,
            system_time(now),
        )
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
        verify_svid(
            &chain,
            &self.bundle,
            &self.trust_domain,
            Role::Client,
            system_time(now),
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(|e| e.to_tls())
    }

    handshake_signatures!();
}
