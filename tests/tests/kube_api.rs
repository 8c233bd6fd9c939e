//! The test API server (`latch_tests::kube_api`) against kube-rs 5, the client the agent's
//! Kubernetes mode uses: reflectors over Pods by node, the 410 re-list, discovery of Istio's
//! group with and without its CRDs, RBAC from `deploy/rbac.yaml`, selectors, an outage.
//! No kernel and no root needed: the server listens on 127.0.0.1.

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::{
    Api, Client, Config, ResourceExt as _,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams, WatchEvent,
        WatchParams,
    },
    discovery::{self, Discovery},
    runtime::{reflector, watcher},
};
use latch_tests::kube_api::{
    Kind, KubeApiServer, Observed,
    fixtures::{self, Qos, authorization_policy, namespace, pod},
};
use serde_json::json;

/// A guard against a hung test only: nothing waits for time to pass.
const LIMIT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client(server: &KubeApiServer) -> Client {
    let config = Config::new(server.url().parse().expect("URL"));
    Client::try_from(config).expect("kube client over plain HTTP")
}

async fn next<T>(s: &mut (impl Stream<Item = T> + Unpin)) -> T {
    tokio::time::timeout(LIMIT, s.next())
        .await
        .expect("no event: the stream hung")
        .expect("the stream ended")
}

fn key(p: &impl kube::Resource) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// A watcher event in a few words: `Init`, `InitApply(prod/a1)`, `Apply(prod/a1)`, ...
fn event(e: Result<watcher::Event<Pod>, watcher::Error>) -> String {
    match e {
        Ok(watcher::Event::Init) => "Init".to_owned(),
        Ok(watcher::Event::InitApply(p)) => format!("InitApply({})", key(&p)),
        Ok(watcher::Event::InitDone) => "InitDone".to_owned(),
        Ok(watcher::Event::Apply(p)) => format!("Apply({})", key(&p)),
        Ok(watcher::Event::Delete(p)) => format!("Delete({})", key(&p)),
        Err(watcher::Error::WatchError(s)) => format!("WatchError({} {})", s.code, s.reason),
        Err(e) => format!("Err({e})"),
    }
}

/// A raw watch event in a few words: `ADDED prod/a1`, `BOOKMARK 7`, `ERROR 410 Expired`.
fn raw<K: kube::Resource>(e: kube::Result<WatchEvent<K>>) -> String {
    match e {
        Ok(WatchEvent::Added(o)) => format!("ADDED {}", key(&o)),
        Ok(WatchEvent::Modified(o)) => format!("MODIFIED {}", key(&o)),
        Ok(WatchEvent::Deleted(o)) => format!("DELETED {}", key(&o)),
        Ok(WatchEvent::Bookmark(b)) => format!("BOOKMARK {}", b.metadata.resource_version),
        Ok(WatchEvent::Error(s)) => format!("ERROR {} {}", s.code, s.reason),
        Err(e) => format!("Err({e})"),
    }
}

/// Drive a watcher on its own task (it only asks the server while polled), its events in a
/// few words on a channel.
fn pump(
    stream: impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(e) = stream.next().await {
            if tx.send(event(e)).is_err() {
                return;
            }
        }
    });
    rx
}

async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("no event: the watcher hung")
        .expect("the watcher ended")
}

fn names(state: Vec<std::sync::Arc<Pod>>) -> Vec<String> {
    let mut names: Vec<String> = state.iter().map(|p| key(p.as_ref())).collect();
    names.sort();
    names
}

/// Block (off the runtime's worker) until `cond` holds of the server's log and watches.
fn wait(server: &KubeApiServer, what: &str, cond: impl FnMut(&Observed) -> bool) {
    let held = tokio::task::block_in_place(|| server.wait_for(LIMIT, cond));
    assert!(held, "never happened: {what}");
}

fn server_with_prod() -> KubeApiServer {
    let server = KubeApiServer::start_local().expect("server");
    server
        .apply(&namespace(
            "prod",
            &[("istio.io/dataplane-mode", "ambient")],
        ))
        .expect("namespace");
    server
}

