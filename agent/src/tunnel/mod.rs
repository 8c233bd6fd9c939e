//! Carrying bytes between the two sides of a connection. For now a plain TCP relay
//! ([`splice`]); the HBONE tunnel (HTTP/2 CONNECT over mutual TLS) joins it here.

pub mod splice;
