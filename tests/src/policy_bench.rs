//! `cargo xtask bench policy`: what policy costs, measured in this process against the agent's
//! own code and a real kernel verdict map.
//!
//! - Decision cost: `evaluate_connection` for a workload with 10, 1,000 and 10,000 policies
//!   loaded (spread over many namespaces and selectors, as in a real cluster), nanoseconds per
//!   decision.
//! - Revocation: 100,000 cached verdicts in the kernel map between 1,000 known identities; a
//!   policy change that denies all of them; the time the agent's revocation sweep takes to find
//!   and remove them, and the time of a sweep that finds nothing to remove.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use latch::{
    config::Config,
    conn::Direction,
    datapath::{Datapath, DatapathSettings, uninstall},
    identity::Registry,
    policy::{Connection, ConnectionDecision, PolicySet, Target},
    state::Snapshot,
    verdicts::{Pair, SharedMaps, VerdictCache},
};

use crate::env;

/// One decision-cost measurement.
pub struct DecisionCost {
    pub policies: usize,
    pub ns_per_decision: f64,
}

/// The revocation measurement.
pub struct Revocation {
    pub entries: usize,
    /// Reading every entry of the map (batched).
    pub read_all: Duration,
    pub sweep_nothing_to_revoke: Duration,
    pub revoke_all: Duration,
    pub removed: usize,
}

