//! Latch node agent library: everything behind the `latch` binary. Its modules are layered and
//! import only downwards (`cargo xtask test` checks it); docs/architecture.md lists the layers and
//! follows one connection through them.
//!
//! Follow a connection from [`capture::outbound`]: the original destination from the kernel
//! ([`datapath`]), the snapshot in force ([`state`]), the tunnel ([`tunnel::hbone`]), the caching
//! rule ([`verdicts::rule`]) and the splice ([`capture::carry`]). [`runtime`] is the `latch agent`
//! process; [`debug`] and [`metrics`] are how it is inspected. [`fuzzing`] is the fuzz targets'
//! code (docs/fuzzing.md).

pub mod accept;
pub mod antispoof;
pub mod authn;
pub mod capture;
pub mod config;
pub mod conn;
pub mod datapath;
pub mod debug;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod kubernetes;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod policy_test;
pub mod runtime;
pub mod scheduling;
pub mod shed;
pub mod state;
pub mod sync;
pub mod tls;
pub mod tunnel;
pub mod verdicts;
