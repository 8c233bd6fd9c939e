//! Anti-spoofing: where the kernel check (`ebpf/src/antispoof.rs`) runs and what it knows. A
//! netlink subscription to link and address changes wakes a resync, which attaches the check to
//! the node's interfaces ([`guarded`]) and computes the whole wanted content of `LATCH_SOURCES`,
//! `LATCH_INTERFACES` and `LATCH_MACS` from the current links, addresses and enrolled pods
//! ([`plan`], [`host_side`]), writing only the difference; the runtime hands over the enrolled pods
//! on every reconcile ([`AntiSpoof::set`]). The rules: `docs/datapath.md` (Anti-spoofing).

pub mod host_side;
pub mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use latch_common::{
    INTERFACE_BRIDGE_PORT, INTERFACE_OWN_MAC, INTERFACE_POD, INTERFACE_VETH, InterfaceInfo,
    OWN_ADDRESSES, SourceBinding,
};

use crate::{
    datapath::{AntiSpoofDatapath, DatapathError, antispoof::Attached},
    sync::lock,
};

use self::{
    host_side::PodSide,
    netlink::{Address, Events, Kind, Link, RouteSocket},
};

/// An enrolled pod of this node, as anti-spoofing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddresses {
    pub workload: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// What anti-spoofing needs from the node's configuration: its enrolled pods, and its own
/// address (the interface that holds it is the node's link to the other nodes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enrolled {
    pub node_address: Option<IpAddr>,
    pub pods: Vec<PodAddresses>,
}

impl Enrolled {
    pub fn of(config: &crate::config::Config, registry: &crate::identity::Registry) -> Self {
        Self {
            node_address: Some(config.node.address),
            pods: registry
                .workloads
                .iter()
                .map(|w| PodAddresses {
                    workload: w.id.clone(),
                    netns: w.netns.clone(),
                    ips: w.ips.clone(),
                })
                .collect(),
        }
    }
}

/// What went wrong, on what.
#[derive(Debug, thiserror::Error)]
pub enum AntiSpoofError {
    #[error("reading the links and addresses of the agent's network namespace: {0}")]
    Netlink(#[source] std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Handle on the anti-spoofing state; clones share it.
#[derive(Clone)]
pub struct AntiSpoof {
    state: Arc<Mutex<State>>,
}

struct State {
    datapath: AntiSpoofDatapath,
    socket: RouteSocket,
    enrolled: Enrolled,
    /// What each pod's namespace said last time, while the agent's links still confirm it.
    resolved: HashMap<String, Resolved>,
    /// Interfaces that have the check in this run.
    attached: BTreeSet<u32>,
    /// Workloads last reported as having no host side (reported again only once fixed).
    unbound: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct Resolved {
    pod: PodAddresses,
    netns_id: i32,
    sides: Vec<(IpAddr, Option<PodSide>)>,
}

impl AntiSpoof {
    /// Put the check on every interface of the agent's namespace now (adopting links an earlier
    /// run pinned), with the enrolled pods bound, and keep following link and address changes
    /// until the returned task is aborted. Must run inside the tokio runtime.
    pub fn start(
        datapath: AntiSpoofDatapath,
        enrolled: Enrolled,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AntiSpoofError> {
        // Subscribed before the first read, so no change falls between the two.
        let mut events = Events::subscribe().map_err(AntiSpoofError::Netlink)?;
        let socket = RouteSocket::open().map_err(AntiSpoofError::Netlink)?;
        let this = Self {
            state: Arc::new(Mutex::new(State {
                datapath,
                socket,
                enrolled,
                resolved: HashMap::new(),
                attached: BTreeSet::new(),
                unbound: BTreeSet::new(),
            })),
        };
        this.resync()?;
        let watcher = this.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = events.changed().await {
                    tracing::error!(error = %e, "anti-spoofing: link and address notifications stopped; new interfaces are not guarded until the agent restarts");
                    return;
                }
                let this = watcher.clone();
                match tokio::task::spawn_blocking(move || {
                    let result = this.resync();
                    // A resync parses a dump of every link of the node (13 MB at its peak with
                    // 1,000 pods), on a thread of the blocking pool whose glibc arena keeps it.
                    crate::shed::trim_heap();
                    result
                })
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "anti-spoofing resync failed"),
                    Err(e) => tracing::error!(error = %e, "anti-spoofing resync panicked"),
                }
            }
        });
        Ok((this, task))
    }

    /// The configuration changed (a reconcile): bind the enrolled pods' addresses, now.
    pub fn set(&self, enrolled: Enrolled) -> Result<(), AntiSpoofError> {
        let mut state = lock(&self.state);
        state.enrolled = enrolled;
        state.resync()
    }

    /// Read the links and addresses again and bring the kernel in line.
    pub fn resync(&self) -> Result<(), AntiSpoofError> {
        lock(&self.state).resync()
    }

    /// Kernel id of the program.
    pub fn program_id(&self) -> u32 {
        lock(&self.state).datapath.program_id()
    }
}

