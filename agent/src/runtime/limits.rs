//! The process limits the agent raises for itself at start: open files. Every relayed connection
//! holds two descriptors (tunneled ones at both agents), and container runtimes start processes
//! with a soft limit as low as 1,024 (containerd 2 and systemd's default) under a hard limit that
//! allows far more; a node agent that kept the soft one would refuse connections past about five
//! hundred. Go raises it at start for every program; the agent does the same.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raise the soft limit on open files to the hard limit; the limits in force afterwards
/// (soft, hard), or why they could not be read or raised.
pub fn raise_open_files() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // Lower the soft limit first (always allowed), so that the raise has work to do; 4,096
        // leaves the other tests running meanwhile far more descriptors than they use.
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(4096), hard).expect("lower the soft limit");
        let (soft, after_hard) = raise_open_files().expect("raise");
        assert_eq!((soft, after_hard), (hard, hard));
    }
}
