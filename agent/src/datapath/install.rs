//! Loading, attaching, pinning and re-adopting the kernel programs (on `cgroupRoot`, and the
//! inbound check in each enrolled pod's netns), and uninstalling them. Pinned maps are reused
//! unless [`super::layout`] refuses them; pinned links are pointed at the new programs
//! (`BPF_LINK_UPDATE`). The anti-spoofing links are [`super::antispoof`]'s. The pins and what
//! survives a restart: `docs/datapath.md` (Pins, restarts and uninstall).

use std::{
    fs::{self, File},
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkLookup, SockOps, links::FdLink,
    },
};
use latch_common::{DatapathConfig, map_names, program_names};

use super::{
    antispoof::{self, AntiSpoofDatapath},
    deliveries::DeliveryMap,
    error::DatapathError,
    layout,
    maps::{KernelMaps, RedirectMap},
    object::EBPF_OBJECT,
    pins::{detach_and_unpin, ignore_not_found},
    syscall::{self, AttachType},
    system,
};

/// What the datapath needs from the node config.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub capture_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
}

/// Programs attached to `cgroupRoot`, with their kernel attach types.
pub const CGROUP_PROGRAMS: [(&str, AttachType); 5] = [
    (program_names::CONNECT4, AttachType::Connect4),
    (program_names::CONNECT6, AttachType::Connect6),
    (program_names::GETPEERNAME4, AttachType::Getpeername4),
    (program_names::GETPEERNAME6, AttachType::Getpeername6),
    (program_names::SOCK_OPS, AttachType::SockOps),
];

/// The loaded datapath. Dropping it leaves every pinned link and map in place.
pub struct Datapath {
    ebpf: Ebpf,
    settings: DatapathSettings,
    /// (program name, kernel program id, adopted from a previous run).
    attached: Vec<AttachedProgram>,
}

/// A program on `cgroupRoot` as this agent found or attached it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub id: u32,
    pub adopted: bool,
}

/// Load a cgroup program, then adopt the link pinned at `link_path` or attach a new one and pin
/// it. Evaluates to (kernel program id, adopted). A macro because aya's cgroup program types
/// share these methods but no trait.
macro_rules! attach_to_cgroup {
    ($prog:expr, $name:expr, $cgroup:expr, $link_path:expr) => {{
        let (prog, name, link_path) = ($prog, $name, $link_path);
        prog.load()
            .map_err(|e| DatapathError::program("loading", name, e))?;
        let fd = prog
            .fd()
            .map_err(|e| DatapathError::program("fd of", name, e))?;
        let adopted = adopt_link(link_path, fd)?;
        if !adopted {
            let link_id = prog
                .attach($cgroup, CgroupAttachMode::Single)
                .map_err(|e| DatapathError::program("attaching", name, e))?;
            let link = prog
                .take_link(link_id)
                .map_err(|e| DatapathError::program("taking link of", name, e))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| DatapathError::Pin {
                    what: "converting link",
                    path: link_path.to_owned(),
                    detail: e.to_string(),
                })?;
            pin_link(link, link_path)?;
        }
        (program_id(prog.info(), name)?, adopted)
    }};
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn inbound_dir(pin_dir: &Path) -> PathBuf {
    links_dir(pin_dir).join("inbound")
}

/// bpffs file names may not contain dots.
fn inbound_pin_name(workload: &str) -> String {
    workload.replace(['.', '/'], "_")
}

fn create_dir(path: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(path).map_err(|e| DatapathError::io("creating", path, e))
}

