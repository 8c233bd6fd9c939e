//! Table tests of the chain rules: one row per rule, each a chain that breaks exactly that rule
//! (made with rcgen, or with openssl for what rcgen cannot make: see `../testdata/regenerate.sh`),
//! asserting which certificate is refused and why; and rows that must pass. Every row is
//! verified twice, and a refused path must never be remembered as good.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose as Eku, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku,
    NameConstraints, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::handshake_sides;
use crate::{
    identity::ca::{DevCa, Svid, init},
    tls::{Position, Problem, Role, VerifyError, svid_identity, verify, verify_svid},
};

const TD: &str = "cluster.local";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";
const HOUR: Duration = Duration::from_secs(3600);

/// A CA made in the test, able to sign.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Latch tests");
    dn.push(DnType::CommonName, cn);
    dn
}

fn window(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - HOUR).into();
    params.not_after = (now + 24 * HOUR).into();
}

/// A CA's parameters as the development CA has them.
fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
    window(&mut params);
    params
}

/// A leaf's parameters as the development CA mints them.
fn leaf_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(cn);
    params
        .subject_alt_names
        .push(SanType::URI(FRONTEND.try_into().expect("URI")));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![Ku::DigitalSignature, Ku::KeyAgreement];
    params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    window(&mut params);
    params
}

fn root(params: CertificateParams) -> Ca {
    let key = key();
    let der = params.self_signed(&key).expect("self-signed").der().clone();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn intermediate(params: CertificateParams, parent: &Ca) -> Ca {
    let key = key();
    let der = params
        .signed_by(&key, &parent.issuer)
        .expect("signed")
        .der()
        .clone();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn leaf(params: CertificateParams, parent: &Ca) -> CertificateDer<'static> {
    params
        .signed_by(&key(), &parent.issuer)
        .expect("signed")
        .der()
        .clone()
}

/// An extension with `oid` and DER `content`, critical or not.
fn extension(oid: &[u64], content: Vec<u8>, critical: bool) -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(oid, content);
    ext.set_criticality(critical);
    ext
}

/// A DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
}

/// A nameConstraints value with one URI subtree, permitted (`[0]`) or excluded (`[1]`).
fn uri_constraint(host: &str, excluded: bool) -> CustomExtension {
    let subtree = tlv(0x30, &tlv(0x86, host.as_bytes()));
    let trees = tlv(if excluded { 0xa1 } else { 0xa0 }, &subtree);
    extension(&[2, 5, 29, 30], tlv(0x30, &trees), true)
}

fn unknown_critical() -> CustomExtension {
    extension(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00], true)
}

fn fixture(name: &str) -> CertificateDer<'static> {
    let pem = match name {
        "rsa-ca" => include_str!("../testdata/rsa-ca.pem"),
        "rsa1024-ca" => include_str!("../testdata/rsa1024-ca.pem"),
        "sha1-ca" => include_str!("../testdata/sha1-ca.pem"),
        "ec-ca" => include_str!("../testdata/ec-ca.pem"),
        "rsa1024-intermediate" => include_str!("../testdata/rsa1024-intermediate.pem"),
        "leaf-sha256" => include_str!("../testdata/leaf-sha256.pem"),
        "leaf-sha1" => include_str!("../testdata/leaf-sha1.pem"),
        "leaf-md5" => include_str!("../testdata/leaf-md5.pem"),
        "leaf-ecdsa-sha1" => include_str!("../testdata/leaf-ecdsa-sha1.pem"),
        "leaf-rsa1024" => include_str!("../testdata/leaf-rsa1024.pem"),
        "leaf-of-rsa1024-ca" => include_str!("../testdata/leaf-of-rsa1024-ca.pem"),
        "leaf-of-sha1-ca" => include_str!("../testdata/leaf-of-sha1-ca.pem"),
        "leaf-of-rsa1024-intermediate" => {
            include_str!("../testdata/leaf-of-rsa1024-intermediate.pem")
        }
        other => panic!("no fixture {other}"),
    };
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("fixture PEM")
}

