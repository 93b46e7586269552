//! The broker's shared state: the exchange and queue registries, connection counts, message
//! memory and its watermark, and the operations of the exchange and queue classes with their
//! protocol errors. Connections call into it; it never touches a socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{AMQPProperties, gen_properties, parse_properties};
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use parking_lot::{Mutex, ReentrantMutex, ReentrantMutexGuard, RwLock};
use tokio::sync::watch;

use crate::auth::UserDb;
use crate::config::BrokerConfig;
use crate::error::AmqpError;
use crate::exchange::{Exchange, ExchangeKind};
use crate::fields;
use crate::message::Message;
use crate::mgmt::events::{BindingEvent, SubscriptionEvent};
use crate::mgmt::{Event, Management};
use crate::queue::{DequeueReason, EnqueueOutcome, Queue, QueuedMessage};
use crate::queue_settings::QueueSettings;
use crate::replication::cluster::{ConfigSubscription, ExpectedGuard, HaStatus, StatusCell};
use crate::replication::{HaModule, ReplicatingSubscription};

/// The predeclared exchanges.
const PREDECLARED: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    (crate::mgmt::REQUEST_EXCHANGE, ExchangeKind::Direct),
    (crate::mgmt::EVENT_EXCHANGE, ExchangeKind::Topic),
];

/// How many alternate exchanges one unroutable message may pass through.
pub const ALTERNATE_EXCHANGE_HOPS_MAX: usize = 8;

/// The connection id under which a cluster backup applies the primary's configuration: it
/// owns nothing, and may bind replica queues (which clients may not).
pub const REPLICATION_CONNECTION: u64 = 0;

/// True for the exchanges every broker has (never replicated: each broker has its own).
pub fn is_predeclared_exchange(name: &str) -> bool {
    name.starts_with("amq.") || PREDECLARED.iter().any(|(n, _)| *n == name)
}

/// A running broker's shared state.
#[derive(Debug)]
pub struct Broker {
    /// Settings and limits.
    pub config: BrokerConfig,
    /// Users and their tags.
    pub users: UserDb,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    started: Instant,
    next_connection_id: AtomicU64,
    /// Connections past the TCP accept, administrative ones included.
    pub connections_total: AtomicUsize,
    /// Open ordinary (non-administrative) connections.
    pub connections_ordinary: AtomicUsize,
    message_memory_bytes: AtomicU64,
    memory_alarm_on: AtomicBool,
    memory_alarm: watch::Sender<bool>,
    /// The management agent's state.
    pub mgmt: Management,
    /// Serialises configuration changes with their events, so that events are numbered and
    /// published in the order the changes took effect. Re-entrant: a change may cause others
    /// (a queue deletion auto-deletes an exchange). Taken before any other lock.
    config_lock: ReentrantMutex<()>,
    self_ref: Weak<Broker>,
    /// The replica side of queue replication, installed by the daemon when HA is on.
    ha_module: std::sync::OnceLock<Arc<dyn HaModule>>,
    /// Replicating subscriptions served by this broker (as an original).
    subscriptions: Mutex<Vec<Weak<ReplicatingSubscription>>>,
    /// The HA status (`standalone` unless `--ha-cluster`).
    status: StatusCell,
    /// Backups' configuration subscriptions (on a primary).
    config_subscriptions: Mutex<Vec<Weak<ConfigSubscription>>>,
    /// The durable store (`--data-dir`), once recovered.
    store: std::sync::OnceLock<Arc<crate::store::Store>>,
    /// Where clients should go instead of this backup (the primary, as the backup found it).
    primary_address: Mutex<Option<String>>,
    /// A recovering primary's guards for its expected backups.
    expected_guards: Mutex<Vec<Arc<ExpectedGuard>>>,
    /// The expected backups' system ids while recovering (queues declared meanwhile are
    /// guarded for them too).
    expected_ids: Mutex<Vec<String>>,
    /// Confirms waiting for `--ha-min-backups` ready backups, with their deadline (broker ms).
    min_backups_holds: Mutex<Vec<(crate::confirms::Hold, u64)>>,
    /// Backups the primary counts as ready (updated every HA tick).
    ready_backups: AtomicUsize,
    /// The cluster epoch this broker knows (fencing: `docs/design/clusters.md`).
    epoch: AtomicU64,
    /// Bumped to make every client connection close (a demoted primary stops serving).
    evict: watch::Sender<u64>,
}

/// What queue.declare answers.
#[derive(Debug, Clone)]
pub struct DeclaredQueue {
    /// The queue.
    pub queue: Arc<Queue>,
    /// Its ready messages.
    pub message_count: u32,
    /// Its consumers.
    pub consumer_count: u32,
}

