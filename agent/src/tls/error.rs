//! What a refused certificate chain is told: which certificate (the leaf, intermediate N or the
//! trust anchor, with its subject) and which rule it broke.

use std::fmt;

use x509_parser::certificate::X509Certificate;

/// The longest chain accepted (leaf + intermediates).
pub const MAX_CHAIN: usize = 4;

/// Subjects longer than this are cut in error messages (a peer chooses them).
const SUBJECT_SHOWN: usize = 200;

/// Where a certificate sits in the path being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The peer's own certificate (first of the chain).
    Leaf,
    /// The Nth certificate above the leaf in the chain the peer sent (1 is the leaf's issuer).
    Intermediate(usize),
    /// The certificate of the trust bundle that issued the top of the chain.
    Anchor,
}

impl Position {
    /// The position of the certificate at `index` of a chain (leaf first).
    pub fn in_chain(index: usize) -> Self {
        match index {
            0 => Position::Leaf,
            n => Position::Intermediate(n),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Leaf => f.write_str("leaf"),
            Position::Intermediate(n) => write!(f, "intermediate {n}"),
            Position::Anchor => f.write_str("trust anchor"),
        }
    }
}

/// A certificate named in an error: its position and its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRef {
    pub position: Position,
    pub subject: String,
}

impl CertRef {
    pub fn new(position: Position, cert: &X509Certificate<'_>) -> Self {
        let mut subject = cert.subject().to_string();
        if let Some((cut, _)) = subject.char_indices().nth(SUBJECT_SHOWN) {
            subject.truncate(cut);
            subject.push('…');
        }
        Self { position, subject }
    }
}

impl fmt::Display for CertRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.position, self.subject)
    }
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("not valid before {not_before}")]
    NotYetValid { not_before: String },
    #[error("expired at {not_after}")]
    Expired { not_after: String },
    #[error("the extension {oid} appears more than once")]
    DuplicateExtension { oid: String },
    #[error("its {name} extension does not decode: {reason}")]
    MalformedExtension { name: &'static str, reason: String },
    #[error("it has the critical extension {oid}, which this verifier does not enforce{why}")]
    UnknownCriticalExtension { oid: String, why: &'static str },
    #[error(
        "its signature algorithm in the signed part ({signed}) is not the one of the signature ({outer})"
    )]
    SignatureAlgorithmMismatch { signed: String, outer: String },
    #[error("it is signed with {algorithm}; SHA-1 and MD5 signatures are refused")]
    WeakSignatureAlgorithm { algorithm: String },
    #[error(
        "it is signed with the algorithm {oid}, which is not accepted (ECDSA with SHA-256/384, RSA PKCS#1 or PSS with SHA-256/384/512, Ed25519)"
    )]
    UnsupportedSignatureAlgorithm { oid: String },
    #[error("its public key does not decode: {reason}")]
    BadPublicKey { reason: String },
    #[error("its RSA key has {bits} bits; at least 2048 are required")]
    WeakRsaKey { bits: usize },
    #[error("it is a CA certificate (basicConstraints CA=true), which a leaf must not be")]
    LeafIsCa,
    #[error("its keyUsage lacks digitalSignature, which a leaf must have")]
    LeafWithoutDigitalSignature,
    #[error("its keyUsage has {usage}, which a leaf must not have")]
    LeafMaySign { usage: &'static str },
    #[error(
        "its extendedKeyUsage lacks {needed}, which a {role} certificate needs (it has: {present})"
    )]
    MissingExtendedKeyUsage {
        needed: &'static str,
        role: &'static str,
        present: String,
    },
    #[error("it is not a CA certificate (basicConstraints CA=true), which an issuer must be")]
    NotCa,
    #[error(
        "its pathLenConstraint allows {allowed} intermediate CA(s) below it, the chain has {below}"
    )]
    PathLen { allowed: u32, below: usize },
    #[error("its keyUsage lacks keyCertSign, which an issuer must have")]
    NoKeyCertSign,
    #[error("its issuer {issuer:?} is not the subject of {by}")]
    IssuerMismatch { issuer: String, by: Position },
    #[error("its signature does not verify with the key of {by}")]
    BadSignature { by: Position },
    #[error("no CA of the trust bundle issued it (its issuer is {issuer:?})")]
    UnknownIssuer { issuer: String },
    #[error("its {form} name constraint is of a form this verifier does not enforce")]
    UnsupportedNameConstraint { form: &'static str },
    #[error("its name {name} is outside what the name constraints of {by} permit")]
    NameNotPermitted { name: String, by: Position },
    #[error("its name {name} is excluded by the name constraints of {by}")]
    NameExcluded { name: String, by: Position },
    #[error("it must carry exactly one URI SAN, it has {0}")]
    UriSanCount(usize),
    #[error("its URI SAN is not a SPIFFE ID: {reason}")]
    NotSpiffe { reason: String },
    #[error("its SPIFFE ID {0} has no path, which a workload's must have")]
    SpiffeIdWithoutPath(String),
    #[error("its SPIFFE ID {id} is outside the trust domain {expected}")]
    TrustDomain { id: String, expected: String },
}

/// A refused chain. Its `Debug` is its message: rustls shows a verifier's own error with
/// `{:?}` in the handshake error, which is what the logs get.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate presented")]
    Empty,
    #[error("the certificate chain has {0} certificates, at most {MAX_CHAIN} are accepted")]
    TooLong(usize),
    #[error("the {position} certificate does not parse: {reason}")]
    Parse { position: Position, reason: String },
    #[error("{cert} is refused: {problem}")]
    Refused { cert: CertRef, problem: Problem },
    #[error("the peer is {found}, expected {expected}")]
    WrongIdentity { found: String, expected: String },
}

impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl VerifyError {
    pub(super) fn refused(
        position: Position,
        cert: &X509Certificate<'_>,
        problem: Problem,
    ) -> Self {
        VerifyError::Refused {
            cert: CertRef::new(position, cert),
            problem,
        }
    }

    /// The rule broken, if a certificate was refused.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            VerifyError::Refused { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// Where the refused certificate sits, if one was.
    pub fn position(&self) -> Option<Position> {
        match self {
            VerifyError::Refused { cert, .. } => Some(cert.position),
            VerifyError::Parse { position, .. } => Some(*position),
            _ => None,
        }
    }
}
