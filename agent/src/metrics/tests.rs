//! Tests of the metrics registry and its exposition.

use std::{collections::BTreeMap, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";
const PAYMENT: &str = "spiffe://cluster.local/ns/prod/sa/payment";

/// Check every sample line is `name{labels} value` (or `name value`) with well-formed labels;
/// return the samples keyed by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value
            .parse()
            .or_else(|e| {
                if value == "+Inf" {
                    Ok(f64::INFINITY)
                } else {
                    Err(e)
                }
            })
            .expect("numeric value");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = series[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .expect("labels in braces");
            for label in labels.split("\",") {
                let (k, v) = label.split_once("=\"").expect("label=\"value\"");
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line:?}"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "{line:?}");
            }
        }
        out.insert(series.to_owned(), value);
    }
    out
}

fn labels(reporter: Reporter) -> Labels {
    Labels {
        reporter,
        source_workload: "frontend".into(),
        source_workload_namespace: "prod".into(),
        source_principal: FRONTEND.into(),
        destination_workload: "payment".into(),
        destination_workload_namespace: "prod".into(),
        destination_principal: PAYMENT.into(),
        destination_service: "unknown".into(),
        destination_port: 8080,
        connection_security_policy: "mutual_tls",
        path: "tunnel",
    }
}

#[test]
fn recorded_values_are_exposed() {
    let metrics = Metrics::new();
    let clone = metrics.clone();
    metrics.connection_opened(&labels(Reporter::Source));
    clone.connection_opened(&labels(Reporter::Source));
    metrics.connection_closed(&labels(Reporter::Source), 100, 2000);
    metrics.connection_opened(&labels(Reporter::Destination));
    metrics.policy_decision(true);
    metrics.policy_decision(true);
    metrics.policy_decision(false);
    metrics.handshake(Duration::from_micros(300));
    metrics.handshake(Duration::from_secs(10));

    let text = metrics.encode().expect("encodes");
    let s = samples(&text);
    let series = |name: &str, reporter: &str| {
        format!(
            "{name}{{reporter=\"{reporter}\",source_workload=\"frontend\",\
             source_workload_namespace=\"prod\",source_principal=\"{FRONTEND}\",\
             destination_workload=\"payment\",destination_workload_namespace=\"prod\",\
             destination_principal=\"{PAYMENT}\",destination_service=\"unknown\",\
             destination_port=\"8080\",connection_security_policy=\"mutual_tls\",\
             path=\"tunnel\"}}"
        )
    };
    assert_eq!(
        s[&series("istio_tcp_connections_opened_total", "source")],
        2.0,
        "{text}"
    );
    assert_eq!(
        s[&series("istio_tcp_connections_opened_total", "destination")],
        1.0
    );
    assert_eq!(
        s[&series("istio_tcp_connections_closed_total", "source")],
        1.0
    );
    assert_eq!(s[&series("istio_tcp_sent_bytes_total", "source")], 100.0);
    assert_eq!(
        s[&series("istio_tcp_received_bytes_total", "source")],
        2000.0
    );
    assert_eq!(s["latch_policy_decisions_total{decision=\"allow\"}"], 2.0);
    assert_eq!(s["latch_policy_decisions_total{decision=\"deny\"}"], 1.0);
    assert_eq!(s["latch_tunnel_handshake_seconds_count"], 2.0);
    assert_eq!(
        s["latch_tunnel_handshake_seconds_bucket{le=\"0.0001\"}"],
        0.0
    );
    assert_eq!(
        s["latch_tunnel_handshake_seconds_bucket{le=\"0.0005\"}"],
        1.0
    );
    assert_eq!(s["latch_tunnel_handshake_seconds_bucket{le=\"5.0\"}"], 1.0);
    assert_eq!(s["latch_tunnel_handshake_seconds_bucket{le=\"+Inf\"}"], 2.0);
    // Without a scrape source, no scrape-time metrics.
    assert!(!text.contains("latch_verdict_cache_entries"));
}

