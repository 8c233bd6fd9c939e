//! `latch-probe`: the client the tests and benchmarks run inside pods (in the pod's netns and
//! cgroup), so that the kernel programs see a real process of that pod.
//!
//! - `latch-probe connect --to IP:PORT [--from IP[:PORT] | --fail-first IP:PORT | --fast-open] [--send TEXT] [--keep-open] [--timeout-ms N]`:
//!   one connection (from the address `--from` if given, which the namespace must hold); sends
//!   TEXT and half-closes (with `--keep-open`, sends TEXT and does not half-close, so the exchange
//!   ends only when the other side closes), reads until the end; prints one JSON line: ok, errno,
//!   error, peer, local, echo, reset, elapsed_ms, first_errno. Exit 0 even when the connection
//!   fails (the JSON says how). With `--fail-first IP:PORT` (an IPv4-mapped address), the
//!   connection is made from an IPv6-only socket that first tried that address, which fails
//!   before any SYN (`first_errno`), as a socket whose `connect()` failed and that connects again.
//!   With `--fast-open` the connection is made by `sendto(MSG_FASTOPEN)` carrying TEXT (TCP Fast
//!   Open), with no `connect()` call.
//! - `latch-probe rate --to IP:PORT --count N`: N sequential connections, each a one-byte
//!   request and its echo (so the time includes the whole path to the server, through the agent
//!   if redirected); prints one JSON line with the count, failures, total seconds and
//!   per-connection latencies in microseconds.
//! - `latch-probe pipe --to IP:PORT`: one connection fed from standard input (until EOF, then
//!   half-close); prints the `connect` JSON line with what came back. Lets a test keep a
//!   connection open across an event and finish it afterwards.
//! - `latch-probe concurrent --to IP:PORT --count N --bytes B`: N connections at once, each
//!   sending B pseudo-random bytes and checking the echo byte for byte; prints one JSON line with
//!   the number that completed intact and the failures.
//! - `latch-probe throughput --to IP:PORT --streams S --mb M`: S connections at once, each
//!   sending M MiB and reading the echo; prints one JSON line with the bytes moved (both
//!   directions) and the seconds it took.
//! - `latch-probe load --to IP:PORT --rate R [--conns C] [--secs S] [--bytes B] [--fresh]`: an
//!   open-loop load of R requests per second for S seconds, each B bytes and their echo, over C
//!   persistent connections or one fresh connection each; prints one JSON line with what was
//!   due, completed and failed, and latency percentiles from when each request was due ([`load`]).
//! - `latch-probe serve --port PORT [--repeat K | --stream | --sink]`: a server inside the pod (its
//!   netns and cgroup): answers each connection with what it read until the half-close, K times
//!   over; with `--stream` with what it reads as it reads it; with `--sink` with as many bytes as
//!   it read until the half-close, without keeping them. With `--defer-accept SECS`
//!   (`TCP_DEFER_ACCEPT`), a handshake completes only once the client's first data arrives (or
//!   SECS pass): until then the connection waits in `SYN-RECV`, its bare ACKs ignored. With
//!   `--mark N` (decimal, or hex with `0x`) the listener carries `SO_MARK` N, and so does every
//!   socket it accepts.
//! - `latch-probe hold-connects --to IP --ports P1,P2,... --count N`: N non-blocking
//!   connections (fewer if its descriptor limit, raised to the hard limit, allows fewer), spread
//!   over the ports and over every CPU in turn (pinned to each), held open (in `SYN-SENT` where
//!   nothing answers) until standard input closes; prints one JSON line with how many it holds
//!   (`held`) and the first error, once all are made.
//! - `latch-probe cgroup`: prints this process's cgroup.

#[path = "latch-probe/load.rs"]
mod load;

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn opt(s: Option<String>) -> String {
    s.map(|s| json_str(&s)).unwrap_or_else(|| "null".into())
}