impl State {
    fn resync(&mut self) -> Result<(), AntiSpoofError> {
        let links = self.socket.links().map_err(AntiSpoofError::Netlink)?;
        let addresses = self.socket.addresses().map_err(AntiSpoofError::Netlink)?;
        let pods = self.resolve_pods(&links);
        let plan = plan(&links, &addresses, &pods, self.enrolled.node_address);
        // The interfaces' copies of the other maps' bindings never run ahead of them: those
        // that change are cleared first and written last.
        self.datapath.clear_changing_copies(&plan.interfaces)?;
        self.datapath.set_sources(&plan.sources)?;
        self.datapath.set_macs(&plan.macs)?;
        self.datapath.set_interfaces(&plan.interfaces)?;
        // Then the check goes on the interfaces that lack it, and this run's program onto the
        // links an earlier run pinned: never with maps that do not say yet what it needs (after
        // an upgrade that changed a map's layout, that map starts empty).
        let (new, adopted) = self.follow_interfaces(&links)?;
        if !new.is_empty() || !adopted.is_empty() {
            tracing::info!(attached = ?new, readopted = ?adopted, "anti-spoofing check on interfaces");
        }
        self.report(plan.unbound);
        Ok(())
    }

    /// Attach the check to every guarded interface that lacks it; drop the pins of interfaces
    /// that are gone (the kernel detached their links with them). Returns the names of the
    /// interfaces newly attached and of those whose link an earlier run left.
    fn follow_interfaces(
        &mut self,
        links: &[Link],
    ) -> Result<(Vec<String>, Vec<String>), AntiSpoofError> {
        let masters = masters(links);
        let wanted: BTreeSet<u32> = links
            .iter()
            .filter(|l| guarded(l, &masters))
            .map(|l| l.index)
            .collect();
        let mut stale: BTreeSet<u32> = self.datapath.pinned()?.into_iter().collect();
        stale.extend(self.attached.iter().copied());
        stale.retain(|i| !wanted.contains(i));
        for ifindex in stale {
            self.datapath.detach(ifindex)?;
            self.attached.remove(&ifindex);
            tracing::debug!(
                ifindex,
                "anti-spoofing check removed from a vanished interface"
            );
        }
        let (mut new, mut adopted) = (Vec::new(), Vec::new());
        for link in links.iter().filter(|l| guarded(l, &masters)) {
            if self.attached.contains(&link.index) {
                continue;
            }
            match self.datapath.attach(link.index) {
                Ok(how) => {
                    self.attached.insert(link.index);
                    match how {
                        Attached::New => new.push(link.name.clone()),
                        Attached::Adopted => adopted.push(link.name.clone()),
                    }
                }
                // Gone between the dump and the attach: its removal wakes another resync.
                Err(DatapathError::Interface { source, .. })
                    if source.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((new, adopted))
    }

    /// Each enrolled pod's sides, from the last look while the agent's links still confirm
    /// them, else from a new look inside its namespace.
    fn resolve_pods(&mut self, links: &[Link]) -> Vec<Resolved> {
        let mut out = Vec::new();
        let pods = self.enrolled.pods.clone();
        for pod in pods {
            let cached = self.resolved.get(&pod.workload).filter(|r| {
                r.pod == pod
                    && r.sides.iter().all(|(_, side)| {
                        side.is_some_and(|s| host_side::confirm(&s, r.netns_id, links).is_some())
                    })
            });
            let resolved = match cached {
                Some(r) => r.clone(),
                None => match self.look(&pod) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(workload = %pod.workload, error = %e, "reading the pod's interfaces");
                        Resolved {
                            pod: pod.clone(),
                            netns_id: -1,
                            sides: pod.ips.iter().map(|ip| (*ip, None)).collect(),
                        }
                    }
                },
            };
            out.push(resolved);
        }
        self.resolved = out
            .iter()
            .map(|r| (r.pod.workload.clone(), r.clone()))
            .collect();
        out
    }

