//! The development CA: `latch ca init DIR` creates one, and the `dev-ca` certificate source uses
//! it to mint short-lived X.509-SVIDs (ECDSA P-256, exactly one `spiffe://` URI SAN).
//! Private keys are written with mode 0600 and never appear in `Debug` output or errors.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File names inside the directory given to `latch ca init`.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long a development CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from a little before they are minted, for clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite a CA", .0.display())]
    Exists(PathBuf),
    #[error("{what}: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CaError {
    let what = what.into();
    move |source| CaError::Certificate { what, source }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_owned();
    move |source| CaError::Io { what, path, source }
}

/// Create a development CA in `dir`: `ca.pem` (certificate) and `ca-key.pem` (private key, mode
/// 0600). Refuses to overwrite an existing CA. Returns both paths.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(cert_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Latch");
    dn.push(DnType::CommonName, "Latch development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    let cert = params
        .self_signed(&key)
        .map_err(cert_err("signing the CA certificate"))?;

    write_private(&key_path, key.serialize_pem().as_bytes())?;
    fs::write(&cert_path, cert.pem()).map_err(io_err("writing", &cert_path))?;
    Ok((cert_path, key_path))
}

/// Write a file readable by its owner only (created with mode 0600, never widened).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.write_all(contents).map_err(io_err("writing", path))
}

/// A loaded development CA that can mint SVIDs.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_len", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// An X.509-SVID: the leaf certificate (and chain), its private key, and its validity.
pub struct Svid {
    pub spiffe_id: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this agent minted or loaded it (rotation is measured from here: `not_before` is
    /// backdated for clock skew).
    pub issued_at: SystemTime,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            spiffe_id: self.spiffe_id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            serial: self.serial.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            issued_at: self.issued_at,
        }
    }
}

impl Svid {
    /// The certificate chain as PEM (leaf first).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect()
    }

    /// The private key as PKCS#8 PEM. For writing a key file (mode 0600, see
    /// [`write_private`]); never for logs.
    pub fn key_pem(&self) -> String {
        pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key.secret_der().to_vec(),
        ))
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl DevCa {
    /// Load the CA certificate and key (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err("reading", cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err("reading", key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err(format!(
            "parsing the CA key {}",
            key_path.display()
        )))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err(format!(
            "parsing the CA certificate {}",
            cert_path.display()
        )))?;
        let cert = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e| CaError::Io {
                what: "parsing PEM",
                path: cert_path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            },
        )?;
        Ok(Self { issuer, cert })
    }

    /// The CA certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.cert.to_vec()))
    }

    /// The CA certificate: the trust bundle of a dev-ca mesh.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Mint an SVID for `spiffe_id` valid for `ttl` from now (backdated a minute for skew).
    pub fn mint(&self, spiffe_id: &str, ttl: Duration) -> Result<Svid, CaError> {
        let now = SystemTime::now();
        self.mint_window(spiffe_id, now - BACKDATE, now + ttl)
    }

    /// Mint an SVID with an explicit validity window (tests use past and future windows).
    pub fn mint_window(
        &self,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Svid, CaError> {
        self.mint_with_sans(&[spiffe_id], not_before, not_after)
    }

    /// Mint a certificate with arbitrary URI SANs (tests build invalid SVIDs with it: none, two,
    /// another trust domain).
    pub fn mint_with_sans(
        &self,
        uris: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Svid, CaError> {
        let spiffe_id = uris.first().copied().unwrap_or_default();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generating an SVID key"))?;
        let mut params = CertificateParams::default();
        for uri in uris {
            let ia5 = (*uri)
                .try_into()
                .map_err(cert_err(format!("{uri:?} as a URI SAN")))?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Latch");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        // rcgen derives the serial from the (fresh, random) public key.
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err(format!("signing the SVID of {spiffe_id}")))?;
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, c)| c.raw_serial_as_string())
            .unwrap_or_default();
        Ok(Svid {
            spiffe_id: spiffe_id.to_owned(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            serial,
            not_before,
            not_after,
            issued_at: SystemTime::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("latch-ca-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_writes_a_ca_with_a_private_key_file() {
        let dir = tempdir("init");
        let (cert, key) = init(&dir).expect("init");
        assert_eq!(
            fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600
        );
        assert!(
            fs::read_to_string(&cert)
                .expect("cert")
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let err = init(&dir).expect_err("second init must not overwrite");
        assert!(err.to_string().contains("already exists"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn minted_svids_carry_one_spiffe_uri_and_the_window() {
        let dir = tempdir("mint");
        let (cert, key) = init(&dir).expect("init");
        let ca = DevCa::load(&cert, &key).expect("load");
        let svid = ca
            .mint(
                "spiffe://cluster.local/ns/prod/sa/frontend",
                Duration::from_secs(3600),
            )
            .expect("mint");
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).expect("parse");
        let uris: Vec<String> = leaf
            .subject_alternative_name()
            .expect("san ext")
            .expect("san present")
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            uris,
            vec!["spiffe://cluster.local/ns/prod/sa/frontend".to_owned()]
        );
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate()).expect("ca");
        leaf.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        assert!(!svid.serial.is_empty());
        let debug = format!("{svid:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
