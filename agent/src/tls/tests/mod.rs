//! Mutual TLS handshakes in memory between rustls client and server configs built by this
//! module, with good and bad SVIDs, and direct checks of each verification error; the table of
//! chain rules is in [`chain`].

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::identity::ca::{DevCa, init};

mod chain;

const TD: &str = "cluster.local";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
const HOUR: Duration = Duration::from_secs(3600);

fn ca(name: &str) -> DevCa {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("latch-tls-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cert, key) = init(&dir).expect("init CA");
    let ca = DevCa::load(&cert, &key).expect("load CA");
    let _ = std::fs::remove_dir_all(&dir);
    ca
}

/// Handshake `client` (expecting `expected`) against `server`; Ok(identity the server saw).
async fn handshake(
    ca_for_server: &DevCa,
    client: &Svid,
    server: &Svid,
    expected: &str,
) -> Result<String, String> {
    let bundle = vec![ca_for_server.certificate().clone()];
    let (client_result, server_result) = handshake_sides(bundle, client, server, expected).await?;
    client_result?;
    server_result
}

/// Handshake `client` (expecting `expected`) against `server`, both trusting `bundle`: what
/// each side saw (the server: the client's identity).
pub(super) async fn handshake_sides(
    bundle: Vec<CertificateDer<'static>>,
    client: &Svid,
    server: &Svid,
    expected: &str,
) -> Result<(Result<(), String>, Result<String, String>), String> {
    let server_cfg = server_config(server, bundle.clone(), TD).map_err(|e| e.to_string())?;
    let client_cfg = client_config(client, bundle, TD, expected).map_err(|e| e.to_string())?;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let connector = tokio_rustls::TlsConnector::from(client_cfg);
    let name = ServerName::try_from("payment.prod").map_err(|e| e.to_string())?;
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor
            .accept(b)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(peer_identity)
            .ok_or("server: no peer identity")?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        Ok::<String, String>(peer.to_string())
    });
    let client_result = async {
        let mut tls = connector
            .connect(name, a)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        tls.flush()
            .await
            .map_err(|e| format!("client flush: {e}"))?;
        Ok::<_, String>(tls)
    }
    .await;
    // Keep the client's end open until the server is done with the handshake.
    let server_result = server_side.await.map_err(|e| e.to_string())?;
    Ok((client_result.map(drop), server_result))
}

#[tokio::test]
async fn mutual_tls_between_valid_svids_names_the_client() {
    let ca = ca("ok");
    let client = ca.mint(FRONTEND, HOUR).expect("client svid");
    let server = ca.mint(PAYMENT, HOUR).expect("server svid");
    assert_eq!(
        handshake(&ca, &client, &server, PAYMENT).await,
        Ok(FRONTEND.to_owned())
    );
}

#[tokio::test]
async fn bad_client_certificates_fail_the_handshake() {
    let ca = ca("bad-client");
    let other_ca = ca_other();
    let server = ca.mint(PAYMENT, HOUR).expect("server");
    let now = SystemTime::now();
    let cases = [
        ("another CA", other_ca.mint(FRONTEND, HOUR).expect("svid")),
        (
            "another trust domain",
            ca.mint("spiffe://evil.example/ns/prod/sa/frontend", HOUR)
                .expect("svid"),
        ),
        (
            "two URI SANs",
            ca.mint_with_sans(&[FRONTEND, PAYMENT], now - HOUR, now + HOUR)
                .expect("svid"),
        ),
        (
            "expired",
            ca.mint_window(FRONTEND, now - 2 * HOUR, now - HOUR)
                .expect("svid"),
        ),
        (
            "not yet valid",
            ca.mint_window(FRONTEND, now + HOUR, now + 2 * HOUR)
                .expect("svid"),
        ),
    ];
    for (what, client) in cases {
        let result = handshake(&ca, &client, &server, PAYMENT).await;
        assert!(
            result.is_err(),
            "{what}: the handshake must fail, got {result:?}"
        );
    }
}

fn ca_other() -> DevCa {
    ca("other")
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let ca = ca("wrong-server");
    let client = ca.mint(FRONTEND, HOUR).expect("client");
    let impostor = ca
        .mint("spiffe://cluster.local/ns/prod/sa/ledger", HOUR)
        .expect("server");
    let result = handshake(&ca, &client, &impostor, PAYMENT).await;
    let err = result.expect_err("must be refused");
    assert!(err.starts_with("client:"), "the client refuses: {err}");
}

/// The rule a refused chain broke, and where.
fn refusal(result: Result<String, VerifyError>) -> (Option<Position>, Option<Problem>) {
    match result {
        Ok(id) => panic!("accepted as {id}"),
        Err(e) => (e.position(), e.problem().cloned()),
    }
}