/// queue.declare's request, as the broker needs it.
#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    /// The name ("" for a server-named queue).
    pub name: String,
    /// Only check that it exists.
    pub passive: bool,
    /// Durable.
    pub durable: bool,
    /// Exclusive to the declaring connection.
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// exchange.declare's request.
#[derive(Debug, Clone, Default)]
pub struct ExchangeDeclare {
    /// The name.
    pub name: String,
    /// The type name.
    pub kind: String,
    /// Only check that it exists.
    pub passive: bool,
    /// Durable.
    pub durable: bool,
    /// Deleted with its last binding.
    pub auto_delete: bool,
    /// Not for publishing.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

impl Broker {
    /// A broker with the predeclared exchanges.
    pub fn new(config: BrokerConfig, users: UserDb) -> Arc<Broker> {
        let (alarm, _) = watch::channel(false);
        let initial_status = if config.ha.cluster {
            HaStatus::Joining
        } else {
            HaStatus::Standalone
        };
        let system_id = config.system_id;
        Arc::new_cyclic(|me| {
            let mut exchanges = HashMap::new();
            for (name, kind) in PREDECLARED {
                let e = Exchange::new(
                    name.to_string(),
                    *kind,
                    true,
                    false,
                    false,
                    FieldTable::default(),
                );
                exchanges.insert(name.to_string(), Arc::new(e));
            }
            Broker {
                config,
                users,
                exchanges: RwLock::new(exchanges),
                queues: RwLock::new(HashMap::new()),
                started: Instant::now(),
                next_connection_id: AtomicU64::new(1),
                connections_total: AtomicUsize::new(0),
                connections_ordinary: AtomicUsize::new(0),
                message_memory_bytes: AtomicU64::new(0),
                memory_alarm_on: AtomicBool::new(false),
                memory_alarm: alarm,
                mgmt: system_id.map_or_else(Management::default, Management::with_id),
                config_lock: ReentrantMutex::new(()),
                self_ref: me.clone(),
                ha_module: std::sync::OnceLock::new(),
                subscriptions: Mutex::new(Vec::new()),
                status: StatusCell::new(initial_status),
                config_subscriptions: Mutex::new(Vec::new()),
                store: std::sync::OnceLock::new(),
                primary_address: Mutex::new(None),
                expected_guards: Mutex::new(Vec::new()),
                expected_ids: Mutex::new(Vec::new()),
                epoch: AtomicU64::new(0),
                min_backups_holds: Mutex::new(Vec::new()),
                ready_backups: AtomicUsize::new(0),
                evict: watch::channel(0).0,
            }
        })
    }

    /// The broker's system id: a uuid kept in the data directory (made at each start without
    /// one), shown as `systemId` on the broker object and on the HA object.
    pub fn system_id(&self) -> uuid::Uuid {
        self.mgmt.broker_id()
    }

    /// How long the broker has run.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Holds configuration changes back while the caller makes one and emits its event
    /// (`consume` and `cancel` in the channel take it too).
    pub fn config_guard(&self) -> ReentrantMutexGuard<'_, ()> {
        self.config_lock.lock()
    }

    /// Reports a configuration change to the management agent (numbered, and published on
    /// `qmf.default.topic` if anyone listens). Call with no registry lock held.
    pub fn emit_event(&self, event: Event<'_>) {
        let subs: Vec<Arc<ConfigSubscription>> = {
            let mut all = self.config_subscriptions.lock();
            if all.is_empty() {
                Vec::new()
            } else {
                all.retain(|w| w.strong_count() > 0);
                all.iter().filter_map(Weak::upgrade).collect()
            }
        };
        if let Some(store) = self.store.get() {
            store.config_event(self, &event);
        }
        for s in subs {
            s.event(&event);
        }
        if let Event::QueueDeclare(q) = &event
            && self.ha_status() == HaStatus::Recovering
            && let Some(q) = self.queue(&q.name)
        {
            self.guard_for_expected(&q);
        }
        crate::mgmt::events::emit(self, event);
    }

    /// Installs the durable store (after it recovered into this broker).
    pub fn set_store(&self, store: Arc<crate::store::Store>) {
        let _ = self.store.set(store);
    }

    /// The durable store, if the broker has one.
    pub fn store(&self) -> Option<&Arc<crate::store::Store>> {
        self.store.get()
    }

    /// True while the store cannot write: persistent publishes to durable queues are nacks.
    pub fn store_failed(&self) -> bool {
        self.store.get().is_some_and(|s| s.failed())
    }

    /// The HA status.
    pub fn ha_status(&self) -> HaStatus {
        self.status.get()
    }

    /// Changes the HA status (logged as Qpid does).
    pub fn set_ha_status(&self, s: HaStatus) {
        self.status.set(s);
    }

    /// On a cluster backup, configuration changes by clients (administrators are the only
    /// ones let in) are refused with 405 naming the primary: the backup's objects follow the
    /// primary's.
    pub fn backup_refusal(&self) -> Result<(), AmqpError> {
        let status = self.ha_status();
        if status.is_primary() {
            return Ok(());
        }
        Err(AmqpError::resource_locked(format!(
            "this broker is an HA backup ({}): make changes on the primary ({})",
            status.as_str(),
            self.redirect_text()
        )))
    }

