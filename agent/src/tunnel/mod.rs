//! Carrying bytes between the two sides of a connection: [`splice`] relays between two streams,
//! [`hbone`] is the HBONE tunnel between agents (HTTP/2 CONNECT over mutual TLS). The capture
//! path still forwards plain TCP; switching it to HBONE is the next step (issue 3).

pub mod hbone;
pub mod splice;

#[cfg(test)]
mod hbone_tests;