/// What a row must give.
enum Expect {
    Pass,
    /// Refused at this position, the refused certificate's subject ending with this CN, for a
    /// problem this matches.
    Refused(Position, &'static str, fn(&Problem) -> bool),
}

struct Row {
    name: &'static str,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    role: Role,
    expect: Expect,
}

fn row(
    name: &'static str,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    expect: Expect,
) -> Row {
    Row {
        name,
        chain,
        bundle,
        role: Role::Client,
        expect,
    }
}

fn as_role(mut row: Row, role: Role) -> Row {
    row.role = role;
    row
}

fn dev_ca(name: &str) -> DevCa {
    let dir = std::env::temp_dir().join(format!("latch-chain-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cert, key) = init(&dir).expect("init CA");
    let ca = DevCa::load(&cert, &key).expect("load CA");
    let _ = std::fs::remove_dir_all(&dir);
    ca
}

fn passing_rows() -> Vec<Row> {
    let dev = dev_ca("passing");
    let dev_svid = dev.mint(FRONTEND, HOUR).expect("svid");
    let dev_bundle = vec![dev.certificate().clone()];
    let root_ca = root(ca_params("root"));
    let inter = intermediate(ca_params("intermediate"), &root_ca);
    let one_intermediate = vec![leaf(leaf_params("leaf"), &inter), inter.der.clone()];

    let mut constrained = ca_params("root, pathLen 1");
    constrained.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    let constrained = root(constrained);
    let below_constrained = intermediate(ca_params("intermediate"), &constrained);

    let mut no_eku = leaf_params("leaf without EKU");
    no_eku.extended_key_usages.clear();
    let mut no_ku = leaf_params("leaf without keyUsage");
    no_ku.key_usages.clear();
    let mut client_only = leaf_params("clientAuth leaf");
    client_only.extended_key_usages = vec![Eku::ClientAuth];
    let mut server_only = leaf_params("serverAuth leaf");
    server_only.extended_key_usages = vec![Eku::ServerAuth];
    let mut ca_no_ku = ca_params("intermediate without keyUsage");
    ca_no_ku.key_usages.clear();
    let ca_no_ku = intermediate(ca_no_ku, &root_ca);
    let mut permits = ca_params("intermediate permitting cluster.local");
    permits.custom_extensions.push(uri_constraint(TD, false));
    let permits = intermediate(permits, &root_ca);
    let mut root_permits = ca_params("root permitting .local");
    root_permits
        .custom_extensions
        .push(uri_constraint(".local", false));
    let root_permits = root(root_permits);
    let mut noncritical = leaf_params("leaf with a non-critical unknown extension");
    let mut ext = unknown_critical();
    ext.set_criticality(false);
    noncritical.custom_extensions.push(ext);

    vec![
        row(
            "a development CA's SVID (EKU clientAuth and serverAuth)",
            dev_svid.chain.clone(),
            dev_bundle.clone(),
            Expect::Pass,
        ),
        as_role(
            row(
                "a development CA's SVID, as a server",
                dev_svid.chain.clone(),
                dev_bundle.clone(),
                Expect::Pass,
            ),
            Role::Server,
        ),
        as_role(
            row(
                "a development CA's SVID, as our own",
                dev_svid.chain,
                dev_bundle,
                Expect::Pass,
            ),
            Role::ClientAndServer,
        ),
        row(
            "one intermediate",
            one_intermediate.clone(),
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "one intermediate, and the root sent as well",
            [one_intermediate.clone(), vec![root_ca.der.clone()]].concat(),
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "an anchor's pathLen of 1 with one intermediate",
            vec![
                leaf(leaf_params("leaf"), &below_constrained),
                below_constrained.der.clone(),
            ],
            vec![constrained.der.clone()],
            Expect::Pass,
        ),
        row(
            "a leaf without EKU",
            vec![leaf(no_eku, &root_ca)],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "a leaf without keyUsage",
            vec![leaf(no_ku, &root_ca)],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "a clientAuth-only leaf as a client",
            vec![leaf(client_only, &root_ca)],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        as_role(
            row(
                "a serverAuth-only leaf as a server",
                vec![leaf(server_only, &root_ca)],
                vec![root_ca.der.clone()],
                Expect::Pass,
            ),
            Role::Server,
        ),
        row(
            "an intermediate without keyUsage",
            vec![leaf(leaf_params("leaf"), &ca_no_ku), ca_no_ku.der.clone()],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "an intermediate's URI name constraint the leaf meets",
            vec![leaf(leaf_params("leaf"), &permits), permits.der.clone()],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "an anchor's URI domain constraint the leaf meets",
            vec![leaf(leaf_params("leaf"), &root_permits)],
            vec![root_permits.der.clone()],
            Expect::Pass,
        ),
        row(
            "a non-critical extension the verifier does not know",
            vec![leaf(noncritical, &root_ca)],
            vec![root_ca.der.clone()],
            Expect::Pass,
        ),
        row(
            "RSA 2048 and SHA-256 (openssl)",
            vec![fixture("leaf-sha256")],
            vec![fixture("rsa-ca")],
            Expect::Pass,
        ),
    ]
}

/// Rows whose chain breaks one rule of a CA (an intermediate or the anchor).
fn issuer_rows() -> Vec<Row> {
    let root_ca = root(ca_params("root"));
    let bundle = vec![root_ca.der.clone()];
    let under = |params: CertificateParams| {
        let ca = intermediate(params, &root_ca);
        vec![leaf(leaf_params("leaf"), &ca), ca.der]
    };
    let mut not_ca = ca_params("intermediate CA:false");
    not_ca.is_ca = IsCa::ExplicitNoCa;
    let mut no_bc = ca_params("intermediate without basicConstraints");
    no_bc.is_ca = IsCa::NoCa;
    let mut no_cert_sign = ca_params("intermediate without keyCertSign");
    no_cert_sign.key_usages = vec![Ku::DigitalSignature, Ku::CrlSign];
    let mut server_eku = ca_params("intermediate with serverAuth only");
    server_eku.extended_key_usages = vec![Eku::ServerAuth];
    let mut critical = ca_params("intermediate with an unknown critical extension");
    critical.custom_extensions.push(unknown_critical());
    let mut expired = ca_params("expired intermediate");
    expired.not_before = (SystemTime::now() - 48 * HOUR).into();
    expired.not_after = (SystemTime::now() - 24 * HOUR).into();

    let mut path_len_0 = ca_params("intermediate pathLen 0");
    path_len_0.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let path_len_0 = intermediate(path_len_0, &root_ca);
    let lower = intermediate(ca_params("lower intermediate"), &path_len_0);
    let over_path_len = vec![
        leaf(leaf_params("leaf"), &lower),
        lower.der.clone(),
        path_len_0.der.clone(),
    ];

    vec![
        row(
            "an intermediate with CA:false",
            under(not_ca),
            bundle.clone(),
            Expect::Refused(Position::Intermediate(1), "intermediate CA:false", |p| {
                *p == Problem::NotCa
            }),
        ),
        row(
            "an intermediate without basicConstraints",
            under(no_bc),
            bundle.clone(),
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate without basicConstraints",
                |p| *p == Problem::NotCa,
            ),
        ),
        row(
            "an intermediate's pathLen 0 with an intermediate below it",
            over_path_len,
            bundle.clone(),
            Expect::Refused(Position::Intermediate(2), "intermediate pathLen 0", |p| {
                *p == Problem::PathLen {
                    allowed: 0,
                    below: 1,
                }
            }),
        ),
        row(
            "an intermediate's keyUsage without keyCertSign",
            under(no_cert_sign),
            bundle.clone(),
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate without keyCertSign",
                |p| *p == Problem::NoKeyCertSign,
            ),
        ),
        row(
            "an intermediate's EKU without clientAuth, for a client",
            under(server_eku),
            bundle.clone(),
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate with serverAuth only",
                |p| matches!(p, Problem::MissingExtendedKeyUsage { needed: "clientAuth", present, .. } if present == "serverAuth"),
            ),
        ),
        row(
            "an intermediate with an unknown critical extension",
            under(critical),
            bundle.clone(),
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate with an unknown critical extension",
                |p| matches!(p, Problem::UnknownCriticalExtension { oid, .. } if oid == "1.3.6.1.4.1.99999.1"),
            ),
        ),
        row(
            "an expired intermediate",
            under(expired),
            bundle,
            Expect::Refused(Position::Intermediate(1), "expired intermediate", |p| {
                matches!(p, Problem::Expired { .. })
            }),
        ),
    ]
}

