//! Revocation against verdicts decided while a reload happens: a verdict decided under one
//! state never reaches the kernel once a newer state is in force, whichever comes first, on the
//! real (pinned) verdict map of a running agent.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use latch::{
    conn::Direction,
    datapath::KernelMaps,
    identity::IdentityKey,
    state::{DecidedUnder, SharedState, Snapshot},
    verdicts::{Pair, Put, SharedMaps, VerdictCache},
};
use latch_tests::{AgentOptions, Cluster, PodSpec};

#[test]
fn a_verdict_decided_before_a_reload_never_reaches_the_kernel_after_it() {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node");
    cluster
        .add_pod(n1, PodSpec::mesh("payment", "prod", "payment"))
        .expect("pod");
    cluster
        .start_agent(n1, AgentOptions::default())
        .expect("agent");
    let config = cluster.agent(n1).config_path().to_owned();
    let maps: SharedMaps = Arc::new(Mutex::new(
        KernelMaps::open_pinned(&cluster.node(n1).pin_dir).expect("maps"),
    ));
    let state = SharedState::new(Snapshot::load(&config).expect("snapshot"));
    let cache = VerdictCache::new(maps.clone(), state.clone()).expect("cache");
    // A pair of this test's own, so the running agent's entries do not matter.
    let pair = Pair {
        src: IdentityKey::of("spiffe://cluster.local/ns/race/sa/decided-early"),
        dst: IdentityKey::of("spiffe://cluster.local/ns/race/sa/target"),
        port: 4242,
        direction: Direction::Inbound,
    };
    let in_kernel = || {
        latch::sync::lock(&maps)
            .verdicts()
            .expect("verdicts")
            .iter()
            .any(|v| v.key == pair.key())
    };

    // Decided under generation N; the reload commits N+1 before the verdict is written.
    let (_, decided) = DecidedUnder::now(&state);
    state.replace(Snapshot::load(&config).expect("snapshot"));
    let put = cache
        .allow(pair, Duration::from_secs(60), decided.generation())
        .expect("allow");
    assert_eq!(put, Put::Stale);
    assert!(
        !in_kernel(),
        "a verdict of the old state reached the kernel"
    );

    // Decided under the state in force: written.
    let (_, decided) = DecidedUnder::now(&state);
    let put = cache
        .allow(pair, Duration::from_secs(60), decided.generation())
        .expect("allow");
    assert_eq!(put, Put::Cached);
    assert!(in_kernel());
    cache.flush_where(|k| *k == pair.key()).expect("flush");
    assert!(!in_kernel());
}