#[test]
fn each_verification_failure_is_named() {
    let ca = ca("errors");
    let other = ca_other();
    let bundle = vec![ca.certificate().clone()];
    let now = SystemTime::now();
    let check = |svid: &Svid| verify_svid(&svid.chain, &bundle, TD, Role::Client, now);
    let leaf = Some(Position::Leaf);

    assert_eq!(
        check(&ca.mint(FRONTEND, HOUR).expect("svid")),
        Ok(FRONTEND.to_owned())
    );
    assert!(matches!(
        refusal(check(&other.mint(FRONTEND, HOUR).expect("svid"))),
        (Some(Position::Leaf), Some(Problem::UnknownIssuer { .. }))
    ));
    assert_eq!(
        refusal(check(
            &ca.mint("spiffe://other.td/ns/a/sa/b", HOUR).expect("svid")
        )),
        (
            leaf,
            Some(Problem::TrustDomain {
                id: "spiffe://other.td/ns/a/sa/b".into(),
                expected: TD.into()
            })
        )
    );
    assert_eq!(
        refusal(check(
            &ca.mint_with_sans(&[FRONTEND, PAYMENT], now - HOUR, now + HOUR)
                .expect("svid")
        )),
        (leaf, Some(Problem::UriSanCount(2)))
    );
    assert_eq!(
        refusal(check(
            &ca.mint_with_sans(&[], now - HOUR, now + HOUR)
                .expect("svid")
        )),
        (leaf, Some(Problem::UriSanCount(0)))
    );
    assert!(matches!(
        refusal(check(
            &ca.mint_with_sans(&["https://example.com/x"], now - HOUR, now + HOUR)
                .expect("svid")
        )),
        (Some(Position::Leaf), Some(Problem::NotSpiffe { .. }))
    ));
    assert!(matches!(
        refusal(check(
            &ca.mint_window(FRONTEND, now - 2 * HOUR, now - HOUR)
                .expect("svid")
        )),
        (Some(Position::Leaf), Some(Problem::Expired { .. }))
    ));
    assert!(matches!(
        refusal(check(
            &ca.mint_window(FRONTEND, now + HOUR, now + 2 * HOUR)
                .expect("svid")
        )),
        (Some(Position::Leaf), Some(Problem::NotYetValid { .. }))
    ));
    let none: [CertificateDer<'_>; 0] = [];
    assert_eq!(
        verify_svid(&none, &bundle, TD, Role::Client, now),
        Err(VerifyError::Empty)
    );
    // The CA certificate itself is not an SVID.
    assert_eq!(
        refusal(verify_svid(
            &[ca.certificate().clone()],
            &bundle,
            TD,
            Role::Client,
            now
        )),
        (leaf, Some(Problem::LeafIsCa))
    );
}

/// Configurations used twice, as cached ones would be: both handshakes are full, so the
/// verifiers see every certificate (a resumed session would skip them, and with them the checks
/// against the current trust bundle).
#[tokio::test]
async fn sessions_are_never_resumed() {
    let ca = ca("resume");
    let client = ca.mint(FRONTEND, HOUR).expect("client svid");
    let server = ca.mint(PAYMENT, HOUR).expect("server svid");
    let bundle = vec![ca.certificate().clone()];
    let server_cfg = server_config(&server, bundle.clone(), TD).expect("server config");
    let client_cfg = client_config(&client, bundle, TD, PAYMENT).expect("client config");
    for round in 0..2 {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
        let server_side = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.expect("server handshake");
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.expect("server read");
            tls.write_all(b"pong").await.expect("server write");
            tls.flush().await.expect("server flush");
            tls.get_ref().1.handshake_kind()
        });
        let name = ServerName::try_from("payment.prod").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(client_cfg.clone())
            .connect(name, a)
            .await
            .expect("client handshake");
        tls.write_all(b"ping").await.expect("client write");
        tls.flush().await.expect("client flush");
        // Reading the answer also takes in whatever the server sent after its handshake.
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.expect("client read");
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "client, round {round}"
        );
        assert_eq!(
            server_side.await.expect("server task"),
            Some(rustls::HandshakeKind::Full),
            "server, round {round}"
        );
    }
}

