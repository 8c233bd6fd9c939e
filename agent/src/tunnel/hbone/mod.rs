//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams over mutual TLS, the wire protocol
//! of Istio ambient. `client` opens streams (the source's early data right behind the
//! `CONNECT`) on the connections `pool` keeps per identity pair, endpoint and trust epoch;
//! `server` admits each stream (`200`) or answers `403`, `503` or `401`; `drain` sends `GOAWAY`
//! and lets open streams finish when the agent stops. The TLS handshakes are
//! [`crate::tls::handshake`]'s: this module speaks HTTP/2 only. See `docs/tunnel.md` (*HBONE*).

mod client;
mod drain;
mod pool;
mod protocol;
mod server;
#[cfg(test)]
mod tests;

pub use client::{ClientStream, Dial, Keepalive, OPEN_TIMEOUT, Opened, TunnelClient};
pub use drain::{DRAIN_TIMEOUT, Drain, Drained};
pub use pool::{PoolKey, Retire};
pub use protocol::{
    BAGGAGE_HEADER, BoxFuture, CACHEABLE_HEADER, EARLY_DATA, TRACEPARENT_HEADER, TunnelError,
    TunnelStream,
};
pub use server::{
    Admission, Caller, Carry, HANDSHAKE_TIMEOUT, Inbound, Proof, ServerConnection,
    accept_connection, serve_connection,
};