/// Rows whose trust anchor breaks one rule.
fn anchor_rows() -> Vec<Row> {
    let anchored = |params: CertificateParams| {
        let anchor = root(params);
        (vec![leaf(leaf_params("leaf"), &anchor)], vec![anchor.der])
    };
    let mut not_ca = ca_params("anchor CA:false");
    not_ca.is_ca = IsCa::ExplicitNoCa;
    let mut no_cert_sign = ca_params("anchor without keyCertSign");
    no_cert_sign.key_usages = vec![Ku::DigitalSignature];
    let mut expired = ca_params("expired anchor");
    expired.not_before = (SystemTime::now() - 48 * HOUR).into();
    expired.not_after = (SystemTime::now() - 24 * HOUR).into();
    let mut critical = ca_params("anchor with an unknown critical extension");
    critical.custom_extensions.push(unknown_critical());
    let mut excludes = ca_params("anchor excluding cluster.local");
    excludes.custom_extensions.push(uri_constraint(TD, true));
    let mut server_eku = ca_params("anchor with serverAuth only");
    server_eku.extended_key_usages = vec![Eku::ServerAuth];

    let mut path_len_0 = ca_params("anchor pathLen 0");
    path_len_0.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let path_len_0 = root(path_len_0);
    let inter = intermediate(ca_params("intermediate"), &path_len_0);

    let (chain, bundle) = anchored(not_ca);
    let not_ca = row(
        "an anchor with CA:false",
        chain,
        bundle,
        Expect::Refused(Position::Anchor, "anchor CA:false", |p| {
            *p == Problem::NotCa
        }),
    );
    let (chain, bundle) = anchored(no_cert_sign);
    let no_cert_sign = row(
        "an anchor's keyUsage without keyCertSign",
        chain,
        bundle,
        Expect::Refused(Position::Anchor, "anchor without keyCertSign", |p| {
            *p == Problem::NoKeyCertSign
        }),
    );
    let (chain, bundle) = anchored(expired);
    let expired = row(
        "an expired anchor",
        chain,
        bundle,
        Expect::Refused(Position::Anchor, "expired anchor", |p| {
            matches!(p, Problem::Expired { .. })
        }),
    );
    let (chain, bundle) = anchored(critical);
    let critical = row(
        "an anchor with an unknown critical extension",
        chain,
        bundle,
        Expect::Refused(
            Position::Anchor,
            "anchor with an unknown critical extension",
            |p| matches!(p, Problem::UnknownCriticalExtension { .. }),
        ),
    );
    let (chain, bundle) = anchored(excludes);
    let excludes = row(
        "an anchor's URI name constraint excluding the trust domain",
        chain,
        bundle,
        Expect::Refused(
            Position::Leaf,
            "leaf",
            |p| matches!(p, Problem::NameExcluded { by: Position::Anchor, name } if name.contains(FRONTEND)),
        ),
    );
    let (chain, bundle) = anchored(server_eku);
    let server_eku = row(
        "an anchor's EKU without clientAuth, for a client",
        chain,
        bundle,
        Expect::Refused(Position::Anchor, "anchor with serverAuth only", |p| {
            matches!(
                p,
                Problem::MissingExtendedKeyUsage {
                    needed: "clientAuth",
                    ..
                }
            )
        }),
    );
    vec![
        not_ca,
        row(
            "an anchor's pathLen 0 with one intermediate",
            vec![leaf(leaf_params("leaf"), &inter), inter.der.clone()],
            vec![path_len_0.der.clone()],
            Expect::Refused(Position::Anchor, "anchor pathLen 0", |p| {
                *p == Problem::PathLen {
                    allowed: 0,
                    below: 1,
                }
            }),
        ),
        no_cert_sign,
        expired,
        critical,
        excludes,
        server_eku,
    ]
}

