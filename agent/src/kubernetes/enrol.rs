//! Which pods Latch enforces for, read from the labels users already set for Istio ambient (as
//! istio-cni decides): a pod is enrolled when it or its namespace has
//! `istio.io/dataplane-mode=ambient`, and the pod's own `none` opts it out. Never enrolled: pods
//! on the host's network, pods with an Istio sidecar, finished pods and pods without an address.
//! `latch.dev/dataplane-mode: tunnel|fastpath` on the pod, else on its namespace, chooses the
//! pod's data-plane mode. The same rule decides which remote pods are peers.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::config::DataplaneMode;

/// Istio's enrolment label, on a pod or a namespace.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Latch's data-plane mode override, on a pod or a namespace.
pub const LATCH_DATAPLANE_MODE: &str = "latch.dev/dataplane-mode";
/// Set by Istio's sidecar injector on every pod it injected.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// What the enrolment rule says of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolment {
    Enrolled(Enrolled),
    NotEnrolled(NotEnrolled),
}

/// An enrolled pod: what the agent needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub ips: Vec<IpAddr>,
    /// `None`: the node's `dataplane.mode`.
    pub mode: Option<DataplaneMode>,
    /// A `latch.dev/dataplane-mode` value that is neither `tunnel` nor `fastpath` (ignored, to
    /// be reported: where it was, and the value).
    pub bad_mode: Option<String>,
}

/// Why a pod is not enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotEnrolled {
    /// Neither the pod nor its namespace asks for the mesh.
    NotInMesh,
    /// The pod's own `istio.io/dataplane-mode=none`.
    OptedOut,
    HostNetwork,
    /// An Istio sidecar proxies the pod's traffic already.
    Sidecar,
    /// `Succeeded` or `Failed`: its containers will not run again.
    Finished,
    /// No address yet (or none that parses).
    NoAddress,
}

impl NotEnrolled {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotInMesh => "not in the mesh",
            Self::OptedOut => "opted out (istio.io/dataplane-mode=none)",
            Self::HostNetwork => "on the host's network",
            Self::Sidecar => "has an Istio sidecar",
            Self::Finished => "finished",
            Self::NoAddress => "no address",
        }
    }
}

/// The enrolment rule for `pod` in `namespace` (`None`: the namespace is not known, so only the
/// pod's own labels count).
pub fn enrolment(pod: &Pod, namespace: Option<&Namespace>) -> Enrolment {
    let empty = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ns_labels = namespace
        .and_then(|ns| ns.metadata.labels.as_ref())
        .unwrap_or(&empty);
    let in_mesh = match pod_labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => return Enrolment::NotEnrolled(NotEnrolled::OptedOut),
        Some("ambient") => true,
        _ => ns_labels
            .get(DATAPLANE_MODE)
            .is_some_and(|m| m == "ambient"),
    };
    if !in_mesh {
        return Enrolment::NotEnrolled(NotEnrolled::NotInMesh);
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Enrolment::NotEnrolled(NotEnrolled::HostNetwork);
    }
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
    {
        return Enrolment::NotEnrolled(NotEnrolled::Sidecar);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Enrolment::NotEnrolled(NotEnrolled::Finished);
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return Enrolment::NotEnrolled(NotEnrolled::NoAddress);
    }
    let (mode, bad_mode) = match pod_labels
        .get(LATCH_DATAPLANE_MODE)
        .map(|m| ("pod", m))
        .or_else(|| {
            ns_labels
                .get(LATCH_DATAPLANE_MODE)
                .map(|m| ("namespace", m))
        }) {
        None => (None, None),
        Some((_, m)) if m == "fastpath" => (Some(DataplaneMode::Fastpath), None),
        Some((_, m)) if m == "tunnel" => (Some(DataplaneMode::Tunnel), None),
        Some((on, m)) => (
            None,
            Some(format!(
                "{LATCH_DATAPLANE_MODE}={m:?} on the {on} is neither tunnel nor fastpath"
            )),
        ),
    };
    Enrolment::Enrolled(Enrolled {
        ips,
        mode,
        bad_mode,
    })
}