#[test]
fn node_pods_reflector_sees_list_added_modified_left_and_deleted() {
    let server = server_with_prod();
    let node_a = |name: &str| pod("prod", name).node("node-a").label("app", "web");
    server
        .apply(&node_a("a1").ip("10.244.1.2").build())
        .expect("a1");
    server
        .apply(&pod("prod", "b1").node("node-b").ip("10.244.2.2").build())
        .expect("b1");
    // Not scheduled yet.
    server
        .apply(
            &pod("prod", "p0")
                .label("app", "web")
                .phase("Pending")
                .build(),
        )
        .expect("p0");

    runtime().block_on(async {
        let client = client(&server);
        let pods: Api<Pod> = Api::all(client);
        let (reader, writer) = reflector::store();
        let mut node = reflector(
            writer,
            watcher(
                pods.clone(),
                watcher::Config::default().fields("spec.nodeName=node-a"),
            ),
        )
        .boxed();
        assert_eq!(event(next(&mut node).await), "Init");
        assert_eq!(event(next(&mut node).await), "InitApply(prod/a1)");
        assert_eq!(event(next(&mut node).await), "InitDone");

        // The same selection watched raw, to see the event types the server sends, and one
        // narrowed by a label to see an object leave a selector.
        let listed = server.resource_version().to_string();
        let wp = WatchParams::default().fields("spec.nodeName=node-a");
        let mut typed = pods.watch(&wp, &listed).await.expect("watch").boxed();
        let mut web = pods
            .watch(&wp.clone().labels("app=web"), &listed)
            .await
            .expect("watch")
            .boxed();

        server.apply(&node_a("a2").build()).expect("a2");
        server
            .apply(&pod("prod", "b2").node("node-b").build())
            .expect("b2 elsewhere");
        server
            .merge_patch(
                Kind::Pod,
                "prod",
                "a1",
                &json!({"metadata": {"labels": {"app": "api"}}}),
            )
            .expect("relabel a1");
        server
            .modify::<Pod>("prod", "p0", |p| {
                p.spec.as_mut().expect("spec").node_name = Some("node-a".to_owned());
            })
            .expect("schedule p0");
        server
            .begin_deletion(Kind::Pod, "prod", "a2", 30)
            .expect("terminating a2");
        server.delete(Kind::Pod, "prod", "a2").expect("delete a2");

        for want in [
            "Apply(prod/a2)",
            "Apply(prod/a1)",
            "Apply(prod/p0)",
            "Apply(prod/a2)",
            "Delete(prod/a2)",
        ] {
            assert_eq!(event(next(&mut node).await), want);
        }
        for want in [
            "ADDED prod/a2",
            "MODIFIED prod/a1",
            "ADDED prod/p0",
            "MODIFIED prod/a2",
            "DELETED prod/a2",
        ] {
            assert_eq!(raw(next(&mut typed).await), want);
        }
        for want in [
            "ADDED prod/a2",
            "DELETED prod/a1",
            "ADDED prod/p0",
            "MODIFIED prod/a2",
            "DELETED prod/a2",
        ] {
            assert_eq!(raw(next(&mut web).await), want);
        }
        assert_eq!(names(reader.state()), ["prod/a1", "prod/p0"]);
        let a1 = reader
            .state()
            .into_iter()
            .find(|p| p.name_any() == "a1")
            .expect("a1");
        assert_eq!(a1.labels()["app"], "api");
        // A bookmark, asked for (kube's WatchParams allow them by default), at the current
        // resourceVersion; the raw watch with bookmarks disallowed gets none, only what follows.
        let mut quiet = pods
            .watch(
                &wp.clone().disable_bookmarks(),
                &server.resource_version().to_string(),
            )
            .await
            .expect("watch")
            .boxed();
        server.bookmark();
        let rv = server.resource_version();
        assert_eq!(raw(next(&mut web).await), format!("BOOKMARK {rv}"));
        server.apply(&node_a("a3").build()).expect("a3");
        assert_eq!(raw(next(&mut quiet).await), "ADDED prod/a3");
    });

    // What kube-runtime 5's watcher sends (the default `watcher::Config`): a list with
    // limit=500 and no resourceVersion, then a watch from the list's resourceVersion with
    // bookmarks and a 290 s timeout.
    let log = server.requests();
    assert!(log.iter().all(|r| r.allowed), "{log:#?}");
    let list = log
        .iter()
        .find(|r| r.verb() == "list" && r.resource() == "pods")
        .expect("a list");
    assert_eq!(list.path, "/api/v1/pods");
    assert_eq!(list.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(list.param("limit"), Some("500"));
    assert_eq!(list.param("resourceVersion"), None);
    // The watcher's watch and the raw one above, both from the list's resourceVersion.
    let watches: Vec<_> = log
        .iter()
        .filter(|r| {
            r.verb() == "watch"
                && r.param("labelSelector").is_none()
                && r.param("allowWatchBookmarks") == Some("true")
        })
        .collect();
    assert_eq!(watches.len(), 2, "{watches:#?}");
    for watch in watches {
        assert_eq!(watch.param("watch"), Some("true"));
        assert_eq!(watch.param("timeoutSeconds"), Some("290"));
        assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
        assert_eq!(watch.param("resourceVersion"), Some("4"));
    }
}

#[test]
fn after_compaction_the_watcher_gets_410_and_lists_again() {
    let server = server_with_prod();
    for name in ["x1", "x2"] {
        server
            .apply(&pod("prod", name).node("node-a").build())
            .expect("pod");
    }
    let listed_at = server.resource_version();

    runtime().block_on(async {
        let pods: Api<Pod> = Api::all(client(&server));
        let (reader, writer) = reflector::store();
        let mut w = pump(reflector(
            writer,
            watcher(pods.clone(), watcher::Config::default()),
        ));
        for want in [
            "Init",
            "InitApply(prod/x1)",
            "InitApply(prod/x2)",
            "InitDone",
        ] {
            assert_eq!(recv(&mut w).await, want);
        }
        wait(&server, "the watch is open", |o| {
            o.open_watches.values().any(|w| w.kind == Kind::Pod)
        });
        let seen = server.requests().len();

        // The watch ends; its re-watch (from `listed_at`) is held by the outage while the world
        // moves on and the history is compacted past it.
        server.go_silent();
        server.drop_watches();
        let from = listed_at.to_string();
        wait(&server, "the watcher watches again", |o| {
            o.requests[seen..]
                .iter()
                .any(|r| r.verb() == "watch" && r.param("resourceVersion") == Some(from.as_str()))
        });
        server.delete(Kind::Pod, "prod", "x1").expect("delete");
        server
            .apply(&pod("prod", "x3").node("node-b").build())
            .expect("x3");
        server
            .update(Kind::Pod, "prod", "x2", |p| {
                p["metadata"]["labels"] = json!({"moved": "yes"});
            })
            .expect("x2");
        let compacted = server.compact();
        assert!(compacted > listed_at);
        server.resume();

        for want in [
            "WatchError(410 Expired)",
            "Init",
            "InitApply(prod/x2)",
            "InitApply(prod/x3)",
            "InitDone",
        ] {
            assert_eq!(recv(&mut w).await, want);
        }
        assert_eq!(names(reader.state()), ["prod/x2", "prod/x3"]);
        let x2 = reader
            .state()
            .into_iter()
            .find(|p| p.name_any() == "x2")
            .expect("x2");
        assert_eq!(x2.labels()["moved"], "yes");

        // The same, raw: a watch from before the compaction is one ERROR event; an exact list
        // there is a 410 answer.
        let mut old = pods
            .watch(&WatchParams::default(), &listed_at.to_string())
            .await
            .expect("watch")
            .boxed();
        assert_eq!(raw(next(&mut old).await), "ERROR 410 Expired");
        let exact = ListParams::default()
            .at(&listed_at.to_string())
            .matching(kube::api::VersionMatch::Exact);
        match pods.list(&exact).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, &*s.reason), (410, "Expired")),
            other => panic!("exact list before the compaction: {other:?}"),
        }
        let now = ListParams::default()
            .at(&compacted.to_string())
            .matching(kube::api::VersionMatch::Exact);
        assert_eq!(
            pods.list(&now).await.expect("exact list now").items.len(),
            2
        );
    });

    // After the 410 the watcher listed again (no resourceVersion), then watched from there.
    let log = server.requests();
    let lists: Vec<_> = log.iter().filter(|r| r.verb() == "list").collect();
    assert!(lists.len() >= 2, "{lists:#?}");
}

