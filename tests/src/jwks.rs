//! An issuer for the JWT tests: ES256 signing keys, tokens signed with them, and a JWKS server
//! over HTTPS (its own CA, a certificate for its address) running inside a network namespace,
//! whose document the test replaces (a key rotation) or takes away (`503`: an outage).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};

/// An ES256 key pair with its `kid`.
pub struct SigningKey {
    key: EncodingKey,
    pub jwk: Jwk,
    pub kid: String,
}

impl SigningKey {
    pub fn generate(kid: &str) -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
        jwk.common.key_id = Some(kid.to_owned());
        Ok(Self {
            key,
            jwk,
            kid: kid.to_owned(),
        })
    }

    /// A token with `claims`, signed with this key.
    pub fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

/// The JWKS document of `keys`.
pub fn document(keys: &[&SigningKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| &k.jwk).collect::<Vec<_>>() }).to_string()
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX)
}

/// The JWKS server; stops when dropped.
pub struct JwksServer {
    pub uri: String,
    /// The CA that signed the server's certificate (PEM), for `jwt.jwksCaFile`.
    pub ca_file: PathBuf,
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl JwksServer {
    /// Serve `document` at `https://addr/jwks.json` from inside `netns`; the CA goes to `dir`.
    pub fn start(
        netns: &Path,
        addr: SocketAddr,
        dir: &Path,
        document: String,
    ) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec![addr.ip().to_string()])?.signed_by(&leaf_key, &issuer)?;
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
        let ca_file = dir.join("jwks-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).context("writing the JWKS CA")?;
        let listener = crate::netns::in_netns(netns, move || {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .with_context(|| format!("JWKS server on {addr}"))?;
        let document = Arc::new(Mutex::new(Some(document)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (doc, count) = (document.clone(), fetches.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let serve = async {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, doc, count) = (acceptor.clone(), doc.clone(), count.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(move |_req| {
                                count.fetch_add(1, Ordering::SeqCst);
                                let current = doc.lock().unwrap_or_else(|p| p.into_inner()).clone();
                                async move {
                                    let mut r = hyper::Response::new(http_body_util::Full::new(
                                        bytes::Bytes::from(current.clone().unwrap_or_default()),
                                    ));
                                    if current.is_none() {
                                        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                    }
                                    Ok::<_, std::convert::Infallible>(r)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self {
            uri: format!("https://{addr}/jwks.json"),
            ca_file,
            document,
            fetches,
            stop: Some(stop),
        })
    }

    /// Serve `document` from now on; `None`: answer `503`.
    pub fn set_document(&self, document: Option<String>) {
        *self.document.lock().unwrap_or_else(|p| p.into_inner()) = document;
    }

    /// Requests served so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
