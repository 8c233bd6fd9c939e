//! Request authentication with real keys (ECDSA P-256 and Ed25519 generated per test), real
//! signatures, and a real HTTPS JWKS server on loopback with its own CA.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{header::HeaderName, http::request::Parts};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

use super::{Authenticator, verify::VerifyError};
use crate::{
    config::Jwt as Settings,
    policy::{JwtRule, KeySource, TokenLocation},
};
use keys::KeySet;

use super::keys;

const ISSUER: &str = "https://issuer.example";

static METRICS: std::sync::LazyLock<crate::metrics::Metrics> =
    std::sync::LazyLock::new(crate::metrics::Metrics::new);

/// A signing key and its public JWK.
struct Signer {
    key: EncodingKey,
    jwk: Jwk,
    alg: Algorithm,
    kid: String,
}

fn signer(kid: &str, alg: Algorithm) -> Signer {
    if alg == Algorithm::RS256 {
        return rsa_signer(kid);
    }
    let (rcgen_alg, der_key) = match alg {
        Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, true),
        Algorithm::EdDSA => (&rcgen::PKCS_ED25519, false),
        other => panic!("no test key for {other:?}"),
    };
    let pair = rcgen::KeyPair::generate_for(rcgen_alg).expect("key");
    let der = pair.serialize_der();
    let key = if der_key {
        EncodingKey::from_ec_der(&der)
    } else {
        EncodingKey::from_ed_der(&der)
    };
    let mut jwk = if der_key {
        Jwk::from_encoding_key(&key, alg).expect("jwk")
    } else {
        use base64::Engine as _;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        serde_json::from_value(json!({"kty": "OKP", "crv": "Ed25519", "x": x})).expect("jwk")
    };
    jwk.common.key_id = Some(kid.to_owned());
    Signer {
        key,
        jwk,
        alg,
        kid: kid.to_owned(),
    }
}

/// One RSA key per test run (generating one takes a while in a debug build).
fn rsa_signer(kid: &str) -> Signer {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    static DER: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key");
        key.to_pkcs1_der().expect("PKCS#1").as_bytes().to_vec()
    });
    let key = EncodingKey::from_rsa_der(&DER);
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    Signer {
        key,
        jwk,
        alg: Algorithm::RS256,
        kid: kid.to_owned(),
    }
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).expect("time")
}

fn sign(s: &Signer, claims: &Value) -> String {
    let mut header = Header::new(s.alg);
    header.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&header, claims, &s.key).expect("sign")
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "sub": "alice", "exp": now() + 600, "iat": now()});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn jwks_text(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| &s.jwk).collect::<Vec<_>>()}).to_string()
}

fn inline(signers: &[&Signer]) -> KeySource {
    let (_, keys) = KeySet::parse(&jwks_text(signers)).expect("jwks");
    KeySource::Inline(Arc::new(keys))
}

fn rule(keys: KeySource) -> JwtRule {
    JwtRule {
        policy: "prod/jwt".into(),
        issuer: ISSUER.into(),
        audiences: Vec::new(),
        keys,
        locations: TokenLocation::defaults(),
        forward_original_token: false,
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        fetch_timeout: None,
    }
}

fn parts(target: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = hyper::Request::post(target).header("host", "payment");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn run(
    rule: JwtRule,
    parts: &mut Parts,
) -> Result<Option<crate::policy::RequestAuth>, VerifyError> {
    Authenticator::default()
        .authenticate(
            &[Arc::new(rule)],
            &Settings::default(),
            &crate::metrics::Metrics::new(),
            parts,
        )
        .await
        .map_err(|r| r.reason)
}

#[tokio::test]
async fn a_valid_token_is_the_request_principal_and_is_not_forwarded() {
    for alg in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
        let s = signer("k1", alg);
        let token = sign(
            &s,
            &claims(json!({"scope": ["payments:write"], "azp": "web"})),
        );
        let mut p = parts("/v1/pay", &[("authorization", &bearer(&token))]);
        let auth = run(rule(inline(&[&s])), &mut p)
            .await
            .expect("verified")
            .expect("a principal");
        assert_eq!(auth.principal, format!("{ISSUER}/alice"));
        assert_eq!(auth.presenter.as_deref(), Some("web"));
        assert_eq!(auth.claims["scope"], json!(["payments:write"]));
        assert!(p.headers.get("authorization").is_none(), "token removed");
    }
}

