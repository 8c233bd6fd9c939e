//! An accept loop that runs out of descriptors backs off instead of spinning, says so in a few
//! log lines, and accepts again once descriptors are freed.
//!
//! Real listener, real `EMFILE`: this test binary lowers its own `RLIMIT_NOFILE` and fills it (it
//! holds this one test, so nothing else in the process is starved). The runtime's clock is
//! paused, so the loop's waits are counted rather than timed: the clock only moves on when every
//! task waits, so a loop that retried at once would never let the test's own wait end.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use latch::accept::{MAX_DELAY, MIN_DELAY, WARN_EVERY};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing_subscriber::layer::SubscriberExt as _;

/// One log event: its fields (the message under `message`) as text.
type Fields = BTreeMap<String, String>;

/// Keeps every event the code under test logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<Fields>>>);

impl Captured {
    fn with_message(&self, message: &str) -> Vec<Fields> {
        let events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        events
            .iter()
            .filter(|e| e.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

struct FieldText<'a>(&'a mut Fields);

impl tracing::field::Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut FieldText(&mut fields));
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(fields);
    }
}

/// The most accepts a loop that backs off as documented can try within `window` of its first
/// failure: MIN_DELAY, then twice as long each time, up to MAX_DELAY.
fn most_attempts(window: Duration) -> u64 {
    let (mut at, mut delay, mut attempts) = (Duration::ZERO, MIN_DELAY, 0);
    while at <= window {
        attempts += 1;
        at += delay;
        delay = (delay * 2).min(MAX_DELAY);
    }
    attempts
}

/// RLIMIT_NOFILE: (soft, hard).
fn nofile() -> (u64, u64) {
    getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit")
}

fn set_nofile((soft, hard): (u64, u64)) {
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
}

/// Open `/dev/null` until the process has no descriptor left; the files are the filling.
fn fill_descriptors() -> Vec<std::fs::File> {
    let mut filling = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => filling.push(file),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return filling,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
}

const WINDOW: Duration = Duration::from_secs(60);

#[test]
fn an_accept_loop_out_of_descriptors_backs_off_warns_sparingly_and_resumes() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    // On a thread of its own, so that a loop that spins (and so never lets the paused clock
    // move on) fails the test instead of hanging it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _log = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let result = runtime.block_on(scenario());
        let _ = done_tx.send(result);
    });
    let (clients, accepted) = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the loop never let the runtime wait: it retries without backing off");

    let warnings = captured.with_message("accepts failed");
    assert!(!warnings.is_empty(), "the failures are reported");
    assert!(
        warnings.iter().all(|w| w
            .get("error")
            .is_some_and(|e| e.contains("Too many open files"))),
        "{warnings:#?}"
    );
    let lines_allowed = WINDOW.as_secs() / WARN_EVERY.as_secs() + 1;
    assert!(
        warnings.len() as u64 <= lines_allowed,
        "one line per {WARN_EVERY:?} at most: {warnings:#?}"
    );
    let failed: u64 = warnings
        .iter()
        .map(|w| {
            w.get("failed")
                .and_then(|n| n.parse::<u64>().ok())
                .expect("failed count")
        })
        .sum();
    assert!(
        (2..=most_attempts(WINDOW) + 1).contains(&failed),
        "{failed} failed accepts within {WINDOW:?}: it keeps trying, and backs off"
    );
    let resumed = captured.with_message("accepting again");
    assert_eq!(resumed.len(), 1, "{resumed:#?}");
    let streak: u64 = resumed[0]["failed"].parse().expect("count");
    assert!(streak >= failed, "the resumption counts the whole streak");
    let mut accepted = accepted;
    accepted.sort();
    let mut clients = clients;
    clients.sort();
    assert_eq!(accepted, clients, "every waiting connection is accepted");
}

/// Three connections wait in a listener's queue while the process has no descriptor left; the
/// accept loop runs for [`WINDOW`] of the paused clock, then descriptors are freed. Returns the
/// clients' addresses and the peers the loop accepted.
async fn scenario() -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let clients: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let client_addrs = clients
        .iter()
        .map(|c| c.local_addr().expect("address"))
        .collect();

    let original = nofile();
    let open = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count();
    assert!(open < 200, "{open} descriptors open already");
    set_nofile((256, original.1));
    let filling = fill_descriptors();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    let accept = tokio::spawn(latch::capture::accept_loop(
        listener,
        Arc::new(tx),
        "test".to_owned(),
        |_stream, peer, tx| async move {
            let _ = tx.send(peer);
        },
    ));
    // Runs only when the loop waits (the clock is paused).
    tokio::time::sleep(WINDOW).await;

    drop(filling);
    let mut accepted = Vec::new();
    while accepted.len() < 3 {
        accepted.push(rx.recv().await.expect("accepted connection"));
    }
    accept.abort();
    set_nofile(original);
    drop(clients);
    (client_addrs, accepted)
}
