//! Bad configs: each kind of mistake stops the agent at start with a clear message and a
//! non-zero exit; a bad reload (SIGHUP or an edited file) keeps the running state and says so.

use std::time::Duration;

use latch::datapath::{KernelMaps, install::programs_on_cgroup, syscall::AttachType};
use latch_tests::{Agent, AgentOptions, Cluster, PodSpec, TwoNodes};

const PORT: u16 = 6060;

#[test]
fn each_kind_of_mistake_is_reported_with_file_line_and_field() {
    let mut cluster = Cluster::new().expect("cluster");
    let n1 = cluster.add_node().expect("node");
    cluster
        .add_pod(n1, PodSpec::mesh("frontend", "prod", "frontend"))
        .expect("pod");
    let good = cluster.config_yaml(n1, &AgentOptions::default());
    let dir = cluster.node(n1).dir.clone();
    let netns = cluster.node(n1).netns();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown field",
            good.replace("trustDomain:", "trustDomian:"),
            "unknown field `trustDomian`",
        ),
        (
            "bad duration",
            good.replace("verdictTtl: 5m", "verdictTtl: 5 parsecs"),
            "dataplane.verdictTtl: invalid duration",
        ),
        (
            "bad enum",
            good.replace("mode: PERMISSIVE", "mode: LAX"),
            "mtls.mode",
        ),
        (
            "bad path normalization",
            format!("{good}http: {{ pathNormalization: base }}\n"),
            "http.pathNormalization: unknown variant `base`",
        ),
        (
            "bad IP",
            good.replace("address: 10.244.0.1", "address: 10.244.0.300"),
            "node.address",
        ),
        (
            "duplicate port",
            good.replace("inbound: 15006", "inbound: 15001"),
            "ports.capture: port 15001 is used twice",
        ),
        (
            "relative path",
            good.replace("bpfPinDir: /", "bpfPinDir: "),
            "bpfPinDir: path",
        ),
        ("empty file", String::new(), "the config file is empty"),
    ];
    for (what, text, expected) in cases {
        let path = dir.join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, &text).expect("write");
        let (code, output) = Agent::run_once(&netns, &path).expect("run");
        assert_ne!(code, 0, "{what}: the agent must refuse to start");
        assert!(
            output.contains(expected),
            "{what}: expected {expected:?} in:\n{output}"
        );
        assert!(
            output.contains(&path.display().to_string()),
            "{what}: the message must name the file:\n{output}"
        );
        if what != "empty file" {
            let name = path.display().to_string();
            let with_line = output.lines().any(|l| {
                l.split(&format!("{name}:"))
                    .nth(1)
                    .and_then(|rest| rest.split(':').next())
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            });
            assert!(
                with_line,
                "{what}: the message must give the line:\n{output}"
            );
        }
        let root = &cluster.node(n1).cgroup_root;
        let attached = programs_on_cgroup(root, AttachType::Connect4).expect("query");
        assert!(
            attached.is_empty(),
            "{what}: a refused start must leave nothing attached"
        );
    }
}

#[test]
fn a_bad_reload_keeps_the_running_state() {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let options = AgentOptions::default();
    let good = cluster.config_yaml(n1, &options);
    cluster.start_agent(n1, options).expect("agent");
    cluster
        .start_agent(n2, AgentOptions::default())
        .expect("agent on node 2");
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    assert!(cluster.probe(client, to, Some("before")).expect("probe").ok);
    let pin_dir = cluster.node(n1).pin_dir.clone();
    let maps = || KernelMaps::open_pinned(&pin_dir).expect("maps");
    let state = (
        maps().workloads().expect("w"),
        maps().endpoints().expect("e"),
        maps().verdicts().expect("v"),
    );

    // A broken file, noticed by the watcher.
    let line = failed_reload(
        cluster.agent(n1),
        &good.replace("peers:", "peers: ["),
        false,
    );
    assert!(
        line.contains("keeping the last good configuration"),
        "{line}"
    );
    assert!(
        line.contains("config.yaml:"),
        "the report names the file: {line}"
    );
    assert!(
        line.contains("\"trigger\":\"config or policy file changed\""),
        "noticed by inotify as the file was closed, not by the periodic check: {line}"
    );

    // A setting that only a restart can change.
    let more_workers = good.replace("verdictTtl: 5m }", "verdictTtl: 5m, workerThreads: 2 }");
    assert_ne!(more_workers, good, "the test changes the setting");
    let line = failed_reload(cluster.agent(n1), &more_workers, true);
    assert!(
        line.contains("dataplane.workerThreads cannot change while the agent runs"),
        "{line}"
    );

    assert!(cluster.agent(n1).is_running());
    assert_eq!(
        (
            maps().workloads().expect("w"),
            maps().endpoints().expect("e"),
            maps().verdicts().expect("v")
        ),
        state,
        "kernel state unchanged"
    );
    let r = cluster.probe(client, to, Some("after")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("after"), "{r:?}");

    // A valid file that points a workload at a cgroup that does not exist, via SIGHUP: that
    // workload alone is not served, and says why; the reload itself is applied.
    let agent = cluster.agent(n1);
    let mark = agent.mark();
    agent
        .write_config(&good.replace("/frontend,", "/gone,"))
        .expect("write");
    agent.reload();
    let line = agent
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            l.contains("workload not served")
        })
        .expect("the workload's failure is reported");
    assert!(
        line.contains("prod/frontend") && line.contains("workloads[0].cgroup"),
        "{line}"
    );
    agent
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            l.contains("\"message\":\"config reloaded\"")
        })
        .expect("the reload is applied");
    let status =
        latch_tests::agent::debug_json(&cluster.debug_socket(n1), &["status"]).expect("status");
    assert_eq!(
        status["failedWorkloads"][0]["workload"], "prod/frontend",
        "{status}"
    );
}

/// Write `yaml` as the agent's config (and send SIGHUP if `sighup`; otherwise the watcher
/// notices the change), then wait for the agent to report the failed reload: that line.
fn failed_reload(agent: &mut Agent, yaml: &str, sighup: bool) -> String {
    let mark = agent.mark();
    agent.write_config(yaml).expect("write");
    if sighup {
        agent.reload();
    }
    agent
        .wait_for_line_after(mark, Duration::from_secs(20), |l| {
            l.contains("config reload failed")
        })
        .expect("the agent reports the failed reload")
}