#[tokio::test]
async fn no_token_passes_without_a_principal() {
    let s = signer("k1", Algorithm::ES256);
    let mut p = parts("/v1/pay", &[("authorization", "Basic dXNlcjpwdw==")]);
    assert_eq!(run(rule(inline(&[&s])), &mut p).await, Ok(None));
    assert!(p.headers.get("authorization").is_some(), "left alone");
}

#[tokio::test]
async fn invalid_tokens_are_refused() {
    let s = signer("k1", Algorithm::ES256);
    let other = signer("k1", Algorithm::ES256);
    let cases: Vec<(&str, String, VerifyError)> = vec![
        (
            "expired",
            sign(&s, &claims(json!({"exp": now() - 3600}))),
            VerifyError::Expired,
        ),
        (
            "not yet valid",
            sign(&s, &claims(json!({"nbf": now() + 3600}))),
            VerifyError::NotYetValid,
        ),
        (
            "exp as a string",
            sign(&s, &claims(json!({"exp": "never"}))),
            VerifyError::Claims("InvalidClaimFormat(\"exp\")".into()),
        ),
        (
            "wrong issuer",
            sign(&s, &claims(json!({"iss": "https://evil.example"}))),
            VerifyError::UnknownIssuer("https://evil.example".into()),
        ),
        (
            "signed by another key with the same kid",
            sign(&other, &claims(json!({}))),
            VerifyError::BadSignature,
        ),
        (
            "unknown kid",
            sign(&signer("k2", Algorithm::ES256), &claims(json!({}))),
            VerifyError::UnknownKid("k2".into()),
        ),
    ];
    for (what, token, expected) in cases {
        let mut p = parts("/", &[("authorization", &bearer(&token))]);
        assert_eq!(
            run(rule(inline(&[&s])), &mut p).await,
            Err(expected),
            "{what}"
        );
    }
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    use base64::Engine as _;
    let s = signer("k1", Algorithm::ES256);
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    // HS256 keyed with the public key as published (the classic key-confusion attack).
    let public = serde_json::to_vec(&s.jwk).expect("jwk");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let hmac = jsonwebtoken::encode(
        &header,
        &claims(json!({})),
        &EncodingKey::from_secret(&public).expect("hmac key"),
    )
    .expect("sign");
    for (what, token, alg) in [("none", none, "none"), ("HS256", hmac, "HS256")] {
        let mut p = parts("/", &[("authorization", &bearer(&token))]);
        assert_eq!(
            run(rule(inline(&[&s])), &mut p).await,
            Err(VerifyError::RefusedAlgorithm(alg.into())),
            "{what}"
        );
    }
}

#[tokio::test]
async fn audiences_when_configured() {
    let s = signer("k1", Algorithm::ES256);
    let mut r = rule(inline(&[&s]));
    r.audiences = vec!["payments".into()];
    let r = Arc::new(r);
    for (aud, ok) in [
        (json!("payments"), true),
        (json!(["other", "payments"]), true),
        (json!("other"), false),
        (Value::Null, false),
    ] {
        let extra = if aud.is_null() {
            json!({})
        } else {
            json!({ "aud": aud })
        };
        let token = sign(&s, &claims(extra));
        let mut p = parts("/", &[("authorization", &bearer(&token))]);
        let got = run((*r).clone(), &mut p).await;
        if ok {
            assert!(matches!(got, Ok(Some(_))), "{aud}: {got:?}");
        } else {
            assert_eq!(got, Err(VerifyError::Audience), "{aud}");
        }
    }
}

