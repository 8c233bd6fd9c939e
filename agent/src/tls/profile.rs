//! The X.509-SVID profile, certificate by certificate (SPIFFE X509-SVID §4 and §5, RFC 5280
//! §4.2): what the leaf, each issuer and the trust anchor of a path must be. Rules between two
//! certificates (signatures, name constraints) are in [`super::verify`] and [`super::names`].

use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    objects::{oid_registry, oid2sn},
    oid_registry::{
        OID_NIST_HASH_SHA256, OID_NIST_HASH_SHA384, OID_NIST_HASH_SHA512, OID_PKCS1_RSASSAPSS,
        OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
        OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_NAME_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME, Oid,
    },
    public_key::PublicKey,
    signature_algorithm::RsaSsaPssParams,
    time::ASN1Time,
    x509::AlgorithmIdentifier,
};

use super::error::Problem;

/// What the leaf authenticates, for the extended key usage of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A TLS client (what a tunnel server verifies).
    Client,
    /// A TLS server (what a tunnel client verifies).
    Server,
    /// Both: an agent's own SVIDs, which it presents on both sides.
    ClientAndServer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::ClientAndServer => "client and server",
        }
    }

    /// A byte for the cache key of verified paths.
    pub(super) fn tag(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Server => 2,
            Role::ClientAndServer => 3,
        }
    }
}