/// A TCP connection to `to`, from `from` if given (port 0: any port).
fn open(to: SocketAddr, from: Option<SocketAddr>, timeout: Duration) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect_timeout(&to, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&from.into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

/// `count` non-blocking connections to `ip`, round-robin over `ports`, made on every CPU in turn;
/// prints how many were made, then holds them until standard input closes.
fn hold_connects(ip: IpAddr, ports: &[u16], count: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Without CAP_SYS_RESOURCE the hard limit is as far as it goes: hold what fits under it.
    let count = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() => {
            count.min(usize::try_from(hard.saturating_sub(64)).unwrap_or(usize::MAX))
        }
        _ => count,
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut held = Vec::with_capacity(count);
    let mut first_error: Option<String> = None;
    for cpu in 0..cpus {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
        let share = count / cpus + usize::from(cpu < count % cpus);
        for i in 0..share {
            let to = SocketAddr::new(ip, ports[i % ports.len()]);
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
            let made = socket.and_then(|s| match s.connect(&to.into()) {
                Ok(()) => Ok(s),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
                Err(e) => Err(e),
            });
            match made {
                Ok(s) => held.push(s),
                Err(e) => {
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    println!(
        "{{\"held\":{},\"error\":{}}}",
        held.len(),
        first_error.as_deref().map_or("null".to_owned(), json_str)
    );
    let _ = std::io::stdout().flush();
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    drop(held);
}

/// A TCP connection to `to` on an IPv6-only socket that first tried to connect to `first` (an
/// IPv4-mapped address, which such a socket cannot reach: `connect()` fails with
/// `ENETUNREACH` after the connect programs ran, before any SYN); also that first errno.
fn open_after_failure(
    first: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> (Option<i32>, std::io::Result<TcpStream>) {
    let socket = match socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .and_then(|s| s.set_only_v6(true).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => return (None, Err(e)),
    };
    let first_errno = match socket.connect_timeout(&first.into(), timeout) {
        Ok(()) => Some(0),
        Err(e) => e.raw_os_error(),
    };
    let opened = socket
        .connect_timeout(&to.into(), timeout)
        .map(|()| socket.into());
    (first_errno, opened)
}

/// A connection made by `sendto(MSG_FASTOPEN)` with `text`, without `connect()` (TCP Fast Open:
/// the kernel connects and sends `text` in the SYN if it holds a cookie from the server, after
/// the handshake otherwise).
fn open_fast_open(to: SocketAddr, text: &str) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    let sent = socket.send_to_with_flags(text.as_bytes(), &to.into(), libc::MSG_FASTOPEN)?;
    if sent == text.len() {
        Ok(socket.into())
    } else {
        Err(std::io::Error::other(format!(
            "sendto(MSG_FASTOPEN) sent {sent} of {} bytes",
            text.len()
        )))
    }
}

fn connect(
    opened: std::io::Result<TcpStream>,
    send: Option<String>,
    half_close: bool,
    timeout: Duration,
    start: Instant,
    first_errno: Option<i32>,
) -> String {
    let (mut ok, mut errno, mut error, mut peer, mut local, mut echo, mut reset) =
        (false, None, None, None, None, None, false);
    match opened {
        Ok(mut stream) => {
            ok = true;
            peer = stream.peer_addr().ok().map(|a| a.to_string());
            local = stream.local_addr().ok().map(|a| a.to_string());
            let _ = stream.set_read_timeout(Some(timeout));
            if let Some(text) = send {
                let exchange = stream
                    .write_all(text.as_bytes())
                    .and_then(|()| {
                        if half_close {
                            stream.shutdown(Shutdown::Write)
                        } else {
                            Ok(())
                        }
                    })
                    .and_then(|()| {
                        let mut buf = Vec::new();
                        stream.read_to_end(&mut buf).map(|_| buf)
                    });
                match exchange {
                    Ok(buf) => echo = Some(String::from_utf8_lossy(&buf).into_owned()),
                    Err(e) => {
                        // A reset that lands between the write and the shutdown leaves
                        // shutdown() with ENOTCONN, the reset itself still pending on the socket.
                        let e = match stream.take_error() {
                            Ok(Some(pending)) => pending,
                            _ => e,
                        };
                        reset = e.kind() == std::io::ErrorKind::ConnectionReset;
                        errno = e.raw_os_error();
                        error = Some(e.to_string());
                    }
                }
            }
        }
        Err(e) => {
            errno = e.raw_os_error();
            reset = e.kind() == std::io::ErrorKind::ConnectionReset;
            error = Some(e.to_string());
        }
    }
    let number = |n: Option<i32>| n.map(|e| e.to_string()).unwrap_or_else(|| "null".into());
    format!(
        "{{\"ok\":{ok},\"errno\":{},\"error\":{},\"peer\":{},\"local\":{},\"echo\":{},\"reset\":{reset},\"elapsed_ms\":{},\"first_errno\":{}}}",
        number(errno),
        opt(error),
        opt(peer),
        opt(local),
        opt(echo),
        start.elapsed().as_secs_f64() * 1000.0,
        number(first_errno),
    )
}

fn pipe(to: SocketAddr) -> String {
    let start = Instant::now();
    let mut stream = match TcpStream::connect(to) {
        Ok(s) => s,
        Err(e) => {
            return format!(
                "{{\"ok\":false,\"errno\":{},\"error\":{},\"peer\":null,\"local\":null,\"echo\":null,\"reset\":false,\"elapsed_ms\":0}}",
                e.raw_os_error().unwrap_or(0),
                json_str(&e.to_string())
            );
        }
    };
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let local = stream.local_addr().ok().map(|a| a.to_string());
    let mut reader = stream.try_clone().expect("clone socket");
    let collector = std::thread::spawn(move || {
        let mut buf = Vec::new();
        reader.read_to_end(&mut buf).map(|_| buf)
    });
    let sent = std::io::copy(&mut std::io::stdin().lock(), &mut stream)
        .and_then(|_| stream.shutdown(Shutdown::Write));
    let received = collector
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
    let (echo, error, reset) = match (sent, received) {
        (Ok(()), Ok(buf)) => (
            Some(String::from_utf8_lossy(&buf).into_owned()),
            None,
            false,
        ),
        (Err(e), _) | (_, Err(e)) => (
            None,
            Some(e.to_string()),
            e.kind() == std::io::ErrorKind::ConnectionReset,
        ),
    };
    format!(
        "{{\"ok\":true,\"errno\":null,\"error\":{},\"peer\":{},\"local\":{},\"echo\":{},\"reset\":{reset},\"elapsed_ms\":{}}}",
        opt(error),
        opt(peer),
        opt(local),
        opt(echo),
        start.elapsed().as_secs_f64() * 1000.0
    )
}

/// xorshift64*: deterministic pseudo-random payloads without a dependency.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn concurrent(to: SocketAddr, count: usize, bytes: usize) -> String {
    let start = Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(count));
    let workers: Vec<_> = (0..count)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let data = payload(i as u64 + 1, bytes);
                let mut stream = TcpStream::connect(to).map_err(|e| format!("connect: {e}"))?;
                // Every connection is open before any finishes.
                barrier.wait();
                let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
                let expected = data.len();
                let collector = std::thread::spawn(move || {
                    let mut buf = Vec::with_capacity(expected);
                    reader.read_to_end(&mut buf).map(|_| buf)
                });
                stream.write_all(&data).map_err(|e| format!("write: {e}"))?;
                stream
                    .shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
                let back = collector
                    .join()
                    .map_err(|_| "reader panicked".to_owned())?
                    .map_err(|e| format!("read: {e}"))?;
                if back != data {
                    return Err(format!(
                        "corrupted echo: {} of {} bytes",
                        back.len(),
                        data.len()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    let mut intact = 0usize;
    let mut errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => intact += 1,
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("worker panicked".to_owned()),
        }
    }
    errors.truncate(5);
    format!(
        "{{\"count\":{count},\"intact\":{intact},\"errors\":{},\"total_s\":{}}}",
        serde_json::to_string(&errors).unwrap_or_else(|_| "[]".into()),
        start.elapsed().as_secs_f64()
    )
}

fn throughput(to: SocketAddr, streams: usize, mib: usize) -> String {
    let bytes = mib * 1024 * 1024;
    let start = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut stream = TcpStream::connect(to)?;
                let mut reader = stream.try_clone()?;
                let collector =
                    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                let chunk = vec![0x5au8; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    stream.write_all(&chunk[..n])?;
                    left -= n;
                }
                stream.shutdown(Shutdown::Write)?;
                let back = collector
                    .join()
                    .map_err(|_| std::io::Error::other("reader panicked"))??;
                Ok(bytes as u64 + back)
            })
        })
        .collect();
    let mut moved = 0u64;
    let mut failures = 0usize;
    for w in workers {
        match w.join() {
            Ok(Ok(n)) => moved += n,
            _ => failures += 1,
        }
    }
    format!(
        "{{\"streams\":{streams},\"bytes\":{moved},\"failures\":{failures},\"total_s\":{}}}",
        start.elapsed().as_secs_f64()
    )
}

