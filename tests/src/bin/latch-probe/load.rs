//! `latch-probe load`: an open-loop load generator. Requests are sent on a fixed schedule, not
//! after the previous answer, and each request's latency is taken from the time it was *due*, so
//! that queueing anywhere on the path (a proxy falling behind, a late wake-up of the sender)
//! shows in the percentiles instead of slowing the offered load down (no coordinated omission).
//!
//! Two shapes: `--conns C` persistent connections sharing the rate, each request `--bytes B`
//! written and its B-byte echo read back on the same connection; or, with `--fresh`, one new
//! connection per request (connect, B bytes, half-close, read the echo to the end), run by a pool
//! of threads so that slow connections do not hold back the schedule.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// What to offer.
pub struct Load {
    pub to: SocketAddr,
    /// Requests per second, all connections together.
    pub rate: f64,
    pub conns: usize,
    pub secs: f64,
    pub bytes: usize,
    /// One new connection per request.
    pub fresh: bool,
}

/// Threads running fresh connections: enough for the connections in flight at 10,000/s with a
/// few milliseconds each.
const FRESH_WORKERS: usize = 64;

/// What a run measured.
struct Outcome {
    /// Latencies of completed requests, in nanoseconds, from when each was due.
    latencies: Vec<u64>,
    failures: usize,
}

/// Run `load` and return its JSON line: requests due, completed, failures, seconds, the
/// achieved rate and latency percentiles in microseconds.
pub fn run(load: &Load) -> String {
    // Sleeps end when asked, not up to 50 µs later (the default timer slack); the threads
    // started below inherit it. Without it the schedule is only looser, so a failure is ignored.
    let _ = nix::sys::prctl::set_timerslack(1);
    let interval = Duration::from_secs_f64(1.0 / load.rate.max(1.0));
    let due = (load.secs * load.rate).round() as usize;
    let start = Instant::now() + Duration::from_millis(20);
    let outcome = if load.fresh {
        fresh(load, start, interval, due)
    } else {
        persistent(load, start, interval, due)
    };
    let total_s = start.elapsed().as_secs_f64();
    let mut latencies = outcome.latencies;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[i.min(latencies.len() - 1)] as f64 / 1000.0
    };
    serde_json::json!({
        "due": due,
        "completed": latencies.len(),
        "failures": outcome.failures,
        "total_s": total_s,
        "rate": latencies.len() as f64 / load.secs,
        "p50_us": pct(0.5),
        "p90_us": pct(0.9),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": pct(1.0),
    })
    .to_string()
}

/// Sleep until `when` (at once if it has passed).
fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}

/// `load.conns` connections, connection `c` sending requests `c`, `c + conns`, `c + 2 conns`, …
/// of the shared schedule; a reader thread per connection reads the echoes in order.
fn persistent(load: &Load, start: Instant, interval: Duration, due: usize) -> Outcome {
    let conns = load.conns.max(1);
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            let (to, bytes) = (load.to, load.bytes);
            thread::spawn(move || -> Outcome {
                // This connection's share of the schedule.
                let assigned = due.saturating_sub(c).div_ceil(conns);
                let mut stream = match TcpStream::connect(to) {
                    Ok(stream) => stream,
                    Err(_) => {
                        return Outcome {
                            latencies: Vec::new(),
                            failures: assigned,
                        };
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(mut reader) = stream.try_clone() else {
                    return Outcome {
                        latencies: Vec::new(),
                        failures: due.div_ceil(conns),
                    };
                };
                let (sent, scheduled) = mpsc::channel::<Instant>();
                let collector = thread::spawn(move || {
                    let mut latencies = Vec::new();
                    let mut echo = vec![0u8; bytes];
                    for when in scheduled {
                        if reader.read_exact(&mut echo).is_err() {
                            break;
                        }
                        latencies.push(when.elapsed().as_nanos() as u64);
                    }
                    latencies
                });
                let request = vec![0x5au8; bytes];
                let mut i = c;
                while i < due {
                    let when = start + interval * i as u32;
                    sleep_until(when);
                    if stream.write_all(&request).is_err() || sent.send(when).is_err() {
                        break;
                    }
                    i += conns;
                }
                drop(sent);
                let latencies = collector.join().unwrap_or_default();
                let _ = stream.shutdown(Shutdown::Both);
                Outcome {
                    failures: assigned.saturating_sub(latencies.len()),
                    latencies,
                }
            })
        })
        .collect();
    gather(workers)
}

/// One connection per request, started on schedule by a dispatcher and run by a pool of threads.
fn fresh(load: &Load, start: Instant, interval: Duration, due: usize) -> Outcome {
    let (dispatch, queue) = mpsc::channel::<Instant>();
    let queue = Arc::new(Mutex::new(queue));
    let workers: Vec<_> = (0..FRESH_WORKERS)
        .map(|_| {
            let queue = queue.clone();
            let (to, bytes) = (load.to, load.bytes);
            thread::spawn(move || -> Outcome {
                let request = vec![0x5au8; bytes];
                let mut outcome = Outcome {
                    latencies: Vec::new(),
                    failures: 0,
                };
                loop {
                    let next = queue.lock().map(|q| q.recv());
                    let Ok(Ok(when)) = next else { break };
                    let exchange = TcpStream::connect(to).and_then(|mut stream| {
                        stream.write_all(&request)?;
                        stream.shutdown(Shutdown::Write)?;
                        let mut echo = Vec::with_capacity(bytes);
                        stream.read_to_end(&mut echo)?;
                        Ok(echo.len())
                    });
                    match exchange {
                        Ok(n) if n == bytes => {
                            outcome.latencies.push(when.elapsed().as_nanos() as u64)
                        }
                        _ => outcome.failures += 1,
                    }
                }
                outcome
            })
        })
        .collect();
    for i in 0..due {
        let when = start + interval * i as u32;
        sleep_until(when);
        if dispatch.send(when).is_err() {
            break;
        }
    }
    drop(dispatch);
    gather(workers)
}

fn gather(workers: Vec<thread::JoinHandle<Outcome>>) -> Outcome {
    let mut all = Outcome {
        latencies: Vec::new(),
        failures: 0,
    };
    for worker in workers {
        match worker.join() {
            Ok(outcome) => {
                all.latencies.extend(outcome.latencies);
                all.failures += outcome.failures;
            }
            Err(_) => all.failures += 1,
        }
    }
    all
}
