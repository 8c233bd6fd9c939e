//! The fast-path event ring buffer (`LATCH_FASTPATH_EVENTS`): [`FastpathEvents`] drains it when
//! the kernel wakes it (a quarter full) and on its own clock ([`DRAIN_EVERY`] while events flow,
//! backing off to [`DRAIN_QUIET`] while none do); [`decode`] turns
//! one record into a [`FastpathEvent`]. What the events mean and who sends them:
//! `docs/datapath.md` (Fast-path audit).

use std::{mem::offset_of, path::Path, time::Duration};

use aya::maps::{MapData, RingBuf};
use latch_common::{FastpathEvent, Identity, IpKey, map_names};
use tokio::io::unix::AsyncFd;

use super::{error::DatapathError, maps::open};

/// A record of the ring buffer that is not a [`FastpathEvent`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{} record of {len} bytes, a fast-path event takes {}",
    map_names::FASTPATH_EVENTS,
    size_of::<FastpathEvent>()
)]
pub struct DecodeError {
    pub len: usize,
}

/// The ring buffer of fast-path events, for its one reader (the agent's audit task).
pub struct FastpathEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl FastpathEvents {
    /// Open the ring buffer pinned under `pin_dir`; needs a tokio runtime with I/O enabled.
    // tokio polls a descriptor only through `AsyncFd::register`, which is unsafe.
    #[allow(unsafe_code)]
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let name = map_names::FASTPATH_EVENTS;
        let ring: RingBuf<MapData> = open(pin_dir, name)?
            .try_into()
            .map_err(|e| DatapathError::map("typing map", name, e))?;
        // SAFETY: a `RingBuf` owns its map's descriptor, keeps it open until it is dropped (with
        // the `AsyncFd`) and always reports the same one.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| {
            DatapathError::io(
                "polling",
                pin_dir.join("maps").join(name),
                std::io::Error::from(e),
            )
        })?;
        Ok(Self { ring })
    }

    /// Take every record the ring buffer holds once it is woken (a quarter of it full, see
    /// `FASTPATH_EVENTS_WAKEUP_BYTES`) or its clock says so, whichever comes first; waits on
    /// while it is empty. The clock starts at [`DRAIN_EVERY`] and doubles at every look that
    /// finds nothing, up to [`DRAIN_QUIET`]: a call after a batch looks again soon.
    pub async fn next_batch(
        &mut self,
    ) -> Result<Vec<Result<FastpathEvent, DecodeError>>, DatapathError> {
        let mut wait = DRAIN_EVERY;
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard.map_err(|e| {
                        DatapathError::io("waiting on", map_names::FASTPATH_EVENTS, e)
                    })?;
                    let batch = drain(guard.get_inner_mut());
                    guard.clear_ready();
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                }
                () = tokio::time::sleep(wait) => {
                    let batch = drain(self.ring.get_mut());
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                    wait = quieter(wait);
                }
            }
        }
    }
}

/// How long a fast-path event may wait in the ring buffer before the agent takes it while
/// events flow: events are submitted without a wake-up (one per event would cost every node a
/// context switch per connection), so the agent looks on its own clock.
pub const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// The longest the clock waits once looks find nothing: an idle agent looks once a second, not
/// ten times, and the first event after a quiet spell waits at most this long.
pub const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// The wait after a look at `wait` that found nothing.
fn quieter(wait: Duration) -> Duration {
    (wait * 2).min(DRAIN_QUIET)
}

/// Every record `ring` holds, decoded.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<Result<FastpathEvent, DecodeError>> {
    let mut batch = Vec::new();
    while let Some(record) = ring.next() {
        batch.push(decode(&record));
    }
    batch
}