    /// The cluster epoch: the number of the latest promotion this broker knows of.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Records a newer epoch (never goes back).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// True while a primary has fewer ready backups than `--ha-min-backups`.
    pub fn below_min_backups(&self) -> bool {
        let min = self.config.ha.min_backups as usize;
        min > 0
            && self.config.ha.cluster
            && self.ha_status().is_primary()
            && self.ready_backups.load(Ordering::Acquire) < min
    }

    /// Records how many backups are ready (by `cluster::membership`, whenever it is computed).
    pub fn note_ready_backups(&self, n: usize) {
        self.ready_backups.store(n, Ordering::Release);
    }

    /// Holds a publish's confirm until `--ha-min-backups` backups are ready; it is a nack if
    /// they are not within `--ha-backup-timeout`.
    pub fn hold_for_min_backups(&self, hold: crate::confirms::Hold) {
        let deadline = self.now_ms() + self.config.ha.backup_timeout.as_millis() as u64;
        self.min_backups_holds.lock().push((hold, deadline));
    }

    /// Closes every client connection (320), administrators' excepted.
    pub fn evict_clients(&self) {
        self.evict.send_modify(|n| *n += 1);
    }

    /// Changes when clients must be evicted.
    pub fn eviction(&self) -> watch::Receiver<u64> {
        self.evict.subscribe()
    }

    /// The backups' configuration subscriptions alive now.
    pub fn config_subscriptions(&self) -> Vec<Arc<ConfigSubscription>> {
        self.config_subscriptions
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// A promoted primary guards every queue at level `all` for each expected backup (their
    /// system ids): confirms wait for them (reference 4.8).
    pub fn install_expected_guards(&self, expected: &[String]) {
        *self.expected_ids.lock() = expected.to_vec();
        for q in self.queues() {
            self.guard_for_expected(&q);
        }
    }

    fn guard_for_expected(&self, q: &Arc<Queue>) {
        if crate::replication::cluster::queue_level(self, q) != crate::config::ReplicateLevel::All {
            return;
        }
        let ids = self.expected_ids.lock().clone();
        let mut guards = self.expected_guards.lock();
        for id in ids {
            let g = ExpectedGuard::new(q.name.clone(), id);
            q.add_observer(g.clone());
            guards.push(g);
        }
    }

    /// The holds kept for `system_id` on `queue` since the promotion, handed to its replicating
    /// subscription.
    pub fn take_expected_holds(
        &self,
        queue: &str,
        system_id: &str,
    ) -> std::collections::HashMap<u64, crate::confirms::Hold> {
        let mut guards = self.expected_guards.lock();
        let mut out = std::collections::HashMap::new();
        guards.retain(|g| {
            if g.queue == queue && g.system_id == system_id {
                out.extend(g.take());
                false
            } else {
                true
            }
        });
        out
    }

    /// Releases every expected backup's holds (all recovered, or the backup timeout expired).
    /// Returns the system ids that were still expected.
    pub fn release_expected_guards(&self) -> Vec<String> {
        self.expected_ids.lock().clear();
        let guards = std::mem::take(&mut *self.expected_guards.lock());
        let mut ids: Vec<String> = guards.iter().map(|g| g.system_id.clone()).collect();
        ids.sort();
        ids.dedup();
        for g in guards {
            drop(g.take());
        }
        ids
    }

    /// A queue's replica definition changed: backups are told (clusters, the seed's case 2).
    pub fn replica_definition_changed(&self, queue: &str) {
        let Some(q) = self.queue(queue) else {
            return;
        };
        let _config = self.config_guard();
        if let Some(store) = self.store() {
            store.queue_changed(self, &q);
        }
        for c in self.config_subscriptions() {
            c.queue_changed(&q);
        }
    }

    /// Registers a backup's configuration subscription.
    pub fn add_config_subscription(&self, sub: &Arc<ConfigSubscription>) {
        self.config_subscriptions.lock().push(Arc::downgrade(sub));
    }

    /// Records the primary a backup follows (named in the 530 that backups give clients).
    pub fn set_primary_address(&self, address: Option<String>) {
        *self.primary_address.lock() = address;
    }

    /// Where a client refused by this backup should go: `--ha-public-url`, else the primary
    /// as found, else `--ha-brokers-url`.
    pub fn redirect_text(&self) -> String {
        let ha = &self.config.ha;
        if !ha.public_url.is_empty() {
            return ha.public_url.clone();
        }
        if let Some(p) = self.primary_address.lock().clone() {
            return p;
        }
        ha.brokers_url.clone()
    }

    /// Milliseconds since the broker started: the clock of TTLs and expiries.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A fresh connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    // ---- memory watermark -------------------------------------------------------------------

    /// Counts `n` more bytes of queued messages.
    pub fn memory_add(&self, n: u64) {
        let now = self.message_memory_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.config.memory_high_watermark_bytes
            && !self.memory_alarm_on.load(Ordering::Relaxed)
        {
            self.set_alarm(true);
        }
    }

    /// Counts `n` fewer bytes of queued messages.
    pub fn memory_sub(&self, n: u64) {
        let now = self.message_memory_bytes.fetch_sub(n, Ordering::Relaxed) - n;
        if now <= self.config.memory_high_watermark_bytes
            && self.memory_alarm_on.load(Ordering::Relaxed)
        {
            self.set_alarm(false);
        }
    }

    fn set_alarm(&self, on: bool) {
        if self.memory_alarm_on.swap(on, Ordering::Relaxed) != on {
            if on {
                tracing::warn!(target: "Broker", "memory high watermark ({} bytes) reached: blocking publishers", self.config.memory_high_watermark_bytes);
            } else {
                tracing::info!(target: "Broker", "memory below the high watermark: unblocking publishers");
            }
            self.memory_alarm.send_replace(on);
        }
    }

    /// Bytes of messages held in queues (each queue's copy counted).
    pub fn message_memory_bytes(&self) -> u64 {
        self.message_memory_bytes.load(Ordering::Relaxed)
    }

    /// True while publishers must be blocked.
    pub fn memory_alarm(&self) -> bool {
        self.memory_alarm_on.load(Ordering::Relaxed)
    }

    /// A receiver that changes when the memory alarm does.
    pub fn watch_memory_alarm(&self) -> watch::Receiver<bool> {
        self.memory_alarm.subscribe()
    }

    // ---- exchanges --------------------------------------------------------------------------

    /// Looks an exchange up.
    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges.read().get(name).cloned()
    }

