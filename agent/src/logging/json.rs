//! The JSON form of a log line, written straight into a buffer: the shape of tracing-subscriber's
//! JSON format (`{"timestamp":…,"level":…,"fields":{"message":…,…},"target":…}`, one line per
//! event), at a fraction of its cost. tracing-subscriber's formatter serializes through generic
//! adapters that check every piece for UTF-8 and go through `fmt::Write` and `io::Write` in
//! turn; with two access-log lines per connection on each agent that was about 9 µs of the
//! worker's time per line. Fields of events bridged from the `log` crate (`log.target`, …) are
//! left out; their target and level are the `log` record's own.

use std::{cell::RefCell, fmt, io::Write, time::SystemTime};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::{Layer, layer::Context};

/// A layer writing each event as one JSON line to `W` (with a single `write_all`).
pub struct JsonLines<W> {
    out: W,
}

impl<W> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

thread_local! {
    /// Each thread's line buffer, reused from line to line.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber,
    W: Write + Clone + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        LINE.with(|line| {
            // A log call made while formatting (a Debug impl that logs) gets a fresh buffer.
            let mut fresh = Vec::new();
            let mut borrowed = line.try_borrow_mut();
            let line = match borrowed.as_deref_mut() {
                Ok(line) => line,
                Err(_) => &mut fresh,
            };
            line.clear();
            format_line(line, event, SystemTime::now());
            // Nowhere to report a failure to log.
            let _ = self.out.clone().write_all(line);
        });
    }
}

/// Append `event` as one JSON line, stamped `now`.
pub fn format_line(line: &mut Vec<u8>, event: &Event<'_>, now: SystemTime) {
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    let _ = write!(
        line,
        "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"fields\":{{",
        humantime::format_rfc3339_micros(now),
        meta.level()
    );
    event.record(&mut Fields { line, first: true });
    line.extend_from_slice(b"},\"target\":");
    string(line, meta.target());
    line.extend_from_slice(b"}\n");
}

/// Writes an event's fields as the members of a JSON object, in the order they were given.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    first: bool,
}

impl Fields<'_> {
    /// Start the member for `field`; `false` for a field that is left out.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.line.push(b',');
        }
        string(self.line, name);
        self.line.push(b':');
        true
    }

    fn value(&mut self, field: &Field, value: &impl serde::Serialize) {
        if self.key(field) {
            // Writing into a Vec cannot fail; numbers that JSON cannot hold become null.
            let _ = serde_json::to_writer(&mut *self.line, value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.value(field, &value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, &value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, &value);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        self.value(field, &value);
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        self.value(field, &value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.value(field, &value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.value(field, &value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Formatted straight into the line (the message, `%` and `?` fields), not into a String
        // first.
        if self.key(field) {
            self.line.push(b'"');
            let _ = fmt::Write::write_fmt(&mut JsonEscaped(self.line), format_args!("{value:?}"));
            self.line.push(b'"');
        }
    }
}

/// Writes what is formatted into it as the inside of a JSON string: `"`, `\` and control
/// characters escaped, everything else as it is.
struct JsonEscaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut plain = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..0x20 | 0x7f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[plain..i]);
            if escape.is_empty() {
                let _ = write!(self.0, "\\u{b:04x}");
            } else {
                self.0.extend_from_slice(escape);
            }
            plain = i + 1;
        }
        self.0.extend_from_slice(&bytes[plain..]);
        Ok(())
    }
}

fn string(line: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *line, s);
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::logging::tests::Recorded;

    fn lines(log: impl FnOnce()) -> Vec<String> {
        let out = Recorded::default();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(out.clone()));
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_line_has_tracing_subscribers_json_shape() {
        let addr: std::net::SocketAddr = "10.244.1.2:8080".parse().expect("addr");
        let got = lines(|| {
            tracing::info!(
                target: "access",
                event = "decision",
                source = %addr,
                quoted = "a \"b\"\n",
                bytes = 5u64,
                delta = -3i64,
                ms = 1.5f64,
                nan = f64::NAN,
                ok = true,
                list = ?vec![1, 2],
                debugged = ?"q\"\\",
                raw = %"tab\there\u{7}\u{7f}",
                "access"
            )
        });
        assert_eq!(got.len(), 1, "one line per event: {got:?}");
        let line = &got[0];
        let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        let stamp = v["timestamp"].as_str().expect("timestamp");
        humantime::parse_rfc3339(stamp).expect("RFC 3339 timestamp");
        assert!(
            stamp.ends_with('Z') && stamp.len() == 27,
            "microseconds: {stamp}"
        );
        let f = &v["fields"];
        assert_eq!(f["message"], "access");
        assert_eq!(f["event"], "decision");
        assert_eq!(f["source"], "10.244.1.2:8080");
        assert_eq!(f["quoted"], "a \"b\"\n", "escaped and read back");
        assert_eq!(f["bytes"], 5);
        assert_eq!(f["delta"], -3);
        assert_eq!(f["ms"], 1.5);
        assert!(f["nan"].is_null(), "JSON has no NaN");
        assert_eq!(f["ok"], true);
        assert_eq!(f["list"], "[1, 2]");
        assert_eq!(
            f["debugged"], "\"q\\\"\\\\\"",
            "Debug output with quotes and backslashes, escaped and read back"
        );
        assert_eq!(
            f["raw"], "tab\there\u{7}\u{7f}",
            "control characters escaped and read back"
        );
        // Members in the order tracing-subscriber writes them, the message first.
        let order: Vec<usize> = ["\"timestamp\"", "\"level\"", "\"fields\"", "\"target\""]
            .iter()
            .map(|k| line.find(k).expect("member"))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "order: {line}");
        assert!(
            line.contains("\"fields\":{\"message\":\"access\","),
            "{line}"
        );
    }

    #[test]
    fn events_from_the_log_crate_keep_their_own_target_and_drop_log_fields() {
        let got = lines(|| {
            let record = log::Record::builder()
                .args(format_args!("hello"))
                .level(log::Level::Warn)
                .target("rustls::conn")
                .build();
            tracing_log::format_trace(&record).expect("bridged");
        });
        let v: serde_json::Value = serde_json::from_str(&got[0]).expect("valid JSON");
        assert_eq!(v["target"], "rustls::conn");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["message"], "hello");
        assert!(!got[0].contains("log."), "{}", got[0]);
    }
}
