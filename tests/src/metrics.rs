//! An agent's Prometheus metrics as a test reads them: the exposition fetched from inside the
//! node's network namespace (the default `127.0.0.1:15020`), its samples, and one sample's sum.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use crate::{Cluster, NodeId, netns};

/// `GET /metrics` from inside `node`'s netns: the whole HTTP answer.
pub fn scrape(cluster: &Cluster, node: NodeId) -> anyhow::Result<String> {
    netns::in_netns(&cluster.node(node).netns(), || {
        let mut s = TcpStream::connect("127.0.0.1:15020")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// The samples of an exposition (with or without its HTTP head): `name{labels}` and value.
pub fn samples(text: &str) -> Vec<(String, f64)> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `labels`
/// (`key="value"`); `None` if there is none.
pub fn sample(samples: &[(String, f64)], name: &str, labels: &[&str]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name) && labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}