fn rate(to: SocketAddr, count: usize) -> String {
    let mut latencies = Vec::with_capacity(count);
    let mut failures = 0usize;
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        let exchange = TcpStream::connect(to).and_then(|mut stream| {
            stream.write_all(b"x")?;
            stream.shutdown(Shutdown::Write)?;
            let mut buf = [0u8; 8];
            let n = stream.read(&mut buf)?;
            Ok(n)
        });
        match exchange {
            Ok(1) => latencies.push(t.elapsed().as_micros() as u64),
            _ => failures += 1,
        }
    }
    let total = start.elapsed().as_secs_f64();
    format!(
        "{{\"count\":{count},\"failures\":{failures},\"total_s\":{total},\"latencies_us\":{}}}",
        serde_json::to_string(&latencies).unwrap_or_else(|_| "[]".into())
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let to = || -> SocketAddr {
        match arg(&args, "--to").and_then(|s| s.parse().ok()) {
            Some(addr) => addr,
            None => {
                eprintln!("latch-probe: --to IP:PORT is required");
                std::process::exit(2);
            }
        }
    };
    match args.first().map(String::as_str) {
        Some("connect") => {
            let timeout = arg(&args, "--timeout-ms")
                .and_then(|s| s.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(Duration::from_secs(10));
            let half_close = !args.iter().any(|a| a == "--keep-open");
            let from = match arg(&args, "--from").map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
            }) {
                None => None,
                Some(Ok(addr)) => Some(addr),
                Some(Err(_)) => {
                    eprintln!("latch-probe: --from must be IP or IP:PORT");
                    std::process::exit(2);
                }
            };
            let start = Instant::now();
            let first = arg(&args, "--fail-first").map(|s| {
                s.parse::<SocketAddr>().unwrap_or_else(|_| {
                    eprintln!("latch-probe: --fail-first must be IP:PORT");
                    std::process::exit(2);
                })
            });
            let mut send = arg(&args, "--send");
            let (first_errno, opened) = match first {
                Some(first) => open_after_failure(first, to(), timeout),
                // The text goes out with the connection itself; nothing is left to write.
                None if args.iter().any(|a| a == "--fast-open") => {
                    let text = send.replace(String::new()).unwrap_or_default();
                    (None, open_fast_open(to(), &text))
                }
                None => (None, open(to(), from, timeout)),
            };
            println!(
                "{}",
                connect(opened, send, half_close, timeout, start, first_errno)
            );
        }
        Some("rate") => {
            let count = arg(&args, "--count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            println!("{}", rate(to(), count));
        }
        Some("pipe") => println!("{}", pipe(to())),
        Some("load") => {
            let number = |name: &str, default: f64| {
                arg(&args, name)
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(default)
            };
            let load = load::Load {
                to: to(),
                rate: number("--rate", 1000.0),
                conns: number("--conns", 1.0) as usize,
                secs: number("--secs", 10.0),
                bytes: number("--bytes", 1024.0) as usize,
                fresh: args.iter().any(|a| a == "--fresh"),
            };
            println!("{}", load::run(&load));
        }
        Some("throughput") => {
            let streams = arg(&args, "--streams")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let mib = arg(&args, "--mb")
                .and_then(|s| s.parse().ok())
                .unwrap_or(64);
            println!("{}", throughput(to(), streams, mib));
        }
        Some("concurrent") => {
            let count = arg(&args, "--count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(100);
            let bytes = arg(&args, "--bytes")
                .and_then(|s| s.parse().ok())
                .unwrap_or(65536);
            println!("{}", concurrent(to(), count, bytes));
        }
        Some("hold") => {
            let count = arg(&args, "--count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            let parallel = arg(&args, "--parallel")
                .and_then(|s| s.parse().ok())
                .unwrap_or(256);
            println!("{}", hold(to(), count, parallel));
        }
        Some("serve") => {
            let port = arg(&args, "--port").and_then(|s| s.parse().ok());
            let repeat = arg(&args, "--repeat")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let Some(port) = port else {
                eprintln!("latch-probe: serve needs --port PORT");
                std::process::exit(2);
            };
            let answer = if args.iter().any(|a| a == "--stream") {
                Answer::Stream
            } else if args.iter().any(|a| a == "--sink") {
                Answer::Count
            } else {
                Answer::Echo(repeat)
            };
            let defer_accept = arg(&args, "--defer-accept").and_then(|s| s.parse().ok());
            let mark = arg(&args, "--mark").and_then(|s| parse_u32(&s));
            if let Err(e) = serve(port, answer, defer_accept, mark) {
                eprintln!("latch-probe: serve on port {port}: {e}");
                std::process::exit(1);
            }
        }
        Some("hold-connects") => {
            let count = arg(&args, "--count")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let ports: Vec<u16> = arg(&args, "--ports")
                .unwrap_or_default()
                .split(',')
                .filter_map(|p| p.parse().ok())
                .collect();
            let ip = arg(&args, "--to").and_then(|s| s.parse::<IpAddr>().ok());
            let (Some(ip), false) = (ip, ports.is_empty()) else {
                eprintln!("latch-probe: hold-connects needs --to IP and --ports P1,P2,...");
                std::process::exit(2);
            };
            hold_connects(ip, &ports, count);
        }
        Some("cgroup") => match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("latch-probe: reading /proc/self/cgroup: {e}");
                std::process::exit(1);
            }
        },
        _ => {
            eprintln!(
                "usage: latch-probe connect --to IP:PORT [--from IP[:PORT] | --fail-first IP:PORT | --fast-open] [--send TEXT] [--keep-open] [--timeout-ms N] | rate --to IP:PORT --count N | serve --port PORT [--repeat K | --stream | --sink] [--defer-accept SECS] [--mark N] | hold-connects --to IP --ports P1,P2,... --count N | cgroup"
            );
            std::process::exit(2);
        }
    }
}