    fn look(&mut self, pod: &PodAddresses) -> std::io::Result<Resolved> {
        let view = host_side::look_in_pod(&pod.netns, &pod.ips)?;
        let netns_id = self.socket.netns_id(&view.netns)?;
        Ok(Resolved {
            pod: pod.clone(),
            netns_id,
            sides: view.sides,
        })
    }

    /// Say once which workloads have addresses bound to no interface, and once when they are
    /// bound again.
    fn report(&mut self, unbound: BTreeSet<String>) {
        for workload in unbound.difference(&self.unbound) {
            tracing::error!(workload = %workload, "anti-spoofing: no veth to the node holds this workload's addresses, so nothing may send with them (only veth-based pod networking is supported)");
        }
        for workload in self.unbound.difference(&unbound) {
            if self.enrolled.pods.iter().any(|p| &p.workload == workload) {
                tracing::info!(workload = %workload, "anti-spoofing: the workload's addresses are bound to its interface again");
            }
        }
        self.unbound = unbound;
    }
}

/// Whether an interface gets the check: every Ethernet interface but
/// - loopback;
/// - a bridge or a bond (the master of other interfaces, in `masters`): a frame reaches its
///   ingress only from one of its ports, which has checked it already;
/// - a veth whose peer is in the agent's namespace too. Such a pair joins the node to itself
///   and carries nothing from a pod; it is often a pod's pair before the CNI moves one end into
///   the pod (Calico makes them so), and a TCX link goes along with a moved interface: left on
///   it, the node's check would judge the pod's incoming traffic with the node's interface
///   indexes. Once the peer is in another namespace, the link change wakes a resync that guards
///   this end.
fn guarded(link: &Link, masters: &BTreeSet<u32>) -> bool {
    let veth_within = link.kind == Kind::Veth && link.peer_netns.is_none();
    link.ethernet && !link.loopback && !veth_within && !masters.contains(&link.index)
}

/// Bridges, and every interface that is another's master.
fn masters(links: &[Link]) -> BTreeSet<u32> {
    links
        .iter()
        .filter(|l| l.kind == Kind::Bridge)
        .map(|l| l.index)
        .chain(links.iter().filter_map(|l| l.master))
        .collect()
}

/// What the maps should hold.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    sources: HashMap<IpAddr, SourceBinding>,
    interfaces: HashMap<u32, InterfaceInfo>,
    macs: HashMap<[u8; 6], u32>,
    /// Workloads with an address bound to no interface.
    unbound: BTreeSet<String>,
}

