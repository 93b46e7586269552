//! Queue replication, the parts that live in the broker (`docs/design/replication.md`): the
//! protocol's names and limits, id ranges, the original side's replicating subscription, and the
//! hook through which the HA module (crate `ha-replication`, the replica side) is reached from
//! the management agent.

pub mod cluster;
pub mod ranges;
pub mod subscription;

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::mgmt::MgmtError;

pub use ranges::IdRanges;
pub use subscription::ReplicatingSubscription;

/// basic.consume argument marking a replicating subscription.
pub const ARG_REPSUB: &str = "qpid.ha-repsub";
/// Its value for queue replication.
pub const REPSUB_QUEUE: &str = "qpid.ha-qrep";
/// basic.consume argument: the protocol version the replica speaks.
pub const ARG_VERSION: &str = "qpid.ha-version";
/// basic.consume argument: who subscribes (a table).
pub const ARG_INFO: &str = "qpid.ha-info";
/// basic.consume argument: the incarnation the replica's messages came from ("" if none).
pub const ARG_INCARNATION: &str = "qpid.ha-incarnation";
/// basic.consume argument of a cluster backup's replica: the cluster epoch it follows.
pub const ARG_EPOCH: &str = "qpid.ha-epoch";
/// This protocol's version.
pub const PROTOCOL_VERSION: i64 = 1;
/// The exchange the replica publishes its id-set chunks to (never routed).
pub const CONTROL_EXCHANGE: &str = "qpid.ha-control";
/// The exchange field of event deliveries (no such exchange exists).
pub const EVENT_EXCHANGE: &str = "qpid.ha-event";
/// Content type of an id-set chunk.
pub const IDS_CONTENT_TYPE: &str = "application/x-qpid-ha-ids";
/// Header marking the last id-set chunk.
pub const HEADER_LAST: &str = "qpid.ha-last";
/// The most ranges in one id-set chunk or dequeue event (64 KiB of body).
pub const CHUNK_RANGES_MAX: usize = 4096;
/// The most ranges a replica may send in all its chunks of one subscription.
pub const ID_SET_RANGES_MAX: usize = 1 << 20;

/// Event routing keys.
pub mod event {
    /// First delivery: the original's description (JSON).
    pub const INIT: &str = "init";
    /// The id of the next data delivery (u64, big-endian).
    pub const ID: &str = "id";
    /// Ids that left the original (ranges).
    pub const DEQUEUE: &str = "dequeue";
    /// Catch-up is complete.
    pub const READY: &str = "ready";
    /// The lag measured on the original (JSON).
    pub const LAG: &str = "lag";
}

/// The consumer tag of the replicating subscription of `queue` by the broker `system_id`.
pub fn consumer_tag(queue: &str, system_id: &str) -> String {
    format!("qpid.ha-q:{queue}:{system_id}")
}

/// How a deferred management answer is given.
pub type Answer = Box<dyn FnOnce(Result<Option<String>, MgmtError>) + Send>;

/// The replica side, provided by the HA module and installed with [`Broker::set_ha_module`].
pub trait HaModule: Send + Sync + std::fmt::Debug {
    /// Starts replicating the local queue `queue` from `original` (an address or list).
    /// Calls `answer` once the first attempt succeeded (`Ok(None)`), failed (`Err`), or did not
    /// finish within `timeout` (`Ok(Some(warning))`: replication keeps trying).
    fn replicate(
        &self,
        broker: &Arc<Broker>,
        queue: &str,
        original: &str,
        timeout: Duration,
        answer: Answer,
    );
    /// Stops replicating `queue`; it keeps its messages and becomes an ordinary queue.
    fn detach(&self, broker: &Arc<Broker>, queue: &str) -> Result<(), MgmtError>;
    /// Promotes this cluster member to primary (`qpid-ha promote --cluster-manager`); `answer`
    /// is told the outcome (the status checks of other members take a moment).
    fn promote(&self, broker: &Arc<Broker>, force: bool, answer: Answer);
    /// The cluster's members (`system-id`, `status`, `address`): computed on a primary, as
    /// last received on a backup.
    fn members(&self, broker: &Broker) -> serde_json::Value;
    /// The replica definition of `queue` when it replicates a queue of another broker
    /// (standalone replication, not a cluster backup's copy): `{"original", "incarnation"}`.
    /// The incarnation of the original a replica queue follows (cluster backups' replicas
    /// too), once known: the store keeps it so a restarted broker can keep its copy.
    fn replica_origin(&self, _queue: &str) -> Option<String> {
        None
    }
    fn replica_definition(&self, queue: &str) -> Option<serde_json::Value>;
    /// One JSON object per replica queue, for `qpid-ha query`.
    fn replica_rows(&self) -> Vec<serde_json::Value>;
    /// Stops every link (broker shutdown).
    fn shutdown(&self);
}
