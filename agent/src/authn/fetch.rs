//! One JWKS fetch: `GET` over HTTPS (rustls; the server's certificate checked against the
//! system's roots and `jwt.jwksCaFile`), a `200` with a JWKS body of at most [`MAX_BODY`]
//! bytes that holds at least one usable key. The caller bounds the time.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

use super::keys::KeySet;

/// Key sets are small; a larger answer is not one.
pub const MAX_BODY: usize = 1 << 20;

/// Fetch and parse the key set at `uri`; the error says what failed.
pub async fn jwks(uri: &Uri, ca_file: Option<&Path>) -> Result<KeySet, String> {
    let host = uri.host().ok_or("no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let config = client_config(ca_file)?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("server name: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP/1.1 with {host}:{port}: {e}"))?;
    let driver = tokio::spawn(connection);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let request = Request::get(target)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("GET: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("GET: status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|e| format!("body: {e}"))?;
        KeySet::parse(text).map(|(_, keys)| keys)
    }
    .await;
    driver.abort();
    result
}

fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let extra = match ca_file {
        None => Vec::new(),
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("reading jwt.jwksCaFile {}: {e}", path.display()))?,
    };
    let provider = crate::tls::provider();
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| format!("trust roots: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(config)
}