/// How `latch-probe serve` answers a connection.
#[derive(Clone, Copy)]
enum Answer {
    /// What it read until the client's half-close, K times over.
    Echo(usize),
    /// What it reads, as it reads it, until the client closes.
    Stream,
    /// As many bytes as it read until the client's half-close, without keeping them: a bulk
    /// upload then costs the server its reads and writes only, not 256 MiB of memory faulted in
    /// and copied as a buffer grows, CPU time the benchmark would take from the agents.
    Count,
}

/// `latch-probe serve --port PORT [--repeat K | --stream | --sink] [--defer-accept SECS]
/// [--mark N]`: a server in the pod itself (its sockets belong to the pod's cgroup, as a real
/// application's do, so the kernel programs on `cgroupRoot` see its side of each connection).
/// Listens on `[::]:PORT` (IPv4 too), prints
/// `listening` once it does, then answers each connection on a thread of its own as [`Answer`]
/// says, and closes it. Runs until killed.
fn serve(
    port: u16,
    answer: Answer,
    defer_accept: Option<i32>,
    mark: Option<u32>,
) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    if let Some(secs) = defer_accept {
        set_defer_accept(&socket, secs)?;
    }
    // What an application with `CAP_NET_RAW` (in a container runtime's default set) may do: its
    // accepted sockets take the listener's mark.
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
    socket.listen(1024)?;
    let listener = std::net::TcpListener::from(socket);
    println!("listening");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            let _ = match answer {
                Answer::Echo(repeat) => echo(stream, repeat),
                Answer::Stream => echo_as_read(stream),
                Answer::Count => count_back(stream),
            };
        });
    }
    Ok(())
}

