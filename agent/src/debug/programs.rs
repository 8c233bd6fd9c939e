//! The program list of `latch debug status`: every program this agent has in the kernel and
//! where it is attached.

use super::api::ProgramStatus;
use crate::{datapath::Datapath, state::Snapshot};

/// The cgroup programs, the inbound check on each configured workload's netns, and the
/// anti-spoofing program (`antispoof_id`).
pub fn programs(
    datapath: &mut Datapath,
    antispoof_id: u32,
    snapshot: &Snapshot,
) -> Vec<ProgramStatus> {
    let root = snapshot.config.cgroup_root.display().to_string();
    let mut programs: Vec<ProgramStatus> = datapath
        .attached()
        .iter()
        .map(|p| ProgramStatus {
            name: p.name.to_owned(),
            id: p.id,
            attached_to: format!("cgroup {root}"),
        })
        .collect();
    if let Ok(id) = datapath.inbound_program_id() {
        programs.extend(snapshot.registry.workloads.iter().map(|w| ProgramStatus {
            name: latch_common::program_names::INBOUND.to_owned(),
            id,
            attached_to: format!("netns {} ({})", w.netns.display(), w.id),
        }));
    }
    programs.push(ProgramStatus {
        name: latch_common::program_names::ANTISPOOF.to_owned(),
        id: antispoof_id,
        attached_to: "every Ethernet interface of the node's network namespace (TCX ingress)"
            .to_owned(),
    });
    programs
}