#[test]
fn istio_group_is_discovered_only_while_its_crds_are_installed() {
    let server = server_with_prod();
    server.uninstall_istio_crds();
    let ap_v1 = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    );
    let policy = authorization_policy(
        "prod",
        "allow-frontend",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/frontend"]}}]}]}),
    );
    assert!(server.apply(&policy).is_err(), "no CRD, no policy");

    runtime().block_on(async {
        let client = client(&server);
        let aps: Api<DynamicObject> = Api::all_with(client.clone(), &ap_v1);
        match aps.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, &*s.reason), (404, "NotFound")),
            other => panic!("list without the CRD: {other:?}"),
        }
        let answered = server
            .requests()
            .iter()
            .find(|r| r.path == "/apis/security.istio.io/v1/authorizationpolicies")
            .and_then(|r| r.status);
        assert_eq!(answered, Some(404), "allowed by RBAC, but not served");
        let d = Discovery::new(client.clone())
            .run()
            .await
            .expect("discovery");
        assert!(!d.has_group("security.istio.io"));
        assert!(d.has_group(""), "the core group");
        assert!(
            discovery::group(&client, "security.istio.io")
                .await
                .is_err()
        );
        let agg = Discovery::new(client.clone())
            .run_aggregated()
            .await
            .expect("aggregated discovery");
        assert!(!agg.has_group("security.istio.io"));

        server.install_istio_crds();
        server.apply(&policy).expect("policy");
        let d = Discovery::new(client.clone())
            .run()
            .await
            .expect("discovery");
        let group = d
            .get("security.istio.io")
            .expect("the group, once installed");
        assert_eq!(group.versions().collect::<Vec<_>>(), ["v1", "v1beta1"]);
        assert_eq!(group.preferred_version_or_latest(), "v1");
        let (ar, caps) = group
            .recommended_kind("AuthorizationPolicy")
            .expect("AuthorizationPolicy");
        assert_eq!(
            (ar.version.as_str(), ar.plural.as_str()),
            ("v1", "authorizationpolicies")
        );
        assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
        for kind in ["PeerAuthentication", "RequestAuthentication"] {
            assert!(group.recommended_kind(kind).is_some(), "{kind}");
        }
        let agg = Discovery::new(client.clone())
            .run_aggregated()
            .await
            .expect("aggregated discovery");
        assert!(agg.has_group("security.istio.io"));

        // Both versions serve the one object, each with its own apiVersion.
        let gvk = GroupVersionKind::gvk("security.istio.io", "v1beta1", "AuthorizationPolicy");
        let (ar_beta, _) = discovery::pinned_kind(&client, &gvk)
            .await
            .expect("v1beta1");
        let beta: Api<DynamicObject> = Api::namespaced_with(client.clone(), "prod", &ar_beta);
        let listed = beta
            .list(&ListParams::default())
            .await
            .expect("v1beta1 list");
        assert_eq!(listed.items.len(), 1);
        assert_eq!(
            listed.items[0]
                .types
                .as_ref()
                .map(|t| t.api_version.as_str()),
            Some("security.istio.io/v1beta1")
        );
        let got = aps.list(&ListParams::default()).await.expect("v1 list");
        assert_eq!(
            got.items[0].metadata.name.as_deref(),
            Some("allow-frontend")
        );

        // Removing the CRDs deletes the policies (a watch sees it) and ends their watches.
        let mut w = aps
            .watch(
                &WatchParams::default(),
                &server.resource_version().to_string(),
            )
            .await
            .expect("watch")
            .boxed();
        server.uninstall_istio_crds();
        assert_eq!(raw(next(&mut w).await), "DELETED prod/allow-frontend");
        let end = tokio::time::timeout(LIMIT, w.next()).await.expect("hung");
        assert!(end.is_none(), "the watch ends with its CRD");
        match aps.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
            other => panic!("list after uninstall: {other:?}"),
        }
    });
}

