//! Tests of the debug server over a real Unix socket, with a backend that returns fixed data.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::debug::{
    api::*,
    client::{Client, DebugCommand},
};

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("latch-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";

struct Fixed;

impl Backend for Fixed {
    fn status(&self) -> Result<Status, String> {
        Ok(Status {
            version: "0.1.0".into(),
            uptime_seconds: 42,
            node: "node-a".into(),
            dataplane_mode: "fastpath".into(),
            trust_domain: "cluster.local".into(),
            programs: vec![ProgramStatus {
                name: "latch_connect4".into(),
                id: 7,
                attached_to: "/sys/fs/cgroup/kubepods".into(),
            }],
            maps: vec![MapStatus {
                name: "LATCH_VERDICTS".into(),
                entries: 1,
                capacity: 1 << 20,
            }],
            certificates: vec![CertificateStatus {
                identity: FRONTEND.into(),
                not_after: "2030-01-01T00:00:00Z".into(),
                seconds_left: 3600,
            }],
            last_reload: ReloadStatus {
                at: "2029-12-31T23:00:00Z".into(),
                ok: true,
                trigger: "startup".into(),
                error: None,
            },
            failed_workloads: Vec::new(),
            source: None,
        })
    }

    fn workloads(&self) -> Vec<Workload> {
        vec![Workload {
            id: "prod/frontend-1".into(),
            name: "frontend-1".into(),
            namespace: "prod".into(),
            identity: FRONTEND.into(),
            service_account: "frontend".into(),
            labels: BTreeMap::from([("app".into(), "frontend".into())]),
            ips: vec!["10.244.1.2".parse().expect("literal")],
            local: true,
            node: None,
            cgroup: Some("/sys/fs/cgroup/kubepods/frontend-1".into()),
            netns: Some("/run/netns/frontend-1".into()),
        }]
    }

    fn policies(&self) -> Policies {
        Policies {
            policies: vec![PolicySummary {
                kind: "AuthorizationPolicy".into(),
                namespace: "prod".into(),
                name: "allow-frontend".into(),
                action: "ALLOW".into(),
                rules: 1,
                file: "/etc/latch/policies/prod.yaml".into(),
                dry_run: false,
                not_enforced: None,
            }],
            errors: vec![],
            refused: vec![],
            jwks: vec![JwksStatus {
                uri: "https://issuer.example/jwks.json".into(),
                keys: 2,
                fetched_seconds_ago: Some(30),
                failures: 1,
                last_error: Some("GET: status 503".into()),
            }],
        }
    }

    fn verdicts(&self, filter: &VerdictFilter) -> Result<VerdictPage, String> {
        Ok(filter.page([Verdict {
            source: FRONTEND.into(),
            destination: PAYMENT.into(),
            port: 8080,
            direction: Direction::Outbound,
            decision: Decision::Allow,
            seconds_left: 12.5,
            encrypted: false,
        }]))
    }

    fn certs(&self) -> Vec<Cert> {
        vec![Cert {
            identity: FRONTEND.into(),
            serial: "0a1b".into(),
            not_before: "2029-12-31T23:00:00Z".into(),
            not_after: "2030-01-01T00:00:00Z".into(),
            next_rotation: "2029-12-31T23:30:00Z".into(),
        }]
    }

    fn connections(&self) -> Vec<Connection> {
        vec![Connection {
            source: FRONTEND.into(),
            destination: PAYMENT.into(),
            destination_address: "10.244.2.2:8080".parse().expect("literal"),
            bytes_sent: 10,
            bytes_received: 20,
            age_seconds: 1.5,
        }]
    }

    fn stats(&self) -> Result<Stats, String> {
        Ok(Stats {
            counters: BTreeMap::from([("fastpath_allowed".into(), 3)]),
        })
    }

    fn explain(&self, query: &ExplainQuery) -> Result<serde_json::Value, String> {
        if query.from == "spiffe://unknown" {
            return Err("unknown identity".into());
        }
        Ok(serde_json::json!({ "decision": "ALLOW", "to": query.to.to_string() }))
    }

    fn flush(&self, filter: &VerdictFilter) -> Result<FlushResult, String> {
        Ok(FlushResult {
            removed: u64::from(filter.port == Some(8080)),
        })
    }

    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadResult> + Send>> {
        Box::pin(async {
            ReloadResult {
                ok: true,
                error: None,
            }
        })
    }
}

/// A served socket in its own temp dir.
struct Served {
    dir: TempDir,
    path: PathBuf,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(tag: &str) -> Served {
    let dir = TempDir::new(tag);
    let path = dir.join("run/latch/debug.sock");
    let server = DebugServer::bind(&path).expect("binding the debug socket");
    let task = tokio::spawn(server.serve(Arc::new(Fixed)));
    Served { dir, path, task }
}

/// Send raw bytes, return everything the server sends until it closes (at most 5 s).
async fn raw(path: &Path, request: &[u8]) -> String {
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(path: &Path, target: &str) -> String {
    raw(
        path,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[tokio::test]
async fn every_route_answers_with_its_json() {
    let served = serve("debug-routes");
    let client = Client::new(&served.path);
    let call = async |cmd: DebugCommand| {
        let body = client.call(&cmd).await.expect("200");
        serde_json::from_slice::<serde_json::Value>(&body).expect("JSON body")
    };
    let status = call(DebugCommand::Status).await;
    assert_eq!(status["uptimeSeconds"], 42);
    assert_eq!(
        status["programs"][0]["attachedTo"],
        "/sys/fs/cgroup/kubepods"
    );
    assert_eq!(status["lastReload"]["trigger"], "startup");
    assert_eq!(
        call(DebugCommand::Workloads).await[0]["serviceAccount"],
        "frontend"
    );
    let policies = call(DebugCommand::Policies).await;
    assert_eq!(policies["policies"][0]["action"], "ALLOW");
    assert_eq!(policies["jwks"][0]["fetchedSecondsAgo"], 30);
    let table = crate::debug::table::policies(
        &serde_json::from_value::<Policies>(policies).expect("the client's type"),
    );
    assert!(
        table.contains("https://issuer.example/jwks.json")
            && table.contains("30s ago")
            && table.contains("GET: status 503"),
        "{table}"
    );
    let page = call(DebugCommand::Verdicts(VerdictFilter::default())).await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["verdicts"][0]["secondsLeft"], 12.5);
    assert_eq!(page["verdicts"][0]["direction"], "outbound");
    let none = VerdictFilter {
        port: Some(1),
        ..VerdictFilter::default()
    };
    assert_eq!(call(DebugCommand::Verdicts(none)).await["total"], 0);
    assert_eq!(
        call(DebugCommand::Certs).await[0]["nextRotation"],
        "2029-12-31T23:30:00Z"
    );
    assert_eq!(
        call(DebugCommand::Connections).await[0]["destinationAddress"],
        "10.244.2.2:8080"
    );
    assert_eq!(
        call(DebugCommand::Stats).await["counters"]["fastpath_allowed"],
        3
    );
    let explain = ExplainQuery::new("plaintext", "10.244.2.2:8080", None).expect("valid");
    assert_eq!(
        call(DebugCommand::Explain(explain)).await["decision"],
        "ALLOW"
    );
    let flush = VerdictFilter {
        port: Some(8080),
        ..VerdictFilter::default()
    };
    assert_eq!(call(DebugCommand::Flush(flush)).await["removed"], 1);
    assert_eq!(call(DebugCommand::Reload).await["ok"], true);

    // The typed rendering path works end to end too.
    let text = client
        .run(&DebugCommand::Verdicts(VerdictFilter::default()), false)
        .await
        .expect("table");
    assert!(text.starts_with("SOURCE "), "{text}");
    let response = get(&served.path, "/v1/status").await;
    assert!(
        response.contains("content-type: application/json"),
        "{response}"
    );
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    let served = serve("debug-errors");
    let r = get(&served.path, "/v1/nope").await;
    assert!(status_line(&r).contains(" 404 "), "{r}");
    assert!(
        r.contains("\"error\": \"no such endpoint: /v1/nope\""),
        "{r}"
    );
    let r = get(&served.path, "/v1/reload").await;
    assert!(status_line(&r).contains(" 405 "), "{r}");
    assert!(r.contains("allow: POST"), "{r}");
    let r = get(&served.path, "/v1/verdicts?port=http").await;
    assert!(status_line(&r).contains(" 400 "), "{r}");
    assert!(r.contains("expected a port number"), "{r}");
    let r = get(&served.path, "/v1/explain?from=plaintext&to=10.244.2.2").await;
    assert!(status_line(&r).contains(" 400 "), "{r}");
    let r = get(
        &served.path,
        "/v1/explain?from=spiffe%3A%2F%2Funknown&to=10.0.0.1:1",
    )
    .await;
    assert!(status_line(&r).contains(" 400 "), "{r}");
    assert!(r.contains("unknown identity"), "{r}");

    let err = Client::new(&served.path)
        .call(&DebugCommand::Verdicts(VerdictFilter {
            limit: 0,
            ..VerdictFilter::default()
        }))
        .await
        .expect_err("limit 0 is refused");
    assert!(
        err.to_string()
            .contains("400 Bad Request: query parameter `limit`"),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_bodies_and_garbage_do_not_stop_the_server() {
    let served = serve("debug-abuse");
    // Declared 10 MB body: refused before it is read.
    let mut stream = tokio::net::UnixStream::connect(&served.path)
        .await
        .expect("connect");
    let size = 10 * 1024 * 1024;
    stream
        .write_all(
            format!("POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("headers");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut out))
        .await
        .expect("the server answers and closes");
    writer.abort();
    let r = String::from_utf8_lossy(&out);
    assert!(status_line(&r).contains(" 413 "), "{r}");

    // Chunked body over the limit: caught while reading.
    let mut chunked =
        b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"8000\r\n");
        chunked.extend(std::iter::repeat_n(b'b', 0x8000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(&served.path, &chunked).await;
    assert!(status_line(&r).contains(" 413 "), "{r}");

    // Not HTTP at all: that connection ends.
    let _ = raw(&served.path, b"\x00\x01\x02 hello \xff\xfe\r\n\r\n").await;
    // Headers that never finish: cut off by the header timeout, not held forever (not waited
    // for here; the server keeps answering others meanwhile).
    let mut slow = tokio::net::UnixStream::connect(&served.path)
        .await
        .expect("connect");
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost:")
        .await
        .expect("partial");

    let r = get(&served.path, "/v1/stats").await;
    assert!(status_line(&r).contains(" 200 "), "{r}");
    assert!(!served.task.is_finished());
}

#[tokio::test]
async fn the_socket_is_private_and_exclusive() {
    let served = serve("debug-socket");
    let meta = std::fs::metadata(&served.path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(served.path.parent().expect("parent")).expect("dir");
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    let err = DebugServer::bind(&served.path).expect_err("a live socket is not taken over");
    assert_eq!(
        err.to_string(),
        format!(
            "another agent is serving the debug socket at {}",
            served.path.display()
        )
    );
    // The refused bind did not disturb the running server.
    let r = get(&served.path, "/v1/status").await;
    assert!(status_line(&r).contains(" 200 "), "{r}");

    let plain = served.dir.join("not-a-socket");
    std::fs::write(&plain, "keep me").expect("write");
    assert!(matches!(
        DebugServer::bind(&plain),
        Err(DebugError::NotASocket { .. })
    ));
    assert_eq!(
        std::fs::read_to_string(&plain).expect("still there"),
        "keep me"
    );
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_drop_removes_ours() {
    let dir = TempDir::new("debug-stale");
    let path = dir.join("debug.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale listener"));
    assert!(path.exists(), "std leaves the socket file behind");
    let server = DebugServer::bind(&path).expect("the stale socket is replaced");
    let task = tokio::spawn(server.serve(Arc::new(Fixed)));
    let r = get(&path, "/v1/status").await;
    assert!(status_line(&r).contains(" 200 "), "{r}");
    task.abort();
    let _ = task.await;
    assert!(!path.exists(), "the socket file goes with the server");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let dir = TempDir::new("debug-slow");
    let path = dir.join("debug.sock");
    let server = DebugServer::bind(&path)
        .expect("bind")
        .with_request_timeout(Duration::from_millis(200));
    let task = tokio::spawn(server.serve(Arc::new(Fixed)));
    // Partial headers: the server gives up on them and closes (raw() waits at most 5 s).
    let _ = raw(&path, b"GET /v1/status HTTP/1.1\r\nHost:").await;
    // A body that never arrives: 408, and the connection ends.
    let started = std::time::Instant::now();
    let r = raw(
        &path,
        b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab",
    )
    .await;
    assert!(status_line(&r).contains(" 408 "), "{r}");
    assert!(started.elapsed() < Duration::from_secs(5));
    task.abort();
}
