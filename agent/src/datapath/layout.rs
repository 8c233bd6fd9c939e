//! The layout of each map as this build defines it (type, key and value size, max entries, flags),
//! and the check that removes, before the object is loaded, a pin laid out by another build: aya
//! alone would adopt it whatever its shape. Why: `docs/datapath.md` (Pins, restarts and uninstall).

use std::{collections::BTreeMap, path::Path};

use latch_common::map_names;

use super::{error::DatapathError, object::EBPF_OBJECT, syscall};

/// What a map is, as far as a program or a reader of it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapLayout {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

impl From<syscall::MapInfo> for MapLayout {
    fn from(info: syscall::MapInfo) -> Self {
        Self {
            map_type: info.map_type,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            map_flags: info.map_flags,
        }
    }
}

/// A map pinned under `maps/`: its kernel id and layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedMap {
    pub id: u32,
    pub layout: MapLayout,
}

/// The layout of every map of `latch_common::map_names`, as the embedded object defines it.
pub fn expected() -> Result<BTreeMap<&'static str, MapLayout>, DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DatapathError::System(format!("parsing the embedded eBPF object: {e}")))?;
    map_names::ALL
        .into_iter()
        .map(|name| {
            let map = object
                .maps
                .get(name)
                .ok_or(DatapathError::Missing { kind: "map", name })?;
            Ok((
                name,
                MapLayout {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    map_flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// The map pinned at `path`, `None` if nothing is pinned there.
pub fn pinned(path: &Path) -> Result<Option<PinnedMap>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    let info = syscall::obj_get(path)
        .and_then(|fd| syscall::map_info(&fd))
        .map_err(|e| DatapathError::io("reading the pinned map", path, e))?;
    Ok(Some(PinnedMap {
        id: info.id,
        layout: info.into(),
    }))
}

/// Remove every pin under `maps_dir` whose map is not laid out as this build's (so that the load
/// creates it afresh); returns the names of the maps replaced. A pin that is not a readable map
/// is removed too: the load could do nothing with it.
pub(super) fn unpin_foreign_maps(maps_dir: &Path) -> Result<Vec<&'static str>, DatapathError> {
    let mut removed = Vec::new();
    for (name, want) in expected()? {
        let path = maps_dir.join(name);
        let found = match pinned(&path) {
            Ok(None) => continue,
            Ok(Some(map)) if map.layout == want => continue,
            Ok(Some(map)) => format!("{:?}", map.layout),
            Err(e) => e.to_string(),
        };
        tracing::warn!(map = name, pin = %path.display(), found, expected = ?want, "pinned map is laid out differently from this build's; replacing it");
        std::fs::remove_file(&path)
            .map_err(|e| DatapathError::io("removing the pin of a foreign map", &path, e))?;
        removed.push(name);
    }
    Ok(removed)
}

/// Remove every pin under `maps_dir` named like one of Latch's maps (`LATCH_…`) that this build
/// no longer defines (`LATCH_FASTPATH_ADMITS`, for one): nothing uses it any more, and an LRU
/// map's memory is allocated whole while it is pinned. Returns the names removed.
pub(super) fn unpin_retired_maps(maps_dir: &Path) -> Result<Vec<String>, DatapathError> {
    let entries = match std::fs::read_dir(maps_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("listing", maps_dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatapathError::io("listing", maps_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("LATCH_") || map_names::ALL.contains(&name.as_str()) {
            continue;
        }
        let path = entry.path();
        tracing::warn!(map = name, pin = %path.display(), "this build has no such map; unpinning it");
        std::fs::remove_file(&path)
            .map_err(|e| DatapathError::io("removing the pin of a retired map", &path, e))?;
        removed.push(name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use latch_common::{EndpointInfo, VerdictKey, VerdictValue, WorkloadInfo};

    use super::*;

    /// The layouts read from the object are those of the `latch_common` types: the identity
    /// maps carry 16-byte identities.
    #[test]
    fn the_object_defines_the_common_layouts() {
        let all = expected().expect("layouts");
        assert_eq!(all.len(), map_names::ALL.len());
        let verdicts = all[map_names::VERDICTS];
        assert_eq!(verdicts.map_type, syscall::map_type::LRU_HASH);
        assert_eq!(verdicts.key_size as usize, size_of::<VerdictKey>());
        assert_eq!(verdicts.value_size as usize, size_of::<VerdictValue>());
        assert_eq!(verdicts.max_entries, latch_common::MAX_VERDICTS);
        assert_eq!(
            all[map_names::WORKLOADS].value_size as usize,
            size_of::<WorkloadInfo>()
        );
        assert_eq!(
            all[map_names::ENDPOINTS].value_size as usize,
            size_of::<EndpointInfo>()
        );
        assert_eq!(size_of::<VerdictKey>(), 40);
    }

    #[test]
    fn pins_of_maps_this_build_no_longer_has_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("latch-retired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for name in ["LATCH_FASTPATH_ADMITS", map_names::VERDICTS, "other"] {
            std::fs::write(dir.join(name), b"").expect("scratch pin");
        }
        let removed = unpin_retired_maps(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("listing")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).expect("cleaning up");
        assert_eq!(removed.expect("unpinning"), ["LATCH_FASTPATH_ADMITS"]);
        assert_eq!(left, [map_names::VERDICTS, "other"]);
    }
}