#[test]
fn rbac_refuses_what_the_cluster_role_does_not_grant_and_logs_it() {
    let server = server_with_prod();
    runtime().block_on(async {
        let client = client(&server);
        let secrets: Api<Secret> = Api::all(client.clone());
        match secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!((s.code, &*s.reason), (403, "Forbidden"));
                assert!(
                    s.message.contains(
                        "User \"system:serviceaccount:latch-system:latch\" cannot list resource \"secrets\""
                    ),
                    "{}",
                    s.message
                );
            }
            other => panic!("listing secrets: {other:?}"),
        }
        let in_prod: Api<Secret> = Api::namespaced(client.clone(), "prod");
        assert!(in_prod.get("token").await.is_err());
        let pods: Api<Pod> = Api::namespaced(client.clone(), "prod");
        let created = pods
            .create(&PostParams::default(), &pod("prod", "new").build())
            .await;
        assert!(created.is_err(), "the agent may not write");

        // What it may do.
        let mut w = pods
            .watch(&WatchParams::default(), "0")
            .await
            .expect("watch pods")
            .boxed();
        server
            .apply(&pod("prod", "w1").node("node-a").build())
            .expect("pod");
        assert_eq!(raw(next(&mut w).await), "ADDED prod/w1");
        let ns: Api<Namespace> = Api::all(client.clone());
        assert_eq!(ns.get("prod").await.expect("get namespace").name_any(), "prod");
        client.apiserver_version().await.expect("/version");
    });

    assert!(server.denied().iter().all(|r| r.status == Some(403)));
    let denied: Vec<(String, String, String)> = server
        .denied()
        .into_iter()
        .map(|r| (r.attrs.verb, r.attrs.resource, r.attrs.namespace))
        .collect();
    assert_eq!(
        denied,
        [
            ("list".into(), "secrets".into(), "".into()),
            ("get".into(), "secrets".into(), "prod".into()),
            ("create".into(), "pods".into(), "prod".into()),
        ]
    );
    let log = server.requests();
    let verb_of = |path: &str| {
        log.iter()
            .find(|r| r.path == path && r.allowed)
            .map(|r| r.verb().to_owned())
    };
    assert_eq!(
        verb_of("/api/v1/namespaces/prod/pods").as_deref(),
        Some("watch")
    );
    assert_eq!(verb_of("/api/v1/namespaces/prod").as_deref(), Some("get"));
    assert_eq!(verb_of("/version").as_deref(), Some("get"));
}

