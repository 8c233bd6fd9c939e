//! The fuzz targets' code ([`TARGETS`]): one function per target, each feeding the fuzzer's bytes
//! to a parser of outside input and asserting what must hold of its answer (a failed property
//! panics, naming what broke). The `fuzz/` crate calls them, and so does
//! `agent/tests/fuzz_corpus.rs`, which replays every committed input on stable. See
//! `docs/fuzzing.md`.

use std::{
    net::SocketAddr,
    path::Path,
    sync::LazyLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    config::{Config, ConfigError},
    identity::{SpiffeId, spiffe::MAX_ID_LEN},
    policy::{
        Connection, ConnectionDecision, HttpRequest, PolicyError, PolicySet, Target as Workload,
        normalize::{PathNormalization, normalize_path},
    },
    tls::{Role, peer_identity, svid_identity, verify_svid},
    tunnel::{forwarded, request_head},
};

/// A target's function: the fuzzer's bytes in, a panic if a property fails.
pub type Target = fn(&[u8]);

/// Every target, by name, with its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("policy", policy),
    ("config", config),
    ("spiffe_id", spiffe_id),
    ("certificate", certificate),
    ("request_head", request_head),
    ("forwarded", forwarded),
    ("normalize_path", normalize),
];

/// The function of the target named `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

const TRUST_DOMAIN: &str = "cluster.local";

/// Policy files (`AuthorizationPolicy`, `PeerAuthentication`, multi-document YAML): a set or
/// errors, each naming the file and pointing inside it; a set answers for every namespace its
/// policies name, on every path.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    match PolicySet::from_yaml(&[(file, text)], "istio-system") {
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused policy file says why");
            let lines = yaml_lines(text);
            for error in &errors {
                assert_eq!(error.file(), file, "{error}");
                assert!(error.to_string().starts_with("fuzz.yaml"), "{error}");
                if let (PolicyError::Invalid { .. }, Some(line)) = (error, error.line()) {
                    assert!(
                        (1..=lines + 1).contains(&line),
                        "{error}: line {line} is not in the file's {lines} lines"
                    );
                }
            }
        }
        Ok(set) => {
            let summaries = set.summaries();
            assert_eq!(summaries.len(), set.len());
            let counted: usize = set
                .files()
                .iter()
                .map(|f| f.authorization_policies + f.peer_authentications)
                .sum();
            assert_eq!(counted, set.len(), "the file summary counts every policy");
            for summary in &summaries {
                let target = Workload {
                    namespace: &summary.namespace,
                    labels: &summary.selector,
                };
                decide(&set, &target);
            }
        }
    }
}

/// The most lines a YAML parser can count in `text` (its positions are in these): libyaml, under
/// serde_yaml_ng, ends a line at LF, CRLF, a lone CR, NEL, LS and PS (YAML 1.1 §4.1.4).
fn yaml_lines(text: &str) -> usize {
    let mut chars = text.chars().peekable();
    let mut breaks = 0;
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => breaks += 1,
            '\r' => {
                chars.next_if_eq(&'\n');
                breaks += 1;
            }
            _ => {}
        }
    }
    breaks + 1
}

/// Every question the data path asks, for one target: never a panic, and the same answer twice.
fn decide(set: &PolicySet, target: &Workload) {
    let principal = format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/default", target.namespace);
    for source_principal in [None, Some(principal.as_str())] {
        let conn = Connection {
            source_principal,
            source_ip: Some([10, 244, 1, 2].into()),
            destination_ip: [10, 244, 2, 3].into(),
            destination_port: 8080,
        };
        let first = set.evaluate_connection(target, &conn);
        assert_eq!(
            first,
            set.evaluate_connection(target, &conn),
            "deterministic"
        );
        if let ConnectionDecision::NeedsHttp { .. } = first {
            for path in ["/", "/admin", "/api/v1/x"] {
                let request = HttpRequest {
                    method: "GET",
                    path,
                    host: "payment",
                    headers: crate::policy::no_headers(),
                    auth: None,
                };
                set.evaluate_request(target, &conn, &request);
            }
            set.evaluate_tcp(target, &conn);
        }
        let explained = set.explain(target, &conn, None);
        assert_eq!(explained.encrypted, explained.traffic.encrypted());
        set.has_l7_for(target, 8080);
        set.port_sensitive(target);
    }
}

