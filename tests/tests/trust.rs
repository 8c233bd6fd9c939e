//! How long a tunnel's proof holds, on real agents: a client certificate that expires under an
//! open tunnel connection opens no new stream on it; a trust-bundle change closes the tunnel
//! connections and revokes the cached verdicts the old bundle proved (the next connection is
//! proven again, under the new bundle, or refused if the new bundle no longer verifies the
//! peer); a `files` key that does not belong to its certificate is refused and the last good
//! SVID kept.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use latch::{datapath::KernelMaps, identity::ca::DevCa};
use latch_tests::{
    AgentOptions, Cluster, NodeId, PodId, TwoNodes,
    hbone::{HeldTunnel, write_svid_files},
};

const PORT: u16 = 8080;
const HOUR: Duration = Duration::from_secs(3600);
/// How long a test waits for an event before it fails (never a threshold on how fast).
const WAIT: Duration = Duration::from_secs(30);

fn cluster_ca(cluster: &Cluster) -> DevCa {
    let dir = cluster.ca_dir();
    DevCa::load(&dir.join("ca.pem"), &dir.join("ca-key.pem")).expect("cluster CA")
}

fn load_ca(dir: &Path) -> DevCa {
    DevCa::load(&dir.join("ca.pem"), &dir.join("ca-key.pem")).expect("CA")
}

/// Unexpired cached verdicts on `node`.
fn live_verdicts(cluster: &Cluster, node: NodeId) -> usize {
    let now = latch::datapath::system::now_boot_ns();
    KernelMaps::open_pinned(&cluster.node(node).pin_dir)
        .expect("maps")
        .verdicts()
        .expect("verdicts")
        .iter()
        .filter(|v| v.remaining_ns(now) > 0)
        .count()
}

/// Write `pod`'s SVID, minted by `ca`, into the `files` directory `dir`, with `bundle_pem`.
fn write_pod_svid(cluster: &Cluster, dir: &Path, pod: PodId, ca: &DevCa, bundle_pem: &str) {
    let p = cluster.pod(pod);
    let svid = ca
        .mint(&p.spiffe_id(&cluster.trust_domain), HOUR)
        .expect("svid");
    write_svid_files(
        dir,
        &p.spec.namespace,
        &p.spec.service_account,
        &svid,
        bundle_pem,
    )
    .expect("svid files");
}

/// A `files` certificate directory for `node` holding its pods' SVIDs from the cluster CA.
fn files_for(cluster: &Cluster, name: &str, pods: &[PodId]) -> PathBuf {
    let dir = cluster.dir().join(name);
    let ca = cluster_ca(cluster);
    for pod in pods {
        write_pod_svid(cluster, &dir, *pod, &ca, &ca.certificate_pem());
    }
    dir
}

/// Wait until `node` has no unexpired cached verdict left: the agent revokes what an old bundle
/// proved once it has the new bundle in force.
fn wait_revoked(cluster: &Cluster, node: NodeId) {
    assert!(
        latch_tests::eventually(WAIT, || live_verdicts(cluster, node) == 0),
        "node {}: the verdicts the old bundle proved are revoked",
        node.0 + 1
    );
}

/// Wait until `node` has cached a verdict for the pair: `what` says which one, for the failure.
fn wait_cached(cluster: &Cluster, node: NodeId, what: &str) {
    assert!(
        latch_tests::eventually(WAIT, || live_verdicts(cluster, node) > 0),
        "node {}: {what}",
        node.0 + 1
    );
}

/// A tunnel connection from `client` to `server`'s node, held open, proven with a new SVID
/// for `client` from the cluster CA and trusting only that CA.
fn hold_tunnel(cluster: &Cluster, client: PodId, server: PodId) -> HeldTunnel {
    let ca = cluster_ca(cluster);
    let svid = ca
        .mint(&cluster.pod(client).spiffe_id(&cluster.trust_domain), HOUR)
        .expect("svid");
    HeldTunnel::open(
        cluster,
        client,
        server,
        &svid,
        vec![ca.certificate().clone()],
    )
    .expect("held tunnel")
}

