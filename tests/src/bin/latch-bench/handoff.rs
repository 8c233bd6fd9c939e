//! What one hand-off between two threads' sockets costs on this machine: the floor under every
//! hop a proxy adds, reported by the `tunnel` suite.

use anyhow::Context as _;

use crate::stats::percentile;

/// What one hand-off of a few bytes from one thread's socket to another's costs on this machine
/// (half the p50 round trip of a one-byte ping-pong over loopback): the floor under every hop a
/// proxy adds, whatever the proxy does.
pub fn handoff_us() -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    const ROUNDS: usize = 20_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read(&mut b)? == 1 {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr).context("connecting on loopback")?;
    s.set_nodelay(true)?;
    let mut rtt = Vec::with_capacity(ROUNDS);
    let mut b = [0u8; 1];
    for _ in 0..ROUNDS {
        let t = std::time::Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
    rtt.sort_unstable();
    Ok(percentile(&rtt, 0.5) as f64 / 2000.0)
}
