//! The kernel's own accounting of the agent's eBPF programs (`BPF_ENABLE_STATS`): how often each
//! ran and for how long, summed over every loaded copy (one per node agent). For measurements
//! (`cargo xtask bench`): the kernel only counts while a [`RunStats`] is held, and counting costs
//! every program run two clock reads, so the agent never turns it on by itself.

use std::{collections::BTreeMap, os::fd::OwnedFd, time::Duration};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

use super::error::DatapathError;

/// Run counts and times of the loaded programs, by program name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs(pub BTreeMap<String, Run>);

/// How often a program ran and for how long, over every loaded copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub count: u64,
    pub time: Duration,
}

impl Run {
    /// Nanoseconds per run; `None` when it did not run.
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.count > 0).then(|| self.time.as_nanos() as f64 / self.count as f64)
    }
}

impl Runs {
    /// What ran between `earlier` and this reading.
    pub fn since(&self, earlier: &Runs) -> Runs {
        Runs(
            self.0
                .iter()
                .map(|(name, now)| {
                    let before = earlier.0.get(name).copied().unwrap_or_default();
                    let run = Run {
                        count: now.count.saturating_sub(before.count),
                        time: now.time.saturating_sub(before.time),
                    };
                    (name.clone(), run)
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Run {
        self.0.get(name).copied().unwrap_or_default()
    }
}

/// The kernel counts program runs while this is held.
pub struct RunStats {
    _enabled: OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<Self, DatapathError> {
        let enabled = enable_stats(Stats::RunTime).map_err(|e| {
            DatapathError::System(format!(
                "enabling eBPF run statistics (BPF_ENABLE_STATS): {e}"
            ))
        })?;
        Ok(Self { _enabled: enabled })
    }

    /// The run counts and times of every loaded program named in `names`, summed by name.
    pub fn read(&self, names: &[&str]) -> Result<Runs, DatapathError> {
        let mut runs = Runs::default();
        for info in loaded_programs() {
            let info = info
                .map_err(|e| DatapathError::System(format!("listing loaded eBPF programs: {e}")))?;
            let Some(name) = info.name_as_str().filter(|n| names.contains(n)) else {
                continue;
            };
            let run = runs.0.entry(name.to_owned()).or_default();
            run.count += info.run_count();
            run.time += info.run_time();
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(count: u64, nanos: u64) -> Run {
        Run {
            count,
            time: Duration::from_nanos(nanos),
        }
    }

    #[test]
    fn since_subtracts_per_program_and_keeps_new_ones_whole() {
        let before = Runs(BTreeMap::from([("a".to_owned(), run(10, 1_000))]));
        let now = Runs(BTreeMap::from([
            ("a".to_owned(), run(30, 5_000)),
            ("b".to_owned(), run(4, 400)),
        ]));
        let delta = now.since(&before);
        assert_eq!(delta.get("a"), run(20, 4_000));
        assert_eq!(delta.get("b"), run(4, 400));
        assert_eq!(delta.get("a").ns_per_run(), Some(200.0));
        assert_eq!(delta.get("missing").ns_per_run(), None);
    }
}