    /// All exchanges.
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    /// exchange.declare.
    pub fn declare_exchange(&self, d: &ExchangeDeclare) -> Result<(), AmqpError> {
        if d.passive {
            return self
                .exchange(&d.name)
                .map(|_| ())
                .ok_or_else(|| no_exchange(&d.name));
        }
        let _config = self.config_guard();
        let Some(kind) = ExchangeKind::parse(&d.kind) else {
            return Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{}' (known: direct, fanout, topic, headers)",
                d.kind
            )));
        };
        let mut all = self.exchanges.write();
        if let Some(e) = all.get(&d.name) {
            return check_exchange_equivalent(e, kind, d);
        }
        if d.name.is_empty() || d.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.'",
                d.name
            )));
        }
        if self.config.max_exchanges != 0 && all.len() >= self.config.max_exchanges {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare exchange '{}': the limit of {} exchanges (--max-exchanges) is reached",
                d.name, self.config.max_exchanges
            )));
        }
        let e = Exchange::new(
            d.name.clone(),
            kind,
            d.durable,
            d.auto_delete,
            d.internal,
            d.arguments.clone(),
        );
        let e = Arc::new(e);
        all.insert(d.name.clone(), e.clone());
        drop(all);
        tracing::debug!(target: "Model", "exchange '{}' ({}) declared", d.name, kind.name());
        self.emit_event(Event::ExchangeDeclare(&e));
        Ok(())
    }

    /// exchange.delete. Deleting an exchange that does not exist succeeds, as in RabbitMQ.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty()
            || name.starts_with("amq.")
            || PREDECLARED.iter().any(|(n, _)| *n == name)
        {
            return Err(AmqpError::access_refused(format!(
                "exchange '{name}' is predeclared and cannot be deleted"
            )));
        }
        let _config = self.config_guard();
        let mut all = self.exchanges.write();
        let Some(e) = all.get(name) else {
            return Ok(());
        };
        if if_unused && e.binding_count() > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "exchange '{name}' in vhost '/' in use"
            )));
        }
        all.remove(name);
        drop(all);
        tracing::debug!(target: "Model", "exchange '{name}' deleted");
        self.emit_event(Event::ExchangeDelete(name));
        Ok(())
    }

    // ---- queues -----------------------------------------------------------------------------

    /// Looks a queue up.
    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().get(name).cloned()
    }

    /// All queues.
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    /// A queue that `connection_id` may use: 404 if missing, 405 if exclusive to another.
    pub fn queue_for(&self, connection_id: u64, name: &str) -> Result<Arc<Queue>, AmqpError> {
        let q = self.queue(name).ok_or_else(|| no_queue(name))?;
        check_exclusive(&q, connection_id)?;
        Ok(q)
    }

    /// queue.declare.
    pub fn declare_queue(
        &self,
        connection_id: u64,
        d: &QueueDeclare,
    ) -> Result<DeclaredQueue, AmqpError> {
        let now = self.now_ms();
        if d.passive {
            let q = self.queue_for(connection_id, &d.name)?;
            return Ok(declared(q));
        }
        let _config = self.config_guard();
        let name = if d.name.is_empty() {
            server_generated_name("amq.gen-")
        } else {
            d.name.clone()
        };
        let mut all = self.queues.write();
        if let Some(q) = all.get(&name) {
            check_exclusive(q, connection_id)?;
            check_queue_equivalent(q, d)?;
            if d.exclusive && connection_id != REPLICATION_CONNECTION && q.adopt(connection_id) {
                tracing::info!(target: "HA", "exclusive queue '{name}' adopted by connection {connection_id}");
            }
            q.touch(now);
            return Ok(declared(q.clone()));
        }
        if name.starts_with("amq.") && !d.name.is_empty() {
            return Err(AmqpError::access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.'"
            )));
        }
        if self.config.max_queues != 0 && all.len() >= self.config.max_queues {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare queue '{name}': the limit of {} queues (--max-queues) is reached",
                self.config.max_queues
            )));
        }
        let settings = QueueSettings::parse(&d.arguments, self.config.default_queue_limit_bytes)?;
        if let Some(dlx) = &settings.dead_letter_exchange {
            tracing::debug!(target: "Model", "queue '{name}' dead-letters to '{dlx}'");
        }
        let q = Arc::new(Queue::new(
            name.clone(),
            d.durable,
            d.exclusive.then_some(connection_id),
            d.auto_delete,
            d.arguments.clone(),
            settings,
            self.self_ref.clone(),
            now,
        ));
        all.insert(name.clone(), q.clone());
        drop(all);
        // Every queue is bound to the default exchange by its name; that binding is implicit.
        tracing::debug!(target: "Model", "queue '{name}' declared");
        self.emit_event(Event::QueueDeclare(&q));
        Ok(declared(q))
    }

    /// queue.delete: returns the number of messages it held. A missing queue is not an error
    /// (as RabbitMQ); an exclusive queue of another connection is 405.
    pub fn delete_queue(
        &self,
        connection_id: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let Some(q) = self.queue(name) else {
            return Ok(0);
        };
        check_exclusive(&q, connection_id)?;
        {
            let st = q.lock();
            if if_unused && st.consumer_count() > 0 {
                return Err(AmqpError::precondition_failed(format!(
                    "queue '{name}' in vhost '/' in use"
                )));
            }
            if if_empty && st.message_count() > 0 {
                return Err(AmqpError::precondition_failed(format!(
                    "queue '{name}' in vhost '/' is not empty"
                )));
            }
        }
        Ok(self.remove_queue(&q))
    }

    /// Removes a queue for good: unbinds it, cancels its consumers, drops its messages.
    pub fn remove_queue(&self, q: &Arc<Queue>) -> u32 {
        let _config = self.config_guard();
        {
            let mut all = self.queues.write();
            match all.get(&q.name) {
                Some(x) if Arc::ptr_eq(x, q) => {
                    all.remove(&q.name);
                }
                _ => return 0,
            }
        }
        let mut emptied = Vec::new();
        for e in self.exchanges() {
            e.unbind_queue(q);
            if e.should_auto_delete() {
                emptied.push(e.name.clone());
            }
        }
        for name in emptied {
            let _ = self.delete_exchange(&name, true);
        }
        let (consumers, count) = q.mark_deleted();
        for c in consumers {
            c.link.lock().consumers.remove(&c.tag);
            if c.mark_cancelled() {
                if c.link.cancel_notify {
                    crate::channel::write_server_cancel(&c.link, &c.tag);
                }
                self.emit_event(Event::Unsubscribe(SubscriptionEvent::of(&c)));
            }
        }
        tracing::debug!(target: "Model", "queue '{}' deleted", q.name);
        self.emit_event(Event::QueueDelete(&q.name));
        count
    }

    /// queue.bind. Returns false if the binding existed already.
    pub fn bind(
        &self,
        connection_id: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        if exchange.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let _config = self.config_guard();
        let q = self.queue_for(connection_id, queue)?;
        if connection_id != REPLICATION_CONNECTION {
            q.replica_refusal("bind")?;
        }
        let e = self
            .exchange(exchange)
            .ok_or_else(|| no_exchange(exchange))?;
        let added = e.bind(&q, key, arguments)?;
        if added {
            self.emit_event(Event::Bind(BindingEvent {
                exchange,
                queue,
                key,
                arguments,
            }));
        }
        Ok(added)
    }

    /// queue.unbind. Removing a binding that does not exist succeeds (and returns false).
    pub fn unbind(
        &self,
        connection_id: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        if exchange.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let _config = self.config_guard();
        let q = self.queue_for(connection_id, queue)?;
        let e = self
            .exchange(exchange)
            .ok_or_else(|| no_exchange(exchange))?;
        let removed = e.unbind(&q, key, arguments);
        if removed {
            self.emit_event(Event::Unbind(BindingEvent {
                exchange,
                queue,
                key,
                arguments,
            }));
        }
        if e.should_auto_delete() {
            let _ = self.delete_exchange(exchange, true);
        }
        Ok(removed)
    }

    /// queue.purge.
    pub fn purge(&self, connection_id: u64, queue: &str) -> Result<u32, AmqpError> {
        let q = self.queue_for(connection_id, queue)?;
        q.replica_refusal("purge")?;
        Ok(q.purge())
    }

    // ---- routing ----------------------------------------------------------------------------

    /// Appends the queues a message published to `exchange` with `routing_key` goes to.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        out: &mut Vec<Arc<Queue>>,
    ) -> Result<(), AmqpError> {
        if exchange.is_empty() {
            if let Some(q) = self.queues.read().get(routing_key)
                && !q.is_replica()
            {
                out.push(q.clone());
            }
            return Ok(());
        }
        let e = self
            .exchange(exchange)
            .ok_or_else(|| no_exchange(exchange))?;
        if e.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '/'"
            )));
        }
        e.route(routing_key, message, out);
        // A replica takes nothing from local publishers.
        out.retain(|q| !q.is_replica());
        // Unroutable: follow alternate exchanges (RabbitMQ's and Qpid's `alternate-exchange`),
        // a bounded number of hops so that a cycle of alternates ends.
        let mut current = e;
        for _ in 0..ALTERNATE_EXCHANGE_HOPS_MAX {
            if !out.is_empty() {
                break;
            }
            let Some(next) = current.alternate.as_deref().and_then(|n| self.exchange(n)) else {
                break;
            };
            next.route(routing_key, message, out);
            out.retain(|q| !q.is_replica());
            current = next;
        }
        Ok(())
    }

    /// Dead-letters messages that left `queue`, if it has a dead-letter exchange.
    pub fn dead_letter(&self, queue: &Queue, dead: Vec<(QueuedMessage, DequeueReason)>) {
        let Some(dlx) = &queue.settings.dead_letter_exchange else {
            return;
        };
        let Some(exchange) = self.exchange(dlx) else {
            tracing::debug!(target: "Broker", "dead-letter exchange '{dlx}' of queue '{}' does not exist: dropping {} messages", queue.name, dead.len());
            return;
        };
        let now = self.now_ms();
        let mut targets = Vec::new();
        for (entry, reason) in dead {
            let Some(reason_text) = reason.dead_letter_reason() else {
                continue;
            };
            let m = &entry.message;
            let key = queue
                .settings
                .dead_letter_routing_key
                .as_deref()
                .unwrap_or(m.routing_key());
            let Some(dead_message) = with_x_death(m, &queue.name, reason_text, dlx, key) else {
                continue;
            };
            targets.clear();
            if exchange.name.is_empty() {
                if let Some(q) = self.queue(key) {
                    targets.push(q);
                }
            } else {
                exchange.route(key, &dead_message, &mut targets);
            }
            for q in &targets {
                // A message expiring or overflowing straight back into its own queue would
                // cycle for ever; RabbitMQ drops it, and so do we. Rejections may cycle.
                if q.name == queue.name && reason != DequeueReason::Rejected {
                    continue;
                }
                if q.enqueue(dead_message.clone(), now) == EnqueueOutcome::Rejected {
                    tracing::debug!(target: "Broker", "dead-letter queue '{}' refused a message", q.name);
                }
            }
        }
    }

    // ---- connections ------------------------------------------------------------------------

    /// A connection closed: its exclusive queues go with it.
    pub fn connection_closed(&self, connection_id: u64) {
        self.mgmt.connection_closed(connection_id);
        let exclusive: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.exclusive_owner() == Some(connection_id))
            .cloned()
            .collect();
        for q in exclusive {
            self.remove_queue(&q);
        }
    }

    /// Installs the HA module (once).
    pub fn set_ha_module(&self, module: Arc<dyn HaModule>) {
        let _ = self.ha_module.set(module);
    }

    /// The HA module, if installed.
    pub fn ha_module(&self) -> Option<&Arc<dyn HaModule>> {
        self.ha_module.get()
    }

    /// Registers a replicating subscription (for `qpid-ha query` and the periodic tick).
    pub fn add_subscription(&self, sub: &Arc<ReplicatingSubscription>) {
        let mut subs = self.subscriptions.lock();
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(sub));
    }

    /// The replicating subscriptions alive now.
    pub fn subscriptions(&self) -> Vec<Arc<ReplicatingSubscription>> {
        self.subscriptions
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Periodic HA work: ack timeouts and lag events of replicating subscriptions.
    pub fn ha_tick(&self) {
        let now = self.now_ms();
        for s in self.subscriptions() {
            s.tick(now);
        }
        if !self.config.ha.cluster || !self.ha_status().is_primary() {
            return;
        }
        let configs = self.config_subscriptions();
        let min = self.config.ha.min_backups as usize;
        if configs.is_empty() && min == 0 {
            return;
        }
        let members = crate::replication::cluster::membership(self);
        let ready = self.ready_backups.load(Ordering::Acquire);
        for c in configs {
            c.send_members(&members);
        }
        if min > 0 {
            let held = std::mem::take(&mut *self.min_backups_holds.lock());
            if held.is_empty() {
                return;
            }
            if ready >= min {
                crate::confirms::release_all(held.into_iter().map(|(h, _)| h));
                return;
            }
            let (expired, waiting): (Vec<_>, Vec<_>) =
                held.into_iter().partition(|(_, deadline)| *deadline <= now);
            if !expired.is_empty() {
                tracing::warn!(target: "HA", "{} publish(es) refused (nack): fewer than {min} backups (--ha-min-backups) were ready within --ha-backup-timeout", expired.len());
            }
            for (h, _) in expired {
                h.nack();
            }
            self.min_backups_holds.lock().extend(waiting);
        }
    }

    /// Periodic housekeeping: expired messages and unused `x-expires` queues.
    pub fn sweep(&self) {
        let now = self.now_ms();
        for q in self.queues() {
            if q.sweep(now) {
                tracing::debug!(target: "Broker", "queue '{}' unused for its x-expires time: deleting", q.name);
                self.remove_queue(&q);
            }
        }
    }
}

