//! Where the desired state comes from. A [`Source`] says when the desired state may have
//! changed and loads it as a [`crate::state::Snapshot`]; the runtime reconciles whatever snapshot it gets, the
//! same way for every source. [`FileSource`] is the config file and the policy files it names;
//! the Kubernetes API is the next source (docs/runtime.md).

mod contract;
mod file;
pub mod file_watch;

pub use contract::{Source, restart_only_unchanged};
pub use file::FileSource;