#[test]
fn label_and_field_selectors_on_list() {
    let server = server_with_prod();
    let pods = [
        pod("prod", "a")
            .node("node-a")
            .label("app", "web")
            .label("tier", "front"),
        pod("prod", "b")
            .node("node-b")
            .label("app", "api")
            .label("tier", "back"),
        pod("prod", "c").node("node-a").label("app", "web"),
        pod("prod", "d").node("node-b").qos(Qos::Guaranteed),
    ];
    for p in pods {
        server.apply(&p.build()).expect("pod");
    }
    let cases: &[(&str, &str, &[&str])] = &[
        ("", "", &["a", "b", "c", "d"]),
        ("app=web", "", &["a", "c"]),
        ("app==web", "", &["a", "c"]),
        ("app!=web", "", &["b", "d"]),
        ("app in (web, api)", "", &["a", "b", "c"]),
        ("app notin (web)", "", &["b", "d"]),
        ("tier", "", &["a", "b"]),
        ("!tier", "", &["c", "d"]),
        ("app=web,tier", "", &["a"]),
        ("app=web,!tier", "", &["c"]),
        ("tier in (front),app notin (api)", "", &["a"]),
        ("", "spec.nodeName=node-a", &["a", "c"]),
        ("", "spec.nodeName!=node-a", &["b", "d"]),
        ("", "metadata.name=d", &["d"]),
        (
            "",
            "metadata.namespace=prod,spec.nodeName=node-b",
            &["b", "d"],
        ),
        ("app", "spec.nodeName=node-b", &["b"]),
    ];
    runtime().block_on(async {
        let api: Api<Pod> = Api::all(client(&server));
        for (labels, fields, want) in cases {
            let mut lp = ListParams::default();
            if !labels.is_empty() {
                lp = lp.labels(labels);
            }
            if !fields.is_empty() {
                lp = lp.fields(fields);
            }
            let got: Vec<String> = api
                .list(&lp)
                .await
                .unwrap_or_else(|e| panic!("{labels:?} {fields:?}: {e}"))
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            assert_eq!(got, *want, "labels {labels:?} fields {fields:?}");
        }
        for (labels, fields) in [("app in web", ""), ("", "spec.color=red")] {
            let lp = ListParams::default().labels(labels).fields(fields);
            match api.list(&lp).await {
                Err(kube::Error::Api(s)) => assert_eq!((s.code, &*s.reason), (400, "BadRequest")),
                other => panic!("{labels:?} {fields:?}: {other:?}"),
            }
        }
    });
}