/// The agent's config file: a config, or an error naming the file and a line inside it; a
/// config that loads holds what validation promises.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    match Config::from_yaml(file, text) {
        Err(error) => {
            assert!(error.to_string().starts_with("fuzz.yaml"), "{error}");
            if let (ConfigError::Invalid { .. }, Some(line)) = (&error, error.line()) {
                let lines = yaml_lines(text);
                assert!(
                    (1..=lines + 1).contains(&line),
                    "{error}: line {line} is not in the file's {lines} lines"
                );
            }
        }
        Ok(config) => {
            let p = &config.ports;
            assert!(p.capture != p.inbound && p.capture != p.tunnel && p.inbound != p.tunnel);
            assert!(!config.dataplane.verdict_ttl.is_zero());
            assert!(config.dataplane.verdict_ttl <= Duration::from_secs(24 * 3600));
            for (ns, sa) in config
                .workloads
                .iter()
                .map(|w| (&w.namespace, &w.service_account))
                .chain(
                    config
                        .peers
                        .iter()
                        .map(|p| (&p.namespace, &p.service_account)),
                )
            {
                let id = format!("spiffe://{}/ns/{ns}/sa/{sa}", config.trust_domain);
                let parsed = SpiffeId::parse(&id)
                    .unwrap_or_else(|e| panic!("a loaded config names an invalid identity: {e}"));
                assert_eq!(parsed.kubernetes(), Some((ns.as_str(), sa.as_str())));
            }
            for w in &config.workloads {
                assert!(w.cgroup.starts_with(&config.cgroup_root) && !w.ips.is_empty());
            }
        }
    }
}

/// A SPIFFE ID (a URI SAN, a policy principal): what parses prints back as itself, and parses
/// again to the same ID.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = SpiffeId::parse(text) else {
        return;
    };
    let printed = id.to_string();
    assert_eq!(printed, text, "an ID prints as it was written");
    assert_eq!(
        SpiffeId::parse(&printed).as_ref(),
        Ok(&id),
        "and parses back"
    );
    assert!(text.is_ascii() && text.len() <= MAX_ID_LEN, "{text:?}");
    assert!(!id.trust_domain().is_empty());
    assert!(id.path().is_empty() || id.path().starts_with('/'));
    if let Some((ns, sa)) = id.kubernetes() {
        assert!(!ns.is_empty() && !sa.is_empty());
        assert_eq!(id.path(), format!("/ns/{ns}/sa/{sa}"));
    }
}

/// The trust bundle the certificate target verifies against: the CAs of the TLS table tests
/// (one of them signed `leaf-sha256.pem`) and the fuzzing CA (`fuzzing/`), which signed the
/// intermediate and the leaf of the seeds' two-certificate chain.
static BUNDLE: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    [
        include_str!("tls/testdata/rsa-ca.pem"),
        include_str!("tls/testdata/ec-ca.pem"),
        include_str!("tls/testdata/rsa1024-ca.pem"),
        include_str!("tls/testdata/sha1-ca.pem"),
        include_str!("fuzzing/root.pem"),
    ]
    .iter()
    .filter_map(|text| pem::parse(text).ok())
    .map(pem::Pem::into_contents)
    .collect()
});

/// A fixed time, inside every test certificate's validity, so that a replay decides as the
/// fuzzer did.
fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_524_608_000) // 2050-01-01
}