fn plan(
    links: &[Link],
    addresses: &[Address],
    pods: &[Resolved],
    node_address: Option<IpAddr>,
) -> Plan {
    let by_index: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let master_of = |index: u32| by_index.get(&index).and_then(|l| l.master).unwrap_or(0);
    let masters = masters(links);
    let mut plan = Plan::default();

    // The node's own addresses (on a bridge too), each bound to the one interface that holds
    // it. One held on several interfaces (a gateway address on every veth of a routed node)
    // binds nowhere: on such links each pod is alone with the node.
    let mut holders: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
    for address in addresses {
        if by_index.get(&address.index).is_some_and(|l| !l.loopback) {
            holders.entry(address.ip).or_default().insert(address.index);
        }
    }
    // The node's link to the other nodes: where its own address is.
    let uplinks: BTreeSet<u32> = addresses
        .iter()
        .filter(|a| Some(a.ip) == node_address)
        .map(|a| a.index)
        .collect();
    for (ip, indexes) in holders {
        if let [index] = indexes.into_iter().collect::<Vec<_>>()[..] {
            plan.sources.insert(
                ip,
                SourceBinding {
                    ifindex: index,
                    master: master_of(index),
                },
            );
        }
    }

    // Enrolled pods' addresses: bound to their host side, or to nothing.
    for pod in pods {
        for (ip, side) in &pod.sides {
            let host = side.and_then(|s| host_side::confirm(&s, pod.netns_id, links));
            let binding = match host {
                Some(host) => {
                    let info = plan.interfaces.entry(host.index).or_default();
                    info.flags |= INTERFACE_POD;
                    if let Some(mac) = side.map(|s| s.mac) {
                        plan.macs.insert(mac, host.index);
                    }
                    SourceBinding {
                        ifindex: host.index,
                        master: host.master.unwrap_or(0),
                    }
                }
                None => {
                    plan.unbound.insert(pod.pod.workload.clone());
                    SourceBinding::default()
                }
            };
            plan.sources.insert(*ip, binding);
        }
    }

    for link in links.iter().filter(|l| guarded(l, &masters)) {
        let mut flags = 0;
        // Guarded veths all have their peer in another namespace; the node's own link, if it
        // is a veth (kind's nodes, the test cluster's), is not a pod's way in.
        if link.kind == Kind::Veth && !uplinks.contains(&link.index) {
            flags |= INTERFACE_VETH;
        }
        if let Some(master) = link.master
            && by_index
                .get(&master)
                .is_some_and(|m| m.kind == Kind::Bridge)
        {
            flags |= INTERFACE_BRIDGE_PORT;
        }
        if flags == 0 && link.master.is_none() {
            continue;
        }
        let info = plan.interfaces.entry(link.index).or_default();
        info.flags |= flags;
        info.master = link.master.unwrap_or(0);
    }
    copy_own_bindings(&mut plan);
    plan
}

/// Give each interface's entry a copy of what the plan binds to it: the lowest
/// [`OWN_ADDRESSES`] of its addresses in `sources` and the lowest of its MACs in `macs`
/// (the check's lookups in those maps find the rest).
fn copy_own_bindings(plan: &mut Plan) {
    let mut addresses: Vec<(u32, IpAddr)> = plan
        .sources
        .iter()
        .map(|(ip, binding)| (binding.ifindex, *ip))
        .collect();
    addresses.sort();
    for (ifindex, ip) in addresses {
        if let Some(info) = plan.interfaces.get_mut(&ifindex)
            && usize::from(info.own_count) < OWN_ADDRESSES
        {
            info.own[usize::from(info.own_count)] = crate::datapath::maps::ip_key(ip);
            info.own_count += 1;
        }
    }
    let mut macs: Vec<(u32, [u8; 6])> = plan.macs.iter().map(|(mac, i)| (*i, *mac)).collect();
    macs.sort();
    for (ifindex, mac) in macs {
        if let Some(info) = plan.interfaces.get_mut(&ifindex)
            && info.flags & INTERFACE_OWN_MAC == 0
        {
            info.own_mac = mac;
            info.flags |= INTERFACE_OWN_MAC;
        }
    }
}

#[cfg(test)]
mod tests;