impl Datapath {
    /// Load, pin and attach everything (adopting what an earlier run left pinned), and write the
    /// node config into the kernel.
    pub fn install(settings: DatapathSettings) -> Result<Self, DatapathError> {
        system::ensure_bpffs(&settings.pin_dir)?;
        for dir in [
            maps_dir(&settings.pin_dir),
            links_dir(&settings.pin_dir),
            inbound_dir(&settings.pin_dir),
            antispoof::links_dir(&settings.pin_dir),
        ] {
            create_dir(&dir)?;
        }
        let root_level = system::cgroup_level(&settings.cgroup_root)?;
        layout::unpin_foreign_maps(&maps_dir(&settings.pin_dir))?;
        layout::unpin_retired_maps(&maps_dir(&settings.pin_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir(&settings.pin_dir))
            .load(EBPF_OBJECT)?;
        for name in map_names::ALL {
            if ebpf.map(name).is_none() {
                return Err(DatapathError::Missing { kind: "map", name });
            }
        }

        let cgroup = File::open(&settings.cgroup_root)
            .map_err(|e| DatapathError::io("opening cgroupRoot", &settings.cgroup_root, e))?;
        let mut attached = Vec::new();
        for (name, _) in CGROUP_PROGRAMS {
            let link_path = links_dir(&settings.pin_dir).join(name);
            let program = ebpf.program_mut(name).ok_or(DatapathError::Missing {
                kind: "program",
                name,
            })?;
            let (id, adopted) = if name == program_names::SOCK_OPS {
                let prog: &mut SockOps = program
                    .try_into()
                    .map_err(|e| DatapathError::program("typing", name, e))?;
                attach_to_cgroup!(prog, name, &cgroup, &link_path)
            } else {
                let prog: &mut CgroupSockAddr = program
                    .try_into()
                    .map_err(|e| DatapathError::program("typing", name, e))?;
                attach_to_cgroup!(prog, name, &cgroup, &link_path)
            };
            tracing::info!(program = name, id, adopted, cgroup = %settings.cgroup_root.display(), "program attached");
            attached.push(AttachedProgram { name, id, adopted });
        }

        let inbound: &mut SkLookup = ebpf
            .program_mut(program_names::INBOUND)
            .ok_or(DatapathError::Missing {
                kind: "program",
                name: program_names::INBOUND,
            })?
            .try_into()
            .map_err(|e| DatapathError::program("typing", program_names::INBOUND, e))?;
        inbound
            .load()
            .map_err(|e| DatapathError::program("loading", program_names::INBOUND, e))?;
        antispoof_program(&mut ebpf)?
            .load()
            .map_err(|e| DatapathError::program("loading", program_names::ANTISPOOF, e))?;

        let mut datapath = Self {
            ebpf,
            settings,
            attached,
        };
        let config = DatapathConfig {
            capture_port: datapath.settings.capture_port,
            tunnel_port: datapath.settings.tunnel_port,
            inbound_port: datapath.settings.inbound_port,
            _pad: 0,
            cgroup_root_level: root_level,
            enabled: 1,
        };
        datapath.maps()?.set_config(config)?;
        Ok(datapath)
    }

    /// The anti-spoofing program (loaded, attached to no interface yet), its link pins and its
    /// maps, on a handle of their own.
    pub fn antispoof(&mut self) -> Result<AntiSpoofDatapath, DatapathError> {
        let name = program_names::ANTISPOOF;
        let program = antispoof_program(&mut self.ebpf)?;
        let fd = program
            .fd()
            .map_err(|e| DatapathError::program("fd of", name, e))?
            .try_clone()
            .map_err(|e| DatapathError::io("duplicating the fd of", name, e))?;
        let id = program_id(program.info(), name)?;
        AntiSpoofDatapath::new(fd, id, &self.settings.pin_dir)
    }

    /// Typed handles on the pinned maps.
    pub fn maps(&mut self) -> Result<KernelMaps, DatapathError> {
        KernelMaps::open_pinned(&self.settings.pin_dir)
    }

    /// A handle on the redirect map alone (see [`RedirectMap`]).
    pub fn redirects(&self) -> Result<RedirectMap, DatapathError> {
        RedirectMap::open_pinned(&self.settings.pin_dir)
    }

    /// The fast-path event ring buffer, for its one reader.
    pub fn fastpath_events(&self) -> Result<super::audit::FastpathEvents, DatapathError> {
        super::audit::FastpathEvents::open_pinned(&self.settings.pin_dir)
    }

    /// A handle on the announced deliveries alone.
    pub fn deliveries(&self) -> Result<DeliveryMap, DatapathError> {
        DeliveryMap::open_pinned(&self.settings.pin_dir)
    }

    pub fn settings(&self) -> &DatapathSettings {
        &self.settings
    }

    /// The programs on `cgroupRoot`, as attached or adopted at start-up.
    pub fn attached(&self) -> &[AttachedProgram] {
        &self.attached
    }

    /// Attach the inbound check to a pod's network namespace (adopting a pinned link if there is
    /// one). Idempotent.
    pub fn attach_inbound(&mut self, workload: &str, netns: &Path) -> Result<(), DatapathError> {
        let link_path = inbound_dir(&self.settings.pin_dir).join(inbound_pin_name(workload));
        let name = program_names::INBOUND;
        let netns_file =
            File::open(netns).map_err(|e| DatapathError::io("opening netns", netns, e))?;
        // A pin left on another namespace (the workload moved to a new netns, while the agent
        // ran or while it was down) is detached, never adopted.
        let wanted_ino = netns_file
            .metadata()
            .map_err(|e| DatapathError::io("reading netns", netns, e))?
            .ino();
        release_link_elsewhere(&link_path, wanted_ino)?;
        let prog = self.inbound_program()?;
        if adopt_link(
            &link_path,
            prog.fd()
                .map_err(|e| DatapathError::program("fd of", name, e))?,
        )? {
            return Ok(());
        }
        let link_id = prog.attach(&netns_file).map_err(|e| {
            DatapathError::program("attaching to netns", netns.display().to_string(), e)
        })?;
        let link = prog
            .take_link(link_id)
            .map_err(|e| DatapathError::program("taking link of", name, e))?;
        pin_link(FdLink::from(link), &link_path)?;
        tracing::info!(workload, netns = %netns.display(), "inbound check attached");
        Ok(())
    }

    /// Detach the inbound check from a workload's netns (no-op if it was not attached).
    pub fn detach_inbound(&mut self, workload: &str) -> Result<(), DatapathError> {
        let link_path = inbound_dir(&self.settings.pin_dir).join(inbound_pin_name(workload));
        if link_path.exists() {
            detach_and_unpin(&link_path)?;
            tracing::info!(workload, "inbound check detached");
        }
        Ok(())
    }

    /// The loaded inbound-check program (one program, attached to every pod netns).
    fn inbound_program(&mut self) -> Result<&mut SkLookup, DatapathError> {
        let name = program_names::INBOUND;
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|e| DatapathError::program("typing", name, e))
    }