/// Rows whose leaf breaks one rule.
fn leaf_rows() -> Vec<Row> {
    let root_ca = root(ca_params("root"));
    let bundle = vec![root_ca.der.clone()];
    let signed = |params: CertificateParams| vec![leaf(params, &root_ca)];
    let with = |cn: &str, change: &dyn Fn(&mut CertificateParams)| {
        let mut params = leaf_params(cn);
        change(&mut params);
        signed(params)
    };
    let refused = |cn: &'static str, problem: fn(&Problem) -> bool| {
        Expect::Refused(Position::Leaf, cn, problem)
    };
    vec![
        row(
            "a leaf that is a CA",
            with("CA leaf", &|p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.key_usages = vec![Ku::DigitalSignature];
            }),
            bundle.clone(),
            refused("CA leaf", |p| *p == Problem::LeafIsCa),
        ),
        row(
            "a leaf's keyUsage without digitalSignature",
            with("keyAgreement leaf", &|p| {
                p.key_usages = vec![Ku::KeyAgreement]
            }),
            bundle.clone(),
            refused("keyAgreement leaf", |p| {
                *p == Problem::LeafWithoutDigitalSignature
            }),
        ),
        row(
            "a leaf's keyUsage with keyCertSign",
            with("keyCertSign leaf", &|p| {
                p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign]
            }),
            bundle.clone(),
            refused("keyCertSign leaf", |p| {
                *p == Problem::LeafMaySign {
                    usage: "keyCertSign",
                }
            }),
        ),
        row(
            "a leaf's keyUsage with cRLSign",
            with("cRLSign leaf", &|p| {
                p.key_usages = vec![Ku::DigitalSignature, Ku::CrlSign]
            }),
            bundle.clone(),
            refused("cRLSign leaf", |p| {
                *p == Problem::LeafMaySign { usage: "cRLSign" }
            }),
        ),
        row(
            "a serverAuth-only leaf as a client",
            with("serverAuth leaf", &|p| {
                p.extended_key_usages = vec![Eku::ServerAuth]
            }),
            bundle.clone(),
            refused("serverAuth leaf", |p| {
                matches!(
                    p,
                    Problem::MissingExtendedKeyUsage {
                        needed: "clientAuth",
                        role: "client",
                        ..
                    }
                )
            }),
        ),
        as_role(
            row(
                "a clientAuth-only leaf as a server",
                with("clientAuth leaf", &|p| {
                    p.extended_key_usages = vec![Eku::ClientAuth]
                }),
                bundle.clone(),
                refused("clientAuth leaf", |p| {
                    matches!(
                        p,
                        Problem::MissingExtendedKeyUsage {
                            needed: "serverAuth",
                            role: "server",
                            ..
                        }
                    )
                }),
            ),
            Role::Server,
        ),
        as_role(
            row(
                "a clientAuth-only leaf as our own (both sides)",
                with("clientAuth leaf", &|p| {
                    p.extended_key_usages = vec![Eku::ClientAuth]
                }),
                bundle.clone(),
                refused("clientAuth leaf", |p| {
                    matches!(
                        p,
                        Problem::MissingExtendedKeyUsage {
                            needed: "serverAuth",
                            ..
                        }
                    )
                }),
            ),
            Role::ClientAndServer,
        ),
        row(
            "a leaf with anyExtendedKeyUsage only (not accepted, as in rustls-webpki)",
            with("anyExtendedKeyUsage leaf", &|p| {
                p.extended_key_usages = vec![Eku::Any]
            }),
            bundle.clone(),
            refused(
                "anyExtendedKeyUsage leaf",
                |p| matches!(p, Problem::MissingExtendedKeyUsage { needed: "clientAuth", present, .. } if present == "anyExtendedKeyUsage"),
            ),
        ),
        row(
            "a leaf whose SPIFFE ID has no path",
            with("trust domain leaf", &|p| {
                p.subject_alt_names = vec![SanType::URI(
                    "spiffe://cluster.local".try_into().expect("URI"),
                )]
            }),
            bundle.clone(),
            refused(
                "trust domain leaf",
                |p| matches!(p, Problem::SpiffeIdWithoutPath(id) if id == "spiffe://cluster.local"),
            ),
        ),
        row(
            "a leaf with an unknown critical extension",
            with("leaf with an unknown critical extension", &|p| {
                p.custom_extensions.push(unknown_critical())
            }),
            bundle.clone(),
            refused(
                "leaf with an unknown critical extension",
                |p| matches!(p, Problem::UnknownCriticalExtension { oid, why: "" } if oid == "1.3.6.1.4.1.99999.1"),
            ),
        ),
        row(
            "a leaf with (critical) name constraints",
            with("leaf with name constraints", &|p| {
                p.name_constraints = Some(NameConstraints {
                    permitted_subtrees: vec![GeneralSubtree::DnsName("example.com".into())],
                    excluded_subtrees: vec![],
                })
            }),
            bundle.clone(),
            refused(
                "leaf with name constraints",
                |p| matches!(p, Problem::UnknownCriticalExtension { oid, why } if oid.contains("2.5.29.30") && why.contains("not a CA")),
            ),
        ),
        row(
            "a leaf with an extension twice",
            with("leaf with two EKU extensions", &|p| {
                // id-kp-clientAuth, as a second extendedKeyUsage extension.
                let eku = tlv(0x30, &tlv(0x06, &[0x2b, 6, 1, 5, 5, 7, 3, 2]));
                p.custom_extensions
                    .push(extension(&[2, 5, 29, 37], eku, false))
            }),
            bundle.clone(),
            refused(
                "leaf with two EKU extensions",
                |p| matches!(p, Problem::DuplicateExtension { oid } if oid.contains("2.5.29.37")),
            ),
        ),
        row(
            "a leaf whose basicConstraints does not decode",
            with("leaf with a broken basicConstraints", &|p| {
                p.is_ca = IsCa::NoCa;
                p.custom_extensions
                    .push(extension(&[2, 5, 29, 19], vec![0x04, 0x00], true))
            }),
            bundle.clone(),
            refused("leaf with a broken basicConstraints", |p| {
                matches!(
                    p,
                    Problem::MalformedExtension {
                        name: "basicConstraints",
                        ..
                    }
                )
            }),
        ),
        row(
            "an expired leaf",
            with("expired leaf", &|p| {
                p.not_before = (SystemTime::now() - 2 * HOUR).into();
                p.not_after = (SystemTime::now() - HOUR).into();
            }),
            bundle,
            refused("expired leaf", |p| matches!(p, Problem::Expired { .. })),
        ),
    ]
}

