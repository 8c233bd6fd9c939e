//! Checks one `PolicyTest` document ([`super::model`]) into a [`Suite`]: workloads with their
//! SPIFFE IDs, and cases whose sources and destinations are resolved, their requests built as
//! the agent would see them ([`super::request`]). Every problem of the document is reported,
//! each at its field.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use super::{
    document::Doc,
    error::TestFileError,
    model,
    request::{self, Request},
};
use crate::{
    identity::SpiffeId,
    policy::{
        MtlsMode,
        load::{POLICY_TEST_GROUP, POLICY_TEST_KIND},
        normalize::PathNormalization,
    },
};

/// The only version of the format.
pub const API_VERSION: &str = "test.latch.dev/v1";
/// The agent config's defaults, which a test inherits unless it says otherwise.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// A checked test document: the policies to load, how to load them, and the cases.
#[derive(Debug, Clone)]
pub struct Suite {
    pub file: PathBuf,
    /// The document's first line in the file.
    pub line: usize,
    pub name: String,
    pub policies: Vec<PathBuf>,
    /// Where `spec.policies` is written (else the document's first line).
    pub policies_line: usize,
    pub root_namespace: String,
    pub mtls_mode: MtlsMode,
    pub workloads: Vec<Workload>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// One expected decision.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub line: usize,
    /// The source's SPIFFE ID, `None` for plaintext.
    pub source: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// Index into [`Suite::workloads`].
    pub destination: usize,
    pub destination_ip: IpAddr,
    pub port: u16,
    pub request: Option<Request>,
    pub expect_allow: bool,
    pub decided_by: Option<Decider>,
    pub rule: Option<usize>,
    /// The expected shadow decision of the dry-run policies (`expectDryRun`).
    pub expect_dry_run: Option<bool>,
}

/// Who a case expects to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// No policy: allowed because no ALLOW policy applies, denied because ALLOW policies apply
    /// and none matched, or plaintext refused by the default mTLS mode.
    Default,
    /// The AuthorizationPolicy or PeerAuthentication `namespace/name`.
    Policy { namespace: String, name: String },
}

