//! Where SVIDs come from: the [`SvidSource`] trait the certificate store asks, and the two
//! sources a `certificates` section configures ([`Source`]): `dev-ca` mints from a CA key the
//! agent holds, `files` reads what another process (cert-manager's csi-driver-spiffe, a SPIRE
//! helper) writes. Room for more: a source that must ask someone else (istiod's CSR API, SPIRE's
//! Delegated Identity API) implements the same two calls; `docs/kubernetes.md` (*Certificates*)
//! weighs them.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::svid::{CertError, Current, certified, mtime, ns_sa, rotation_due};
use crate::{
    identity::ca::{DevCa, Svid},
    tls::{Role, verify_svid},
};

/// What the certificate store needs of a source of SVIDs. Blocking calls, made by the
/// runtime's reconcile (a new identity) and its rotation tick (what is due).
pub trait SvidSource: Send + Sync {
    /// A fresh SVID for `id` (a SPIFFE ID of `trust_domain`), with the bundle to trust. Its
    /// `trust` is set by the store.
    fn issue(&self, id: &str, trust_domain: &str) -> Result<Current, CertError>;

    /// Whether `id`'s SVID in force (`current`) is to be replaced now.
    fn due(&self, id: &str, current: &Current, now: SystemTime) -> bool;
}

/// The sources a `certificates` section configures.
pub enum Source {
    /// Mint with the development CA: SVIDs of `ttl`, rotated at half their life.
    DevCa { ca: Box<DevCa>, ttl: Duration },
    /// Read `<dir>/<namespace>/<serviceAccount>/{cert,key,bundle}.pem`, again when they change.
    Files { dir: PathBuf },
}

impl SvidSource for Source {
    fn issue(&self, id: &str, trust_domain: &str) -> Result<Current, CertError> {
        match self {
            Source::DevCa { ca, ttl } => {
                let svid = ca.mint(id, *ttl)?;
                Ok(Current {
                    certified: certified(&svid)?,
                    svid: Arc::new(svid),
                    bundle: Arc::new(vec![ca.certificate().clone()]),
                    trust: 0,
                    stamps: Vec::new(),
                })
            }
            Source::Files { dir } => load_files(dir, id, trust_domain),
        }
    }

    fn due(&self, id: &str, current: &Current, now: SystemTime) -> bool {
        match self {
            Source::DevCa { .. } => rotation_due(&current.svid, now),
            Source::Files { dir } => file_paths(dir, id).is_some_and(|paths| {
                paths.iter().map(|p| mtime(p)).collect::<Vec<_>>() != current.stamps
            }),
        }
    }
}

fn file_paths(dir: &Path, id: &str) -> Option<[PathBuf; 3]> {
    let (ns, sa) = ns_sa(id)?;
    let base = dir.join(&ns).join(&sa);
    Some([
        base.join("cert.pem"),
        base.join("key.pem"),
        base.join("bundle.pem"),
    ])
}

fn load_files(dir: &Path, id: &str, trust_domain: &str) -> Result<Current, CertError> {
    let paths = file_paths(dir, id).ok_or_else(|| CertError::Invalid {
        path: dir.to_owned(),
        why: format!("{id} is not of the form spiffe://<td>/ns/<namespace>/sa/<serviceAccount>"),
    })?;
    let stamps: Vec<Option<SystemTime>> = paths.iter().map(|p| mtime(p)).collect();
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| CertError::Read {
            path: p.clone(),
            source,
        })
    };
    let (cert_pem, key_pem, bundle_pem) = (read(&paths[0])?, read(&paths[1])?, read(&paths[2])?);
    let certs = |pem: &[u8], path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, CertError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Invalid {
                path: path.clone(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(CertError::Invalid {
                path: path.clone(),
                why: "no certificate in the file".into(),
            });
        }
        Ok(certs)
    };
    let chain = certs(&cert_pem, &paths[0])?;
    let bundle = certs(&bundle_pem, &paths[2])?;
    // Never put key material into an error message: only say what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::Invalid {
        path: paths[1].clone(),
        why: "no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected)".into(),
    })?;
    // The agent presents a workload's SVID on both sides of its tunnels.
    let found = verify_svid(
        &chain,
        &bundle,
        trust_domain,
        Role::ClientAndServer,
        SystemTime::now(),
    )
    .map_err(|e| CertError::Invalid {
        path: paths[0].clone(),
        why: e.to_string(),
    })?;
    if found != id {
        return Err(CertError::Invalid {
            path: paths[0].clone(),
            why: format!("the certificate is for {found}, expected {id}"),
        });
    }
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| CertError::Invalid {
            path: paths[0].clone(),
            why: e.to_string(),
        })?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let svid = Svid {
        spiffe_id: id.to_owned(),
        serial: leaf.raw_serial_as_string(),
        not_before: to_time(leaf.validity().not_before),
        not_after: to_time(leaf.validity().not_after),
        issued_at: SystemTime::now(),
        chain,
        key,
    };
    let certified = certified(&svid)?;
    // A key that is not the certificate's would fail every handshake: refuse it here.
    certified.keys_match().map_err(|e| CertError::Invalid {
        path: paths[1].clone(),
        why: format!(
            "the private key does not belong to the certificate in {} ({e})",
            paths[0].display()
        ),
    })?;
    Ok(Current {
        certified,
        svid: Arc::new(svid),
        bundle: Arc::new(bundle),
        trust: 0,
        stamps,
    })
}