#[tokio::test]
async fn tokens_from_a_prefixed_header_and_a_query_parameter() {
    let s = signer("k1", Algorithm::ES256);
    let token = sign(&s, &claims(json!({})));
    let mut r = rule(inline(&[&s]));
    r.locations = vec![
        TokenLocation::Header {
            name: HeaderName::from_static("x-jwt"),
            prefix: "Token ".into(),
        },
        TokenLocation::Param("jwt".into()),
    ];
    let mut p = parts("/", &[("x-jwt", &format!("Token {token}"))]);
    assert!(run(r.clone(), &mut p).await.expect("verified").is_some());
    assert!(p.headers.get("x-jwt").is_none());
    let mut p = parts(&format!("/v1/pay?a=1&jwt={token}"), &[]);
    assert!(run(r.clone(), &mut p).await.expect("verified").is_some());
    assert_eq!(
        p.uri.to_string(),
        "/v1/pay?a=1",
        "token removed from the query"
    );
    // The default locations are not looked at once fromHeaders/fromParams are given.
    let mut p = parts("/", &[("authorization", &bearer("garbage"))]);
    assert_eq!(run(r, &mut p).await, Ok(None));
    // A bad token in a configured place is refused.
    let mut p = parts("/?jwt=garbage", &[]);
    let mut r = rule(inline(&[&s]));
    r.locations = vec![TokenLocation::Param("jwt".into())];
    assert!(matches!(
        run(r, &mut p).await,
        Err(VerifyError::Malformed(_))
    ));
}

#[tokio::test]
async fn forward_original_token_and_outputs() {
    let s = signer("k1", Algorithm::ES256);
    let token = sign(
        &s,
        &claims(json!({"group": "admins", "n": 7, "nested": {"a": "b"}})),
    );
    let mut r = rule(inline(&[&s]));
    r.forward_original_token = true;
    r.output_payload_to_header = Some(HeaderName::from_static("x-jwt-payload"));
    r.output_claim_to_headers = vec![
        (HeaderName::from_static("x-group"), "group".into()),
        (HeaderName::from_static("x-n"), "n".into()),
        (HeaderName::from_static("x-nested"), "nested.a".into()),
        (HeaderName::from_static("x-missing"), "missing".into()),
    ];
    let mut p = parts(
        "/",
        &[
            ("authorization", &bearer(&token)),
            // Set by the client: must not reach the application.
            ("x-missing", "spoofed"),
            ("x-group", "spoofed"),
        ],
    );
    run(r.clone(), &mut p).await.expect("verified");
    assert_eq!(
        p.headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some(bearer(&token).as_str())
    );
    let payload = token.split('.').nth(1).expect("payload");
    assert_eq!(p.headers["x-jwt-payload"], payload);
    assert_eq!(p.headers["x-group"], "admins");
    assert_eq!(p.headers["x-n"], "7");
    assert_eq!(p.headers["x-nested"], "b");
    assert!(
        p.headers.get("x-missing").is_none(),
        "spoofed header removed"
    );
    // Without a token, output headers a client sets are removed too.
    let mut p = parts("/", &[("x-group", "spoofed")]);
    assert_eq!(run(r, &mut p).await, Ok(None));
    assert!(p.headers.get("x-group").is_none());
}

