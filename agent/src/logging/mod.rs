//! Where the agent's log lines go: JSON on stdout, written in batches by a background thread
//! [`FLUSH_EVERY`] after the first line of a batch arrives (the thread sleeps while there is
//! nothing to write). A connection's access-log lines cost a copy into memory, not a write
//! and a wake-up of the log reader each, which on a busy node is the difference between the
//! log keeping up and the log slowing every connection (Envoy batches its access log the same
//! way). Nothing is dropped: a writer that finds [`MOST_BUFFERED`] bytes waiting writes them
//! itself, and the [`Flusher`] writes what is left when it is dropped. A producer that writes
//! lines in bursts (the fast-path audit, a batch of connections at a time) holds a [`Burst`]
//! while it writes: the thread is woken once, when the burst ends, and writes it at once. Lines
//! are formatted by the `json` submodule.

mod json;

use std::{
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::sync::lock;

/// How long a log line may wait in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that make a writer write them out itself.
pub const MOST_BUFFERED: usize = 1 << 20;

/// The process's log writer, once [`init`] has made it (for [`burst`]).
static LOG: OnceLock<Batched> = OnceLock::new();

/// Log output as JSON lines on stdout (level from `LATCH_LOG`, default `info`). Keep the
/// returned [`Flusher`] until the end: dropping it writes what is still waiting.
pub fn init() -> io::Result<Flusher> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, flusher) = batched(Box::new(io::stdout()))?;
    let _ = LOG.set(writer.clone());
    tracing_subscriber::registry()
        .with(filter)
        .with(json::JsonLines::new(writer))
        .init();
    Ok(flusher)
}

/// A [`Burst`] of the process's log, if [`init`] made one (`None` in tests and tools).
pub fn burst() -> Option<Burst> {
    LOG.get().map(Batched::burst)
}

/// A writer that batches into memory, and the thread that writes the batches to `out`.
pub fn batched(out: Box<dyn Write + Send>) -> io::Result<(Batched, Flusher)> {
    batched_every(out, FLUSH_EVERY)
}