/// `count` AuthorizationPolicies over `count / 10` namespaces, each selecting one of 10 apps.
fn policies_yaml(count: usize) -> String {
    let mut y = String::new();
    for i in 0..count {
        let ns = i / 10;
        let _ = write!(
            y,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p{i}, namespace: ns{ns} }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: app{} }} }}\n  action: {}\n  rules:\n  \
             - from: [{{ source: {{ principals: [\"cluster.local/ns/ns{ns}/sa/client*\"] }} }}]\n    \
             to: [{{ operation: {{ ports: [\"{}\"] }} }}]\n---\n",
            i % 10,
            if i % 7 == 0 { "DENY" } else { "ALLOW" },
            8000 + i % 100,
        );
    }
    y
}

/// Nanoseconds per `evaluate_connection` for a workload in `ns0` with `count` policies loaded.
pub fn decision_cost(count: usize, iterations: usize) -> anyhow::Result<DecisionCost> {
    let text = policies_yaml(count);
    let path = PathBuf::from(format!("bench-{count}.yaml"));
    let set = PolicySet::from_yaml(&[(path.as_path(), text.as_str())], "istio-system")
        .map_err(|e| anyhow::anyhow!("generated policies do not load: {:?}", e.first()))?;
    let labels = BTreeMap::from([("app".to_owned(), "app3".to_owned())]);
    let target = Target {
        namespace: "ns0",
        labels: &labels,
    };
    let principals: Vec<String> = (0..16)
        .map(|i| format!("spiffe://cluster.local/ns/ns0/sa/client{i}"))
        .collect();
    let mut allowed = 0usize;
    let started = Instant::now();
    for i in 0..iterations {
        let conn = Connection {
            source_principal: Some(&principals[i % principals.len()]),
            source_ip: None,
            destination_ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
            destination_port: 8000 + (i % 100) as u16,
        };
        if let ConnectionDecision::Decided(d) = set.evaluate_connection(&target, &conn) {
            allowed += usize::from(d.allowed);
        }
    }
    let elapsed = started.elapsed();
    std::hint::black_box(allowed);
    Ok(DecisionCost {
        policies: set.len(),
        ns_per_decision: elapsed.as_nanos() as f64 / iterations as f64,
    })
}

/// A config with `identities` peers (one service account each) in namespace `bench`.
fn config_yaml(cgroup: &Path, pins: &Path, policies: &Path, identities: usize) -> String {
    let mut y = format!(
        "node: {{ name: bench, address: 10.244.0.1 }}\ntrustDomain: cluster.local\n\
         cgroupRoot: {}\nbpfPinDir: {}\ndebugSocket: /run/latch-bench.sock\nmetrics: off\n\
         policies: [{}]\npeers:\n",
        cgroup.display(),
        pins.display(),
        policies.display()
    );
    for i in 0..identities {
        let _ = writeln!(
            y,
            "  - {{ name: svc{i}, namespace: bench, serviceAccount: svc{i}, labels: {{ app: svc{i} }}, ips: [10.244.{}.{}], node: 10.244.0.2 }}",
            2 + i / 250,
            2 + i % 250
        );
    }
    y
}

fn snapshot(config_path: &Path, text: &str) -> anyhow::Result<Snapshot> {
    let config = Config::from_yaml(config_path, text)?;
    let registry = Registry::from_config(&config)?;
    let policies = latch::state::load_policies(config_path, &config)?;
    Ok(Snapshot {
        config,
        registry,
        policies,
    })
}

/// Fill the kernel verdict map with `entries` allows, then measure the revocation sweep.
pub fn revocation(entries: usize) -> anyhow::Result<Revocation> {
    // The cgroup, pins and files below are named after this process (`leftovers`).
    let _claim = crate::leftovers::claim()?;
    let name = format!("latch-bench-{}", std::process::id());
    let cgroup = env::cgroup2_mount()?.join(&name);
    let pins = PathBuf::from("/sys/fs/bpf").join(&name);
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    std::fs::create_dir_all(dir.join("policies"))?;
    let result = revocation_in(entries, &cgroup, &pins, &dir);
    let _ = uninstall(&pins);
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn revocation_in(
    entries: usize,
    cgroup: &Path,
    pins: &Path,
    dir: &Path,
) -> anyhow::Result<Revocation> {
    let identities = 1000;
    let policies = dir.join("policies");
    let config_path = dir.join("config.yaml");
    let text = config_yaml(cgroup, pins, &policies, identities);
    std::fs::write(&config_path, &text)?;
    let allow_all = snapshot(&config_path, &text)?;
    let mut datapath = Datapath::install(DatapathSettings {
        pin_dir: pins.to_owned(),
        cgroup_root: cgroup.to_owned(),
        capture_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
    })
    .context("installing the datapath")?;
    let maps: SharedMaps = Arc::new(Mutex::new(datapath.maps()?));
    let state = latch::state::SharedState::new(snapshot(&config_path, &text)?);
    let cache = VerdictCache::new(maps.clone(), state.clone())?;
    // 100 sources x 100 destinations x 10 ports = 100,000 pairs.
    let ids: Vec<_> = allow_all
        .registry
        .workloads
        .iter()
        .map(|w| w.identity.key())
        .chain(
            allow_all
                .registry
                .endpoints
                .values()
                .map(|e| e.identity.key()),
        )
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut inserted = 0;
    'fill: for src in ids.iter().take(100) {
        for dst in ids.iter().skip(100).take(100) {
            for port in 0..10u16 {
                if inserted == entries {
                    break 'fill;
                }
                let pair = Pair {
                    src: *src,
                    dst: *dst,
                    port: 8000 + port,
                    direction: if port % 2 == 0 {
                        Direction::Outbound
                    } else {
                        Direction::Inbound
                    },
                };
                cache.allow(pair, Duration::from_secs(600), state.generation())?;
                inserted += 1;
            }
        }
    }
    let started = Instant::now();
    let read = latch::sync::lock(&maps).verdicts()?.len();
    let read_all = started.elapsed();
    anyhow::ensure!(read == inserted, "read {read} of {inserted} entries");
    let started = Instant::now();
    let kept = cache.revoke_stale(&allow_all)?;
    let sweep_nothing_to_revoke = started.elapsed();
    anyhow::ensure!(kept == 0, "a sweep with nothing changed removed {kept}");

    std::fs::write(
        policies.join("deny.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: { name: deny-all, namespace: bench }\nspec:\n  action: DENY\n  rules: [{}]\n",
    )?;
    let deny_all = snapshot(&config_path, &text)?;
    let started = Instant::now();
    let removed = cache.revoke_stale(&deny_all)?;
    let revoke_all = started.elapsed();
    drop(datapath.maps());
    Ok(Revocation {
        read_all,
        entries: inserted,
        sweep_nothing_to_revoke,
        revoke_all,
        removed,
    })
}