/// Rows whose signatures or keys break one rule (certificates from openssl where rcgen
/// cannot make them).
fn crypto_rows() -> Vec<Row> {
    let rsa = vec![fixture("rsa-ca")];
    // A leaf whose signed part names another algorithm than its signature.
    let root_ca = root(ca_params("root"));
    let mut mismatched = leaf(leaf_params("leaf with two algorithms"), &root_ca).to_vec();
    let ecdsa_sha256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    let at = mismatched
        .windows(ecdsa_sha256.len())
        .position(|w| w == ecdsa_sha256)
        .expect("the signed part names ecdsa-with-SHA256");
    mismatched[at + ecdsa_sha256.len() - 1] = 0x03; // ecdsa-with-SHA384

    vec![
        row(
            "a leaf signed with SHA-1 (sha1WithRSAEncryption)",
            vec![fixture("leaf-sha1")],
            rsa.clone(),
            Expect::Refused(
                Position::Leaf,
                "SHA-1 leaf",
                |p| matches!(p, Problem::WeakSignatureAlgorithm { algorithm } if algorithm == "sha1WithRSAEncryption"),
            ),
        ),
        row(
            "a leaf signed with MD5",
            vec![fixture("leaf-md5")],
            rsa.clone(),
            Expect::Refused(
                Position::Leaf,
                "MD5 leaf",
                |p| matches!(p, Problem::WeakSignatureAlgorithm { algorithm } if algorithm == "md5WithRSAEncryption"),
            ),
        ),
        row(
            "a leaf signed with ECDSA and SHA-1",
            vec![fixture("leaf-ecdsa-sha1")],
            vec![fixture("ec-ca")],
            Expect::Refused(
                Position::Leaf,
                "ECDSA SHA-1 leaf",
                |p| matches!(p, Problem::WeakSignatureAlgorithm { algorithm } if algorithm == "ecdsa-with-SHA1"),
            ),
        ),
        row(
            "an anchor self-signed with SHA-1",
            vec![fixture("leaf-of-sha1-ca")],
            vec![fixture("sha1-ca")],
            Expect::Refused(
                Position::Anchor,
                "CA self-signed with SHA-1",
                |p| matches!(p, Problem::WeakSignatureAlgorithm { algorithm } if algorithm == "sha1WithRSAEncryption"),
            ),
        ),
        row(
            "a leaf with a 1024-bit RSA key",
            vec![fixture("leaf-rsa1024")],
            rsa.clone(),
            Expect::Refused(Position::Leaf, "RSA 1024 leaf", |p| {
                *p == Problem::WeakRsaKey { bits: 1024 }
            }),
        ),
        row(
            "an intermediate with a 1024-bit RSA key",
            vec![
                fixture("leaf-of-rsa1024-intermediate"),
                fixture("rsa1024-intermediate"),
            ],
            rsa,
            Expect::Refused(Position::Intermediate(1), "RSA 1024 intermediate", |p| {
                *p == Problem::WeakRsaKey { bits: 1024 }
            }),
        ),
        row(
            "an anchor with a 1024-bit RSA key",
            vec![fixture("leaf-of-rsa1024-ca")],
            vec![fixture("rsa1024-ca")],
            Expect::Refused(Position::Anchor, "RSA 1024 CA", |p| {
                *p == Problem::WeakRsaKey { bits: 1024 }
            }),
        ),
        row(
            "a leaf whose signed part names another signature algorithm",
            vec![CertificateDer::from(mismatched)],
            vec![root_ca.der.clone()],
            Expect::Refused(
                Position::Leaf,
                "leaf with two algorithms",
                |p| matches!(p, Problem::SignatureAlgorithmMismatch { signed, outer } if signed.contains("ecdsa-with-SHA384") && outer.contains("ecdsa-with-SHA256")),
            ),
        ),
    ]
}

