//! The BPF commands Latch needs that aya 0.14 keeps private, as raw `bpf(2)` calls: querying the
//! programs on a cgroup, netns or interface, updating and detaching links, opening and pinning
//! objects, batch lookups and deletes (revocation of large caches), attaching a TCX link by
//! interface index at the head of the chain, and reading and creating maps of any layout. Why each
//! is needed: `docs/datapath.md` (Pins, restarts and uninstall; Anti-spoofing).

use std::os::fd::{AsFd, AsRawFd};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Kernel attach types (UAPI `enum bpf_attach_type`) of the hooks Latch uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    Getpeername4 = 29,
    Getpeername6 = 30,
    SkLookup = 36,
    TcxIngress = 46,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// [`bpf_call`] for a command whose result is only success or failure.
///
/// # Safety
/// As [`bpf_call`].
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: the caller upholds `bpf_call`'s contract.
    unsafe { bpf_call(cmd, attr) }.map(drop)
}

/// The `bpf(2)` system call with `attr`, a `#[repr(C)]` prefix of `union bpf_attr` (the kernel
/// zero-extends it to its own size); the call's non-negative result (a new fd, for some
/// commands). The benchmarks' test runs of the programs use it too.
///
/// # Safety
/// `attr` must be a `#[repr(C)]` prefix of `union bpf_attr` laid out as `cmd` defines it, and
/// every address it carries (key and value buffers, paths, info structs, program data) must point
/// to memory the kernel may read, and write where `cmd` writes, for as many bytes as `cmd` will
/// use (the sizes the attribute and the object give), valid for the whole call. A safe wrapper
/// checks the object's sizes against its buffers first.
pub unsafe fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] bpf_attr prefix of the size we pass (the kernel
    // zero-extends); the caller vouches for the addresses in it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Ids of the programs attached at `target` (a cgroup or netns fd) for `attach_type`.
pub fn attached_program_ids(
    target: &impl AsFd,
    attach_type: AttachType,
) -> std::io::Result<Vec<u32>> {
    query_programs(target.as_fd().as_raw_fd() as u32, attach_type)
}

/// Ids of the programs attached at the TCX ingress of interface `ifindex` of the calling
/// thread's network namespace.
pub fn tcx_ingress_program_ids(ifindex: u32) -> std::io::Result<Vec<u32>> {
    query_programs(ifindex, AttachType::TcxIngress)
}

/// `target` is an fd, or an interface index for the TCX hooks (the same field of `bpf_attr`).
fn query_programs(target: u32, attach_type: AttachType) -> std::io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: target,
        attach_type: attach_type as u32,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: `prog_ids` points to `prog_cnt` u32s, alive until the call returns.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// Point an existing link at a new program, atomically.
pub fn link_update(link: &impl AsFd, new_prog: &impl AsFd) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: new_prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute carries only fds and flags.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }
}

/// Detach a link now. Dropping the last reference also detaches, but the kernel may do that
/// later (deferred work); uninstall must be done when it returns.
pub fn link_detach(link: &impl AsFd) -> std::io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct DetachAttr {
        link_fd: u32,
        _pad: [u32; 3],
    }
    let mut attr = DetachAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute carries only an fd.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }
}

const BPF_OBJ_GET: libc::c_long = 7;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Open a pinned BPF object (map, program or link) and return its fd.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: as in `bpf`; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr as *mut libc::c_void,
            std::mem::size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements read or removed per batch syscall.
const BATCH: usize = 8192;

/// Check that `map` is a (non-per-CPU) hash map whose keys are `K`'s size and, with `V`, whose
/// values are `V`'s: the kernel copies elements of the map's sizes into the caller's buffers.
fn check_layout<K, V>(map: &impl AsFd, values: bool) -> std::io::Result<()> {
    let info = map_info(map)?;
    let hash = matches!(info.map_type, map_type::HASH | map_type::LRU_HASH);
    let key_ok = info.key_size as usize == std::mem::size_of::<K>();
    let value_ok = !values || info.value_size as usize == std::mem::size_of::<V>();
    if hash && key_ok && value_ok {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "map {} (type {}, {}-byte keys, {}-byte values) is not a hash map of {}-byte keys{}",
            info.id,
            info.map_type,
            info.key_size,
            info.value_size,
            std::mem::size_of::<K>(),
            if values {
                format!(" and {}-byte values", std::mem::size_of::<V>())
            } else {
                String::new()
            }
        ),
    ))
}

/// Every (key, value) of a hash map, read a batch of buckets per syscall (`BPF_MAP_LOOKUP_BATCH`)
/// instead of two syscalls per entry. Fails if the map's key or value size is not `K`'s or `V`'s.
pub fn map_lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &impl AsFd,
) -> std::io::Result<Vec<(K, V)>> {
    check_layout::<K, V>(map, true)?;
    let mut out = Vec::new();
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The batch token is the kernel's bucket cursor (a u32 for hash maps); 8 bytes is enough.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut token_in as *mut u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` and `values` hold `BATCH` elements of the map's own key and value sizes
        // (checked above), the tokens are 8 bytes (the kernel's cursor is 4), all alive until
        // the call returns; `K` and `V` are plain data, valid for any bytes the kernel writes.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = attr.count as usize;
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match result {
            Ok(()) => {}
            // The end of the map (the last batch may still have carried elements).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Remove `keys` from a hash map, a batch per syscall (`BPF_MAP_DELETE_BATCH`), large sets
/// split over the machine's CPUs (the kernel's per-element cost dominates). Keys that are
/// already gone are skipped. Returns how many were removed. Fails if the map's key size is not
/// `K`'s.
pub fn map_delete_all<K: aya::Pod + Sync>(
    map: &(impl AsFd + Sync),
    keys: &[K],
) -> std::io::Result<usize> {
    check_layout::<K, ()>(map, false)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(keys.len() / BATCH)
        .max(1);
    if threads == 1 {
        return delete_batches(map, keys);
    }
    let per_thread = keys.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .chunks(per_thread)
            .map(|part| scope.spawn(move || delete_batches(map, part)))
            .collect();
        let mut removed = 0;
        for worker in workers {
            removed += worker
                .join()
                .map_err(|_| std::io::Error::other("a map-delete thread panicked"))??;
        }
        Ok(removed)
    })
}