/// Start node 1's agent with `options`, and node 2's with the same options but its SVIDs read
/// from the `files` directory `files`.
fn start_n2_on_files(
    cluster: &mut Cluster,
    n1: NodeId,
    n2: NodeId,
    files: &Path,
    options: AgentOptions,
) {
    cluster.start_agent(n1, options.clone()).expect("agent 1");
    let options = AgentOptions {
        cert_files: Some(files.to_path_buf()),
        ..options
    };
    cluster.start_agent(n2, options).expect("agent 2");
}

#[test]
fn a_client_certificate_that_expires_under_an_open_tunnel_opens_no_new_stream() {
    let TwoNodes {
        cluster,
        client,
        server,
        ..
    } = Cluster::frontend_payment()
        .and_then(|t| t.start_agents(AgentOptions::default()))
        .expect("cluster with agents");
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let ca = cluster_ca(&cluster);
    let td = cluster.trust_domain.clone();
    // Valid for a few seconds from now: long enough to prove it once, then it expires while
    // the connection stays open.
    let now = SystemTime::now();
    let svid = ca
        .mint_window(
            &cluster.pod(client).spiffe_id(&td),
            now - Duration::from_secs(60),
            now + Duration::from_secs(4),
        )
        .expect("short-lived svid");
    let mut held = HeldTunnel::open(
        &cluster,
        client,
        server,
        &svid,
        vec![ca.certificate().clone()],
    )
    .expect("tunnel connection proven while the certificate is valid");
    let to = cluster.pod(server).addr4(PORT);
    assert_eq!(held.connect(to), Ok(200), "admitted while valid");
    assert!(
        latch_tests::eventually(WAIT, || echo.accepted() == 1),
        "the application got the first stream"
    );

    // The certificate itself says when it is no longer valid (NotAfter has whole seconds, and
    // is inclusive): wait for that, on the clock the agent reads too.
    let expired_at = svid.not_after + Duration::from_secs(1);
    while SystemTime::now() < expired_at {
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = held.connect(to);
    assert_ne!(
        answer,
        Ok(200),
        "a stream was opened with an expired client certificate"
    );
    if let Ok(status) = answer {
        assert_eq!(status, 401, "refused as unauthorized");
    }
    assert!(
        held.wait_closed(WAIT),
        "the server sends GOAWAY: the client must reconnect and prove again"
    );
    assert_eq!(
        echo.accepted(),
        1,
        "the application saw no second connection"
    );
}

#[test]
fn a_trust_bundle_that_no_longer_verifies_the_peer_closes_its_tunnel_and_revokes_its_verdicts() {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let files = files_for(&cluster, "n2-svids", &[server]);
    start_n2_on_files(
        &mut cluster,
        n1,
        n2,
        &files,
        AgentOptions::strict_fastpath(),
    );
    let echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);

    // Proven once through the tunnel; both nodes cache the pair.
    let r = cluster.probe(client, to, Some("first")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("first"), "{r:?}");
    wait_cached(
        &cluster,
        n2,
        "the destination cached the pair's inbound verdict",
    );
    // And a tunnel connection to payment held open, proven under the cluster CA.
    let mut held = hold_tunnel(&cluster, client, server);
    assert_eq!(held.connect(to), Ok(200));
    let accepted = echo.accepted();

    // Node 2 now trusts only another CA (which issued payment's new SVID): it no longer
    // verifies frontend's chain.
    let rogue_dir = cluster.other_ca("new-ca").expect("new CA");
    let rogue = load_ca(&rogue_dir);
    write_pod_svid(&cluster, &files, server, &rogue, &rogue.certificate_pem());
    wait_revoked(&cluster, n2);
    assert!(
        held.wait_closed(WAIT),
        "the tunnel connection the old bundle proved is closed"
    );
    // Node 1 still has its outbound verdict, so its next connection leaves in the clear, and
    // node 2 (STRICT, nothing cached any more) refuses it; a tunnel would not verify either.
    let r = cluster.probe(client, to, Some("again")).expect("probe");
    assert!(r.echo.is_none() && (r.reset || r.refused()), "{r:?}");
    assert_eq!(
        echo.accepted(),
        accepted,
        "the application is not reached once the peer is no longer trusted"
    );
}