/// The extensions the verifier reads and enforces, by OID, with their names. A critical
/// extension not listed is refused (RFC 5280 §4.2); `nameConstraints` only on CAs.
fn understood(oid: &Oid<'_>, ca: bool) -> Option<&'static str> {
    if *oid == OID_X509_EXT_BASIC_CONSTRAINTS {
        Some("basicConstraints")
    } else if *oid == OID_X509_EXT_KEY_USAGE {
        Some("keyUsage")
    } else if *oid == OID_X509_EXT_EXTENDED_KEY_USAGE {
        Some("extendedKeyUsage")
    } else if *oid == OID_X509_EXT_SUBJECT_ALT_NAME {
        Some("subjectAltName")
    } else if *oid == OID_X509_EXT_NAME_CONSTRAINTS && ca {
        Some("nameConstraints")
    } else {
        None
    }
}

/// An OID as shown in errors: its short name when it has one, and the dotted form.
pub(super) fn describe(oid: &Oid<'_>) -> String {
    match oid2sn(oid, oid_registry()) {
        Ok(name) => format!("{name} ({})", oid.to_id_string()),
        Err(_) => oid.to_id_string(),
    }
}

/// Checks every certificate gets, whatever its place: well-formed extensions, no critical
/// extension the verifier does not enforce, a signature algorithm it accepts, and no RSA key
/// under 2048 bits. `ca` is whether it is used as a CA (an issuer or the anchor).
pub(super) fn check_encoding(cert: &X509Certificate<'_>, ca: bool) -> Result<(), Problem> {
    check_extensions(cert, ca)?;
    check_signature_algorithm(cert)?;
    check_public_key(cert)
}

fn check_extensions(cert: &X509Certificate<'_>, ca: bool) -> Result<(), Problem> {
    let mut oids: Vec<&[u8]> = cert.extensions().iter().map(|e| e.oid.as_bytes()).collect();
    oids.sort_unstable();
    if let Some(twice) = oids.windows(2).find(|w| w[0] == w[1]) {
        return Err(Problem::DuplicateExtension {
            oid: describe(&Oid::new(twice[0].into())),
        });
    }
    for ext in cert.extensions() {
        let Some(name) = understood(&ext.oid, ca) else {
            if ext.critical {
                let why = if ext.oid == OID_X509_EXT_NAME_CONSTRAINTS {
                    " on a certificate that is not a CA"
                } else {
                    ""
                };
                return Err(Problem::UnknownCriticalExtension {
                    oid: describe(&ext.oid),
                    why,
                });
            }
            continue;
        };
        let malformed = |reason: String| Problem::MalformedExtension { name, reason };
        match ext.parsed_extension() {
            ParsedExtension::ParseError { error } => return Err(malformed(error.to_string())),
            ParsedExtension::UnsupportedExtension { .. } => {
                return Err(malformed("not decoded".into()));
            }
            ParsedExtension::SubjectAlternativeName(san) if !all_decode(&san.general_names) => {
                return Err(malformed("a name does not decode".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether every name of a list decoded (x509-parser keeps one that does not as `Invalid`).
pub(super) fn all_decode(names: &[GeneralName<'_>]) -> bool {
    !names.iter().any(|n| matches!(n, GeneralName::Invalid(..)))
}

/// Signature algorithms refused by name: SHA-1, MD5 and older digests.
const WEAK_SIGNATURES: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.2", "md2WithRSAEncryption"),
    ("1.2.840.113549.1.1.3", "md4WithRSAEncryption"),
    ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
    ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
    ("1.3.14.3.2.25", "md5WithRSASignature"),
    ("1.3.14.3.2.29", "sha1WithRSAEncryption (OIW)"),
    ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
    ("1.2.840.10040.4.3", "dsa-with-sha1"),
    ("1.3.14.3.2.27", "dsaWithSHA1 (OIW)"),
];

/// The certificate's signature algorithm: the same in the signed part and outside it (RFC 5280
/// §4.1.1.2), and one of ECDSA with SHA-256/384, RSA PKCS#1 v1.5 or PSS with SHA-256/384/512,
/// or Ed25519; SHA-1 and MD5 are named as such.
fn check_signature_algorithm(cert: &X509Certificate<'_>) -> Result<(), Problem> {
    let outer = &cert.signature_algorithm;
    let signed = &cert.tbs_certificate.signature;
    if signed != outer {
        return Err(Problem::SignatureAlgorithmMismatch {
            signed: describe(&signed.algorithm),
            outer: describe(&outer.algorithm),
        });
    }
    let oid = &outer.algorithm;
    if [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ED25519,
    ]
    .contains(oid)
    {
        return Ok(());
    }
    if *oid == OID_PKCS1_RSASSAPSS {
        return check_pss(outer);
    }
    let dotted = oid.to_id_string();
    match WEAK_SIGNATURES.iter().find(|(id, _)| *id == dotted) {
        Some((_, name)) => Err(Problem::WeakSignatureAlgorithm {
            algorithm: (*name).to_owned(),
        }),
        None => Err(Problem::UnsupportedSignatureAlgorithm { oid: describe(oid) }),
    }
}

/// RSASSA-PSS: the hash comes from the parameters, SHA-1 when they are absent (RFC 4055).
fn check_pss(alg: &AlgorithmIdentifier<'_>) -> Result<(), Problem> {
    let weak = |hash: &str| Problem::WeakSignatureAlgorithm {
        algorithm: format!("RSASSA-PSS with {hash}"),
    };
    let Some(params) = alg.parameters.as_ref() else {
        return Err(weak("SHA-1"));
    };
    let params =
        RsaSsaPssParams::try_from(params).map_err(|_| Problem::UnsupportedSignatureAlgorithm {
            oid: "RSASSA-PSS with parameters that do not decode".into(),
        })?;
    let hash = params.hash_algorithm_oid();
    if [
        OID_NIST_HASH_SHA256,
        OID_NIST_HASH_SHA384,
        OID_NIST_HASH_SHA512,
    ]
    .contains(hash)
    {
        return Ok(());
    }
    match hash.to_id_string().as_str() {
        "1.3.14.3.2.26" => Err(weak("SHA-1")),
        "1.2.840.113549.2.5" => Err(weak("MD5")),
        _ => Err(Problem::UnsupportedSignatureAlgorithm {
            oid: format!("RSASSA-PSS with the hash {}", describe(hash)),
        }),
    }
}

/// RSA keys of fewer than 2048 bits are refused.
fn check_public_key(cert: &X509Certificate<'_>) -> Result<(), Problem> {
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let bits = significant_bits(rsa.modulus);
            if bits < 2048 {
                return Err(Problem::WeakRsaKey { bits });
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(Problem::BadPublicKey {
            reason: e.to_string(),
        }),
    }
}

/// The length in bits of a big-endian unsigned integer (leading zeros not counted).
fn significant_bits(bytes: &[u8]) -> usize {
    let Some(first) = bytes.iter().position(|b| *b != 0) else {
        return 0;
    };
    let rest = bytes.len() - first;
    rest * 8 - bytes[first].leading_zeros() as usize
}

/// Within its validity window at `at`.
pub(super) fn check_window(cert: &X509Certificate<'_>, at: ASN1Time) -> Result<(), Problem> {
    let validity = cert.validity();
    if at < validity.not_before {
        return Err(Problem::NotYetValid {
            not_before: validity.not_before.to_string(),
        });
    }
    if at > validity.not_after {
        return Err(Problem::Expired {
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(())
}

/// The leaf: not a CA; its keyUsage, when present, has digitalSignature and neither keyCertSign
/// nor cRLSign (SPIFFE X509-SVID §4.3 and §5.2); its extendedKeyUsage fits `role`.
pub(super) fn check_leaf(cert: &X509Certificate<'_>, role: Role) -> Result<(), Problem> {
    if is_ca(cert)? {
        return Err(Problem::LeafIsCa);
    }
    if let Some(ku) = key_usage(cert)? {
        if !ku.digital_signature() {
            return Err(Problem::LeafWithoutDigitalSignature);
        }
        if ku.key_cert_sign() {
            return Err(Problem::LeafMaySign {
                usage: "keyCertSign",
            });
        }
        if ku.crl_sign() {
            return Err(Problem::LeafMaySign { usage: "cRLSign" });
        }
    }
    check_eku(cert, role)
}

/// An issuer (an intermediate, or the trust anchor) with `below` intermediate CAs under it in
/// the path: a CA whose pathLenConstraint, if any, allows them; keyUsage, when present, with
/// keyCertSign; extendedKeyUsage, when present, fitting `role` (as rustls-webpki checks it on
/// every certificate of a path).
pub(super) fn check_issuer(
    cert: &X509Certificate<'_>,
    below: usize,
    role: Role,
) -> Result<(), Problem> {
    let Ok(Some(bc)) = cert.basic_constraints() else {
        return Err(Problem::NotCa);
    };
    if !bc.value.ca {
        return Err(Problem::NotCa);
    }
    if let Some(allowed) = bc.value.path_len_constraint
        && below > allowed as usize
    {
        return Err(Problem::PathLen { allowed, below });
    }
    if let Some(ku) = key_usage(cert)?
        && !ku.key_cert_sign()
    {
        return Err(Problem::NoKeyCertSign);
    }
    check_eku(cert, role)
}

fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, Problem> {
    match cert.basic_constraints() {
        Ok(bc) => Ok(bc.is_some_and(|bc| bc.value.ca)),
        Err(e) => Err(Problem::MalformedExtension {
            name: "basicConstraints",
            reason: e.to_string(),
        }),
    }
}

fn key_usage<'c>(
    cert: &'c X509Certificate<'_>,
) -> Result<Option<&'c x509_parser::extensions::KeyUsage>, Problem> {
    cert.key_usage()
        .map(|ku| ku.map(|ku| ku.value))
        .map_err(|e| Problem::MalformedExtension {
            name: "keyUsage",
            reason: e.to_string(),
        })
}

/// extendedKeyUsage, when present, must name the role's purposes: clientAuth for a client,
/// serverAuth for a server, both for both. anyExtendedKeyUsage does not stand in for them
/// (rustls-webpki does not accept it either), and an empty list allows nothing.
fn check_eku(cert: &X509Certificate<'_>, role: Role) -> Result<(), Problem> {
    let eku = match cert.extended_key_usage() {
        Ok(Some(eku)) => eku.value,
        Ok(None) => return Ok(()),
        Err(e) => {
            return Err(Problem::MalformedExtension {
                name: "extendedKeyUsage",
                reason: e.to_string(),
            });
        }
    };
    let needs: &[(&'static str, bool)] = match role {
        Role::Client => &[("clientAuth", eku.client_auth)],
        Role::Server => &[("serverAuth", eku.server_auth)],
        Role::ClientAndServer => &[
            ("clientAuth", eku.client_auth),
            ("serverAuth", eku.server_auth),
        ],
    };
    let Some((needed, _)) = needs.iter().find(|(_, present)| !present) else {
        return Ok(());
    };
    let mut present: Vec<String> = [
        (eku.any, "anyExtendedKeyUsage"),
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| (*name).to_owned())
    .collect();
    present.extend(eku.other.iter().map(Oid::to_id_string));
    Err(Problem::MissingExtendedKeyUsage {
        needed,
        role: role.name(),
        present: if present.is_empty() {
            "nothing".into()
        } else {
            present.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::significant_bits;

    #[test]
    fn key_lengths_count_significant_bits() {
        assert_eq!(significant_bits(&[]), 0);
        assert_eq!(significant_bits(&[0, 0]), 0);
        assert_eq!(significant_bits(&[0x01]), 1);
        assert_eq!(significant_bits(&[0x00, 0x80, 0x00]), 16);
        let mut modulus = vec![0x00, 0xc1];
        modulus.extend([0u8; 255]);
        assert_eq!(significant_bits(&modulus), 2048);
        let mut short = vec![0x00, 0x7f];
        short.extend([0u8; 255]);
        assert_eq!(significant_bits(&short), 2047);
    }
}
