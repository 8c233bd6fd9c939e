//! What every listener of one pod works with: the pod, its netns netns, and the node-wide
//! handles its connections share. The runtime makes one per pod ([`crate::runtime::pod`]).

use std::sync::Arc;

use super::{PodNetns, delivery::DeliverySockets};
use crate::{
    datapath::{DeliveryMap, RedirectMap},
    identity::{LocalWorkload, certs::CertStore},
    metrics::Metrics,
    state::SharedState,
    tunnel::{
        handshakes::Handshakes,
        hbone::{Drain, TunnelClient},
        tracked::Tracker,
    },
    verdicts::VerdictCache,
};

/// One pod's context, shared by its outbound, inbound and tunnel listeners.
pub struct PodContext {
    pub workload: LocalWorkload,
    /// The pod netns's cookie: the key of its captured connections' original destinations.
    pub netns_cookie: u64,
    pub netns: Arc<PodNetns>,
    /// Delivery sockets in the pod's netns.
    pub delivery: DeliverySockets,
    /// The redirect map, read (without a lock) for each captured connection.
    pub redirects: Arc<RedirectMap>,
    pub deliveries: Arc<DeliveryMap>,
    pub cache: VerdictCache,
    pub state: SharedState,
    pub certs: Arc<CertStore>,
    pub tunnel: TunnelClient,
    pub tracker: Tracker,
    pub metrics: Metrics,
    /// TLS handshakes in progress per source, shared by the node's tunnel listeners.
    pub handshakes: Handshakes,
    /// The pod's tunnel server connections, part of the node's drain; started when the agent
    /// stops serving the pod, so they send `GOAWAY`.
    pub drain: Drain,
}