fn declared(queue: Arc<Queue>) -> DeclaredQueue {
    let (message_count, consumer_count) = {
        let st = queue.lock();
        (st.message_count(), st.consumer_count())
    };
    DeclaredQueue {
        queue,
        message_count,
        consumer_count,
    }
}

fn no_queue(name: &str) -> AmqpError {
    AmqpError::not_found(format!("no queue '{name}' in vhost '/'"))
}

fn no_exchange(name: &str) -> AmqpError {
    AmqpError::not_found(format!("no exchange '{name}' in vhost '/'"))
}

fn check_exclusive(q: &Queue, connection_id: u64) -> Result<(), AmqpError> {
    match q.exclusive_owner() {
        Some(owner) if owner != connection_id => Err(AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{}' in vhost '/'",
            q.name
        ))),
        _ => Ok(()),
    }
}

fn inequivalent(
    what: &str,
    arg: &str,
    name: &str,
    received: impl std::fmt::Display,
    current: impl std::fmt::Display,
) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "inequivalent arg '{arg}' for {what} '{name}' in vhost '/': received '{received}' but current is '{current}'"
    ))
}

fn check_exchange_equivalent(
    e: &Exchange,
    kind: ExchangeKind,
    d: &ExchangeDeclare,
) -> Result<(), AmqpError> {
    if e.kind != kind {
        return Err(inequivalent(
            "exchange",
            "type",
            &d.name,
            kind.name(),
            e.kind.name(),
        ));
    }
    if e.durable != d.durable {
        return Err(inequivalent(
            "exchange", "durable", &d.name, d.durable, e.durable,
        ));
    }
    if e.auto_delete != d.auto_delete {
        return Err(inequivalent(
            "exchange",
            "auto_delete",
            &d.name,
            d.auto_delete,
            e.auto_delete,
        ));
    }
    if e.internal != d.internal {
        return Err(inequivalent(
            "exchange", "internal", &d.name, d.internal, e.internal,
        ));
    }
    if !e.name.is_empty()
        && !e.name.starts_with("amq.")
        && !fields::tables_equivalent(&e.arguments, &d.arguments)
    {
        return Err(AmqpError::precondition_failed(format!(
            "inequivalent arguments for exchange '{}' in vhost '/'",
            d.name
        )));
    }
    Ok(())
}

