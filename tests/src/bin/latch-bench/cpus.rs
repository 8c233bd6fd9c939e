//! The benchmark's CPU affinity: every online CPU (`docs/benchmarks.md`).

use anyhow::Context as _;

/// Let the benchmark and everything it starts (agents, applications, clients) run on every online
/// CPU. A process may inherit a narrower affinity than the machine has (this workplace's process
/// supervisor pins itself, and so every process it starts, to CPU 0); the simulated cluster would
/// then run on one core and measure that instead.
pub fn use_every_cpu() -> anyhow::Result<()> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let mut cpus = CpuSet::new();
    for range in online.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (usize, usize) = (
            first.parse().context("parsing the online CPUs")?,
            last.parse().context("parsing the online CPUs")?,
        );
        for cpu in first..=last {
            cpus.set(cpu).context("adding a CPU to the set")?;
        }
    }
    let count = |set: &CpuSet| {
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .count()
    };
    let inherited = count(&sched_getaffinity(Pid::from_raw(0)).context("reading CPU affinity")?);
    sched_setaffinity(Pid::from_raw(0), &cpus).context("setting CPU affinity")?;
    let now = count(&sched_getaffinity(Pid::from_raw(0)).context("reading CPU affinity")?);
    if now != inherited {
        println!("running on {now} CPUs (the benchmark was started on {inherited})");
    }
    Ok(())
}