/// A peer's certificate chain, the fuzzer's bytes cut into DER elements (leaf first): the SPIFFE
/// ID of the leaf and the verdict of the chain against the fixed bundle agree, and nothing
/// verifies without a bundle.
pub fn certificate(data: &[u8]) {
    let chain = der_elements(data);
    let Some(leaf) = chain.first() else {
        return;
    };
    let identity = svid_identity(leaf, TRUST_DOMAIN);
    if let Ok(id) = &identity {
        let parsed = SpiffeId::parse(id).expect("an SVID's identity is a SPIFFE ID");
        assert_eq!(parsed.trust_domain(), TRUST_DOMAIN);
        assert!(!parsed.path().is_empty());
    }
    for role in [Role::Client, Role::Server] {
        if let Ok(id) = verify_svid(&chain, &BUNDLE, TRUST_DOMAIN, role, at()) {
            assert_eq!(identity.as_ref(), Ok(&id), "verified as {role:?}");
            let der = rustls::pki_types::CertificateDer::from(*leaf);
            assert_eq!(
                peer_identity(&[der]).map(|p| p.to_string()),
                Some(id.clone())
            );
            let no_bundle: &[&[u8]] = &[];
            assert!(
                verify_svid(&chain, no_bundle, TRUST_DOMAIN, role, at()).is_err(),
                "a chain verified without any trust anchor"
            );
        }
    }
}

/// `data` cut into its top-level DER elements by their lengths (short and long form); what is
/// left over, or does not fit, is the last element.
fn der_elements(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = der_len(data)
            .filter(|&n| n <= data.len())
            .unwrap_or(data.len());
        let (element, rest) = data.split_at(len);
        out.push(element);
        data = rest;
    }
    out
}

/// The whole length (tag, length and contents) of the DER element `data` starts with.
fn der_len(data: &[u8]) -> Option<usize> {
    let first = usize::from(*data.get(1)?);
    if first < 0x80 {
        return Some(2 + first);
    }
    let count = first & 0x7f;
    if count == 0 || count > 4 {
        return None;
    }
    let bytes = data.get(2..2 + count)?;
    let len = bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
    (2 + count).checked_add(len)
}

/// The path normalisation modes, the first byte of some targets' input choosing one.
const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

/// An HTTP/1.1 request head as a client inside a carried connection sends it (the first byte
/// picks the path normalisation): after [`request_head::prepare`], the application receives
/// exactly the path and host policy judged.
pub fn request_head(data: &[u8]) {
    let Some((&mode, head)) = data.split_first() else {
        return;
    };
    let mode = MODES[usize::from(mode) % MODES.len()];
    let Some(mut request) = parse_head(head) else {
        return;
    };
    let connect = request.method() == hyper::Method::CONNECT;
    let before = request.uri().clone();
    let Ok(judged) = request_head::prepare(&mut request, mode) else {
        return;
    };
    let hosts: Vec<_> = request
        .headers()
        .get_all(hyper::header::HOST)
        .iter()
        .collect();
    assert!(hosts.len() <= 1, "one Host header at most");
    let host = hosts.first().and_then(|h| h.to_str().ok()).unwrap_or("");
    assert_eq!(
        request_head::strip_port(host),
        judged.host,
        "the application's Host is the one judged"
    );
    assert_eq!(judged.method, request.method().as_str());
    if connect {
        return;
    }
    let uri = request.uri();
    if judged.path == "*" {
        assert_eq!(uri.path(), "*");
        return;
    }
    assert_eq!(
        uri.path(),
        judged.path,
        "the application's path is the one judged"
    );
    assert_eq!(
        uri.query(),
        before.query(),
        "the query is passed on untouched"
    );
    if mode != PathNormalization::None {
        assert!(uri.authority().is_none(), "forwarded in origin form: {uri}");
        assert_eq!(
            normalize_path(&judged.path, mode).as_ref(),
            Ok(&judged.path),
            "the judged path is normalised"
        );
    }
}

/// The bytes as a request head, the way hyper's HTTP/1.1 server reads one (it parses with
/// httparse, then builds the request).
fn parse_head(head: &[u8]) -> Option<hyper::Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(head).ok()?;
    let mut builder = hyper::Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .version(match parsed.version? {
            0 => hyper::Version::HTTP_10,
            _ => hyper::Version::HTTP_11,
        });
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    builder.body(()).ok()
}

