//! What the agent gives back once it serves: the free pages of glibc's heap ([`trim_heap`]; at
//! start-up, after every reload and after every anti-spoofing resync) and the pages of its binary
//! and libraries it touched only to start ([`drop_file_pages`]).
//!
//! Start-up parses the eBPF object and its BTF, the config and the command line, and issues
//! certificates: it peaks at about 30 MB and runs code the agent never runs again. glibc keeps
//! the freed heap pages that lie below live allocations, and the kernel keeps every page of
//! the binary the agent has run or read (and the 64 KiB around each, mapped by fault-around)
//! in its resident set. Neither is needed to serve. docs/benchmarks.md (memory) has the
//! figures; docs/runtime.md what this does and does not change (the cgroup's page cache).

// glibc's `malloc_trim` and `madvise` have no safe wrapper in the crates the agent uses.
#![allow(unsafe_code)]

use std::ops::Range;

/// Give the free pages of every glibc heap back to the kernel (`malloc_trim(0)`: free chunks
/// above a page in size are released with `MADV_DONTNEED`, wherever they are in the heap).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only releases memory glibc holds free; it takes no pointer and is
    // thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmap the resident pages of every read-only private file mapping that holds no page of its
/// own (the agent's code and constants, those of libc and the loader): the kernel keeps them in
/// the page cache, and what the agent runs again faults back in without reading the disk.
/// Returns the bytes of the mappings advised; an unreadable `/proc/self/smaps` is an error and
/// nothing is unmapped.
pub fn drop_file_pages() -> std::io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut advised = 0;
    for range in droppable(&smaps) {
        // SAFETY: `range` is a whole mapping that is private, not writable and holds no
        // anonymous (copy-on-write) page, so every page of it is the file's, unchanged: after
        // `MADV_DONTNEED` a read faults in the same bytes from the page cache, and no reference
        // into it sees a change. Not being writable, no page of it can have become anonymous
        // since smaps was read.
        let result = unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                range.end - range.start,
                libc::MADV_DONTNEED,
            )
        };
        if result == 0 {
            advised += range.end - range.start;
        }
    }
    Ok(advised)
}

/// The address ranges of `smaps` (the text of `/proc/<pid>/smaps`) that [`drop_file_pages`]
/// may unmap: file-backed (a path, not `[vdso]` or an anonymous inode), private, not writable,
/// and with `Anonymous: 0 kB`.
fn droppable(smaps: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            current = range;
        } else if let Some(value) = line.strip_prefix("Anonymous:") {
            let none = value.trim() == "0 kB";
            if let Some(range) = current.take().filter(|_| none) {
                out.push(range);
            }
        }
    }
    out
}

/// For a mapping's header line of smaps (`start-end perms offset dev inode [path]`): `Some` of
/// the range if the mapping qualifies by its header, `Some(None)` if it does not; `None` for
/// any other line.
fn mapping_header(line: &str) -> Option<Option<Range<usize>>> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let path = fields.nth(3).unwrap_or("");
    let qualifies = perms[1] != b'w' && perms[3] == b'p' && path.starts_with('/');
    Some(qualifies.then_some(start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a03a5000 r--p 00000000 fe:01 1234 /usr/bin/latch
Size:               3732 kB
Rss:                1840 kB
Anonymous:             0 kB
55d0a03a5000-55d0a1148000 r-xp 003a4000 fe:01 1234 /usr/bin/latch
Rss:                8168 kB
Anonymous:             0 kB
55d0a1148000-55d0a11a7000 r--p 01146000 fe:01 1234 /usr/bin/latch
Rss:                 380 kB
Anonymous:           380 kB
55d0a11a7000-55d0a11c0000 rw-p 011a4000 fe:01 1234 /usr/bin/latch
Anonymous:            96 kB
7f0000000000-7f0000202000 r--s 00000000 00:0f 99 anon_inode:bpf-map
Anonymous:             0 kB
7f1000000000-7f1000100000 r--s 00000000 fe:01 77 /dev/shm/shared
Anonymous:             0 kB
7f2000000000-7f2000010000 rw-p 00000000 00:00 0
Anonymous:            64 kB
7f3000000000-7f3000028000 r-xp 00028000 fe:01 55 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";

    #[test]
    fn only_read_only_private_file_mappings_without_own_pages() {
        assert_eq!(
            droppable(SMAPS),
            vec![
                0x55d0a0000000..0x55d0a03a5000,
                0x55d0a03a5000..0x55d0a1148000,
                0x7f3000000000..0x7f3000028000,
            ]
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_left_alone() {
        let smaps = "55d0a03a5000-55d0a1148000 r-xp 003a4000 fe:01 1234 /usr/bin/latch\n\
                     Rss: 8168 kB\n\
                     7f2000000000-7f2000010000 rw-p 00000000 00:00 0\n\
                     Anonymous: 0 kB\n";
        assert_eq!(droppable(smaps), Vec::<Range<usize>>::new());
    }

    /// On this test process for real: its code's resident pages go, and it goes on running.
    #[test]
    fn dropping_shrinks_the_resident_file_pages() {
        let file_kb = || {
            let status = std::fs::read_to_string("/proc/self/status").expect("status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .expect("RssFile")
        };
        let before = file_kb();
        let advised = drop_file_pages().expect("smaps readable");
        let after = file_kb();
        assert!(advised > 0, "nothing advised");
        assert!(
            after < before,
            "RssFile {before} kB before, {after} kB after"
        );
        trim_heap();
        assert_eq!(droppable(SMAPS).len(), 3, "still runs after both");
    }
}
