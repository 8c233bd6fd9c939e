//! Who is who: SPIFFE identities of workloads, the 128-bit keys the kernel stores for them, and
//! the registry built from the config (cgroup → local workload, IP → identity).

pub mod ca;
pub mod certs;
pub mod id;
pub mod registry;
pub mod spiffe;

pub use id::{IdentityKey, SpiffeId};
pub use registry::{Endpoint, LocalWorkload, Registry, RegistryError};