fn check_queue_equivalent(q: &Queue, d: &QueueDeclare) -> Result<(), AmqpError> {
    if q.durable != d.durable {
        return Err(inequivalent(
            "queue", "durable", &q.name, d.durable, q.durable,
        ));
    }
    if q.exclusive != d.exclusive {
        return Err(inequivalent(
            "queue",
            "exclusive",
            &q.name,
            d.exclusive,
            q.exclusive,
        ));
    }
    if q.auto_delete != d.auto_delete {
        return Err(inequivalent(
            "queue",
            "auto_delete",
            &q.name,
            d.auto_delete,
            q.auto_delete,
        ));
    }
    if !fields::tables_equivalent(&q.arguments, &d.arguments) {
        for (k, v) in q.arguments.inner().iter().chain(d.arguments.inner().iter()) {
            let (a, b) = (
                q.arguments.inner().get(k.as_str()),
                d.arguments.inner().get(k.as_str()),
            );
            if !matches!((a, b), (Some(x), Some(y)) if fields::values_match(x, y)) {
                let show =
                    |v: Option<&AMQPValue>| v.map_or("none".to_string(), |v| format!("{v:?}"));
                let _ = v;
                return Err(inequivalent("queue", k.as_str(), &q.name, show(b), show(a)));
            }
        }
    }
    Ok(())
}