#[test]
fn scrape_source_values_are_read_at_each_scrape() {
    let metrics = Metrics::new();
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = scrapes.clone();
    metrics.set_scrape_source(Box::new(move || {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        ScrapeSnapshot {
            kernel_counters: KernelCounter::ALL
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, i as u64 * 10 + n))
                .collect(),
            cache_entries: 7,
            cert_expiry: vec![(FRONTEND.into(), 1800.5)],
            busy_poll_seconds: 0.25,
            busy_poll_stretches: (40, 2),
            failed_workloads: 2,
            api_failing: Some(true),
            refused_policies: 3,
        }
    }));
    let first = samples(&metrics.encode().expect("encodes"));
    let second = samples(&metrics.encode().expect("encodes"));
    assert_eq!(first["latch_fastpath_connections_total"], 1.0);
    assert_eq!(second["latch_fastpath_connections_total"], 2.0);
    assert_eq!(second["latch_kubernetes_api_failing"], 1.0);
    assert_eq!(second["latch_policy_objects_refused"], 3.0);
    assert_eq!(second["latch_redirected_connections_total"], 12.0);
    assert_eq!(second["latch_cached_deny_connections_total"], 22.0);
    assert_eq!(second["latch_inbound_admitted_total"], 32.0);
    assert_eq!(second["latch_inbound_steered_total"], 42.0);
    assert_eq!(second["latch_inbound_rejected_total"], 52.0);
    assert_eq!(second["latch_verdict_cache_entries"], 7.0);
    assert_eq!(second["latch_workloads_failed"], 2.0);
    assert_eq!(second["latch_busy_poll_seconds_total"], 0.25);
    assert_eq!(
        second["latch_busy_poll_idle_stretches_total{ended=\"within_window\"}"],
        40.0
    );
    assert_eq!(
        second["latch_busy_poll_idle_stretches_total{ended=\"after_window\"}"],
        2.0
    );
    assert_eq!(
        second[&format!("latch_certificate_expiry_seconds{{identity=\"{FRONTEND}\"}}")],
        1800.5
    );
}

#[tokio::test]
async fn the_endpoint_serves_metrics_and_404s_the_rest() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Metrics::new();
    metrics.policy_decision(false);
    let task = tokio::spawn(http::serve_on(listener, metrics));
    let get = async |path: &str| {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
            .await
            .expect("answer in time")
            .expect("read");
        out
    };
    let ok = get("/metrics").await;
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.contains(http::CONTENT_TYPE_OPENMETRICS), "{ok}");
    assert!(
        ok.contains("latch_policy_decisions_total{decision=\"deny\"} 1"),
        "{ok}"
    );
    let missing = get("/other").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    task.abort();
}

#[test]
fn requests_are_counted_and_timed_by_response_code_with_the_connection_labels() {
    let metrics = Metrics::new();
    let mut connection = labels(Reporter::Destination);
    connection.path = "http";
    metrics.request(connection.clone(), 200, Duration::from_millis(3));
    metrics.request(connection.clone(), 200, Duration::from_millis(30));
    metrics.request(connection, 403, Duration::from_micros(200));
    let text = metrics.encode().expect("encodes");
    let s = samples(&text);
    let find = |name: &str, code: &str, extra: &str| -> f64 {
        let hits: Vec<f64> = s
            .iter()
            .filter(|(k, _)| {
                k.split('{').next() == Some(name)
                    && k.contains("reporter=\"destination\"")
                    && k.contains("path=\"http\"")
                    && k.contains("request_protocol=\"http\"")
                    && k.contains(&format!("response_code=\"{code}\""))
                    && k.contains(extra)
            })
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(hits.len(), 1, "{name} {code} {extra} in {text}");
        hits[0]
    };
    assert_eq!(find("istio_requests_total", "200", ""), 2.0);
    assert_eq!(find("istio_requests_total", "403", ""), 1.0);
    assert_eq!(
        find("istio_request_duration_milliseconds_count", "200", ""),
        2.0
    );
    assert_eq!(
        find(
            "istio_request_duration_milliseconds_bucket",
            "200",
            "le=\"5.0\""
        ),
        1.0
    );
    assert_eq!(
        find(
            "istio_request_duration_milliseconds_bucket",
            "403",
            "le=\"0.5\""
        ),
        1.0
    );
}