#[test]
fn a_trust_bundle_rotation_closes_pooled_tunnels_and_the_next_connection_is_proven_again() {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let n1_files = files_for(&cluster, "n1-svids", &[client]);
    let n2_files = files_for(&cluster, "n2-svids", &[server]);
    for (node, files) in [(n1, &n1_files), (n2, &n2_files)] {
        let options = AgentOptions {
            cert_files: Some(files.clone()),
            ..AgentOptions::strict_fastpath()
        };
        cluster.start_agent(node, options).expect("agent");
    }
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);
    let r = cluster.probe(client, to, Some("first")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("first"), "{r:?}");
    for node in [n1, n2] {
        wait_cached(&cluster, node, "cached the pair");
    }
    let ca = cluster_ca(&cluster);
    let mut held = hold_tunnel(&cluster, client, server);
    assert_eq!(held.connect(to), Ok(200));

    // A root rotation's first step: both nodes trust the old and a new CA; the SVIDs stay.
    let new_ca = load_ca(&cluster.other_ca("new-ca").expect("new CA"));
    let both = format!("{}{}", ca.certificate_pem(), new_ca.certificate_pem());
    for (files, pod) in [(&n1_files, client), (&n2_files, server)] {
        write_pod_svid(&cluster, files, pod, &ca, &both);
    }
    for node in [n1, n2] {
        wait_revoked(&cluster, node);
    }
    assert!(
        held.wait_closed(WAIT),
        "the server sent GOAWAY on the connection the old bundle proved"
    );

    // The next connection goes through the tunnel again, on a new connection proven under
    // the new bundle, which still verifies both: admitted and cached again.
    let mark = cluster.agent(n1).mark();
    let r = cluster.probe(client, to, Some("again")).expect("probe");
    assert!(r.ok && r.echo.as_deref() == Some("again"), "{r:?}");
    cluster
        .agent(n1)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("\"decision\":\"ALLOW\"") && l.contains("new mTLS connection")
        })
        .expect("the pooled connection of the old bundle was not reused");
    for node in [n1, n2] {
        wait_cached(&cluster, node, "cached the pair again under the new bundle");
    }
}

#[test]
fn a_files_key_that_does_not_belong_to_its_certificate_is_refused_and_the_last_svid_kept() {
    let TwoNodes {
        mut cluster,
        n1,
        n2,
        client,
        server,
    } = Cluster::frontend_payment().expect("cluster");
    let files = files_for(&cluster, "n2-svids", &[server]);
    start_n2_on_files(&mut cluster, n1, n2, &files, AgentOptions::default());
    let _echo = cluster.echo_server(server, PORT).expect("echo");
    let to = cluster.pod(server).addr4(PORT);

    // payment's certificate stays; its key is replaced by another key (renamed into place
    // whole, the only file that changes).
    let p = cluster.pod(server);
    let key_path = files
        .join(&p.spec.namespace)
        .join(&p.spec.service_account)
        .join("key.pem");
    let other = cluster_ca(&cluster)
        .mint(&p.spiffe_id(&cluster.trust_domain), HOUR)
        .expect("svid");
    let staged = key_path.with_extension("new");
    std::fs::write(&staged, other.key_pem()).expect("write key");
    let mark = cluster.agent(n2).mark();
    std::fs::rename(&staged, &key_path).expect("rename key");
    let key_path = key_path.display().to_string();
    let line = cluster
        .agent(n2)
        .wait_for_line_after(mark, WAIT, |l| {
            l.contains("\"message\":\"certificate in place\"")
                || l.contains("certificate rotation failed")
        })
        .expect("the agent reads the changed key");
    assert!(
        line.contains("certificate rotation failed")
            && line.contains(&key_path)
            && line.contains("does not belong to the certificate"),
        "the mismatched key is refused with an error naming the file: {line}"
    );

    // The last good SVID is still presented: a new tunnel connection's handshake succeeds.
    let status = latch_tests::hbone::connect_status(&cluster, client, server, to).expect("tunnel");
    assert_eq!(
        status, 200,
        "payment still proves itself with its last good SVID"
    );
}
