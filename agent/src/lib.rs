//! Latch node agent library: everything behind the `latch` binary.
//!
//! A connection is followed through the modules in this order: [`capture`] (per-pod listeners and
//! the original destination), [`tunnel`] (carrying bytes), [`verdicts`] (what gets cached, for how
//! long), [`datapath`] (the kernel programs and maps; the only module that talks to aya).
//! [`config`] reads the node's configuration, [`identity`] turns workloads into identities and
//! [`policy`] decides, Istio's way, whether a connection or request is allowed. [`debug`] serves
//! the node-local debug socket (and is the `latch debug` client); [`metrics`] is the Prometheus
//! exposition and the access log; [`logging`] writes log lines out in batches; [`scheduling`]
//! decides when the data path's worker polls, sleeps or yields; [`runtime`] is the `latch agent`
//! process (a source of desired state, reconciled into the kernel and the pods' listeners) and
//! [`state`] the snapshot in force; [`accept`] keeps every accept loop from spinning when
//! descriptors run out; [`sync`] is the one way to take a lock; [`conn`] holds the words every
//! layer shares about a connection. [`fuzzing`] is the fuzz targets' code (docs/fuzzing.md), shared with the corpus
//! replay test.

pub mod accept;
pub mod antispoof;
pub mod capture;
pub mod config;
pub mod conn;
pub mod datapath;
pub mod debug;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod runtime;
pub mod scheduling;
pub mod state;
pub mod sync;
pub mod tls;
pub mod tunnel;
pub mod verdicts;
