//! The broker side of active-passive clusters (`docs/design/clusters.md`): the HA status, the
//! replication level of a queue, and the configuration subscription a backup opens on the
//! primary to learn its replicated queues.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::config::ReplicateLevel;
use crate::delivery::ChannelLink;
use crate::fields;
use crate::mgmt::Event;
use crate::protocol::hot;
use crate::queue::Queue;

use super::{EVENT_EXCHANGE, PROTOCOL_VERSION};

/// Value of `qpid.ha-repsub` for a backup's configuration subscription.
pub const REPSUB_CONFIG: &str = "qpid.ha-config";
/// The queue argument naming a queue's replication level.
pub const ARG_REPLICATE: &str = "qpid.replicate";

/// Configuration events (routing keys on `qpid.ha-event`).
pub mod config_event {
    /// First delivery: the primary's description.
    pub const INIT: &str = "init";
    /// The replicated queues the primary has (a JSON array), sent once after `init`.
    pub const QUEUES: &str = "queues";
    /// A replicated queue was declared (JSON object).
    pub const QUEUE_DECLARE: &str = "queue-declare";
    /// A replicated queue was deleted (`{"name": ...}`).
    pub const QUEUE_DELETE: &str = "queue-delete";
}

/// A broker's HA status (reference section 4.3), in Qpid's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HaStatus {
    /// A cluster member that has not found a primary yet.
    Joining = 0,
    /// A backup copying the primary's queues.
    CatchUp = 1,
    /// A backup with every replicated queue live.
    Ready = 2,
    /// A promoted primary waiting for its expected backups.
    Recovering = 3,
    /// The primary.
    Active = 4,
    /// Not in a cluster.
    Standalone = 5,
}

impl HaStatus {
    /// Qpid's name.
    pub fn as_str(self) -> &'static str {
        match self {
            HaStatus::Joining => "joining",
            HaStatus::CatchUp => "catchup",
            HaStatus::Ready => "ready",
            HaStatus::Recovering => "recovering",
            HaStatus::Active => "active",
            HaStatus::Standalone => "standalone",
        }
    }

    /// Serves clients (Qpid's `isPrimary`).
    pub fn is_primary(self) -> bool {
        matches!(
            self,
            HaStatus::Recovering | HaStatus::Active | HaStatus::Standalone
        )
    }

    fn from_u8(v: u8) -> HaStatus {
        match v {
            0 => HaStatus::Joining,
            1 => HaStatus::CatchUp,
            2 => HaStatus::Ready,
            3 => HaStatus::Recovering,
            4 => HaStatus::Active,
            _ => HaStatus::Standalone,
        }
    }
}

/// The status cell of a broker.
#[derive(Debug)]
pub struct StatusCell(AtomicU8);

impl StatusCell {
    /// Starts at `s`.
    pub fn new(s: HaStatus) -> StatusCell {
        StatusCell(AtomicU8::new(s as u8))
    }

    /// The status now.
    pub fn get(&self) -> HaStatus {
        HaStatus::from_u8(self.0.load(Ordering::Acquire))
    }

    /// Changes it, logging Qpid's "Status change" line.
    pub fn set(&self, s: HaStatus) {
        let old = HaStatus::from_u8(self.0.swap(s as u8, Ordering::AcqRel));
        if old != s {
            tracing::info!(target: "HA", notice = true, "Status change: {} -> {}", old.as_str(), s.as_str());
        }
    }
}

/// The replication level of `queue` on a cluster broker: its `qpid.replicate` argument, else
/// `--ha-replicate`; temporary queues (exclusive and auto-delete) are never replicated unless
/// the argument says so (reference section 4.6).
pub fn queue_level(broker: &Broker, queue: &Queue) -> ReplicateLevel {
    if let Some(v) = fields::get(&queue.arguments, ARG_REPLICATE).and_then(fields::as_str) {
        return parse_level(v).unwrap_or(ReplicateLevel::None);
    }
    if queue.exclusive_owner.is_some() && queue.auto_delete {
        return ReplicateLevel::None;
    }
    if queue.name.starts_with("qpid.") || queue.name.starts_with("qmf.") {
        return ReplicateLevel::None;
    }
    broker.config.ha.replicate
}

/// Parses a `qpid.replicate` value.
pub fn parse_level(v: &str) -> Option<ReplicateLevel> {
    match v {
        "none" => Some(ReplicateLevel::None),
        "configuration" => Some(ReplicateLevel::Configuration),
        "all" => Some(ReplicateLevel::All),
        _ => None,
    }
}

/// How a queue is described to backups.
pub fn describe_queue(broker: &Broker, q: &Queue) -> Value {
    json!({
        "name": q.name,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": crate::mgmt::json::from_table(&q.arguments),
        "level": queue_level(broker, q).as_str(),
        "incarnation": q.incarnation().to_string(),
    })
}

/// A backup's configuration subscription on the primary: `init`, the replicated queues, then
/// every declare and delete of a replicated queue, as events on the subscription's channel.
#[derive(Debug)]
pub struct ConfigSubscription {
    /// The consumer tag.
    pub tag: String,
    link: Arc<ChannelLink>,
    broker: Weak<Broker>,
    next_tag: Mutex<u64>,
}

impl ConfigSubscription {
    /// Starts the stream (call under `Broker::config_guard`, so no change slips between the
    /// snapshot and the events).
    pub fn start(broker: &Arc<Broker>, tag: String, link: Arc<ChannelLink>) -> Arc<Self> {
        let sub = Arc::new(ConfigSubscription {
            tag,
            link,
            broker: Arc::downgrade(broker),
            next_tag: Mutex::new(1),
        });
        let init = json!({
            "version": PROTOCOL_VERSION,
            "system-id": broker.system_id().to_string(),
            "replicate": broker.config.ha.replicate.as_str(),
            "status": broker.ha_status().as_str(),
        });
        sub.write(config_event::INIT, &init);
        let queues: Vec<Value> = broker
            .queues()
            .iter()
            .filter(|q| queue_level(broker, q) != ReplicateLevel::None)
            .map(|q| describe_queue(broker, q))
            .collect();
        sub.write(config_event::QUEUES, &Value::Array(queues));
        sub
    }

    /// A configuration change on the primary.
    pub fn event(&self, event: &Event<'_>) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        match event {
            Event::QueueDeclare(q) if queue_level(&broker, q) != ReplicateLevel::None => {
                self.write(config_event::QUEUE_DECLARE, &describe_queue(&broker, q));
            }
            Event::QueueDelete(name) => {
                self.write(config_event::QUEUE_DELETE, &json!({ "name": name }));
            }
            _ => {}
        }
    }

    fn write(&self, name: &str, body: &Value) {
        let body = body.to_string();
        let mut t = self.next_tag.lock();
        let tag = *t;
        *t += 1;
        let ch = self.link.channel;
        let frame_max = self.link.frame_max;
        let ctag = self.tag.as_str();
        self.link.out.write(|out| {
            hot::write_deliver(out, ch, ctag, tag, false, EVENT_EXCHANGE, name);
            hot::write_content(out, ch, &[0, 0], body.as_bytes(), frame_max);
        });
    }
}