#[test]
fn an_outage_stalls_the_watcher_and_it_catches_up_after() {
    let server = server_with_prod();
    server
        .apply(&pod("prod", "s1").node("node-a").label("v", "1").build())
        .expect("s1");

    runtime().block_on(async {
        let pods: Api<Pod> = Api::namespaced(client(&server), "prod");
        let (reader, writer) = reflector::store();
        let mut w = pump(reflector(
            writer,
            watcher(pods.clone(), watcher::Config::default()),
        ));
        for want in ["Init", "InitApply(prod/s1)", "InitDone"] {
            assert_eq!(recv(&mut w).await, want);
        }
        wait(&server, "the watch is open", |o| !o.open_watches.is_empty());

        server.go_silent();
        server
            .apply(&pod("prod", "s2").node("node-a").build())
            .expect("s2");
        server
            .update(Kind::Pod, "prod", "s1", |p| {
                p["metadata"]["labels"]["v"] = json!("2");
            })
            .expect("s1");
        // A new request is taken but not answered.
        let seen = server.requests().len();
        let list = tokio::spawn({
            let pods = pods.clone();
            async move { pods.list(&ListParams::default()).await }
        });
        wait(&server, "the list arrived", |o| {
            o.requests[seen..].iter().any(|r| r.verb() == "list")
        });
        assert!(!list.is_finished(), "a silent server answered");
        // The open watch sent nothing since the outage began.
        let sent: Vec<u64> = server
            .open_watches()
            .iter()
            .map(|w| w.events_sent)
            .collect();
        assert_eq!(sent, [0], "the watch sent something during the outage");
        assert!(w.try_recv().is_err(), "an event during the outage");

        server.resume();
        assert_eq!(recv(&mut w).await, "Apply(prod/s2)");
        assert_eq!(recv(&mut w).await, "Apply(prod/s1)");
        let listed = tokio::time::timeout(LIMIT, list)
            .await
            .expect("hung")
            .expect("task")
            .expect("list");
        assert_eq!(listed.items.len(), 2);
        assert_eq!(names(reader.state()), ["prod/s1", "prod/s2"]);
        let s1 = reader
            .state()
            .into_iter()
            .find(|p| p.name_any() == "s1")
            .expect("s1");
        assert_eq!(s1.labels()["v"], "2");
    });
}

#[test]
fn streaming_lists_bookmarks_and_timeouts() {
    let server = server_with_prod();
    server
        .apply(&pod("prod", "t1").node("node-a").build())
        .expect("t1");
    runtime().block_on(async {
        let pods: Api<Pod> = Api::all(client(&server));
        // The initial state through a watch (sendInitialEvents), ended by a bookmark.
        let mut w = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
        for want in ["Init", "InitApply(prod/t1)", "InitDone"] {
            assert_eq!(event(next(&mut w).await), want);
        }
        server
            .apply(&pod("prod", "t2").node("node-a").build())
            .expect("t2");
        assert_eq!(event(next(&mut w).await), "Apply(prod/t2)");
        let streaming = server
            .requests()
            .into_iter()
            .find(|r| r.param("sendInitialEvents").is_some())
            .expect("a streaming list");
        assert_eq!(
            streaming.param("resourceVersionMatch"),
            Some("NotOlderThan")
        );
        assert_eq!(streaming.param("resourceVersion"), Some("0"));

        // Bookmarks on demand, at the current resourceVersion.
        let rv = server.resource_version().to_string();
        let mut b = pods
            .watch(&WatchParams::default().timeout(1), &rv)
            .await
            .expect("watch")
            .boxed();
        server.bookmark();
        assert_eq!(raw(next(&mut b).await), format!("BOOKMARK {rv}"));
        // timeoutSeconds ends the watch.
        assert!(
            tokio::time::timeout(LIMIT, b.next())
                .await
                .expect("hung")
                .is_none()
        );
    });
}

#[test]
fn the_server_frees_its_port_on_drop() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = KubeApiServer::start(listener).expect("server");
    server.apply(&namespace("prod", &[])).expect("namespace");
    let held = std::net::TcpStream::connect(addr).expect("connect");
    drop(server);
    std::net::TcpListener::bind(addr).expect("the port is free again");
    drop(held);
}