#[test]
fn a_chain_is_signature_checked_once_per_bundle_and_its_dates_every_time() {
    let ca = ca("remembered");
    let other = ca_other();
    let svid = ca.mint(FRONTEND, HOUR).expect("svid");
    let bundle = vec![ca.certificate().clone()];
    let checks = || verify::SIGNATURE_CHECKS.with(|n| n.get());
    let now = SystemTime::now();
    let verify = |bundle: &[CertificateDer<'static>], td: &str, at: SystemTime| {
        verify_svid(&svid.chain, bundle, td, Role::Client, at)
    };

    let before = checks();
    assert_eq!(verify(&bundle, TD, now), Ok(FRONTEND.to_owned()));
    assert_eq!(checks(), before + 1, "first sight: signatures checked");
    assert_eq!(verify(&bundle, TD, now), Ok(FRONTEND.to_owned()));
    assert_eq!(
        checks(),
        before + 1,
        "seen with this bundle: not checked again"
    );

    let later = now + 2 * HOUR;
    assert!(
        matches!(
            refusal(verify(&bundle, TD, later)),
            (Some(Position::Leaf), Some(Problem::Expired { .. }))
        ),
        "a remembered chain still expires"
    );
    assert_eq!(
        refusal(verify(&bundle, "other.domain", now)),
        (
            Some(Position::Leaf),
            Some(Problem::TrustDomain {
                id: FRONTEND.to_owned(),
                expected: "other.domain".to_owned()
            })
        ),
        "and is still held to the trust domain"
    );

    let wider = vec![other.certificate().clone(), ca.certificate().clone()];
    assert_eq!(verify(&wider, TD, now), Ok(FRONTEND.to_owned()));
    assert_eq!(checks(), before + 2, "another bundle: checked again");
    let foreign = vec![other.certificate().clone()];
    for _ in 0..2 {
        assert!(
            matches!(
                refusal(verify(&foreign, TD, now)),
                (Some(Position::Leaf), Some(Problem::UnknownIssuer { .. }))
            ),
            "a chain that failed is never remembered"
        );
    }
    assert_eq!(checks(), before + 4);
}

/// The key exchange each side of a handshake ended with, and whether it took a
/// HelloRetryRequest.
async fn key_exchange(
    client_cfg: Arc<ClientConfig>,
    server_cfg: Arc<ServerConfig>,
) -> (
    Option<rustls::NamedGroup>,
    Option<rustls::HandshakeKind>,
    Option<rustls::NamedGroup>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.expect("server handshake");
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.expect("server read");
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name())
    });
    let name = ServerName::try_from("payment.prod").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(client_cfg)
        .connect(name, a)
        .await
        .expect("client handshake");
    tls.write_all(b"ping").await.expect("client write");
    tls.flush().await.expect("client flush");
    let client = tls.get_ref().1;
    let group = client.negotiated_key_exchange_group().map(|g| g.name());
    let kind = client.handshake_kind();
    (group, kind, server_side.await.expect("server task"))
}

/// A peer whose provider offers only the X25519MLKEM768 hybrid, as ztunnel with
/// `COMPLIANCE_POLICY=pqc` does.
fn post_quantum_only() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
        ..crypto_provider()
    })
}

/// Between agents the key exchange is X25519 in one round trip; a peer that offers only the
/// post-quantum hybrid gets it: answered directly when it is the client, after one
/// HelloRetryRequest when the agent is.
#[tokio::test]
async fn agents_agree_on_x25519_and_answer_a_post_quantum_only_peer_with_the_hybrid() {
    use rustls::{HandshakeKind::*, NamedGroup::*};
    let ca = ca("kx");
    let client = ca.mint(FRONTEND, HOUR).expect("client svid");
    let server = ca.mint(PAYMENT, HOUR).expect("server svid");
    let bundle = vec![ca.certificate().clone()];
    let agent_server = server_config(&server, bundle.clone(), TD).expect("server config");
    let agent_client = client_config(&client, bundle.clone(), TD, PAYMENT).expect("client config");
    let pq_client = Arc::new(
        ClientConfig::builder_with_provider(post_quantum_only())
            .with_protocol_versions(&[&TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                bundle.clone(),
                TD,
                PAYMENT,
            )))
            .with_client_cert_resolver(Arc::new(FixedCert(
                certified_key(&client).expect("client key"),
            ))),
    );
    let pq_server = Arc::new(
        ServerConfig::builder_with_provider(post_quantum_only())
            .with_protocol_versions(&[&TLS13])
            .expect("versions")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle, TD)))
            .with_cert_resolver(Arc::new(FixedCert(
                certified_key(&server).expect("server key"),
            ))),
    );
    assert_eq!(
        key_exchange(agent_client.clone(), agent_server.clone()).await,
        (Some(X25519), Some(Full), Some(X25519)),
        "agent to agent"
    );
    assert_eq!(
        key_exchange(pq_client, agent_server).await,
        (Some(X25519MLKEM768), Some(Full), Some(X25519MLKEM768)),
        "a post-quantum-only client to an agent"
    );
    assert_eq!(
        key_exchange(agent_client, pq_server).await,
        (
            Some(X25519MLKEM768),
            Some(FullWithHelloRetryRequest),
            Some(X25519MLKEM768)
        ),
        "an agent to a post-quantum-only server"
    );
}
