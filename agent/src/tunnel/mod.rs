//! Carrying bytes between the two sides of a connection: [`splice`] relays between two streams,
//! [`hbone`] is the HBONE tunnel between agents (HTTP/2 CONNECT over mutual TLS, the client's
//! address in [`forwarded`], the handshakes in progress per source in [`handshakes`]), [`http`]
//! enforces per-request (L7) policy inside a carried connection (each request made ready for
//! policy by [`request_head`]), and [`tracked`] lists the
//! connections being carried, counts their bytes and closes the ones policy no longer allows.

pub mod answer;
pub mod chunk;
pub mod forwarded;
pub mod h2stream;
pub mod handshakes;
pub mod hbone;
pub mod http;
pub mod request_head;
pub mod splice;
pub mod tracked;