/// Agents run inside network namespaces: the server listens inside one, on a listener the test
/// bound there.
#[test]
fn the_server_serves_inside_a_network_namespace() {
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = latch_tests::netns::delete(&self.0);
        }
    }
    let ns = Netns(format!("latch-kapi-{}", std::process::id()));
    latch_tests::netns::create(&ns.0).expect("netns (needs root)");
    let path = latch_tests::netns::path(&ns.0);
    let listener =
        latch_tests::netns::in_netns(&path, || Ok(std::net::TcpListener::bind("127.0.0.1:0")?))
            .expect("bind inside the netns");
    let server = KubeApiServer::start(listener).expect("server");
    let addr = server.addr();
    let answer = latch_tests::netns::in_netns(&path, move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(b"GET /version HTTP/1.1\r\nHost: kube\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("GET /version from inside the netns");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"gitVersion\":\"v1.33.0\""), "{answer}");
}

/// The agent's other watches: Namespaces (enrolment labels; deleting one takes its pods with it)
/// and Istio policies as dynamic objects, one written at v1beta1 and read at v1.
#[test]
fn namespaces_and_policies_through_watchers() {
    let server = server_with_prod();
    server
        .apply(&pod("prod", "web-1").node("node-a").build())
        .expect("pod");
    runtime().block_on(async {
        let client = client(&server);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut ns = watcher(namespaces, watcher::Config::default()).boxed();
        let mut described = Vec::new();
        for _ in 0..3 {
            described.push(match next(&mut ns).await.expect("event") {
                watcher::Event::InitApply(n) => format!(
                    "InitApply({} {:?})",
                    n.name_any(),
                    n.labels().get("istio.io/dataplane-mode")
                ),
                other => format!("{:?}", std::mem::discriminant(&other)),
            });
        }
        assert_eq!(described[1], "InitApply(prod Some(\"ambient\"))");

        let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication");
        let (ar, _) = discovery::pinned_kind(&client, &gvk)
            .await
            .expect("discovered");
        let pas: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let mut pa = watcher(pas, watcher::Config::default()).boxed();
        for want in ["Init", "InitDone"] {
            let got = match next(&mut pa).await.expect("event") {
                watcher::Event::Init => "Init",
                watcher::Event::InitDone => "InitDone",
                _ => "other",
            };
            assert_eq!(got, want);
        }
        let mut strict =
            fixtures::peer_authentication("prod", "strict", json!({"mtls": {"mode": "STRICT"}}));
        strict["apiVersion"] = json!("security.istio.io/v1beta1");
        server
            .apply(&strict)
            .expect("PeerAuthentication at v1beta1");
        match next(&mut pa).await.expect("event") {
            watcher::Event::Apply(o) => {
                assert_eq!(o.name_any(), "strict");
                assert_eq!(
                    o.types.as_ref().map(|t| t.api_version.as_str()),
                    Some("security.istio.io/v1")
                );
                assert_eq!(o.data["spec"]["mtls"]["mode"], "STRICT");
            }
            other => panic!("{other:?}"),
        }

        // Un-enrol the namespace, then delete it: it turns Terminating, its pod and policy go,
        // then it does.
        server
            .merge_patch(
                Kind::Namespace,
                "",
                "prod",
                &json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}}),
            )
            .expect("un-enrol");
        match next(&mut ns).await.expect("event") {
            watcher::Event::Apply(n) => {
                assert!(!n.labels().contains_key("istio.io/dataplane-mode"));
                assert_eq!(n.labels()["kubernetes.io/metadata.name"], "prod");
            }
            other => panic!("{other:?}"),
        }
        server.delete(Kind::Namespace, "", "prod").expect("delete");
        match next(&mut ns).await.expect("event") {
            watcher::Event::Apply(n) => {
                let phase = n.status.and_then(|s| s.phase);
                assert_eq!(phase.as_deref(), Some("Terminating"));
            }
            other => panic!("{other:?}"),
        }
        match next(&mut ns).await.expect("event") {
            watcher::Event::Delete(n) => assert_eq!(n.name_any(), "prod"),
            other => panic!("{other:?}"),
        }
        match next(&mut pa).await.expect("event") {
            watcher::Event::Delete(o) => assert_eq!(o.name_any(), "strict"),
            other => panic!("{other:?}"),
        }
    });
    assert!(server.get(Kind::Pod, "prod", "web-1").is_none());
    assert!(server.denied().is_empty());
}