/// One ring-buffer record as the `sock_ops` program wrote it (native byte order, the layout of
/// `latch_common::FastpathEvent`).
pub fn decode(record: &[u8]) -> Result<FastpathEvent, DecodeError> {
    if record.len() < size_of::<FastpathEvent>() {
        return Err(DecodeError { len: record.len() });
    }
    let bytes = |offset: usize, out: &mut [u8]| {
        out.copy_from_slice(&record[offset..offset + out.len()]);
    };
    let array16 = |offset: usize| {
        let mut out = [0u8; 16];
        bytes(offset, &mut out);
        out
    };
    let u64_at = |offset: usize| {
        let mut out = [0u8; 8];
        bytes(offset, &mut out);
        u64::from_ne_bytes(out)
    };
    let u16_at = |offset: usize| {
        let mut out = [0u8; 2];
        bytes(offset, &mut out);
        u16::from_ne_bytes(out)
    };
    Ok(FastpathEvent {
        src_identity: Identity::new(array16(offset_of!(FastpathEvent, src_identity))),
        dst_identity: Identity::new(array16(offset_of!(FastpathEvent, dst_identity))),
        src_addr: IpKey::from_v6(array16(offset_of!(FastpathEvent, src_addr))),
        dst_addr: IpKey::from_v6(array16(offset_of!(FastpathEvent, dst_addr))),
        cookie: u64_at(offset_of!(FastpathEvent, cookie)),
        duration_ns: u64_at(offset_of!(FastpathEvent, duration_ns)),
        bytes_acked: u64_at(offset_of!(FastpathEvent, bytes_acked)),
        bytes_received: u64_at(offset_of!(FastpathEvent, bytes_received)),
        src_port: u16_at(offset_of!(FastpathEvent, src_port)),
        dst_port: u16_at(offset_of!(FastpathEvent, dst_port)),
        kind: record[offset_of!(FastpathEvent, kind)],
        direction: record[offset_of!(FastpathEvent, direction)],
        close_state: record[offset_of!(FastpathEvent, close_state)],
        all_acked: record[offset_of!(FastpathEvent, all_acked)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use latch_common::{DIRECTION_OUTBOUND, FASTPATH_CLOSED, TCP_FIN_WAIT2};

    /// A record laid out by hand, field by field at the offsets the kernel writes.
    fn record(event: &FastpathEvent) -> Vec<u8> {
        let mut out = vec![0u8; size_of::<FastpathEvent>()];
        let mut put = |offset: usize, value: &[u8]| {
            out[offset..offset + value.len()].copy_from_slice(value);
        };
        put(
            offset_of!(FastpathEvent, src_identity),
            &event.src_identity.bytes,
        );
        put(
            offset_of!(FastpathEvent, dst_identity),
            &event.dst_identity.bytes,
        );
        put(offset_of!(FastpathEvent, src_addr), &event.src_addr.addr);
        put(offset_of!(FastpathEvent, dst_addr), &event.dst_addr.addr);
        put(
            offset_of!(FastpathEvent, cookie),
            &event.cookie.to_ne_bytes(),
        );
        put(
            offset_of!(FastpathEvent, duration_ns),
            &event.duration_ns.to_ne_bytes(),
        );
        put(
            offset_of!(FastpathEvent, bytes_acked),
            &event.bytes_acked.to_ne_bytes(),
        );
        put(
            offset_of!(FastpathEvent, bytes_received),
            &event.bytes_received.to_ne_bytes(),
        );
        put(
            offset_of!(FastpathEvent, src_port),
            &event.src_port.to_ne_bytes(),
        );
        put(
            offset_of!(FastpathEvent, dst_port),
            &event.dst_port.to_ne_bytes(),
        );
        put(offset_of!(FastpathEvent, kind), &[event.kind]);
        put(offset_of!(FastpathEvent, direction), &[event.direction]);
        put(offset_of!(FastpathEvent, close_state), &[event.close_state]);
        put(offset_of!(FastpathEvent, all_acked), &[event.all_acked]);
        out
    }

    #[test]
    fn the_clock_doubles_while_quiet_up_to_a_second() {
        let mut wait = DRAIN_EVERY;
        let mut waits = Vec::new();
        for _ in 0..6 {
            wait = quieter(wait);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn decodes_every_field() {
        let event = FastpathEvent {
            src_identity: Identity::new([1; 16]),
            dst_identity: Identity::new([2; 16]),
            src_addr: IpKey::from_v4([10, 244, 1, 2]),
            dst_addr: IpKey::from_v4([10, 244, 2, 2]),
            cookie: 0x0102_0304_0506_0708,
            duration_ns: 1_500_000,
            bytes_acked: 4096,
            bytes_received: 777,
            src_port: 40_000,
            dst_port: 8080,
            kind: FASTPATH_CLOSED,
            direction: DIRECTION_OUTBOUND,
            close_state: TCP_FIN_WAIT2,
            all_acked: 1,
        };
        assert_eq!(decode(&record(&event)), Ok(event));
    }

    #[test]
    fn a_short_record_is_an_error_naming_the_map_and_sizes() {
        let err = decode(&[0u8; 10]).expect_err("too short");
        assert_eq!(err, DecodeError { len: 10 });
        let message = err.to_string();
        assert!(message.contains("LATCH_FASTPATH_EVENTS"), "{message}");
        assert!(message.contains("10 bytes"), "{message}");
        assert!(message.contains("104"), "{message}");
    }
}
