//! The node-local debug API: HTTP/1.1 with JSON bodies over a root-only Unix socket.
//!
//! - [`api`]: the request and response types and the [`api::Backend`] trait the agent implements.
//! - [`server`]: the socket's lifecycle (stale-socket takeover, mode 0600) and the routes.
//! - [`client`] and [`table`]: `latch debug`, which calls the routes and prints tables.
//! - [`query`]: query-string encoding shared by both sides.
//! - [`agent`]: the running agent's implementation of the backend; [`programs`]: its program list.

pub mod agent;
pub mod api;
pub mod client;
pub mod programs;
pub mod query;
pub mod server;
pub mod table;

pub use api::Backend;
pub use client::{DebugCli, DebugCommand};
pub use server::{DebugError, DebugServer};

/// Where `latch debug` looks for the agent unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/latch/debug.sock";