/// A JWKS server over HTTPS on loopback: serves the current document, or `503` when none.
struct JwksServer {
    uri: hyper::Uri,
    ca_file: std::path::PathBuf,
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

async fn jwks_server(document: String) -> JwksServer {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let ca_file =
        std::env::temp_dir().join(format!("latch-jwks-ca-{}-{port}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_cert.pem()).expect("write CA");
    let document = Arc::new(Mutex::new(Some(document)));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (doc, count) = (document.clone(), fetches.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, doc, count) = (acceptor.clone(), doc.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let current = doc.lock().expect("lock").clone();
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
    });
    JwksServer {
        uri: format!("https://127.0.0.1:{port}/jwks.json")
            .parse()
            .expect("uri"),
        ca_file,
        document,
        fetches,
    }
}

fn settings(server: &JwksServer) -> Settings {
    Settings {
        jwks_ca_file: Some(server.ca_file.clone()),
        jwks_refresh_interval: Duration::from_secs(3600),
        jwks_fetch_timeout: Duration::from_secs(30),
        jwks_max_stale: Duration::from_secs(3600),
        jwks_refetch_min_interval: Duration::ZERO,
    }
}

async fn check(
    authn: &Authenticator,
    r: &Arc<JwtRule>,
    settings: &Settings,
    token: &str,
) -> Result<Option<crate::policy::RequestAuth>, VerifyError> {
    let mut p = parts("/", &[("authorization", &bearer(token))]);
    authn
        .authenticate(std::slice::from_ref(r), settings, &METRICS, &mut p)
        .await
        .map_err(|r| r.reason)
}

#[tokio::test]
async fn jwks_over_https_rotation_and_outage() {
    let a = signer("a", Algorithm::ES256);
    let b = signer("b", Algorithm::ES256);
    let server = jwks_server(jwks_text(&[&a])).await;
    let r = Arc::new(rule(KeySource::Uri(server.uri.clone())));
    let authn = Authenticator::default();
    let settings = settings(&server);
    let token_a = sign(&a, &claims(json!({})));
    let token_b = sign(&b, &claims(json!({})));

    // First request: fetched (the request waits for it), verified.
    assert!(
        check(&authn, &r, &settings, &token_a)
            .await
            .expect("a")
            .is_some()
    );
    // The issuer rotates to b: b's unknown kid makes the agent fetch again, no restart.
    *server.document.lock().expect("lock") = Some(jwks_text(&[&b]));
    assert!(
        check(&authn, &r, &settings, &token_b)
            .await
            .expect("b")
            .is_some()
    );
    assert_eq!(server.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Outage: a fetch for an unknown kid fails and is reported; b's keys are kept.
    *server.document.lock().expect("lock") = None;
    let token_c = sign(&signer("c", Algorithm::ES256), &claims(json!({})));
    assert_eq!(
        check(&authn, &r, &settings, &token_c).await,
        Err(VerifyError::UnknownKid("c".into()))
    );
    let status = authn.status();
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].failures, 1, "{status:?}");
    assert!(
        status[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{status:?}"
    );
    let exposition = METRICS.encode().expect("metrics");
    for (result, n) in [("ok", 2), ("error", 1)] {
        let line = format!(
            "latch_jwks_fetches_total{{jwks_uri=\"{}\",result=\"{result}\"}} {n}",
            server.uri
        );
        assert!(exposition.contains(&line), "{line} in {exposition}");
    }
    assert!(
        check(&authn, &r, &settings, &token_b)
            .await
            .expect("kept")
            .is_some()
    );

    // Past jwksMaxStale the last keys are dropped: refused (fail closed).
    let strict = Settings {
        jwks_max_stale: Duration::from_nanos(1),
        ..settings.clone()
    };
    assert!(matches!(
        check(&authn, &r, &strict, &token_b).await,
        Err(VerifyError::NoKeys { .. })
    ));
    // Back up: keys fetched again.
    *server.document.lock().expect("lock") = Some(jwks_text(&[&b]));
    assert!(
        check(&authn, &r, &settings, &token_b)
            .await
            .expect("b")
            .is_some()
    );
}

#[tokio::test]
async fn an_unknown_kid_refetch_is_rate_limited() {
    let a = signer("a", Algorithm::ES256);
    let server = jwks_server(jwks_text(&[&a])).await;
    let r = Arc::new(rule(KeySource::Uri(server.uri.clone())));
    let authn = Authenticator::default();
    let settings = Settings {
        jwks_refetch_min_interval: Duration::from_secs(3600),
        ..settings(&server)
    };
    assert!(
        check(&authn, &r, &settings, &sign(&a, &claims(json!({}))))
            .await
            .expect("a")
            .is_some()
    );
    let stranger = sign(&signer("x", Algorithm::ES256), &claims(json!({})));
    for _ in 0..3 {
        assert_eq!(
            check(&authn, &r, &settings, &stranger).await,
            Err(VerifyError::UnknownKid("x".into()))
        );
    }
    assert_eq!(server.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_server_not_trusted_gives_no_keys() {
    let a = signer("a", Algorithm::ES256);
    let server = jwks_server(jwks_text(&[&a])).await;
    let r = Arc::new(rule(KeySource::Uri(server.uri.clone())));
    let settings = Settings {
        jwks_ca_file: None,
        ..settings(&server)
    };
    let got = check(
        &Authenticator::default(),
        &r,
        &settings,
        &sign(&a, &claims(json!({}))),
    )
    .await;
    assert!(
        matches!(&got, Err(VerifyError::NoKeys { why, .. }) if why.contains("TLS")),
        "{got:?}"
    );
}
