//! Plain-text rendering of debug API answers for `latch debug`: aligned columns under upper-case
//! headers, durations in human units, and a `key: value` view of arbitrary JSON (the default
//! rendering of `explain`).

use super::api::{Cert, Connection, Decision, Policies, Stats, Status, VerdictPage, Workload};

/// Columns padded to their widest cell, separated by two spaces, no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(headers: [&str; N]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row (cells past the header count are dropped, missing ones are blank).
    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) -> &mut Self {
        let mut cells: Vec<String> = cells.into_iter().take(self.headers.len()).collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
        self
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `45.2s`, `3m07s`, `2h05m`, `3d04h`; `expired` at or below zero.
pub fn duration(seconds: f64) -> String {
    if seconds.is_nan() || seconds <= 0.0 {
        return "expired".into();
    }
    elapsed(seconds)
}

/// A time that has passed (uptime, age): `0s` is just started, not expired.
pub fn elapsed(seconds: f64) -> String {
    if seconds.is_nan() || seconds <= 0.0 {
        return "0s".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds as u64;
    match s {
        ..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_owned()
}

pub fn status(s: &Status) -> String {
    let mut out = format!(
        "version:        {}\nnode:           {}\nuptime:         {}\ndataplane mode: {}\ntrust domain:   {}\nlast reload:    {} ({}, {}){}\n",
        s.version,
        s.node,
        elapsed(s.uptime_seconds as f64),
        s.dataplane_mode,
        s.trust_domain,
        s.last_reload.at,
        s.last_reload.trigger,
        if s.last_reload.ok { "ok" } else { "failed" },
        s.last_reload
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default(),
    );
    let mut programs = Table::new(["PROGRAM", "ID", "ATTACHED TO"]);
    for p in &s.programs {
        programs.row([p.name.clone(), p.id.to_string(), p.attached_to.clone()]);
    }
    let mut maps = Table::new(["MAP", "ENTRIES", "CAPACITY"]);
    for m in &s.maps {
        maps.row([
            m.name.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
        ]);
    }
    let mut certs = Table::new(["CERTIFICATE", "NOT AFTER", "LEFT"]);
    for c in &s.certificates {
        certs.row([
            c.identity.clone(),
            c.not_after.clone(),
            duration(c.seconds_left as f64),
        ]);
    }
    let mut tables = vec![programs, maps, certs];
    if !s.failed_workloads.is_empty() {
        let mut failed = Table::new(["FAILED WORKLOAD", "ERROR"]);
        for f in &s.failed_workloads {
            failed.row([f.workload.clone(), f.error.clone()]);
        }
        tables.push(failed);
    }
    if let Some(source) = &s.source {
        let mut watches = Table::new(["WATCH", "SYNCED", "FAILING", "LAST ERROR"]);
        for w in &source.watches {
            let name = match &w.version {
                Some(v) => format!("{} ({v})", w.name),
                None => w.name.clone(),
            };
            watches.row([
                name,
                w.synced.to_string(),
                w.failing.to_string(),
                match (&w.last_error_at, &w.last_error) {
                    (Some(at), Some(e)) => format!("{at} {e}"),
                    _ => "-".to_owned(),
                },
            ]);
        }
        tables.push(watches);
        if !source.waiting_pods.is_empty() {
            let mut waiting = Table::new(["POD NOT SERVED YET"]);
            for p in &source.waiting_pods {
                waiting.row([p.clone()]);
            }
            tables.push(waiting);
        }
    }
    if let Some(source) = &s.source {
        out.push_str(&format!(
            "source: {}, {}, API {}\n",
            source.kind,
            if source.ready { "ready" } else { "not ready" },
            if source.api_failing {
                "FAILING (enforcing the last known state)"
            } else {
                "reachable"
            }
        ));
    }
    for table in tables {
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

pub fn workloads(workloads: &[Workload]) -> String {
    let mut table = Table::new(["NAMESPACE", "NAME", "IDENTITY", "WHERE", "IPS"]);
    for w in workloads {
        let place = if w.local {
            "local".to_owned()
        } else {
            format!("peer@{}", or_dash(w.node.as_deref()))
        };
        let ips: Vec<String> = w.ips.iter().map(ToString::to_string).collect();
        table.row([
            w.namespace.clone(),
            w.name.clone(),
            w.identity.clone(),
            place,
            ips.join(","),
        ]);
    }
    table.render()
}

pub fn policies(p: &Policies) -> String {
    let mut table = Table::new(["KIND", "NAMESPACE", "NAME", "ACTION", "RULES", "FILE"]);
    for policy in &p.policies {
        table.row([
            policy.kind.clone(),
            policy.namespace.clone(),
            policy.name.clone(),
            policy.action.clone(),
            policy.rules.to_string(),
            policy.file.clone(),
        ]);
    }
    let mut out = table.render();
    if !p.jwks.is_empty() {
        let mut keys = Table::new(["JWKS", "KEYS", "FETCHED", "FAILURES", "LAST ERROR"]);
        for j in &p.jwks {
            keys.row([
                j.uri.clone(),
                j.keys.to_string(),
                j.fetched_seconds_ago
                    .map_or_else(|| "never".to_owned(), |s| format!("{s}s ago")),
                j.failures.to_string(),
                j.last_error.clone().unwrap_or_default(),
            ]);
        }
        out.push('\n');
        out.push_str(&keys.render());
    }
    if !p.errors.is_empty() {
        out.push_str("\nerrors in the last reload:\n");
        for e in &p.errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    for r in &p.refused {
        out.push_str(&format!(
            "\nrefused: {} {}/{} (resourceVersion {}){}{}:\n",
            r.kind,
            r.namespace,
            r.name,
            r.resource_version,
            if r.deny { ", a DENY" } else { "" },
            if r.last_good_kept {
                ", its last good version stays in force"
            } else {
                ", not in force"
            }
        ));
        for e in &r.errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

pub fn verdicts(page: &VerdictPage) -> String {
    let mut table = Table::new([
        "SOURCE",
        "DESTINATION",
        "PORT",
        "DIRECTION",
        "DECISION",
        "TTL",
        "ENCRYPTED",
    ]);
    for v in &page.verdicts {
        table.row([
            v.source.clone(),
            v.destination.clone(),
            v.port.to_string(),
            v.direction.as_str().into(),
            match v.decision {
                Decision::Allow => "allow".into(),
                Decision::Deny => "deny".into(),
            },
            duration(v.seconds_left),
            match (v.decision, v.encrypted) {
                (Decision::Deny, _) => "-".into(),
                (Decision::Allow, true) => "yes".into(),
                (Decision::Allow, false) => "no (fast path)".into(),
            },
        ]);
    }
    let mut out = table.render();
    let shown = page.verdicts.len();
    if shown < page.total {
        let first = if shown == 0 {
            page.offset
        } else {
            page.offset + 1
        };
        out.push_str(&format!(
            "({first}-{} of {}; use --offset/--limit for more)\n",
            page.offset + shown,
            page.total
        ));
    }
    out
}

pub fn certs(certs: &[Cert]) -> String {
    let mut table = Table::new([
        "IDENTITY",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "NEXT ROTATION",
    ]);
    for c in certs {
        table.row([
            c.identity.clone(),
            c.serial.clone(),
            c.not_before.clone(),
            c.not_after.clone(),
            c.next_rotation.clone(),
        ]);
    }
    table.render()
}

pub fn connections(connections: &[Connection]) -> String {
    let mut table = Table::new([
        "SOURCE",
        "DESTINATION",
        "ADDRESS",
        "SENT",
        "RECEIVED",
        "AGE",
    ]);
    for c in connections {
        table.row([
            c.source.clone(),
            c.destination.clone(),
            c.destination_address.to_string(),
            c.bytes_sent.to_string(),
            c.bytes_received.to_string(),
            elapsed(c.age_seconds),
        ]);
    }
    table.render()
}

pub fn stats(stats: &Stats) -> String {
    let mut table = Table::new(["COUNTER", "VALUE"]);
    for (name, value) in &stats.counters {
        table.row([name.clone(), value.to_string()]);
    }
    table.render()
}

/// `key: value` lines for any JSON value, nested keys joined with `.`, array items by index.
pub fn key_values(value: &serde_json::Value) -> String {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut String) {
        use serde_json::Value;
        let key = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    walk(&key(k), v, out);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                for (i, v) in items.iter().enumerate() {
                    walk(&key(&i.to_string()), v, out);
                }
            }
            Value::String(s) if !prefix.is_empty() => out.push_str(&format!("{prefix}: {s}\n")),
            Value::String(s) => out.push_str(&format!("{s}\n")),
            other if prefix.is_empty() => out.push_str(&format!("{other}\n")),
            other => out.push_str(&format!("{prefix}: {other}\n")),
        }
    }
    let mut out = String::new();
    walk("", value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conn::Direction, debug::api::Verdict};

    #[test]
    fn verdict_table_is_aligned() {
        let page = VerdictPage {
            total: 3,
            offset: 0,
            limit: 2,
            verdicts: vec![
                Verdict {
                    source: "spiffe://cluster.local/ns/prod/sa/frontend".into(),
                    destination: "spiffe://cluster.local/ns/prod/sa/payment".into(),
                    port: 8080,
                    direction: Direction::Outbound,
                    decision: Decision::Allow,
                    seconds_left: 252.4,
                    encrypted: false,
                },
                Verdict {
                    source: "key:000000000000000000000000deadbeef".into(),
                    destination: "spiffe://cluster.local/ns/db/sa/pg".into(),
                    port: 5432,
                    direction: Direction::Inbound,
                    decision: Decision::Deny,
                    seconds_left: 4.25,
                    encrypted: false,
                },
            ],
        };
        assert_eq!(
            verdicts(&page),
            "\
SOURCE                                      DESTINATION                                PORT  DIRECTION  DECISION  TTL    ENCRYPTED
spiffe://cluster.local/ns/prod/sa/frontend  spiffe://cluster.local/ns/prod/sa/payment  8080  outbound   allow     4m12s  no (fast path)
key:000000000000000000000000deadbeef        spiffe://cluster.local/ns/db/sa/pg         5432  inbound    deny      4.2s   -
(1-2 of 3; use --offset/--limit for more)
"
        );
    }

    #[test]
    fn durations_and_key_values() {
        assert_eq!(duration(0.0), "expired");
        assert_eq!(elapsed(0.0), "0s");
        assert_eq!(duration(7260.0), "2h01m");
        assert_eq!(duration(90000.0), "1d01h");
        let v = serde_json::json!({"decision": "DENY", "matched": {"policy": "prod/deny", "rules": [1, 2]}});
        assert_eq!(
            key_values(&v),
            "decision: DENY\nmatched.policy: prod/deny\nmatched.rules.0: 1\nmatched.rules.1: 2\n"
        );
    }
}
