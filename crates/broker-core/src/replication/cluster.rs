//! The broker side of active-passive clusters (`docs/design/clusters.md`): the HA status, the
//! replication level of a queue, and the configuration subscription a backup opens on the
//! primary to learn its replicated queues.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::config::ReplicateLevel;
use crate::delivery::ChannelLink;
use crate::exchange::Exchange;
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
    /// The replicated exchanges (a JSON array), sent once before `queues`.
    pub const EXCHANGES: &str = "exchanges";
    /// The replicated bindings (a JSON array), sent once after `queues`.
    pub const BINDINGS: &str = "bindings";
    /// A replicated exchange was declared.
    pub const EXCHANGE_DECLARE: &str = "exchange-declare";
    /// A replicated exchange was deleted (`{"name": ...}`).
    pub const EXCHANGE_DELETE: &str = "exchange-delete";
    /// A replicated binding was added.
    pub const BIND: &str = "bind";
    /// A replicated binding was removed.
    pub const UNBIND: &str = "unbind";
    /// The cluster's members as the primary sees them (a JSON array), sent when it changes.
    pub const MEMBERS: &str = "members";
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
    if queue.exclusive && queue.auto_delete {
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

/// The replication level of an exchange: `qpid.replicate`, else `--ha-replicate`; the
/// predeclared exchanges, and `qpid.*`/`qmf.*` ones, are never replicated.
pub fn exchange_level(broker: &Broker, e: &Exchange) -> ReplicateLevel {
    if crate::broker::is_predeclared_exchange(&e.name)
        || e.name.starts_with("qpid.")
        || e.name.starts_with("qmf.")
    {
        return ReplicateLevel::None;
    }
    if let Some(v) = fields::get(&e.arguments, ARG_REPLICATE).and_then(fields::as_str) {
        return parse_level(v).unwrap_or(ReplicateLevel::None);
    }
    broker.config.ha.replicate
}

/// True if a binding is replicated: its queue is, its exchange is (or is one every broker has),
/// and its own arguments do not say `qpid.replicate=none`.
pub fn binding_replicated(
    broker: &Broker,
    e: &Exchange,
    queue: &Queue,
    arguments: &FieldTable,
) -> bool {
    if fields::get(arguments, ARG_REPLICATE).and_then(fields::as_str) == Some("none") {
        return false;
    }
    queue_level(broker, queue) != ReplicateLevel::None
        && (crate::broker::is_predeclared_exchange(&e.name)
            || exchange_level(broker, e) != ReplicateLevel::None)
}

/// How an exchange is described to backups.
pub fn describe_exchange(e: &Exchange) -> Value {
    json!({
        "name": e.name,
        "type": e.kind.name(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": crate::mgmt::json::from_table(&e.arguments),
    })
}

pub fn describe_binding(exchange: &str, queue: &str, key: &str, arguments: &FieldTable) -> Value {
    json!({
        "exchange": exchange,
        "queue": queue,
        "key": key,
        "arguments": crate::mgmt::json::from_table(arguments),
    })
}

/// How a queue is described to backups.
pub fn describe_queue(broker: &Broker, q: &Queue) -> Value {
    json!({
        "name": q.name,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive,
        "arguments": crate::mgmt::json::from_table(&q.arguments),
        "level": queue_level(broker, q).as_str(),
        "incarnation": q.incarnation().to_string(),
        "replica-of": broker.ha_module().and_then(|m| m.replica_definition(&q.name)),
        "subscribed": q.lock().had_consumers(),
    })
}

/// A backup's configuration subscription on the primary: `init`, the replicated queues, then
/// every declare and delete of a replicated queue, as events on the subscription's channel.
#[derive(Debug)]
pub struct ConfigSubscription {
    /// The consumer tag.
    pub tag: String,
    /// The backup's system id.
    pub system_id: String,
    /// The backup's link, as seen here.
    pub peer: String,
    link: Arc<ChannelLink>,
    broker: Weak<Broker>,
    next_tag: Mutex<u64>,
    last_members: Mutex<String>,
    /// `--ha-max-config-backlog`.
    max_backlog: usize,
    /// Set once the link was dropped for its backlog.
    dropped: std::sync::atomic::AtomicBool,
    /// The size of the snapshot written at the start: the backlog limit counts events on top
    /// of it (a backup still reading a large snapshot is not dropped for it).
    snapshot_bytes: std::sync::atomic::AtomicUsize,
}

impl ConfigSubscription {
    /// Starts the stream (call under `Broker::config_guard`, so no change slips between the
    /// snapshot and the events).
    pub fn start(
        broker: &Arc<Broker>,
        tag: String,
        link: Arc<ChannelLink>,
        system_id: String,
        peer: String,
    ) -> Arc<Self> {
        let sub = Arc::new(ConfigSubscription {
            tag,
            system_id,
            peer,
            link,
            broker: Arc::downgrade(broker),
            next_tag: Mutex::new(1),
            last_members: Mutex::new(String::new()),
            max_backlog: usize::try_from(broker.config.ha.max_config_backlog).unwrap_or(usize::MAX),
            dropped: Default::default(),
            snapshot_bytes: Default::default(),
        });
        let init = json!({
            "version": PROTOCOL_VERSION,
            "system-id": broker.system_id().to_string(),
            "replicate": broker.config.ha.replicate.as_str(),
            "status": broker.ha_status().as_str(),
            "epoch": broker.epoch(),
        });
        sub.write(config_event::INIT, &init);
        let exchanges: Vec<Value> = broker
            .exchanges()
            .iter()
            .filter(|e| exchange_level(broker, e) != ReplicateLevel::None)
            .map(|e| describe_exchange(e))
            .collect();
        sub.write(config_event::EXCHANGES, &Value::Array(exchanges));
        let queues: Vec<Value> = broker
            .queues()
            .iter()
            .filter(|q| queue_level(broker, q) != ReplicateLevel::None)
            .map(|q| describe_queue(broker, q))
            .collect();
        sub.write(config_event::QUEUES, &Value::Array(queues));
        let mut bindings = Vec::new();
        for e in broker.exchanges() {
            for b in e.bindings() {
                if binding_replicated(broker, &e, &b.queue, &b.arguments) {
                    bindings.push(describe_binding(
                        &e.name,
                        &b.queue.name,
                        &b.key,
                        &b.arguments,
                    ));
                }
            }
        }
        sub.write(config_event::BINDINGS, &Value::Array(bindings));
        sub.snapshot_bytes.store(
            sub.link.out.pending_bytes(),
            std::sync::atomic::Ordering::Relaxed,
        );
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
            // The first consumer of an auto-delete queue: after a failover it is deleted once
            // unused, as on the old primary (reference 4.10).
            Event::Subscribe(s) => {
                if let Some(q) = broker.queue(s.queue)
                    && q.auto_delete
                    && q.lock().consumer_count() == 1
                {
                    self.queue_changed(&q);
                }
            }
            Event::ExchangeDeclare(e) if exchange_level(&broker, e) != ReplicateLevel::None => {
                self.write(config_event::EXCHANGE_DECLARE, &describe_exchange(e));
            }
            Event::ExchangeDelete(name) => {
                self.write(config_event::EXCHANGE_DELETE, &json!({ "name": name }));
            }
            Event::Bind(b) | Event::Unbind(b) => {
                let (Some(e), Some(q)) = (broker.exchange(b.exchange), broker.queue(b.queue))
                else {
                    return;
                };
                if binding_replicated(&broker, &e, &q, b.arguments) {
                    let name = if matches!(event, Event::Bind(_)) {
                        config_event::BIND
                    } else {
                        config_event::UNBIND
                    };
                    self.write(
                        name,
                        &describe_binding(b.exchange, b.queue, b.key, b.arguments),
                    );
                }
            }
            _ => {}
        }
    }

    /// A replicated queue changed (its replica definition): sent as a new `queue-declare`.
    pub fn queue_changed(&self, q: &Queue) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        if queue_level(&broker, q) != ReplicateLevel::None {
            self.write(config_event::QUEUE_DECLARE, &describe_queue(&broker, q));
        }
    }

    /// Sends the membership if it changed since the last time.
    pub fn send_members(&self, members: &Value) {
        let text = members.to_string();
        {
            let mut last = self.last_members.lock();
            if *last == text {
                return;
            }
            last.clone_from(&text);
        }
        self.write(config_event::MEMBERS, members);
    }

    fn write(&self, name: &str, body: &Value) {
        // A backup that leaves this much unread (a stalled process whose heartbeats have not
        // timed out yet, or a slow one) is dropped rather than buffered without bound: it
        // reconnects and reconciles from a fresh snapshot, losing nothing.
        if self.dropped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let pending = self.link.out.pending_bytes();
        let snapshot = self
            .snapshot_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if pending > self.max_backlog.saturating_add(snapshot) {
            self.dropped
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(target: "HA", "Primary: dropping backup {} ({}): {pending} bytes of configuration events unread, over --ha-max-config-backlog {}; it will reconnect and reconcile",
                self.peer, self.system_id, self.max_backlog);
            self.link.out.abort();
            return;
        }
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

/// The cluster as the primary sees it: itself, and each backup with a configuration
/// subscription, `ready` when every queue at level `all` has a ready replicating subscription
/// from it, else `catchup`.
pub fn membership(broker: &Broker) -> Value {
    let replicated: Vec<String> = broker
        .queues()
        .iter()
        .filter(|q| queue_level(broker, q) == ReplicateLevel::All)
        .map(|q| q.name.clone())
        .collect();
    let subs = broker.subscriptions();
    let mut members = vec![json!({
        "system-id": broker.system_id().to_string(),
        "status": broker.ha_status().as_str(),
        "address": null,
    })];
    let mut ready_count = 0;
    for c in broker.config_subscriptions() {
        let ready = replicated.iter().all(|q| {
            subs.iter().any(|s| {
                s.queue.name == *q
                    && s.replica.system_id == c.system_id
                    && s.phase() == super::subscription::Phase::Ready
            })
        });
        ready_count += usize::from(ready);
        members.push(json!({
            "system-id": c.system_id,
            "status": if ready { "ready" } else { "catchup" },
            "address": c.peer,
        }));
    }
    if broker.ha_status().is_primary() {
        broker.note_ready_backups(ready_count);
    }
    Value::Array(members)
}

/// A promoted primary's stand-in for an expected backup on one queue: it holds the confirms of
/// what is published until that backup's replicating subscription takes them over (the holds
/// move to it at its snapshot and are released by its acks), or the backup timeout expires.
#[derive(Debug)]
pub struct ExpectedGuard {
    /// The queue.
    pub queue: String,
    /// The expected backup's system id.
    pub system_id: String,
    holds: Mutex<std::collections::HashMap<u64, crate::confirms::Hold>>,
    retired: std::sync::atomic::AtomicBool,
}

impl ExpectedGuard {
    /// A guard for `system_id` on `queue`.
    pub fn new(queue: String, system_id: String) -> Arc<ExpectedGuard> {
        Arc::new(ExpectedGuard {
            queue,
            system_id,
            holds: Mutex::new(std::collections::HashMap::new()),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stops guarding and hands over the holds (by message id).
    pub fn take(&self) -> std::collections::HashMap<u64, crate::confirms::Hold> {
        self.retired.store(true, Ordering::Release);
        std::mem::take(&mut *self.holds.lock())
    }
}

impl crate::queue::QueueObserver for ExpectedGuard {
    fn enqueued(
        &self,
        _queue: &Queue,
        entry: &crate::queue::QueuedMessage,
        confirm: Option<crate::confirms::PendingConfirm<'_>>,
    ) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        if let Some(c) = confirm {
            self.holds.lock().insert(entry.id, c.hold());
        }
    }

    fn dequeued(
        &self,
        _queue: &Queue,
        entry: &crate::queue::QueuedMessage,
        _reason: crate::queue::DequeueReason,
    ) {
        let hold = self.holds.lock().remove(&entry.id);
        drop(hold);
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}