/// A server-generated name: `prefix` and 22 random URL-safe characters.
pub fn server_generated_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for _ in 0..22 {
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}

/// The message as dead-lettered: an `x-death` entry added (or its count raised) and the
/// `x-first-death-*` headers set as RabbitMQ does, the expiration removed (kept in the entry as
/// `original-expiration`), published to the dead-letter exchange with `routing_key`.
fn with_x_death(
    m: &Message,
    queue: &str,
    reason: &str,
    dead_letter_exchange: &str,
    routing_key: &str,
) -> Option<Message> {
    let (_, mut props) = parse_properties(m.raw_properties()).ok()?;
    let mut headers = props.headers().clone().unwrap_or_default();
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        fields::get(t, "queue").and_then(fields::as_str) == Some(queue)
            && fields::get(t, "reason").and_then(fields::as_str) == Some(reason)
    };
    let existing = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)));
    let entry = match existing {
        Some(i) => {
            let AMQPValue::FieldTable(mut t) = deaths.remove(i) else {
                return None;
            };
            let count = fields::get(&t, "count")
                .and_then(fields::as_i64)
                .unwrap_or(0)
                + 1;
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            t.insert(
                "exchange".into(),
                AMQPValue::LongString(m.exchange().into()),
            );
            let keys = FieldArray::from(vec![AMQPValue::LongString(m.routing_key().into())]);
            t.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
            if let Some(exp) = props.expiration() {
                t.insert(
                    "original-expiration".into(),
                    AMQPValue::LongString(exp.as_str().into()),
                );
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    if !headers.contains_key("x-first-death-reason") {
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        headers.insert(
            "x-first-death-exchange".into(),
            AMQPValue::LongString(LongString::from(m.exchange())),
        );
    }
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    props = rebuild_without_expiration(props).with_headers(headers);
    let raw = encode_properties(&props)?;
    Message::new(dead_letter_exchange, routing_key, &raw, m.body()).ok()
}

fn rebuild_without_expiration(p: AMQPProperties) -> AMQPProperties {
    let mut n = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        n = n.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        n = n.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        n = n.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        n = n.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        n = n.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        n = n.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        n = n.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        n = n.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        n = n.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        n = n.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        n = n.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        n = n.with_cluster_id(v.clone());
    }
    n
}

fn encode_properties(p: &AMQPProperties) -> Option<Vec<u8>> {
    let ctx = gen_properties(p)(WriteContext::from(Vec::new())).ok()?;
    Some(ctx.into_inner().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(b: &Broker, name: &str, kind: &str, alternate: Option<&str>) {
        let mut arguments = FieldTable::default();
        if let Some(a) = alternate {
            arguments.insert("alternate-exchange".into(), AMQPValue::LongString(a.into()));
        }
        let d = ExchangeDeclare {
            name: name.into(),
            kind: kind.into(),
            arguments,
            ..Default::default()
        };
        b.declare_exchange(&d).unwrap();
    }

    #[test]
    fn unroutable_messages_follow_the_alternate_exchange_and_cycles_end() {
        let b = Broker::new(BrokerConfig::default(), UserDb::default());
        exchange(&b, "x", "direct", Some("ae"));
        exchange(&b, "ae", "fanout", None);
        b.declare_queue(
            1,
            &QueueDeclare {
                name: "unrouted".into(),
                ..Default::default()
            },
        )
        .unwrap();
        b.bind(1, "unrouted", "ae", "", &FieldTable::default())
            .unwrap();
        let m = Message::new("x", "nowhere", &[0, 0], b"m").unwrap();
        let mut out = Vec::new();
        b.route("x", "nowhere", &m, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            ["unrouted"]
        );

        exchange(&b, "c1", "direct", Some("c2"));
        exchange(&b, "c2", "direct", Some("c1"));
        let mut out = Vec::new();
        b.route("c1", "k", &m, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn redeclare_with_other_properties_is_406_and_reserved_names_403() {
        let b = Broker::new(BrokerConfig::default(), UserDb::default());
        b.declare_queue(
            1,
            &QueueDeclare {
                name: "q".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let e = b.declare_queue(
            1,
            &QueueDeclare {
                name: "q".into(),
                durable: true,
                ..Default::default()
            },
        );
        assert_eq!(e.unwrap_err().code, 406);
        let e = b.declare_queue(
            1,
            &QueueDeclare {
                name: "amq.q".into(),
                ..Default::default()
            },
        );
        assert_eq!(e.unwrap_err().code, 403);
        exchange(&b, "x", "topic", None);
        let d = ExchangeDeclare {
            name: "x".into(),
            kind: "fanout".into(),
            ..Default::default()
        };
        assert_eq!(b.declare_exchange(&d).unwrap_err().code, 406);
        let d = ExchangeDeclare {
            name: "x".into(),
            kind: "bogus".into(),
            ..Default::default()
        };
        assert_eq!(b.declare_exchange(&d).unwrap_err().code, 503);
    }
}