impl std::fmt::Display for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Policy { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// Check `doc`, a `PolicyTest` document of `doc.file`.
pub fn build(doc: &Doc) -> Result<Suite, Vec<TestFileError>> {
    if let Some(error) = doc.syntax_error() {
        return Err(vec![error]);
    }
    let raw: model::PolicyTestDoc = doc.parse().map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    if raw.api_version != API_VERSION {
        errors.push(doc.error(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?} (expected {API_VERSION})",
                raw.api_version
            ),
        ));
    }
    if raw.kind != POLICY_TEST_KIND {
        errors.push(doc.error(
            "kind",
            format!(
                "unsupported kind {:?} (expected {POLICY_TEST_KIND} of {POLICY_TEST_GROUP})",
                raw.kind
            ),
        ));
    }
    let spec = &raw.spec;
    let trust_domain = spec.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN);
    let trust_domain_ok = match SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/a/sa/b")) {
        Ok(_) => true,
        Err(e) => {
            errors.push(doc.error(
                "spec.trustDomain",
                format!("{trust_domain:?} is not a trust domain: {e}"),
            ));
            false
        }
    };
    let root_namespace = spec
        .root_namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_owned());
    if root_namespace.is_empty() {
        errors.push(doc.error("spec.rootNamespace", "must not be empty"));
    }
    // Relative to the test file (a bare file name's directory is the working directory).
    let base = doc.file.parent().unwrap_or(Path::new(""));
    let policies = match &spec.policies {
        None if base.as_os_str().is_empty() => vec![PathBuf::from(".")],
        None => vec![base.to_owned()],
        Some(list) if list.is_empty() => {
            errors.push(doc.error(
                "spec.policies",
                "is empty: name policy files or directories, or leave it out for the test \
                 file's directory",
            ));
            Vec::new()
        }
        Some(list) => list.iter().map(|p| base.join(p)).collect(),
    };

    let workloads = Workloads::check(
        doc,
        &spec.workloads,
        (trust_domain, trust_domain_ok),
        &mut errors,
    );
    let resolver = Resolver {
        doc,
        workloads: &workloads,
        normalization: spec.path_normalization.unwrap_or_default(),
    };
    if spec.cases.is_empty() {
        errors.push(doc.error("spec.cases", "no cases: a test needs at least one"));
    }
    let cases: Vec<Case> = spec
        .cases
        .iter()
        .enumerate()
        .filter_map(|(i, case)| match resolver.case(i, case) {
            Ok(case) => Some(case),
            Err(mut found) => {
                errors.append(&mut found);
                None
            }
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let first_line = doc.offset + 1;
    Ok(Suite {
        file: doc.file.to_owned(),
        line: doc.line_of("apiVersion").unwrap_or(first_line),
        name: raw.metadata.name.clone().unwrap_or_else(|| {
            doc.file
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
        }),
        policies,
        policies_line: doc.line_of("spec.policies").unwrap_or(first_line),
        root_namespace,
        mtls_mode: spec.mtls_mode.unwrap_or(MtlsMode::Permissive),
        workloads: workloads.list,
        cases,
    })
}

/// The checked workloads, by name and by address.
struct Workloads {
    list: Vec<Workload>,
    /// Name to (index in `list`, SPIFFE ID, first address).
    by_name: HashMap<String, (usize, String, IpAddr)>,
    /// Address to index in `list`.
    by_ip: HashMap<IpAddr, usize>,
}

impl Workloads {
    fn check(
        doc: &Doc,
        raw: &[model::Workload],
        (trust_domain, trust_domain_ok): (&str, bool),
        errors: &mut Vec<TestFileError>,
    ) -> Self {
        let mut found = Self {
            list: Vec::new(),
            by_name: HashMap::new(),
            by_ip: HashMap::new(),
        };
        for (i, w) in raw.iter().enumerate() {
            let at = |field: &str| format!("spec.workloads[{i}].{field}");
            let before = errors.len();
            if w.name.is_empty() || w.name == PLAINTEXT || w.name.starts_with(SPIFFE_SCHEME) {
                errors.push(doc.error(
                    &at("name"),
                    format!(
                        "{:?} cannot name a workload (empty, {PLAINTEXT:?} or a SPIFFE ID)",
                        w.name
                    ),
                ));
            } else if found.by_name.contains_key(&w.name) {
                errors.push(doc.error(&at("name"), format!("{:?} is already defined", w.name)));
            }
            if w.namespace.is_empty() {
                errors.push(doc.error(&at("namespace"), "must not be empty"));
            }
            let service_account = w.service_account.as_deref().unwrap_or("default");
            let id = format!(
                "spiffe://{trust_domain}/ns/{}/sa/{service_account}",
                w.namespace
            );
            if let Err(e) = SpiffeId::parse(&id)
                && trust_domain_ok
            {
                errors.push(doc.error(
                    &at("serviceAccount"),
                    format!("the workload's SPIFFE ID {id:?} is invalid: {e}"),
                ));
            }
            let Some(&first) = w.ips.first() else {
                errors.push(doc.error(
                    &at("ips"),
                    "at least one address: the first is the workload's address",
                ));
                continue;
            };
            for (j, ip) in w.ips.iter().enumerate() {
                let ip = ip.to_canonical();
                if let Some(&other) = found.by_ip.get(&ip) {
                    errors.push(doc.error(
                        &at(&format!("ips[{j}]")),
                        format!(
                            "{ip} is already the address of {:?}",
                            found.list[other].name
                        ),
                    ));
                }
            }
            if errors.len() > before {
                continue;
            }
            let index = found.list.len();
            for ip in &w.ips {
                found.by_ip.insert(ip.to_canonical(), index);
            }
            found
                .by_name
                .insert(w.name.clone(), (index, id, first.to_canonical()));
            found.list.push(Workload {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
            });
        }
        found
    }
}

const PLAINTEXT: &str = "plaintext";
const SPIFFE_SCHEME: &str = "spiffe://";

/// Resolves the cases of one document against its workloads.
struct Resolver<'a> {
    doc: &'a Doc<'a>,
    workloads: &'a Workloads,
    normalization: PathNormalization,
}

