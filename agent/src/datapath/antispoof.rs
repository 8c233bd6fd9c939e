//! The kernel side of anti-spoofing: the TCX links of `latch_antispoof`, one per interface,
//! attached by index at the head of the chain and pinned under `links/antispoof/<ifindex>`, and its
//! three maps. What goes in them, and on which interfaces, is decided by [`crate::antispoof`]; this
//! module only carries it out (`docs/datapath.md`, Anti-spoofing).

use std::{
    collections::HashMap as StdHashMap,
    fs,
    hash::Hash,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
    programs::ProgramFd,
};
use latch_common::{InterfaceInfo, IpKey, MacKey, SourceBinding, map_names};

use super::{
    error::DatapathError,
    maps::{found, ip_key, open},
    pins::detach_and_unpin,
    syscall,
};

/// The directory of the anti-spoofing links under `bpfPinDir`.
pub(super) fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links").join("antispoof")
}

/// How an interface got its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New,
    /// A link pinned by an earlier run, now running this run's program.
    Adopted,
}

/// Handles on the anti-spoofing program, its link pins and its maps.
pub struct AntiSpoofDatapath {
    program: ProgramFd,
    program_id: u32,
    links_dir: PathBuf,
    sources: HashMap<MapData, IpKey, SourceBinding>,
    interfaces: HashMap<MapData, u32, InterfaceInfo>,
    macs: HashMap<MapData, MacKey, u32>,
}

macro_rules! typed {
    ($pin_dir:expr, $name:expr) => {
        open($pin_dir, $name)?
            .try_into()
            .map_err(|e| DatapathError::map("typing map", $name, e))?
    };
}

/// What `LATCH_SOURCES` binds `ip` to and `LATCH_INTERFACES` holds for `ifindex`, read from the
/// maps pinned under `pin_dir` (for tests and inspection; `None` where there is no entry).
pub fn read_binding(
    pin_dir: &Path,
    ip: IpAddr,
    ifindex: u32,
) -> Result<(Option<SourceBinding>, Option<InterfaceInfo>), DatapathError> {
    let sources: HashMap<MapData, IpKey, SourceBinding> = typed!(pin_dir, map_names::SOURCES);
    let interfaces: HashMap<MapData, u32, InterfaceInfo> = typed!(pin_dir, map_names::INTERFACES);
    Ok((
        found(sources.get(&ip_key(ip), 0), map_names::SOURCES)?,
        found(interfaces.get(&ifindex, 0), map_names::INTERFACES)?,
    ))
}

impl AntiSpoofDatapath {
    pub(super) fn new(
        program: ProgramFd,
        program_id: u32,
        pin_dir: &Path,
    ) -> Result<Self, DatapathError> {
        let links_dir = links_dir(pin_dir);
        fs::create_dir_all(&links_dir).map_err(|e| DatapathError::io("creating", &links_dir, e))?;
        Ok(Self {
            program,
            program_id,
            links_dir,
            sources: typed!(pin_dir, map_names::SOURCES),
            interfaces: typed!(pin_dir, map_names::INTERFACES),
            macs: typed!(pin_dir, map_names::MACS),
        })
    }