/// A `u32` written in decimal, or in hex after `0x`.
fn parse_u32(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// `TCP_DEFER_ACCEPT` (neither socket2 nor nix wraps it).
#[allow(unsafe_code)]
fn set_defer_accept(socket: &socket2::Socket, secs: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt(2) on a socket we own, with a pointer to an `int` and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn echo(mut stream: TcpStream, repeat: usize) -> std::io::Result<()> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    for _ in 0..repeat {
        stream.write_all(&buf)?;
    }
    Ok(())
}

fn echo_as_read(mut stream: TcpStream) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk)? {
            0 => return Ok(()),
            n => stream.write_all(&chunk[..n])?,
        }
    }
}

/// What [`Answer::Count`] sends back: constant bytes, shared by every connection.
static COUNT_BACK: [u8; 256 * 1024] = [0x5a; 256 * 1024];

fn count_back(stream: TcpStream) -> std::io::Result<()> {
    // Reads go into uninitialised buffers: a small one on the stack first (a larger frame would
    // fault in the new thread's stack pages one by one, about 85 µs per connection here), then,
    // once a read fills it, one of 256 KiB on the heap, so that a read takes whatever the socket
    // holds. A one-byte request costs what an echo costs.
    let socket = socket2::SockRef::from(&stream);
    let mut small = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
    let mut large: Vec<u8> = Vec::new();
    let mut left = 0u64;
    loop {
        let n = if large.capacity() == 0 {
            let n = socket.recv(&mut small)?;
            if n == small.len() {
                large.reserve_exact(256 * 1024);
            }
            n
        } else {
            socket.recv(large.spare_capacity_mut())?
        };
        if n == 0 {
            break;
        }
        left += n as u64;
    }
    let mut stream = stream;
    while left > 0 {
        let n = left.min(COUNT_BACK.len() as u64) as usize;
        stream.write_all(&COUNT_BACK[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// `latch-probe hold --to IP:PORT --count N [--parallel P]`: N connections open at once, on one
/// thread (tokio's current-thread runtime), at most P (default 256) being opened at a time. Each
/// sends one byte and reads its echo, so every one has crossed the whole path to the server
/// (through the agents, if redirected). Prints one JSON line when all are open (`"event":"open"`:
/// how many are, the failures, the first errors, the seconds it took), keeps them until standard
/// input closes or SIGTERM or SIGINT comes, then prints a second line (`"event":"closed"`: how
/// many were still open, i.e. had not been closed or reset by the other side). Raises its own
/// RLIMIT_NOFILE as far as N needs (the hard limit too, when root).
fn hold(to: SocketAddr, count: usize, parallel: usize) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fail = |e: String| {
        format!(
            "{{\"event\":\"closed\",\"count\":{count},\"open\":0,\"error\":{}}}",
            json_str(&e)
        )
    };
    let need = count as u64 + 64;
    let raised = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .and_then(|(soft, hard)| {
            if soft >= need {
                return Ok(());
            }
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                need,
                hard.max(need),
            )
        });
    if let Err(e) = raised {
        return fail(format!("raising RLIMIT_NOFILE to {need}: {e}"));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("tokio runtime: {e}")),
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => return fail(format!("signal handlers: {e}")),
        };
        let start = Instant::now();
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..count {
            let permits = permits.clone();
            opening.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
                let exchange = async {
                    let mut stream = tokio::net::TcpStream::connect(to).await?;
                    stream.write_all(b"h").await?;
                    let mut echo = [0u8; 1];
                    stream.read_exact(&mut echo).await?;
                    if &echo != b"h" {
                        return Err(std::io::Error::other("wrong echo"));
                    }
                    Ok(stream)
                };
                match tokio::time::timeout(Duration::from_secs(20), exchange).await {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out after 20 s".to_owned()),
                }
            });
        }
        let mut open = Vec::with_capacity(count);
        let mut errors = Vec::new();
        let mut failures = 0usize;
        while let Some(done) = opening.join_next().await {
            match done {
                Ok(Ok(stream)) => open.push(stream),
                Ok(Err(e)) => {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(e);
                    }
                }
                Err(e) => {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(e.to_string());
                    }
                }
            }
        }
        println!(
            "{{\"event\":\"open\",\"count\":{count},\"open\":{},\"failures\":{failures},\"errors\":{},\"open_s\":{}}}",
            open.len(),
            serde_json::to_string(&errors).unwrap_or_else(|_| "[]".into()),
            start.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        let held = Instant::now();
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 512];
        let stdin_closed = async {
            while !matches!(stdin.read(&mut sink).await, Ok(0) | Err(_)) {}
        };
        tokio::select! {
            () = stdin_closed => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Still open: nothing to read and no end or error pending.
        let mut probe = [0u8; 1];
        let still_open = open
            .iter()
            .filter(|s| {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        format!(
            "{{\"event\":\"closed\",\"count\":{count},\"open\":{},\"still_open\":{still_open},\"held_s\":{}}}",
            open.len(),
            held.elapsed().as_secs_f64()
        )
    })
}