/// [`batched`], the thread waiting `flush_every` after a batch's first line.
fn batched_every(
    out: Box<dyn Write + Send>,
    flush_every: Duration,
) -> io::Result<(Batched, Flusher)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        waiting: Condvar::new(),
        out: Mutex::new(out),
        bursts: AtomicUsize::new(0),
        flush_every,
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("latch-log".into())
            .spawn(move || shared.flush_until_stopped())?
    };
    Ok((
        Batched(shared.clone()),
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when lines arrive in an empty buffer, and when the flusher stops.
    waiting: Condvar,
    /// Held while a batch is written, so batches go out in order.
    out: Mutex<Box<dyn Write + Send>>,
    /// [`Burst`]s live: while there are any, a first line does not wake the thread.
    bursts: AtomicUsize,
    /// How long the thread waits after a batch's first line ([`FLUSH_EVERY`]).
    flush_every: Duration,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    stopping: bool,
    /// A burst ended: write what is waiting without waiting for more.
    write_now: bool,
}

impl Shared {
    /// The log thread: asleep while there is nothing to write (an idle agent does not wake it),
    /// otherwise writing what [`FLUSH_EVERY`] collected.
    fn flush_until_stopped(&self) {
        loop {
            let pending = lock(&self.pending);
            let pending = self
                .waiting
                .wait_while(pending, |p| p.lines.is_empty() && !p.stopping)
                .unwrap_or_else(PoisonError::into_inner);
            let (pending, _) = self
                .waiting
                .wait_timeout_while(pending, self.flush_every, |p| !p.stopping && !p.write_now)
                .unwrap_or_else(PoisonError::into_inner);
            let stop = pending.stopping;
            drop(pending);
            self.write_out();
            if stop {
                return;
            }
        }
    }

    fn write_out(&self) {
        let mut out = lock(&self.out);
        let batch = {
            let mut pending = lock(&self.pending);
            pending.write_now = false;
            std::mem::take(&mut pending.lines)
        };
        if !batch.is_empty() {
            // Nowhere to report a failure to write the log; the next batch tries again.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
    }
}

/// The writer handed to the log formatter (one `write_all` per line).
#[derive(Clone)]
pub struct Batched(Arc<Shared>);

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (first, full) = {
            let mut pending = lock(&self.0.pending);
            let first = pending.lines.is_empty();
            pending.lines.extend_from_slice(buf);
            (first, pending.lines.len() >= MOST_BUFFERED)
        };
        // A burst wakes the thread when it ends. The line is in before the count is read, and
        // a burst's end counts down before it looks for lines, so one of the two wakes it.
        if first && self.0.bursts.load(Ordering::SeqCst) == 0 {
            self.0.waiting.notify_one();
        }
        if full {
            self.0.write_out();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Batched {
    /// Lines written until the returned [`Burst`] drops wake the log thread once, when it
    /// drops, and go out at once: they are a batch already. Hold it only for writing (no
    /// `.await`), since no line of any writer wakes the thread while it is held.
    pub fn burst(&self) -> Burst {
        self.0.bursts.fetch_add(1, Ordering::SeqCst);
        Burst(self.0.clone())
    }
}

/// See [`Batched::burst`].
pub struct Burst(Arc<Shared>);

impl Drop for Burst {
    fn drop(&mut self) {
        if self.0.bursts.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let waiting = {
            let mut pending = lock(&self.0.pending);
            pending.write_now = !pending.lines.is_empty();
            pending.write_now
        };
        if waiting {
            self.0.waiting.notify_one();
        }
    }
}

/// Writes what is still waiting, and stops the log thread, when dropped.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.pending).stopping = true;
        self.shared.waiting.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.write_out();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records what reached it.
    #[derive(Clone, Default)]
    pub(super) struct Recorded(pub(super) Arc<Mutex<Vec<u8>>>);

    impl Write for Recorded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_output_in_order_and_nothing_is_left_behind() {
        let output = Recorded::default();
        let (writer, flusher) = batched(Box::new(output.clone())).expect("log thread");
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        w.write_all(format!("{t} {i}\n").as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        drop(flusher);
        let text = String::from_utf8(lock(&output.0).clone()).expect("utf-8");
        for t in 0..4 {
            let seen: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|n| n.parse().expect("number"))
                .collect();
            assert_eq!(
                seen,
                (0..1000).collect::<Vec<_>>(),
                "writer {t}: every line, in order"
            );
        }
    }

    /// An output that reports each write.
    struct Reported(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Reported {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_in_a_quiet_log_wakes_the_thread_and_is_written_without_waiting_for_exit() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut writer, _flusher) = batched(Box::new(Reported(tx))).expect("log thread");
        for line in ["first\n", "after a quiet spell\n"] {
            writer.write_all(line.as_bytes()).expect("write");
            let written = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the log thread writes the line while the agent runs");
            assert_eq!(written, line.as_bytes());
        }
    }

    /// With an hour between a batch's first line and its write, only a burst's end gets its
    /// lines out while the agent runs: the thread writes them at once, in one write.
    #[test]
    fn a_burst_is_written_when_it_ends() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (writer, _flusher) =
            batched_every(Box::new(Reported(tx)), Duration::from_secs(3600)).expect("log thread");
        for round in 0..2 {
            let burst = writer.burst();
            for i in 0..3 {
                writer
                    .clone()
                    .write_all(format!("{round} {i}\n").as_bytes())
                    .expect("write");
            }
            drop(burst);
            let written = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the burst's end has the thread write its lines");
            assert_eq!(
                String::from_utf8(written).expect("utf-8"),
                format!("{round} 0\n{round} 1\n{round} 2\n")
            );
        }
    }

    #[test]
    fn a_full_buffer_is_written_by_the_writer_without_waiting_for_the_thread() {
        let output = Recorded::default();
        let (mut writer, _flusher) = batched(Box::new(output.clone())).expect("log thread");
        let line = vec![b'x'; MOST_BUFFERED];
        writer.write_all(&line).expect("write");
        assert_eq!(
            lock(&output.0).len(),
            MOST_BUFFERED,
            "written at once, not after the flush interval"
        );
    }
}