/// Rows whose certificates do not chain, or break name constraints.
fn path_rows() -> Vec<Row> {
    let root_ca = root(ca_params("root"));
    let bundle = vec![root_ca.der.clone()];
    let other_root = root(ca_params("root"));

    // The leaf names an issuer whose key signed it, but the intermediate sent has another name.
    let key = key();
    let named_issuer = Issuer::new(ca_params("the name in the leaf"), key);
    let renamed = ca_params("the intermediate's own name")
        .signed_by(named_issuer.key(), &root_ca.issuer)
        .expect("signed")
        .der()
        .clone();
    let mismatched = vec![
        leaf(
            leaf_params("leaf"),
            &Ca {
                issuer: named_issuer,
                der: renamed.clone(),
            },
        ),
        renamed,
    ];

    // Two intermediates of the same name: the leaf of one presented with the other.
    let twin_a = intermediate(ca_params("twin"), &root_ca);
    let twin_b = intermediate(ca_params("twin"), &root_ca);
    let wrong_twin = vec![leaf(leaf_params("leaf"), &twin_a), twin_b.der.clone()];

    let mut permits_other = ca_params("intermediate permitting other.domain");
    permits_other
        .custom_extensions
        .push(uri_constraint("other.domain", false));
    let permits_other = intermediate(permits_other, &root_ca);
    let mut permits_dns = ca_params("intermediate permitting example.com");
    permits_dns.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName("example.com".into())],
        excluded_subtrees: vec![],
    });
    let permits_dns = intermediate(permits_dns, &root_ca);
    let mut dns_leaf = leaf_params("leaf with a DNS name");
    dns_leaf
        .subject_alt_names
        .push(SanType::DnsName("evil.test".try_into().expect("DNS")));
    let mut dir_constraint = ca_params("intermediate with a directoryName constraint");
    dir_constraint.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DirectoryName(named("x"))],
        excluded_subtrees: vec![],
    });
    let dir_constraint = intermediate(dir_constraint, &root_ca);
    // Its permitted subtrees wrapped in one SEQUENCE too many: x509-parser reads no subtree.
    let mut wrapped = ca_params("intermediate with a misencoded constraint");
    let subtree = tlv(0x30, &tlv(0x86, b"other.domain"));
    let misencoded = tlv(0x30, &tlv(0xa0, &tlv(0x30, &subtree)));
    wrapped
        .custom_extensions
        .push(extension(&[2, 5, 29, 30], misencoded, true));
    let wrapped = intermediate(wrapped, &root_ca);

    vec![
        row(
            "a chain from another CA of the same name",
            vec![leaf(leaf_params("leaf of another CA"), &other_root)],
            bundle.clone(),
            Expect::Refused(
                Position::Leaf,
                "leaf of another CA",
                |p| matches!(p, Problem::UnknownIssuer { issuer } if issuer.contains("CN=root")),
            ),
        ),
        row(
            "a leaf whose issuer is not the intermediate's subject",
            mismatched,
            bundle.clone(),
            Expect::Refused(
                Position::Leaf,
                "leaf",
                |p| matches!(p, Problem::IssuerMismatch { issuer, by: Position::Intermediate(1) } if issuer.contains("the name in the leaf")),
            ),
        ),
        row(
            "a leaf not signed by the intermediate sent",
            wrong_twin,
            bundle.clone(),
            Expect::Refused(Position::Leaf, "leaf", |p| {
                *p == Problem::BadSignature {
                    by: Position::Intermediate(1),
                }
            }),
        ),
        row(
            "a leaf outside an intermediate's URI name constraint",
            vec![
                leaf(leaf_params("leaf"), &permits_other),
                permits_other.der.clone(),
            ],
            bundle.clone(),
            Expect::Refused(
                Position::Leaf,
                "leaf",
                |p| matches!(p, Problem::NameNotPermitted { by: Position::Intermediate(1), name } if name.contains(FRONTEND)),
            ),
        ),
        row(
            "a leaf outside an intermediate's DNS name constraint",
            vec![leaf(dns_leaf, &permits_dns), permits_dns.der.clone()],
            bundle.clone(),
            Expect::Refused(
                Position::Leaf,
                "leaf with a DNS name",
                |p| matches!(p, Problem::NameNotPermitted { by: Position::Intermediate(1), name } if name.contains("evil.test")),
            ),
        ),
        row(
            "an intermediate whose name constraints do not decode",
            vec![leaf(leaf_params("leaf"), &wrapped), wrapped.der.clone()],
            bundle.clone(),
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate with a misencoded constraint",
                |p| {
                    matches!(
                        p,
                        Problem::MalformedExtension {
                            name: "nameConstraints",
                            ..
                        }
                    )
                },
            ),
        ),
        row(
            "an intermediate with a name constraint of a form not enforced",
            vec![
                leaf(leaf_params("leaf"), &dir_constraint),
                dir_constraint.der.clone(),
            ],
            bundle,
            Expect::Refused(
                Position::Intermediate(1),
                "intermediate with a directoryName constraint",
                |p| {
                    *p == Problem::UnsupportedNameConstraint {
                        form: "directoryName",
                    }
                },
            ),
        ),
    ]
}

