//! `cargo xtask bench tls`: what the tunnel's TLS costs on the agent's provider (aws-lc-rs,
//! X25519 first: `latch::tls::crypto_provider`), against ring (the agent's provider until
//! 2026-12-04) and against aws-lc-rs preferring post-quantum key exchange (X25519MLKEM768,
//! ztunnel's `COMPLIANCE_POLICY=pqc`), in one run. The agent's own SPIFFE verifiers
//! and SVIDs from a development CA, TLS 1.3, no resumption, as the tunnel configures them; both
//! sides in this process over memory, so the figures are CPU alone: microseconds of one
//! handshake (client and server together) and MB/s of bulk data (encrypt and decrypt). Rounds
//! alternate the providers; each figure is the median of the rounds with its spread.

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use latch::{
    identity::ca::{DevCa, Svid},
    tls::{FixedCert, SpiffeClientVerifier, SpiffeServerVerifier},
};
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection,
    crypto::{CryptoProvider, aws_lc_rs, ring},
    pki_types::ServerName,
    sign::CertifiedKey,
    version::TLS13,
};

const TD: &str = "cluster.local";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
const ROUNDS: usize = 11;
const HANDSHAKES_PER_ROUND: usize = 300;
const BULK_PER_ROUND: usize = 64 << 20;
const CHUNK: usize = 16 << 10;

struct Variant {
    label: &'static str,
    provider: Arc<CryptoProvider>,
}

fn variants() -> Vec<Variant> {
    // This workspace builds rustls with `prefer-post-quantum`: its default puts the hybrid first.
    let mut post_quantum = aws_lc_rs::default_provider();
    post_quantum.kx_groups = vec![aws_lc_rs::kx_group::X25519MLKEM768];
    vec![
        Variant {
            label: "ring, X25519 (the agent until 2026-12-04)",
            provider: Arc::new(ring::default_provider()),
        },
        Variant {
            label: "aws-lc-rs, X25519 first (the agent)",
            provider: latch::tls::provider(),
        },
        Variant {
            label: "aws-lc-rs, X25519MLKEM768 (post-quantum hybrid)",
            provider: Arc::new(post_quantum),
        },
    ]
}

fn certified(provider: &CryptoProvider, svid: &Svid) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = provider
        .key_provider
        .load_private_key(svid.key.clone_key())
        .context("loading the SVID's key")?;
    Ok(Arc::new(CertifiedKey::new(svid.chain.clone(), key)))
}

/// The tunnel's client and server configurations on `provider`.
fn configs(
    provider: &Arc<CryptoProvider>,
    ca: &DevCa,
    client: &Svid,
    server: &Svid,
) -> anyhow::Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let bundle = vec![ca.certificate().clone()];
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            bundle.clone(),
            TD,
            PAYMENT,
        )))
        .with_client_cert_resolver(Arc::new(FixedCert(certified(provider, client)?)));
    c.alpn_protocols = vec![b"h2".to_vec()];
    c.resumption = rustls::client::Resumption::disabled();
    let mut s = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle, TD)))
        .with_cert_resolver(Arc::new(FixedCert(certified(provider, server)?)));
    s.alpn_protocols = vec![b"h2".to_vec()];
    s.send_tls13_tickets = 0;
    Ok((Arc::new(c), Arc::new(s)))
}

/// Move what `from` has to send into `to`; the bytes moved.
fn transfer(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
) -> anyhow::Result<usize> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf)?;
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest)?;
        to.process_new_packets()?;
    }
    Ok(buf.len())
}

/// One handshake; the bytes each way.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> anyhow::Result<(ClientConnection, ServerConnection, usize)> {
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("payment")?)?;
    let mut s = ServerConnection::new(server.clone())?;
    let mut bytes = 0;
    while c.is_handshaking() || s.is_handshaking() {
        bytes += transfer(&mut c, &mut s)?;
        bytes += transfer(&mut s, &mut c)?;
    }
    Ok((c, s, bytes))
}

fn bulk(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> anyhow::Result<Duration> {
    let (mut c, mut s, _) = handshake(client, server)?;
    let chunk = vec![0x5au8; CHUNK];
    let mut out = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0;
    while sent < BULK_PER_ROUND {
        c.writer().write_all(&chunk)?;
        transfer(&mut c, &mut s)?;
        let mut got = 0;
        while got < CHUNK {
            got += s.reader().read(&mut out)?;
        }
        sent += CHUNK;
    }
    Ok(started.elapsed())
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("latch-tls-bench-{}", std::process::id()));
    let (cert, key) = latch::identity::ca::init(&dir)?;
    let ca = DevCa::load(&cert, &key)?;
    let _ = std::fs::remove_dir_all(&dir);
    let hour = Duration::from_secs(3600);
    let (client_svid, server_svid) = (ca.mint(FRONTEND, hour)?, ca.mint(PAYMENT, hour)?);
    let variants = variants();
    let configs = variants
        .iter()
        .map(|v| configs(&v.provider, &ca, &client_svid, &server_svid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut handshake_us = vec![Vec::new(); variants.len()];
    let mut handshake_bytes = vec![0usize; variants.len()];
    let mut bulk_mbs = vec![Vec::new(); variants.len()];
    println!(
        "tls benchmark: {ROUNDS} rounds, each {HANDSHAKES_PER_ROUND} handshakes and {} MiB per provider, alternating",
        BULK_PER_ROUND >> 20
    );
    for _ in 0..ROUNDS {
        for (i, (client, server)) in configs.iter().enumerate() {
            let started = Instant::now();
            for _ in 0..HANDSHAKES_PER_ROUND {
                let (c, _, bytes) = handshake(client, server)?;
                handshake_bytes[i] = bytes;
                anyhow::ensure!(
                    c.negotiated_key_exchange_group().is_some(),
                    "no key exchange group"
                );
            }
            handshake_us[i]
                .push(started.elapsed().as_secs_f64() * 1e6 / HANDSHAKES_PER_ROUND as f64);
            let took = bulk(client, server)?;
            bulk_mbs[i].push(BULK_PER_ROUND as f64 / took.as_secs_f64() / 1e6);
        }
    }
    println!(
        "\n| provider, key exchange | handshake µs (median, min–max) | handshake bytes | bulk MB/s (median, min–max) |"
    );
    println!("|---|---:|---:|---:|");
    let mut rows = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        let (hs, hs_min, hs_max) = median(handshake_us[i].clone());
        let (mbs, mbs_min, mbs_max) = median(bulk_mbs[i].clone());
        let group = handshake(&configs[i].0, &configs[i].1)?
            .0
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default();
        println!(
            "| {} | {hs:.0} ({hs_min:.0}–{hs_max:.0}) | {} | {mbs:.0} ({mbs_min:.0}–{mbs_max:.0}) |",
            v.label, handshake_bytes[i]
        );
        rows.push(serde_json::json!({
            "provider": v.label, "negotiated_group": group,
            "handshake_us": {"median": hs, "min": hs_min, "max": hs_max},
            "handshake_bytes": handshake_bytes[i],
            "bulk_mb_per_s": {"median": mbs, "min": mbs_min, "max": mbs_max},
        }));
    }
    let out = std::env::var_os("LATCH_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out)?;
    let path = out.join("tls.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({"benchmark": "tls", "rows": rows}))?,
    )?;
    println!("\nwritten: {}", path.display());
    Ok(())
}
