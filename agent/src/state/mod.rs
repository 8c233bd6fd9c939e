//! The agent's current view of the world: the config it runs with, the registry built from it
//! and the policies it names. Replaced as a whole on a successful reload; readers take a cheap
//! snapshot.
//!
//! Every snapshot put in place gets the next generation number. A decision made under one
//! generation can tell whether a newer one has been committed since ([`SharedState::generation`]):
//! the verdict cache refuses a verdict decided under an older generation, and a carried
//! connection decided under one is judged again, so nothing decided under the old state slips
//! past the revocation that follows a reload.
//!
//! A snapshot is read from a config file with [`Snapshot::load`] (the policies it names
//! included); [`cert_store`] makes the certificate store its `certificates` section describes;
//! [`decide`] answers what the snapshot's policies say, in the enforcement points' terms.

pub mod decide;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;

use crate::{
    config::{CertificateSource, Config, MtlsMode},
    identity::{
        Registry,
        ca::DevCa,
        certs::{CertStore, Source},
    },
    policy::{self, PolicySet},
};

/// One consistent config + registry + policy set.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub registry: Registry,
    pub policies: PolicySet,
}

impl Snapshot {
    /// The state a config file describes (config, registry, policies), without touching the
    /// kernel: what `latch policy explain` evaluates against.
    pub fn load(config_path: &Path) -> anyhow::Result<Self> {
        Self::from_config(config_path, Config::load(config_path)?)
    }

    /// The registry and the policies of `config`, read from `config_path`.
    pub fn from_config(config_path: &Path, config: Config) -> anyhow::Result<Self> {
        let registry =
            Registry::from_config(&config).with_context(|| format!("{}", config_path.display()))?;
        let policies = load_policies(config_path, &config)?;
        Ok(Self {
            config,
            registry,
            policies,
        })
    }

    /// A snapshot from a node config and one policy file given as text, for unit tests.
    #[cfg(test)]
    pub fn from_texts(config_yaml: &str, policy_yaml: &str) -> Self {
        let config = Config::from_yaml(Path::new("node.yaml"), config_yaml).expect("config");
        let registry = Registry::from_config(&config).expect("registry");
        let policies = PolicySet::from_yaml(&[(Path::new("p.yaml"), policy_yaml)], "istio-system")
            .expect("policies");
        Self {
            config,
            registry,
            policies,
        }
    }

    /// The SPIFFE IDs of the workloads this node serves.
    pub fn identities(&self) -> Vec<String> {
        self.registry
            .workloads
            .iter()
            .map(|w| w.identity.to_string())
            .collect()
    }
}

/// The policy files of `config`, relative paths taken from the config file's directory.
pub fn policy_paths(config_path: &Path, config: &Config) -> Vec<PathBuf> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config.policies.iter().map(|p| base.join(p)).collect()
}

/// `set` with the config's mesh-wide defaults: the mTLS mode where no PeerAuthentication
/// applies, and `mtls.strictFastpath`.
pub fn with_policy_defaults(set: PolicySet, config: &Config) -> PolicySet {
    let default_mtls = match config.mtls.mode {
        MtlsMode::Strict => policy::MtlsMode::Strict,
        MtlsMode::Permissive => policy::MtlsMode::Permissive,
    };
    set.with_default_mtls(default_mtls)
        .with_strict_fastpath(config.mtls.strict_fastpath)
}

/// Load every policy the config names (all or nothing).
pub fn load_policies(config_path: &Path, config: &Config) -> anyhow::Result<PolicySet> {
    PolicySet::load(&policy_paths(config_path, config), &config.root_namespace)
        .map(|set| with_policy_defaults(set, config))
        .map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "{} policy error{}:\n{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                lines.join("\n")
            )
        })
}

/// The certificate store for the config's `certificates` section.
pub fn cert_store(config_path: &Path, config: &Config) -> anyhow::Result<CertStore> {
    let source = match &config.certificates {
        None => None,
        Some(c) => Some(match (c.source, &c.ca_cert, &c.ca_key, &c.dir) {
            (CertificateSource::DevCa, Some(cert), Some(key), _) => Source::DevCa {
                ca: Box::new(
                    DevCa::load(cert, key)
                        .with_context(|| format!("{}: certificates", config_path.display()))?,
                ),
                ttl: c.ttl,
            },
            (CertificateSource::Files, _, _, Some(dir)) => Source::Files { dir: dir.clone() },
            _ => anyhow::bail!("{}: certificates: incomplete", config_path.display()),
        }),
    };
    Ok(CertStore::new(source, &config.trust_domain))
}

/// Shared, swappable snapshot.
#[derive(Clone)]
pub struct SharedState(Arc<RwLock<Current>>);

struct Current {
    snapshot: Arc<Snapshot>,
    generation: u64,
}

impl SharedState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self(Arc::new(RwLock::new(Current {
            snapshot: Arc::new(snapshot),
            generation: 1,
        })))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        crate::sync::read(&self.0)
    }

    pub fn get(&self) -> Arc<Snapshot> {
        self.read().snapshot.clone()
    }

    /// The snapshot in force and its generation, read together.
    pub fn current(&self) -> (Arc<Snapshot>, u64) {
        let current = self.read();
        (current.snapshot.clone(), current.generation)
    }

    /// The generation of the snapshot in force.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Keep the snapshot in force but start a new generation: what was proven under the old
    /// one (a trust bundle since replaced) is not cached, and carried connections decided
    /// under it are judged again.
    pub fn renew(&self) {
        let mut current = crate::sync::write(&self.0);
        current.generation += 1;
    }

    /// Put `snapshot` in force, as the next generation.
    pub fn replace(&self, snapshot: Snapshot) {
        let mut current = crate::sync::write(&self.0);
        current.snapshot = Arc::new(snapshot);
        current.generation += 1;
    }
}

/// The state a decision was made under: its generation, and the shared state to compare it with.
#[derive(Clone)]
pub struct DecidedUnder {
    state: SharedState,
    generation: u64,
}

impl DecidedUnder {
    /// The snapshot in force now, to decide with, and the mark of that decision.
    pub fn now(state: &SharedState) -> (Arc<Snapshot>, Self) {
        let (snapshot, generation) = state.current();
        (
            snapshot,
            Self {
                state: state.clone(),
                generation,
            },
        )
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The snapshot in force, if a newer one than the decision's has been committed since.
    pub fn newer(&self) -> Option<Arc<Snapshot>> {
        let (snapshot, generation) = self.state.current();
        (generation != self.generation).then_some(snapshot)
    }
}
