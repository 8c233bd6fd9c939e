//! When the data path's worker runs what: [`busy_poll`] keeps it polling for I/O for a moment
//! after data-path activity, [`yielding`] hands it to waiting work before a connection's
//! bookkeeping. The measurements behind both are in `docs/benchmarks.md`.

pub mod busy_poll;
pub mod yielding;
