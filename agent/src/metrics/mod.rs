//! Observability: the access log ([`access`]).

pub mod access;