#[test]
fn every_chain_rule_refuses_its_row_and_normal_chains_pass() {
    let rows: Vec<Row> = [
        passing_rows(),
        issuer_rows(),
        anchor_rows(),
        leaf_rows(),
        crypto_rows(),
        path_rows(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let now = SystemTime::now();
    let mut failures = Vec::new();
    for row in &rows {
        for attempt in ["first", "second"] {
            let result = verify_svid(&row.chain, &row.bundle, TD, row.role, now);
            let remembered = verify::remembered(row.role, &row.chain, &row.bundle);
            let as_expected = match &row.expect {
                Expect::Pass => result.as_deref() == Ok(FRONTEND) && remembered,
                Expect::Refused(at, cn, problem) => match &result {
                    Err(
                        e @ VerifyError::Refused {
                            cert,
                            problem: found,
                        },
                    ) => {
                        cert.position == *at
                            && cert.subject.ends_with(&format!("CN={cn}"))
                            && problem(found)
                            && !remembered
                            && e.to_string().starts_with(&at.to_string())
                    }
                    _ => false,
                },
            };
            if !as_expected {
                failures.push(format!(
                    "{} ({attempt} time, as {:?}): got {result:?}, remembered: {remembered}",
                    row.name, row.role
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A path remembered as good for one role is not good for another: the role is in the key.
#[test]
fn a_path_good_for_a_server_is_not_remembered_for_a_client() {
    let root_ca = root(ca_params("root"));
    let mut params = leaf_params("serverAuth leaf");
    params.extended_key_usages = vec![Eku::ServerAuth];
    let chain = vec![leaf(params, &root_ca)];
    let bundle = vec![root_ca.der.clone()];
    let now = SystemTime::now();
    assert_eq!(
        verify_svid(&chain, &bundle, TD, Role::Server, now),
        Ok(FRONTEND.to_owned())
    );
    assert!(verify::remembered(Role::Server, &chain, &bundle));
    let refused = verify_svid(&chain, &bundle, TD, Role::Client, now).expect_err("client");
    assert!(
        matches!(
            refused.problem(),
            Some(Problem::MissingExtendedKeyUsage {
                needed: "clientAuth",
                ..
            })
        ),
        "{refused}"
    );
}

/// A remembered path whose anchor has since expired is verified in full again and refused.
#[test]
fn a_remembered_path_still_needs_a_valid_anchor() {
    let mut params = ca_params("short-lived anchor");
    let now = SystemTime::now();
    params.not_after = (now + HOUR).into();
    let anchor = root(params);
    let mut leaf_window = leaf_params("leaf");
    leaf_window.not_after = (now + 24 * HOUR).into();
    let chain = vec![leaf(leaf_window, &anchor)];
    let bundle = vec![anchor.der.clone()];
    assert_eq!(
        verify_svid(&chain, &bundle, TD, Role::Client, now),
        Ok(FRONTEND.to_owned())
    );
    let later = now + 2 * HOUR;
    let refused =
        verify_svid(&chain, &bundle, TD, Role::Client, later).expect_err("anchor expired");
    assert_eq!(refused.position(), Some(Position::Anchor), "{refused}");
    assert!(
        matches!(refused.problem(), Some(Problem::Expired { .. })),
        "{refused}"
    );
}

#[test]
fn errors_name_the_certificate_and_the_rule() {
    let refused = verify_svid(
        &[fixture("leaf-sha1")],
        &[fixture("rsa-ca")],
        TD,
        Role::Client,
        SystemTime::now(),
    )
    .expect_err("SHA-1");
    assert_eq!(
        refused.to_string(),
        "leaf \"O=Latch tests, CN=SHA-1 leaf\" is refused: it is signed with sha1WithRSAEncryption; SHA-1 and MD5 signatures are refused"
    );
}

#[test]
fn a_chain_of_more_than_four_certificates_is_refused() {
    let mut parent = root(ca_params("root"));
    let bundle = vec![parent.der.clone()];
    let mut intermediates = Vec::new();
    for n in 1..=4 {
        let ca = intermediate(ca_params(&format!("intermediate {n}")), &parent);
        intermediates.insert(0, ca.der.clone());
        parent = ca;
    }
    let chain = [vec![leaf(leaf_params("leaf"), &parent)], intermediates].concat();
    assert_eq!(
        verify_svid(&chain, &bundle, TD, Role::Client, SystemTime::now()),
        Err(VerifyError::TooLong(5))
    );
    assert_eq!(
        verify_svid(&chain[..4], &bundle, TD, Role::Client, SystemTime::now())
            .expect_err("the chain is cut")
            .problem(),
        Some(&Problem::UnknownIssuer {
            issuer: "O=Latch tests, CN=intermediate 1".into()
        }),
        "four certificates are looked at, and anchored (here: not)"
    );
}

#[test]
fn svid_identity_reads_and_checks_a_leaf() {
    let root_ca = root(ca_params("root"));
    assert_eq!(
        svid_identity(&leaf(leaf_params("leaf"), &root_ca), TD),
        Ok(FRONTEND.to_owned())
    );
    let other =
        svid_identity(&leaf(leaf_params("leaf"), &root_ca), "other.domain").expect_err("domain");
    assert!(
        matches!(other.problem(), Some(Problem::TrustDomain { .. })),
        "{other}"
    );
    assert!(matches!(
        svid_identity(b"not a certificate", TD),
        Err(VerifyError::Parse {
            position: Position::Leaf,
            ..
        })
    ));
    let mut trailing = leaf(leaf_params("leaf"), &root_ca).to_vec();
    trailing.push(0);
    assert!(matches!(
        svid_identity(&trailing, TD),
        Err(VerifyError::Parse { reason, .. }) if reason.contains("1 bytes after")
    ));
}

/// An SVID to present in a handshake.
fn svid(spiffe_id: &str, chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Svid {
    let now = SystemTime::now();
    Svid {
        spiffe_id: spiffe_id.to_owned(),
        chain,
        key,
        serial: String::new(),
        not_before: now - HOUR,
        not_after: now + HOUR,
        issued_at: now,
    }
}

/// A real rustls handshake with the configurations of this module: a client certificate signed
/// with SHA-1 is refused by the server, and the error names it; the same leaf (same key, same
/// CA) signed with SHA-256 is accepted. Before the chain rules, the SHA-1 one was accepted too.
#[tokio::test]
async fn a_client_certificate_signed_with_sha1_fails_the_handshake() {
    let dev = dev_ca("sha1-handshake");
    let server = dev.mint(PAYMENT, HOUR).expect("server svid");
    let bundle = vec![dev.certificate().clone(), fixture("rsa-ca")];
    let key = || {
        PrivateKeyDer::from_pem_slice(include_bytes!("../testdata/leaf-key.pem")).expect("leaf key")
    };

    let good = svid(FRONTEND, vec![fixture("leaf-sha256")], key());
    let (client, server_saw) = handshake_sides(bundle.clone(), &good, &server, PAYMENT)
        .await
        .expect("handshake");
    assert_eq!(client, Ok(()));
    assert_eq!(server_saw, Ok(FRONTEND.to_owned()), "SHA-256: accepted");

    let sha1 = svid(FRONTEND, vec![fixture("leaf-sha1")], key());
    let (_, server_saw) = handshake_sides(bundle, &sha1, &server, PAYMENT)
        .await
        .expect("handshake");
    let refused = server_saw.expect_err("SHA-1: the server refuses the client");
    assert!(
        refused.starts_with("server: invalid peer certificate")
            && refused.contains(r#"leaf "O=Latch tests, CN=SHA-1 leaf" is refused"#)
            && refused.contains("sha1WithRSAEncryption"),
        "{refused}"
    );
}

/// A real rustls handshake: a server certificate whose extendedKeyUsage is clientAuth only is
/// refused by the client; with serverAuth it is accepted.
#[tokio::test]
async fn a_server_certificate_for_clients_only_fails_the_handshake() {
    let dev = dev_ca("eku-handshake");
    let client = dev.mint(FRONTEND, HOUR).expect("client svid");
    let root_ca = root(ca_params("root"));
    let bundle = vec![dev.certificate().clone(), root_ca.der.clone()];
    for (purpose, accepted) in [(Eku::ServerAuth, true), (Eku::ClientAuth, false)] {
        let mut params = leaf_params("payment");
        params.subject_alt_names = vec![SanType::URI(PAYMENT.try_into().expect("URI"))];
        params.extended_key_usages = vec![purpose.clone()];
        let key = key();
        let der = params.signed_by(&key, &root_ca.issuer).expect("signed");
        let server = svid(
            PAYMENT,
            vec![der.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        );
        let (client_saw, server_saw) = handshake_sides(bundle.clone(), &client, &server, PAYMENT)
            .await
            .expect("handshake");
        if accepted {
            assert_eq!(client_saw, Ok(()), "{purpose:?}");
            assert_eq!(server_saw, Ok(FRONTEND.to_owned()), "{purpose:?}");
        } else {
            let refused = client_saw.expect_err("clientAuth only: the client refuses the server");
            assert!(
                refused.starts_with("client: invalid peer certificate")
                    && refused.contains("lacks serverAuth"),
                "{refused}"
            );
            assert!(server_saw.is_err(), "the server sees the handshake fail");
        }
    }
}

mod no_panic {
    //! The byte-level entry points (fuzz targets' too) on arbitrary and on mutated input.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_never_an_identity(
            chain in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..5),
            bundle in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..3),
        ) {
            prop_assert!(verify_svid(&chain, &bundle, TD, Role::Client, SystemTime::now()).is_err());
            for der in &chain {
                prop_assert!(svid_identity(der, TD).is_err());
            }
        }

        #[test]
        fn a_mutated_chain_proves_nothing_else(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (chain, bundle) = MUTATED.with(|c| c.clone());
            let mut leaf = chain[0].to_vec();
            let at = index.index(leaf.len());
            leaf[at] = byte;
            let mutated = [CertificateDer::from(leaf), chain[1].clone()];
            // Only a change outside what the intermediate signed can still verify.
            if let Ok(id) = verify_svid(&mutated, &bundle, TD, Role::Client, SystemTime::now()) {
                prop_assert_eq!(id, FRONTEND);
            }
        }
    }

    thread_local! {
        static MUTATED: (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) = {
            let root_ca = root(ca_params("root"));
            let inter = intermediate(ca_params("intermediate"), &root_ca);
            (vec![leaf(leaf_params("leaf"), &inter), inter.der], vec![root_ca.der])
        };
    }
}
