//! Property: on random policy sets and random connections, the indexed engine agrees with the
//! [`crate::policy::reference`] evaluator for HTTP requests and plain TCP, and it only answers
//! a connection without `NeedsHttp` when every request (and plain TCP) gets that answer.
//!
//! Policies and requests are drawn from small alphabets (so that they often match) by a
//! generator seeded by proptest; a failure prints the policy YAML and the request.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use proptest::prelude::*;

use crate::policy::{
    Connection, ConnectionDecision, HttpRequest, PolicySet, Target,
    model::{
        AuthorizationPolicyDoc, AuthorizationPolicySpec, Condition, From, ObjectMeta, Operation,
        Rule, Scalar, Source, To, WorkloadSelector,
    },
    reference,
};

const NAMESPACES: &[&str] = &["istio-system", "a", "b"];
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/s1",
    "cluster.local/ns/b/*",
    "*/sa/s1",
    "*",
];
const NS_PATTERNS: &[&str] = &["a", "b", "*", "a*", "*b"];
const BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3",
    "fd00::/8",
    "::ffff:10.1.2.3",
];
const PORTS: &[&str] = &["80", "8080"];
const METHODS: &[&str] = &["GET", "POST", "*"];
const PATHS: &[&str] = &["/api/*", "*/x", "/health"];
const HOSTS: &[&str] = &["a.com", "*.com", "B.COM"];

const SOURCES: &[Option<&str>] = &[
    None,
    Some("spiffe://cluster.local/ns/a/sa/s1"),
    Some("spiffe://cluster.local/ns/b/sa/s2"),
    Some("spiffe://cluster.local/ns/a/sa/s3"),
];
const SOURCE_IPS: &[&str] = &[
    "10.1.2.3",
    "10.2.0.1",
    "192.168.0.1",
    "::ffff:10.1.2.3",
    "fd00::1",
];
const DEST_IPS: &[&str] = &["10.1.2.3", "fd00::9"];
const REQ_METHODS: &[&str] = &["GET", "POST", "PUT"];
const REQ_PATHS: &[&str] = &["/api/v1", "/health", "/a/x", "/health?q=1"];
const REQ_HOSTS: &[&str] = &["a.com", "b.com", "x.org"];

/// SplitMix64.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn list(&mut self, xs: &[&str], percent: u64) -> Option<Vec<String>> {
        self.chance(percent).then(|| {
            (0..1 + self.below(2))
                .map(|_| self.pick(xs).to_owned())
                .collect()
        })
    }
    fn ports(&mut self, percent: u64) -> Option<Vec<Scalar>> {
        self.list(PORTS, percent)
            .map(|v| v.into_iter().map(Scalar).collect())
    }
    fn labels(&mut self, max: usize) -> BTreeMap<String, String> {
        (0..self.below(max + 1))
            .map(|_| {
                (
                    self.pick(&["app", "tier"]).to_owned(),
                    self.pick(&["x", "y"]).to_owned(),
                )
            })
            .collect()
    }

    fn source(&mut self) -> Source {
        let mut s = Source {
            principals: self.list(PRINCIPALS, 30),
            not_principals: self.list(PRINCIPALS, 20),
            namespaces: self.list(NS_PATTERNS, 30),
            not_namespaces: self.list(NS_PATTERNS, 20),
            ip_blocks: self.list(BLOCKS, 15),
            not_ip_blocks: self.list(BLOCKS, 10),
            ..Source::default()
        };
        if s == Source::default() {
            s.namespaces = Some(vec![self.pick(NS_PATTERNS).to_owned()]);
        }
        s
    }

    fn operation(&mut self) -> Operation {
        let mut o = Operation {
            ports: self.ports(35),
            not_ports: self.ports(15),
            methods: self.list(METHODS, 25),
            not_methods: self.list(METHODS, 10),
            paths: self.list(PATHS, 20),
            not_paths: self.list(PATHS, 10),
            hosts: self.list(HOSTS, 15),
            not_hosts: self.list(HOSTS, 10),
        };
        if o == Operation::default() {
            o.ports = Some(vec![Scalar(self.pick(PORTS).to_owned())]);
        }
        o
    }

    fn condition(&mut self) -> Condition {
        let key = self.pick(&[
            "source.ip",
            "destination.ip",
            "source.namespace",
            "source.principal",
            "destination.port",
        ]);
        let alphabet = match key {
            "source.ip" | "destination.ip" => BLOCKS,
            "source.namespace" => NS_PATTERNS,
            "source.principal" => PRINCIPALS,
            _ => PORTS,
        };
        let scalars = |v: Option<Vec<String>>| v.map(|v| v.into_iter().map(Scalar).collect());
        let mut values = scalars(self.list(alphabet, 70));
        let not_values = scalars(self.list(alphabet, 40));
        if values.is_none() && not_values.is_none() {
            values = Some(vec![Scalar(self.pick(alphabet).to_owned())]);
        }
        Condition {
            key: key.to_owned(),
            values,
            not_values,
        }
    }

    fn rule(&mut self) -> Rule {
        let n = |g: &mut Self, percent| g.chance(percent).then(|| 1 + g.below(2));
        Rule {
            from: n(self, 50).map(|k| {
                (0..k)
                    .map(|_| From {
                        source: Some(self.source()),
                    })
                    .collect()
            }),
            to: n(self, 50).map(|k| {
                (0..k)
                    .map(|_| To {
                        operation: Some(self.operation()),
                    })
                    .collect()
            }),
            when: n(self, 25).map(|k| (0..k).map(|_| self.condition()).collect()),
        }
    }

    fn policy(&mut self, i: usize) -> AuthorizationPolicyDoc {
        let action = self.pick(&[
            None,
            Some("ALLOW"),
            Some("ALLOW"),
            Some("DENY"),
            Some("DENY"),
            Some("AUDIT"),
        ]);
        let selector = self.chance(40).then(|| WorkloadSelector {
            match_labels: Some(self.labels(2)),
        });
        let rules = self
            .chance(85)
            .then(|| (0..self.below(4)).map(|_| self.rule()).collect());
        AuthorizationPolicyDoc {
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            metadata: ObjectMeta {
                name: format!("p{i}"),
                namespace: Some(self.pick(NAMESPACES).to_owned()),
                ..ObjectMeta::default()
            },
            spec: AuthorizationPolicySpec {
                selector,
                action: action.map(str::to_owned),
                rules,
                ..AuthorizationPolicySpec::default()
            },
            status: None,
        }
    }
}