impl Resolver<'_> {
    fn case(&self, i: usize, raw: &model::Case) -> Result<Case, Vec<TestFileError>> {
        let at = |field: &str| format!("spec.cases[{i}].{field}");
        let mut errors = Vec::new();
        if raw.name.trim().is_empty() {
            errors.push(self.doc.error(&at("name"), "must not be empty"));
        }
        let (source, default_ip) = match self.source(&raw.from) {
            Ok(found) => found,
            Err(why) => {
                errors.push(self.doc.error(&at("from"), why));
                (None, None)
            }
        };
        let destination = self
            .destination(&raw.to)
            .map_err(|why| errors.push(self.doc.error(&at("to"), why)));
        let request = match &raw.request {
            None => None,
            Some(r) => match request::build(self.doc, i, r, self.normalization) {
                Ok(r) => Some(r),
                Err(mut found) => {
                    errors.append(&mut found);
                    None
                }
            },
        };
        let decided_by = match raw.decided_by.as_deref().map(decider) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(why)) => {
                errors.push(self.doc.error(&at("decidedBy"), why));
                None
            }
        };
        match destination {
            Ok((destination, destination_ip, port)) if errors.is_empty() => Ok(Case {
                name: raw.name.clone(),
                line: self
                    .doc
                    .line_of(&format!("spec.cases[{i}]"))
                    .unwrap_or(self.doc.offset + 1),
                source,
                source_ip: raw.source_ip.map(|ip| ip.to_canonical()).or(default_ip),
                destination,
                destination_ip,
                port,
                request,
                expect_allow: raw.expect == model::Expect::Allow,
                decided_by,
                rule: raw.rule,
                expect_dry_run: raw.expect_dry_run.map(|e| e == model::Expect::Allow),
            }),
            _ => Err(errors),
        }
    }

    /// The SPIFFE ID (`None` for plaintext) and default source address of `from`.
    fn source(&self, from: &str) -> Result<(Option<String>, Option<IpAddr>), String> {
        if from == PLAINTEXT {
            return Ok((None, None));
        }
        if from.starts_with(SPIFFE_SCHEME) {
            return SpiffeId::parse(from)
                .map(|_| (Some(from.to_owned()), None))
                .map_err(|e| format!("{from:?} is not a valid SPIFFE ID: {e}"));
        }
        match self.workloads.by_name.get(from) {
            Some((_, id, ip)) => Ok((Some(id.clone()), Some(*ip))),
            None => Err(format!(
                "{from:?} is not a workload of spec.workloads, a SPIFFE ID (spiffe://...) or \
                 {PLAINTEXT:?}"
            )),
        }
    }

    /// The workload, address and port of `to`.
    fn destination(&self, to: &str) -> Result<(usize, IpAddr, u16), String> {
        if let Ok(address) = to.parse::<SocketAddr>() {
            let ip = address.ip().to_canonical();
            let Some(&index) = self.workloads.by_ip.get(&ip) else {
                return Err(format!(
                    "no workload of spec.workloads has the address {ip}"
                ));
            };
            return Ok((index, ip, port(address.port())?));
        }
        let Some((name, port_text)) = to.rsplit_once(':') else {
            return Err(format!(
                "{to:?}: expected WORKLOAD:PORT or IP:PORT (for example payment:8080)"
            ));
        };
        let number = port_text
            .parse::<u16>()
            .map_err(|_| format!("{port_text:?} is not a port (1-65535)"))?;
        match self.workloads.by_name.get(name) {
            Some(&(index, _, ip)) => Ok((index, ip, port(number)?)),
            None => Err(format!("{name:?} is not a workload of spec.workloads")),
        }
    }
}

fn port(number: u16) -> Result<u16, String> {
    if number == 0 {
        Err("port 0 is not a port (1-65535)".to_owned())
    } else {
        Ok(number)
    }
}

/// `default`, or `namespace/name`.
fn decider(text: &str) -> Result<Decider, String> {
    if text == "default" {
        return Ok(Decider::Default);
    }
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(Decider::Policy {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!(
            "{text:?}: expected NAMESPACE/NAME of the deciding policy, or \"default\" when no \
             policy decides"
        )),
    }
}