/// The `Forwarded` header of an HBONE `CONNECT` (which pod a pooled tunnel's stream carries):
/// an address, or an error; what the client writes for that address reads back as it.
pub fn forwarded(data: &[u8]) {
    let Ok(value) = hyper::header::HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(client) = forwarded::parse(&value) {
        let written = forwarded::header(client);
        assert_eq!(forwarded::parse(&written), Ok(client), "{written:?}");
        // Only from a `for` parameter (its name matched without case, blanks around it ignored)
        // of the first element.
        if let Ok(text) = value.to_str() {
            let first = text.split(',').next().unwrap_or_default();
            assert!(
                first
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .any(|(name, _)| name.trim().eq_ignore_ascii_case("for")),
                "an address from an element without a for parameter: {text:?}"
            );
        }
    }
    // The CONNECT target: an authority the server reads as a socket address.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(addr) = text.parse::<SocketAddr>()
    {
        assert_eq!(addr.to_string().parse::<SocketAddr>(), Ok(addr));
    }
}

/// A request path in every mode: refused with a reason, or normalised to a path that is its own
/// normalisation, starts with `/`, holds no dot segment, is ASCII, and (merging) has no `//`.
pub fn normalize(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for mode in MODES {
        let Ok(once) = normalize_path(path, mode) else {
            continue;
        };
        if mode == PathNormalization::None {
            assert_eq!(once, path, "NONE changes nothing");
            continue;
        }
        assert_eq!(
            normalize_path(&once, mode).as_ref(),
            Ok(&once),
            "{mode}: normalising {path:?} twice"
        );
        assert!(once.starts_with('/'), "{mode}: {once:?}");
        assert!(
            once.split('/').all(|s| s != "." && s != ".."),
            "{mode}: a dot segment left in {once:?}"
        );
        assert!(once.is_ascii(), "{mode}: {once:?}");
        assert!(!once.contains('\\'), "{mode}: a backslash left in {once:?}");
        if mode != PathNormalization::Base {
            assert!(!once.contains("//"), "{mode}: {once:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_elements_split_on_lengths() {
        let data = [
            0x30, 0x01, 0xaa, 0x30, 0x81, 0x02, 0xbb, 0xcc, 0x30, 0x05, 0xdd,
        ];
        assert_eq!(
            der_elements(&data),
            vec![&data[..3], &data[3..8], &data[8..]],
            "short form, long form, and a truncated last one"
        );
        assert_eq!(der_elements(&[]), Vec::<&[u8]>::new());
        assert_eq!(der_elements(&[0x30]), vec![&[0x30][..]]);
    }

    #[test]
    fn yaml_counts_lone_carriage_returns_and_unicode_separators_as_lines() {
        // Found by fuzzing `config`: YAML reports positions in lines that a lone CR, or a NEL, LS
        // or PS, ends.
        assert_eq!(yaml_lines("a"), 1);
        assert_eq!(yaml_lines("a\nb\r\nc\rd\r"), 5);
        assert_eq!(yaml_lines("a\u{85}b\u{2028}c\u{2029}"), 4);
        config(b"\r\rno*tDomaitDmnfh\n");
        config(include_bytes!(
            "../../fuzz/regressions/config/line-separator"
        ));
    }

    #[test]
    fn the_bundle_holds_every_ca() {
        assert_eq!(BUNDLE.len(), 5);
    }

    #[test]
    fn a_good_chain_verifies_through_the_target() {
        let leaf = pem::parse(include_str!("tls/testdata/leaf-sha256.pem")).expect("pem");
        let id = verify_svid(
            &[leaf.contents()],
            &BUNDLE,
            TRUST_DOMAIN,
            Role::Client,
            at(),
        )
        .expect("the seed chain verifies");
        assert_eq!(id, "spiffe://cluster.local/ns/prod/sa/frontend");
        certificate(leaf.contents());
    }

    #[test]
    fn the_seed_chain_verifies_through_the_target() {
        let chain = include_bytes!("../../fuzz/seeds/certificate/chain-p256");
        let elements = der_elements(chain);
        assert_eq!(elements.len(), 2, "leaf and intermediate");
        let id = verify_svid(&elements, &BUNDLE, TRUST_DOMAIN, Role::Server, at())
            .expect("the seed chain verifies");
        assert_eq!(id, "spiffe://cluster.local/ns/prod/sa/payment");
        certificate(chain);
    }
}