fn agree(seed: u64) -> Result<(), TestCaseError> {
    let mut g = Gen(seed);
    let policies: Vec<AuthorizationPolicyDoc> = (0..1 + g.below(6)).map(|i| g.policy(i)).collect();
    let text = policies
        .iter()
        .map(|p| serde_yaml_ng::to_string(p).expect("serializable"))
        .collect::<Vec<_>>()
        .join("---\n");
    let set = PolicySet::from_yaml(&[(Path::new("gen.yaml"), &text)], "istio-system")
        .map_err(|e| TestCaseError::fail(format!("{text}\n{e:?}")))?;
    for _ in 0..8 {
        let namespace = g.pick(NAMESPACES);
        let labels = g.labels(2);
        let principal = g.pick(SOURCES);
        let source_ip: IpAddr = g.pick(SOURCE_IPS).parse().expect("ip");
        let destination_ip: IpAddr = g.pick(DEST_IPS).parse().expect("ip");
        let port = g.pick(&[80, 8080, 9090]);
        let target = Target {
            namespace,
            labels: &labels,
        };
        let conn = Connection {
            source_principal: principal,
            source_ip: Some(source_ip),
            destination_ip,
            destination_port: port,
        };
        let reference = |http| {
            reference::allowed(
                &policies,
                "istio-system",
                &reference::Request {
                    namespace,
                    labels: &labels,
                    principal,
                    source_ip: Some(source_ip),
                    destination_ip,
                    port,
                    http,
                },
            )
        };
        let context = format!(
            "{text}\nns={namespace} labels={labels:?} from={principal:?} sip={source_ip} dip={destination_ip} port={port}"
        );
        let mut outcomes = vec![reference(None)];
        prop_assert_eq!(
            set.evaluate_tcp(&target, &conn).allowed,
            outcomes[0],
            "TCP: {}",
            context
        );
        for method in REQ_METHODS {
            for path in REQ_PATHS {
                for host in REQ_HOSTS {
                    let want = reference(Some((method, path, host)));
                    let got = set.evaluate_request(
                        &target,
                        &conn,
                        &HttpRequest {
                            method,
                            path,
                            host,
                            headers: super::super::no_headers(),
                            auth: None,
                        },
                    );
                    prop_assert_eq!(
                        got.allowed,
                        want,
                        "{} {} {}: {}",
                        method,
                        path,
                        host,
                        context
                    );
                    outcomes.push(want);
                }
            }
        }
        if let ConnectionDecision::Decided(d) = set.evaluate_connection(&target, &conn) {
            prop_assert!(
                outcomes.iter().all(|&o| o == d.allowed),
                "decided {} too early: {}",
                d.allowed,
                context
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn engine_agrees_with_reference(seed in any::<u64>()) {
        agree(seed)?;
    }
}