/// The pod's addresses (`status.podIPs`, else `status.podIP`), those that parse, in order and
/// without repeats.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = Vec::new();
    for text in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = text.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{PodIP, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn namespace(pairs: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("prod".into()),
                labels: labels(pairs),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn pod(pairs: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("payment-1".into()),
                namespace: Some("prod".into()),
                labels: labels(pairs),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.244.2.2".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.244.2.2".into(),
                    },
                    PodIP {
                        ip: "fd00:10:244:2::2".into(),
                    },
                ]),
                ..PodStatus::default()
            }),
        }
    }

    fn enrolled(mode: Option<DataplaneMode>) -> Enrolment {
        Enrolment::Enrolled(Enrolled {
            ips: vec![
                "10.244.2.2".parse().expect("ip"),
                "fd00:10:244:2::2".parse().expect("ip"),
            ],
            mode,
            bad_mode: None,
        })
    }

    #[test]
    fn labels_decide_as_istio_cni_does() {
        let ambient = [(DATAPLANE_MODE, "ambient")];
        let none = [(DATAPLANE_MODE, "none")];
        type Labels<'a> = &'a [(&'a str, &'a str)];
        let cases: [(&str, Labels, Option<Labels>, Enrolment); 6] = [
            ("namespace ambient", &[], Some(&ambient), enrolled(None)),
            (
                "pod ambient, namespace not",
                &ambient,
                Some(&[]),
                enrolled(None),
            ),
            (
                "pod ambient, namespace unknown",
                &ambient,
                None,
                enrolled(None),
            ),
            (
                "pod none opts out of an ambient namespace",
                &none,
                Some(&ambient),
                Enrolment::NotEnrolled(NotEnrolled::OptedOut),
            ),
            (
                "neither",
                &[("app", "payment")],
                Some(&[]),
                Enrolment::NotEnrolled(NotEnrolled::NotInMesh),
            ),
            (
                "another value on the namespace is not ambient",
                &[],
                Some(&[(DATAPLANE_MODE, "sidecar")]),
                Enrolment::NotEnrolled(NotEnrolled::NotInMesh),
            ),
        ];
        for (name, pod_labels, ns_labels, expected) in cases {
            let ns = ns_labels.map(namespace);
            assert_eq!(enrolment(&pod(pod_labels), ns.as_ref()), expected, "{name}");
        }
    }

    #[test]
    fn host_network_sidecar_finished_and_addressless_pods_are_never_enrolled() {
        let ns = namespace(&[(DATAPLANE_MODE, "ambient")]);
        let not = |p: &Pod| match enrolment(p, Some(&ns)) {
            Enrolment::NotEnrolled(why) => Some(why),
            Enrolment::Enrolled(_) => None,
        };

        let mut host = pod(&[]);
        host.spec = Some(PodSpec {
            host_network: Some(true),
            ..PodSpec::default()
        });
        assert_eq!(not(&host), Some(NotEnrolled::HostNetwork));

        let mut sidecar = pod(&[]);
        sidecar.metadata.annotations = labels(&[(SIDECAR_STATUS, "{}")]);
        assert_eq!(not(&sidecar), Some(NotEnrolled::Sidecar));

        for phase in ["Succeeded", "Failed"] {
            let mut done = pod(&[]);
            if let Some(s) = done.status.as_mut() {
                s.phase = Some(phase.into());
            }
            assert_eq!(not(&done), Some(NotEnrolled::Finished), "{phase}");
        }

        let mut pending = pod(&[]);
        pending.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        assert_eq!(not(&pending), Some(NotEnrolled::NoAddress));

        assert_eq!(not(&pod(&[])), None, "the same pod, plain, is enrolled");
    }

    #[test]
    fn the_pods_data_plane_mode_beats_its_namespaces() {
        let ns = namespace(&[
            (DATAPLANE_MODE, "ambient"),
            (LATCH_DATAPLANE_MODE, "tunnel"),
        ]);
        assert_eq!(
            enrolment(&pod(&[]), Some(&ns)),
            enrolled(Some(DataplaneMode::Tunnel))
        );
        assert_eq!(
            enrolment(&pod(&[(LATCH_DATAPLANE_MODE, "fastpath")]), Some(&ns)),
            enrolled(Some(DataplaneMode::Fastpath))
        );
        let Enrolment::Enrolled(bad) =
            enrolment(&pod(&[(LATCH_DATAPLANE_MODE, "fast")]), Some(&ns))
        else {
            panic!("a bad mode value does not take the pod out");
        };
        assert_eq!(bad.mode, None);
        assert!(
            bad.bad_mode
                .as_deref()
                .is_some_and(|m| m.contains("\"fast\" on the pod")),
            "{bad:?}"
        );
    }

    #[test]
    fn addresses_come_from_pod_ips_then_pod_ip_without_repeats() {
        let mut p = pod(&[]);
        assert_eq!(pod_ips(&p).len(), 2);
        if let Some(s) = p.status.as_mut() {
            s.pod_ips = None;
        }
        assert_eq!(
            pod_ips(&p),
            vec!["10.244.2.2".parse::<IpAddr>().expect("ip")]
        );
        if let Some(s) = p.status.as_mut() {
            s.pod_ip = Some("not-an-ip".into());
        }
        assert!(pod_ips(&p).is_empty());
    }
}