fn delete_batches<K: Copy>(map: &impl AsFd, keys: &[K]) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` points to `count` keys of the map's key size (checked by the caller),
        // which the kernel only reads.
        let result = unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) };
        let done = attr.count as usize;
        removed += done;
        match result {
            Ok(()) => rest = &rest[chunk.len()..],
            // chunk[done] was not there: skip it and go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_TCX_INGRESS` of `enum bpf_attach_type`.
const BPF_TCX_INGRESS: u32 = AttachType::TcxIngress as u32;
/// With no relative program or link: insert at the head of the interface's TCX chain.
const BPF_F_BEFORE: u32 = 1 << 3;
/// `BPF_LINK_TYPE_TCX` of `enum bpf_link_type`.
const BPF_LINK_TYPE_TCX: u32 = 11;
/// `BPF_LINK_TYPE_NETNS` of `enum bpf_link_type` (`sk_lookup` and flow dissector links).
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// `bpf_attr` for `BPF_LINK_CREATE` with the `tcx` member of its union.
#[repr(C)]
#[derive(Default)]
struct TcxLinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// Attach `prog` (a `sched_cls` program) at the ingress of interface `ifindex` of the calling
/// thread's network namespace, first in the chain, and return the link.
pub fn tcx_attach_ingress_first(
    prog: &impl AsFd,
    ifindex: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = TcxLinkCreateAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: BPF_F_BEFORE,
        ..Default::default()
    };
    // SAFETY: as in `bpf`; BPF_LINK_CREATE returns a new fd on success.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &mut attr as *mut TcxLinkCreateAttr as *mut libc::c_void,
            std::mem::size_of::<TcxLinkCreateAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Pin a BPF object (a link, or a map) at `path` on a bpffs.
pub fn obj_pin(object: &impl AsFd, path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: object.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `pathname` is a NUL-terminated string alive until the call returns.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }
}

/// `struct bpf_link_info` up to and including its union (the `tcx` member is what is read).
#[repr(C, align(8))]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u32; 12],
}

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn link_info(link: &impl AsFd) -> std::io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: `info` points to `info_len` writable bytes, alive until the call returns.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// The interface a TCX link is attached to: `Some(0)` once its interface is gone (the kernel
/// detaches the link then), `None` for a link that is not a TCX link.
pub fn tcx_link_ifindex(link: &impl AsFd) -> std::io::Result<Option<u32>> {
    let info = link_info(link)?;
    Ok((info.kind == BPF_LINK_TYPE_TCX).then_some(info.union[0]))
}

/// The inode of the network namespace a netns link (`sk_lookup`) is attached to: `Some(0)` once
/// that namespace is gone, `None` for a link of another kind.
pub fn netns_link_ino(link: &impl AsFd) -> std::io::Result<Option<u32>> {
    let info = link_info(link)?;
    Ok((info.kind == BPF_LINK_TYPE_NETNS).then_some(info.union[0]))
}

/// Some map types of `enum bpf_map_type`.
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const LRU_HASH: u32 = 9;
}

/// `struct bpf_map_info` up to `map_flags`: what a map is (the kernel fills a prefix of the size
/// it is given).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapInfo {
    /// `enum bpf_map_type` ([`map_type`]).
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// Type, id, sizes and flags of a map.
pub fn map_info(map: &impl AsFd) -> std::io::Result<MapInfo> {
    let mut info = MapInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: map.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    // SAFETY: `info` points to `info_len` writable bytes, alive until the call returns.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

const BPF_MAP_CREATE: libc::c_long = 0;

/// `bpf_attr` for `BPF_MAP_CREATE`, up to `map_flags`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Create a map of no program's (the agent's maps come from its object, through aya): the tests
/// make maps of another layout with it, to stand for what an earlier build pinned.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: the attribute carries only sizes and flags.
    let fd = unsafe { bpf_call(BPF_MAP_CREATE, &mut attr) }?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch calls copy elements of the map's own sizes into the caller's buffers: a map whose
    /// layout is not the caller's types is refused before any call that would write, and one
    /// that is reads back what was put in.
    #[test]
    fn batch_calls_refuse_a_map_whose_sizes_are_not_the_callers_types() {
        let map = map_create(map_type::HASH, 8, 16, 4).expect("a hash map (needs root)");
        let refused = map_lookup_all::<u32, u64>(&map).expect_err("4-byte keys, 8-byte values");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        assert!(
            refused.to_string().contains("8-byte keys, 16-byte values"),
            "{refused}"
        );
        let refused = map_delete_all::<u32>(&map, &[1]).expect_err("4-byte keys");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);

        let empty = map_lookup_all::<u64, [u64; 2]>(&map).expect("the map's own layout");
        assert!(empty.is_empty());
        assert_eq!(map_delete_all::<u64>(&map, &[7]).expect("deleting"), 0);
    }
}
