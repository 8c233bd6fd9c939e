//! The registry: every mesh endpoint this node knows, built from the config. Local workloads
//! (pods on this node: cgroup, netns, IPs) and peers (pods on other nodes: IPs), each with its
//! SPIFFE identity; lookups by IP and by identity key.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use super::id::{IdentityKey, SpiffeId};
use crate::config::{Config, DataplaneMode};

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LocalWorkload {
    /// `<namespace>/<name>`.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Its data-plane mode is `tunnel` (its own, else the node's): every connection it makes is
    /// tunneled, nothing of it cached.
    pub tunnel_only: bool,
}

/// Any mesh endpoint (local or remote), by one of its IPs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    /// The pod's labels (policy selectors match them).
    pub labels: BTreeMap<String, String>,
    pub local: bool,
    /// Node address for remote endpoints.
    pub node: Option<IpAddr>,
    /// Its data-plane mode is `tunnel` (its own, else this node's): every connection to it is
    /// tunneled, no verdict of it cached.
    pub tunnel_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "identities {a} and {b} have the same 128-bit identity key; rename one service account"
    )]
    KeyCollision { a: String, b: String },
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub workloads: Vec<LocalWorkload>,
    /// Index into `workloads` by `id`: the metrics look a connection's local workload up on
    /// every connection, and a node may run a thousand pods.
    workload_by_id: HashMap<String, usize>,
    pub endpoints: HashMap<IpAddr, Endpoint>,
    identities: HashMap<IdentityKey, SpiffeId>,
    /// One address of each pod (local or peer) by identity, for [`Registry::pods_of`].
    pods: HashMap<IdentityKey, Vec<IpAddr>>,
}

impl Registry {
    pub fn from_config(config: &Config) -> Result<Self, RegistryError> {
        let mut registry = Registry::default();
        let td = &config.trust_domain;
        let tunnel_only = |own: Option<DataplaneMode>| {
            own.unwrap_or(config.dataplane.mode) == DataplaneMode::Tunnel
        };
        for w in &config.workloads {
            let identity = SpiffeId::new(td, &w.namespace, &w.service_account);
            registry.add_identity(&identity)?;
            registry.add_pod(&identity, &w.ips);
            for ip in &w.ips {
                registry.endpoints.insert(
                    *ip,
                    Endpoint {
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                        identity: identity.clone(),
                        labels: w.labels.clone(),
                        local: true,
                        node: None,
                        tunnel_only: tunnel_only(w.dataplane_mode),
                    },
                );
            }
            let id = format!("{}/{}", w.namespace, w.name);
            let index = registry.workloads.len();
            registry.workload_by_id.entry(id.clone()).or_insert(index);
            registry.workloads.push(LocalWorkload {
                id,
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                identity,
                labels: w.labels.clone(),
                cgroup: w.cgroup.clone(),
                netns: w.netns.clone(),
                ips: w.ips.clone(),
                tunnel_only: tunnel_only(w.dataplane_mode),
            });
        }
        for p in &config.peers {
            let identity = SpiffeId::new(td, &p.namespace, &p.service_account);
            registry.add_identity(&identity)?;
            registry.add_pod(&identity, &p.ips);
            for ip in &p.ips {
                registry.endpoints.insert(
                    *ip,
                    Endpoint {
                        name: p.name.clone(),
                        namespace: p.namespace.clone(),
                        identity: identity.clone(),
                        labels: p.labels.clone(),
                        local: false,
                        node: Some(p.node),
                        tunnel_only: tunnel_only(p.dataplane_mode),
                    },
                );
            }
        }
        Ok(registry)
    }

    fn add_pod(&mut self, identity: &SpiffeId, ips: &[IpAddr]) {
        self.pods
            .entry(identity.key())
            .or_default()
            .extend(ips.first());
    }

    fn add_identity(&mut self, id: &SpiffeId) -> Result<(), RegistryError> {
        match self.identities.get(&id.key()) {
            Some(existing) if existing != id => Err(RegistryError::KeyCollision {
                a: existing.to_string(),
                b: id.to_string(),
            }),
            _ => {
                self.identities.insert(id.key(), id.clone());
                Ok(())
            }
        }
    }

    pub fn endpoint(&self, ip: &IpAddr) -> Option<&Endpoint> {
        // IPv4-mapped IPv6 addresses are looked up as IPv4.
        self.endpoints.get(&ip.to_canonical())
    }

    pub fn identity(&self, key: IdentityKey) -> Option<&SpiffeId> {
        self.identities.get(&key)
    }

    pub fn workload(&self, id: &str) -> Option<&LocalWorkload> {
        self.workload_by_id
            .get(id)
            .and_then(|&i| self.workloads.get(i))
    }

    /// Every pod (local or peer) that carries `identity`, once each (a pod with several IPs
    /// is one pod), in a stable order.
    pub fn pods_of(&self, identity: IdentityKey) -> Vec<(IpAddr, &Endpoint)> {
        let mut pods: BTreeMap<(&str, &str), (IpAddr, &Endpoint)> = BTreeMap::new();
        for ip in self.pods.get(&identity).into_iter().flatten() {
            if let Some(e) = self.endpoints.get(ip) {
                pods.insert((e.namespace.as_str(), e.name.as_str()), (*ip, e));
            }
        }
        pods.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collision (infeasible with 128-bit keys, so one is planted) refuses the identity and
    /// names both IDs, so that the operator knows which service accounts to look at.
    /// Local workloads are found by `namespace/name`, each to its own entry.
    #[test]
    fn local_workloads_are_found_by_id() {
        let mut yaml = String::from(
            "node: { name: node-a, address: 10.244.0.1 }\ntrustDomain: cluster.local\n\
             cgroupRoot: /sys/fs/cgroup/latch-test\nbpfPinDir: /sys/fs/bpf/latch-test\n\
             certificates: { source: dev-ca, caCert: /tmp/ca.pem, caKey: /tmp/ca-key.pem }\n\
             debugSocket: /tmp/latch.sock\nworkloads:\n",
        );
        for i in 0..50 {
            yaml.push_str(&format!(
                "  - {{ name: w-{i}, namespace: prod, serviceAccount: sa-{i}, \
                 cgroup: /sys/fs/cgroup/latch-test/w-{i}, netns: /run/netns/w-{i}, \
                 ips: [10.244.1.{}] }}\n",
                i + 2
            ));
        }
        let config = Config::from_yaml(std::path::Path::new("test.yaml"), &yaml).expect("config");
        let registry = Registry::from_config(&config).expect("registry");
        for i in [0, 17, 49] {
            let w = registry.workload(&format!("prod/w-{i}")).expect("found");
            assert_eq!(w.name, format!("w-{i}"));
            assert_eq!(
                w.ips,
                [format!("10.244.1.{}", i + 2).parse::<IpAddr>().expect("ip")]
            );
        }
        assert!(registry.workload("prod/w-50").is_none());
        assert!(registry.workload("staging/w-1").is_none());
    }

    #[test]
    fn a_key_collision_names_both_identities() {
        let mut registry = Registry::default();
        let first = SpiffeId::new("cluster.local", "a", "first");
        let second = SpiffeId::new("cluster.local", "b", "second");
        registry.identities.insert(second.key(), first.clone());
        let err = registry.add_identity(&second).expect_err("collision");
        let message = err.to_string();
        assert!(message.contains(&first.to_string()), "{message}");
        assert!(message.contains(&second.to_string()), "{message}");
        assert!(message.contains("128-bit"), "{message}");
        // The same identity twice is no collision.
        registry.add_identity(&first).expect("first is new");
        registry.add_identity(&first).expect("first again");
    }
}