    /// Kernel id of the inbound-check program.
    pub fn inbound_program_id(&mut self) -> Result<u32, DatapathError> {
        let prog = self.inbound_program()?;
        program_id(prog.info(), program_names::INBOUND)
    }

    /// Workloads (pin names) whose netns has the inbound check pinned.
    pub fn inbound_attachments(&self) -> Result<Vec<String>, DatapathError> {
        let dir = inbound_dir(&self.settings.pin_dir);
        let entries = fs::read_dir(&dir).map_err(|e| DatapathError::io("listing", &dir, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

fn antispoof_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    let name = program_names::ANTISPOOF;
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e| DatapathError::program("typing", name, e))
}

/// The pin name the inbound link of `workload` uses (for comparing with
/// [`Datapath::inbound_attachments`]).
pub fn inbound_link_name(workload: &str) -> String {
    inbound_pin_name(workload)
}

fn program_id(
    info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
    name: &str,
) -> Result<u32, DatapathError> {
    info.map(|i| i.id())
        .map_err(|e| DatapathError::program("reading info of", name, e))
}

/// Detach the netns link pinned at `path` if it is attached to any namespace but the one with
/// inode `netns_ino`.
fn release_link_elsewhere(path: &Path, netns_ino: u64) -> Result<(), DatapathError> {
    if !path.exists() {
        return Ok(());
    }
    let attached = syscall::obj_get(path).and_then(|link| syscall::netns_link_ino(&link));
    match attached {
        Ok(Some(ino)) if u64::from(ino) == netns_ino => Ok(()),
        Ok(other) => {
            tracing::info!(pin = %path.display(), attached_to = ?other, netns_ino, "inbound check pinned on another network namespace; detaching it");
            detach_and_unpin(path)
        }
        // Unreadable: adopt_link decides (it replaces a pin that does not work).
        Err(_) => Ok(()),
    }
}

/// If a link is pinned at `path`, point it at `prog` and return true. A pin whose link no longer
/// works (its cgroup or netns is gone) is removed so that a fresh link can be made.
fn adopt_link(path: &Path, prog: &impl AsFd) -> Result<bool, DatapathError> {
    if !path.exists() {
        return Ok(false);
    }
    let updated = syscall::obj_get(path).and_then(|link| syscall::link_update(&link, prog));
    match updated {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(pin = %path.display(), error = %e, "pinned link is stale; replacing it");
            fs::remove_file(path).map_err(|e| DatapathError::io("removing stale pin", path, e))?;
            Ok(false)
        }
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    link.pin(path).map(drop).map_err(|e| DatapathError::Pin {
        what: "pinning link",
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// Detach and unpin everything under `pin_dir`: links first (so enforcement stops before the
/// maps go), then maps, then the directories. Safe to run twice.
pub fn uninstall(pin_dir: &Path) -> Result<(), DatapathError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    for dir in [
        antispoof::links_dir(pin_dir),
        inbound_dir(pin_dir),
        links_dir(pin_dir),
        maps_dir(pin_dir),
    ] {
        remove_pins(&dir)?;
    }
    fs::remove_dir(pin_dir)
        .or_else(ignore_not_found)
        .map_err(|e| DatapathError::io("removing", pin_dir, e))?;
    tracing::info!(pin_dir = %pin_dir.display(), "uninstalled: links detached, maps unpinned");
    Ok(())
}

fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DatapathError::io("listing", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| DatapathError::io("listing", dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        detach_and_unpin(&path)?;
    }
    fs::remove_dir(dir)
        .or_else(ignore_not_found)
        .map_err(|e| DatapathError::io("removing", dir, e))
}

/// Ids of the programs attached to a cgroup for one of Latch's hooks (to check that nothing is
/// attached twice).
pub fn programs_on_cgroup(
    cgroup: &Path,
    attach_type: AttachType,
) -> Result<Vec<u32>, DatapathError> {
    let file = File::open(cgroup).map_err(|e| DatapathError::io("opening cgroup", cgroup, e))?;
    syscall::attached_program_ids(&file, attach_type)
        .map_err(|e| DatapathError::io("querying programs on", cgroup, e))
}

/// Ids of the `sk_lookup` programs attached to a network namespace.
pub fn programs_on_netns(netns: &Path) -> Result<Vec<u32>, DatapathError> {
    let file = File::open(netns).map_err(|e| DatapathError::io("opening netns", netns, e))?;
    syscall::attached_program_ids(&file, AttachType::SkLookup)
        .map_err(|e| DatapathError::io("querying programs on", netns, e))
}

/// Ids of the programs at the TCX ingress of interface `ifindex` of the calling thread's
/// network namespace (the anti-spoofing check, and whatever else is there).
pub fn programs_on_interface(ifindex: u32) -> Result<Vec<u32>, DatapathError> {
    syscall::tcx_ingress_program_ids(ifindex).map_err(|source| DatapathError::Interface {
        what: "querying the TCX programs of",
        ifindex,
        source,
    })
}
