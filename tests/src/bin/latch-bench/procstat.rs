//! What a process has used, read from `/proc`: CPU time ([`cpu_ns`], and while something runs:
//! [`cpu_during`]), how often its threads were put on a CPU ([`timeslices`]) and resident memory
//! ([`rss_kib`]).

/// CPU time used so far by all threads of process `pid`, in nanoseconds (the first field of
/// each thread's `schedstat`, kept by the scheduler itself rather than sampled at ticks); 0 if
/// it cannot be read.
pub fn cpu_ns(pid: u32) -> u64 {
    schedstat_sum(pid, 0)
}

/// Run `f`, adding the CPU time each of the processes `pids` used meanwhile to its entry of
/// `sums`.
pub fn cpu_during<const N: usize, T>(
    pids: [u32; N],
    sums: &mut [u64; N],
    f: impl FnOnce() -> T,
) -> T {
    let before = pids.map(cpu_ns);
    let out = f();
    for ((sum, pid), before) in sums.iter_mut().zip(pids).zip(before) {
        *sum += cpu_ns(pid).saturating_sub(before);
    }
    out
}

/// How many times the threads of process `pid` were put on a CPU so far (the third field of
/// each thread's `schedstat`): each wake-up of a sleeping thread is one, and so is each return
/// after being preempted; 0 if it cannot be read.
pub fn timeslices(pid: u32) -> u64 {
    schedstat_sum(pid, 2)
}

/// Field `field` of every thread's `schedstat` of process `pid`, summed.
fn schedstat_sum(pid: u32, field: usize) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(field)?.parse::<u64>().ok())
        .sum()
}

/// Process `pid`'s resident memory (`VmRSS`) in KiB; 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