    /// Kernel id of the program.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    fn pin(&self, ifindex: u32) -> PathBuf {
        self.links_dir.join(ifindex.to_string())
    }

    /// Put the check on interface `ifindex` of the agent's network namespace, adopting the link
    /// an earlier run pinned for it if that link is still on it.
    pub fn attach(&mut self, ifindex: u32) -> Result<Attached, DatapathError> {
        let pin = self.pin(ifindex);
        if pin.exists() {
            let adopted =
                syscall::obj_get(&pin).and_then(|link| match syscall::tcx_link_ifindex(&link)? {
                    Some(on) if on == ifindex => syscall::link_update(&link, &self.program),
                    other => Err(std::io::Error::other(format!(
                        "the pinned link is on interface {other:?}, not {ifindex}"
                    ))),
                });
            match adopted {
                Ok(()) => return Ok(Attached::Adopted),
                Err(e) => {
                    tracing::debug!(pin = %pin.display(), error = %e, "stale anti-spoofing link; replacing it");
                    detach_and_unpin(&pin)?;
                }
            }
        }
        let link = syscall::tcx_attach_ingress_first(&self.program, ifindex).map_err(|source| {
            DatapathError::Interface {
                what: "attaching latch_antispoof (TCX ingress, Linux 6.6 or newer) to",
                ifindex,
                source,
            }
        })?;
        syscall::obj_pin(&link, &pin).map_err(|e| DatapathError::io("pinning link", &pin, e))?;
        Ok(Attached::New)
    }

    /// Take the check off interface `ifindex` (a no-op if it is not there; the kernel has
    /// already detached the link of an interface that is gone).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        detach_and_unpin(&self.pin(ifindex))
    }

    /// Interfaces with a pinned link, this run's or an earlier one's.
    pub fn pinned(&self) -> Result<Vec<u32>, DatapathError> {
        let entries = fs::read_dir(&self.links_dir)
            .map_err(|e| DatapathError::io("listing", &self.links_dir, e))?;
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// Make `LATCH_SOURCES` hold exactly `wanted`.
    pub fn set_sources(
        &mut self,
        wanted: &StdHashMap<IpAddr, SourceBinding>,
    ) -> Result<(), DatapathError> {
        let wanted: StdHashMap<IpKey, SourceBinding> =
            wanted.iter().map(|(ip, b)| (ip_key(*ip), *b)).collect();
        sync(&mut self.sources, &wanted, map_names::SOURCES)
    }

    /// Before `LATCH_SOURCES` and `LATCH_MACS` change: clear the copy of their bindings
    /// ([`InterfaceInfo::own`]) from every entry of `LATCH_INTERFACES` whose copy `wanted`
    /// changes or drops, so that no entry carries a binding those maps no longer grant while
    /// they change. [`Self::set_interfaces`], after them, writes the new copies.
    pub fn clear_changing_copies(
        &mut self,
        wanted: &StdHashMap<u32, InterfaceInfo>,
    ) -> Result<(), DatapathError> {
        let name = map_names::INTERFACES;
        let current: Vec<(u32, InterfaceInfo)> =
            self.interfaces
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| DatapathError::map("iterating", name, e))?;
        for (ifindex, info) in current {
            let cleared = info.without_own();
            let keeps = wanted.get(&ifindex).is_some_and(|w| w.same_own(&info));
            if info != cleared && !keeps {
                self.interfaces
                    .insert(ifindex, cleared, 0)
                    .map_err(|e| DatapathError::map("writing", name, e))?;
            }
        }
        Ok(())
    }

    /// Make `LATCH_INTERFACES` hold exactly `wanted`.
    pub fn set_interfaces(
        &mut self,
        wanted: &StdHashMap<u32, InterfaceInfo>,
    ) -> Result<(), DatapathError> {
        sync(&mut self.interfaces, wanted, map_names::INTERFACES)
    }

    /// Make `LATCH_MACS` hold exactly `wanted` (MAC → host-side ifindex).
    pub fn set_macs(&mut self, wanted: &StdHashMap<[u8; 6], u32>) -> Result<(), DatapathError> {
        let wanted: StdHashMap<MacKey, u32> = wanted
            .iter()
            .map(|(mac, ifindex)| (MacKey::new(*mac), *ifindex))
            .collect();
        sync(&mut self.macs, &wanted, map_names::MACS)
    }
}

/// Bring `map` to exactly `wanted`: stale keys removed, new and changed ones written.
fn sync<K: Pod + Eq + Hash, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &StdHashMap<K, V>,
    name: &'static str,
) -> Result<(), DatapathError> {
    let current: StdHashMap<K, V> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| DatapathError::map("iterating", name, e))?;
    for key in current.keys().filter(|k| !wanted.contains_key(k)) {
        super::maps::remove_if_present(map.remove(key), name)?;
    }
    for (key, value) in wanted {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0)
                .map_err(|e| DatapathError::map("writing", name, e))?;
        }
    }
    Ok(())
}
