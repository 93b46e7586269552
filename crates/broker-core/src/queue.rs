//! Queues: ready messages (in priority levels), consumers, limits, TTL, last-value semantics,
//! and the single place every enqueue and dequeue passes through (`QueueState::record_*`), which
//! is where replication observers, the store and confirm guards attach.
//!
//! Each message gets a 64-bit id, increasing and never reused within the queue's incarnation (a
//! uuid made when the queue is created). Ready messages are kept sorted by id within their
//! priority level, so a requeued message goes back to its place.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::{Mutex, MutexGuard};

use crate::broker::Broker;
use crate::confirms::PendingConfirm;
use crate::delivery::{ChannelLink, Consumer, LinkState, Unacked};
use crate::error::AmqpError;
use crate::fields;
use crate::message::Message;
use crate::protocol::hot;
use crate::queue_settings::{Overflow, QueueSettings};
use crate::replication::IdRanges;

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Its id in this queue's incarnation (replication id).
    pub id: u64,
    /// The message.
    pub message: Message,
    /// Delivered before and put back.
    pub redelivered: bool,
    /// When it expires, in broker milliseconds (`u64::MAX` = never).
    pub expires_at_ms: u64,
}

/// Why a message left a queue. Observers (replication, store) see every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DequeueReason {
    /// Acknowledged, or sent to a no-ack consumer or no-ack get.
    Consumed,
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Pushed out by a length or size limit (drop-head, ring).
    Overflow,
    /// Replaced by a newer message with the same last-value key.
    Replaced,
    /// queue.purge.
    Purged,
    /// The queue was deleted.
    Deleted,
}

impl DequeueReason {
    /// The `reason` of an x-death entry, for reasons that dead-letter.
    pub fn dead_letter_reason(self) -> Option<&'static str> {
        match self {
            DequeueReason::Rejected => Some("rejected"),
            DequeueReason::Expired => Some("expired"),
            DequeueReason::Overflow => Some("maxlen"),
            _ => None,
        }
    }
}

/// Something that follows a queue's enqueues and dequeues (replication, later the store).
/// Called with the queue's lock held: it must be quick and must not call back into the queue.
pub trait QueueObserver: Send + Sync + std::fmt::Debug {
    /// A message was added; `confirm` is the publish's confirm, which the observer may hold.
    fn enqueued(&self, queue: &Queue, entry: &QueuedMessage, confirm: Option<PendingConfirm<'_>>);
    /// A message left the queue for good.
    fn dequeued(&self, queue: &Queue, entry: &QueuedMessage, reason: DequeueReason);
    /// The queue was deleted (its messages' dequeues, reason `Deleted`, come before).
    fn queue_deleted(&self, _queue: &Queue) {}
    /// True once the observer wants no more calls: it is dropped from the queue at the next
    /// snapshot (it may be retired while the queue's lock is held).
    fn retired(&self) -> bool {
        false
    }
}

/// Outcome of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Taken.
    Accepted,
    /// Refused by a `reject-publish` limit: the publisher gets a nack.
    Rejected,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Survives a restart (once there is a store).
    pub durable: bool,
    /// Exclusive to one connection (its owner).
    pub exclusive: bool,
    /// The owning connection of an exclusive queue (0: none yet, for a queue a cluster
    /// replicated: the first connection that declares it exclusive adopts it).
    owner: std::sync::atomic::AtomicU64,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments as the client gave them (for redeclare checks and listings).
    pub arguments: FieldTable,
    /// What the arguments mean.
    pub settings: QueueSettings,
    incarnation: Mutex<uuid::Uuid>,
    broker: Weak<Broker>,
    deleted: AtomicBool,
    /// While the queue is a replica: what it replicates, for the 405 texts.
    replica_of: Mutex<Option<String>>,
    replicating: AtomicBool,
    state: Mutex<QueueState>,
}

/// The mutable part of a queue.
#[derive(Debug)]
pub struct QueueState {
    ready: Ready,
    next_id: u64,
    ready_bytes: u64,
    unacked_count: u64,
    consumers: Vec<Arc<Consumer>>,
    next_consumer: usize,
    had_consumers: bool,
    last_used_ms: u64,
    last_value: HashMap<Vec<u8>, u64>,
    /// Total messages ever enqueued.
    pub enqueued_total: u64,
    /// Total messages ever dequeued.
    pub dequeued_total: u64,
    observers: Vec<Arc<dyn QueueObserver>>,
    /// Delivered and not yet settled, by id; kept only on brokers with HA enabled (the
    /// snapshot a replicating subscription starts from includes them).
    acquired: Option<Acquired>,
}

/// Ready messages by priority level, each level sorted by id.
#[derive(Debug)]
struct Ready {
    levels: Vec<VecDeque<QueuedMessage>>,
    len: usize,
}

impl Ready {
    fn new(levels: usize) -> Ready {
        Ready {
            levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    fn level_of(&self, m: &Message) -> usize {
        (m.priority() as usize).min(self.levels.len() - 1)
    }

    fn push_back(&mut self, e: QueuedMessage) {
        let l = self.level_of(&e.message);
        debug_assert!(
            self.levels[l].back().is_none_or(|b| b.id < e.id),
            "ids must increase"
        );
        self.levels[l].push_back(e);
        self.len += 1;
    }

    /// Puts a message back in id order within its level.
    fn insert_sorted(&mut self, e: QueuedMessage) {
        let l = self.level_of(&e.message);
        let level = &mut self.levels[l];
        if level.back().is_none_or(|x| x.id < e.id) {
            level.push_back(e); // the usual case: restored and replicated in id order
        } else {
            let at = level.partition_point(|x| x.id < e.id);
            level.insert(at, e);
        }
        self.len += 1;
    }

    fn front(&self) -> Option<&QueuedMessage> {
        self.levels.iter().rev().find_map(|l| l.front())
    }

    fn pop_front(&mut self) -> Option<QueuedMessage> {
        let e = self.levels.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.len -= 1;
        Some(e)
    }

    /// Removes the oldest message of the lowest level (what drop-head discards first).
    fn pop_oldest_lowest(&mut self) -> Option<QueuedMessage> {
        let e = self.levels.iter_mut().find_map(|l| l.pop_front())?;
        self.len -= 1;
        Some(e)
    }

    fn contains_id(&self, id: u64, m: &Message) -> bool {
        let level = &self.levels[self.level_of(m)];
        let at = level.partition_point(|x| x.id < id);
        level.get(at).is_some_and(|x| x.id == id)
    }

    fn remove_id(&mut self, id: u64) -> Option<QueuedMessage> {
        for level in &mut self.levels {
            let at = level.partition_point(|x| x.id < id);
            if level.get(at).is_some_and(|x| x.id == id) {
                self.len -= 1;
                return level.remove(at);
            }
        }
        None
    }

    fn drain(&mut self) -> Vec<QueuedMessage> {
        self.len = 0;
        self.levels.iter_mut().flat_map(|l| l.drain(..)).collect()
    }
}

/// Delivered-not-settled messages by id. Deliveries come mostly in id order and acks mostly
/// oldest first, so this is a deque sorted by id where a settled entry leaves a hole that is
/// dropped once it reaches the front, and holes are compacted away when they outnumber the
/// entries (a message left unacked while later ones are acked).
#[derive(Debug, Default)]
struct Acquired {
    entries: VecDeque<(u64, Option<QueuedMessage>)>,
    live: usize,
}

impl Acquired {
    fn insert(&mut self, e: QueuedMessage) {
        let id = e.id;
        if self.entries.back().is_none_or(|&(b, _)| b < id) {
            self.entries.push_back((id, Some(e)));
        } else {
            let at = self.entries.partition_point(|&(x, _)| x < id);
            if self.entries.get(at).is_some_and(|&(x, _)| x == id) {
                if self.entries[at].1.is_none() {
                    self.live += 1;
                }
                self.entries[at].1 = Some(e);
                return;
            }
            self.entries.insert(at, (id, Some(e)));
        }
        self.live += 1;
    }

    fn remove(&mut self, id: u64) {
        let at = match self.entries.front() {
            Some(&(f, _)) if f == id => 0,
            _ => self.entries.partition_point(|&(x, _)| x < id),
        };
        if let Some((x, slot)) = self.entries.get_mut(at)
            && *x == id
            && slot.take().is_some()
        {
            self.live -= 1;
        }
        while self.entries.front().is_some_and(|(_, e)| e.is_none()) {
            self.entries.pop_front();
        }
        if self.entries.len() > 64 && self.entries.len() > 2 * self.live {
            self.entries.retain(|(_, e)| e.is_some());
        }
    }

    fn values(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.entries.iter().filter_map(|(_, e)| e.as_ref())
    }
}

/// What a dispatch or an enqueue produced that must be handled after the queue lock is released.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Messages to dead-letter, with why.
    pub dead: Vec<(QueuedMessage, DequeueReason)>,
}

impl Queue {
    /// A new, empty queue.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        durable: bool,
        exclusive_owner: Option<u64>,
        auto_delete: bool,
        arguments: FieldTable,
        settings: QueueSettings,
        broker: Weak<Broker>,
        now_ms: u64,
    ) -> Queue {
        let levels = settings.max_priority.map_or(1, |p| p as usize + 1);
        let track_acquired = broker.upgrade().is_some_and(|b| b.config.ha.enabled());
        Queue {
            name,
            durable,
            exclusive: exclusive_owner.is_some(),
            owner: std::sync::atomic::AtomicU64::new(exclusive_owner.unwrap_or(0)),
            auto_delete,
            arguments,
            settings,
            incarnation: Mutex::new(uuid::Uuid::new_v4()),
            broker,
            deleted: AtomicBool::new(false),
            replica_of: Mutex::new(None),
            replicating: AtomicBool::new(false),
            state: Mutex::new(QueueState {
                ready: Ready::new(levels),
                next_id: 1,
                ready_bytes: 0,
                unacked_count: 0,
                consumers: Vec::new(),
                next_consumer: 0,
                had_consumers: false,
                last_used_ms: now_ms,
                last_value: HashMap::new(),
                enqueued_total: 0,
                dequeued_total: 0,
                observers: Vec::new(),
                acquired: track_acquired.then(Acquired::default),
            }),
        }
    }

    /// Locks the state (for statistics and management).
    pub fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock()
    }

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.broker.upgrade().map_or(0, |b| b.now_ms())
    }

    /// The owning connection of an exclusive queue (`None` for a shared queue, or an exclusive
    /// one nobody owns yet).
    pub fn exclusive_owner(&self) -> Option<u64> {
        match self.owner.load(Ordering::Acquire) {
            0 => None,
            o if self.exclusive => Some(o),
            _ => None,
        }
    }

    /// Gives an ownerless exclusive queue to `connection_id` (a failover: the queue came from
    /// the old primary). Returns false if it has an owner already.
    pub fn adopt(&self, connection_id: u64) -> bool {
        self.exclusive
            && self
                .owner
                .compare_exchange(0, connection_id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// This incarnation's uuid.
    pub fn incarnation(&self) -> uuid::Uuid {
        *self.incarnation.lock()
    }

    /// Adds an observer of enqueues and dequeues.
    pub fn add_observer(&self, observer: Arc<dyn QueueObserver>) {
        self.state.lock().observers.push(observer);
    }

    /// Removes an observer added before.
    pub fn remove_observer(&self, observer: &Arc<dyn QueueObserver>) {
        self.state
            .lock()
            .observers
            .retain(|o| !Arc::ptr_eq(o, observer));
    }

    /// Adds `observer` and, under the same lock, calls `with` with every message the queue
    /// holds (ready and delivered-not-settled), in id order: nothing enqueued or dequeued can
    /// fall between the snapshot and the first change the observer sees.
    pub fn observe_from_snapshot(
        &self,
        observer: Arc<dyn QueueObserver>,
        with: impl FnOnce(Vec<QueuedMessage>),
    ) {
        let mut st = self.state.lock();
        let mut all: Vec<QueuedMessage> = st.ready.levels.iter().flatten().cloned().collect();
        if let Some(a) = &st.acquired {
            all.extend(a.values().cloned());
        }
        all.sort_unstable_by_key(|e| e.id);
        st.observers.push(observer);
        with(all);
        st.observers.retain(|o| !o.retired());
    }

    /// Calls `f` with every ready message whose id is in `lo..hi`, in id order within each
    /// priority level, under the queue's lock: no enqueue or dequeue of this queue runs
    /// meanwhile (the store moves messages between its segments this way).
    pub fn for_each_ready_in(&self, lo: u64, hi: u64, mut f: impl FnMut(&QueuedMessage)) {
        let st = self.state.lock();
        for level in &st.ready.levels {
            let from = level.partition_point(|e| e.id < lo);
            for e in level.range(from..) {
                if e.id >= hi {
                    break;
                }
                f(e);
            }
        }
    }

    // ---- the replica side ----------------------------------------------------------------

    /// Marks the queue a replica of `original` (a description such as `'q' on host:port`), or
    /// an ordinary queue again with `None` (detach: it also gets a new incarnation).
    pub fn set_replica_of(&self, original: Option<String>) {
        let detach = original.is_none() && self.is_replica();
        self.replicating
            .store(original.is_some(), Ordering::Release);
        *self.replica_of.lock() = original;
        if detach {
            *self.incarnation.lock() = uuid::Uuid::new_v4();
            // Replicated messages carry no expiry (the original expires them); an ordinary
            // queue's messages get their TTL again, counted from now.
            let now = self.now_ms();
            let mut st = self.state.lock();
            for e in st.ready.levels.iter_mut().flatten() {
                let ttl = match (self.settings.message_ttl_ms, e.message.expiration_ms()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                e.expires_at_ms = ttl.map_or(u64::MAX, |t| now.saturating_add(t));
            }
        }
    }

    /// A cluster backup's replica becomes the new primary's queue: it stops replicating, and
    /// keeps the incarnation its messages came from (so the other backups, which hold copies of
    /// the same incarnation, re-subscribe without discarding anything).
    /// Every inherited message is flagged redelivered: any of them may have been delivered by
    /// the old primary.
    pub fn take_over(&self, incarnation: Option<uuid::Uuid>) {
        self.set_replica_of(None);
        if let Some(i) = incarnation {
            *self.incarnation.lock() = i;
        }
        let mut st = self.state.lock();
        for e in st.ready.levels.iter_mut().flatten() {
            e.redelivered = true;
        }
    }

    /// True while the queue replicates another.
    pub fn is_replica(&self) -> bool {
        self.replicating.load(Ordering::Acquire)
    }

    /// The 405 a local operation on a replica gets, naming the original.
    pub fn replica_refusal(&self, what: &str) -> Result<(), AmqpError> {
        if !self.is_replica() {
            return Ok(());
        }
        let of = self.replica_of.lock().clone().unwrap_or_default();
        Err(AmqpError::resource_locked(format!(
            "cannot {what} queue '{}': it is a replica of {of}; detach it first (qpid-ha detach)",
            self.name
        )))
    }

    /// The ids the queue holds (ready and unsettled), as ranges.
    pub fn held_ids(&self) -> IdRanges {
        let st = self.state.lock();
        let mut ids: Vec<u64> = st.ready.levels.iter().flatten().map(|e| e.id).collect();
        if let Some(a) = &st.acquired {
            ids.extend(a.values().map(|e| e.id));
        }
        ids.sort_unstable();
        IdRanges::from_sorted(ids)
    }

    /// Adds a message replicated from the original with the original's id. A message whose id
    /// the queue holds already is dropped. No limit, TTL or last-value replacement applies:
    /// the original's own events say what leaves.
    pub fn apply_enqueue(&self, id: u64, message: Message, redelivered: bool) -> bool {
        let mut st = self.state.lock();
        if st.ready.contains_id(id, &message) {
            return false;
        }
        if let Some(key) = &self.settings.last_value_key
            && let Some(value) = last_value_of(&message, key)
        {
            st.last_value.insert(value, id);
        }
        let entry = QueuedMessage {
            id,
            message,
            redelivered,
            expires_at_ms: u64::MAX,
        };
        st.next_id = st.next_id.max(id + 1);
        st.ready_bytes += entry.message.body_size();
        st.enqueued_total += 1;
        for o in &st.observers {
            o.enqueued(self, &entry, None);
        }
        if let Some(b) = self.broker.upgrade() {
            b.memory_add(entry.message.memory_size());
        }
        st.ready.insert_sorted(entry);
        true
    }

    /// Puts back a message recovered from the store, with its id, flagged redelivered (it may
    /// have been delivered before the restart). No observer sees it.
    pub fn restore(&self, id: u64, message: Message, expires_at_ms: u64) {
        let mut st = self.state.lock();
        if let Some(key) = &self.settings.last_value_key
            && let Some(value) = last_value_of(&message, key)
        {
            st.last_value.insert(value, id);
        }
        let entry = QueuedMessage {
            id,
            message,
            redelivered: true,
            expires_at_ms,
        };
        st.next_id = st.next_id.max(id + 1);
        st.ready_bytes += entry.message.body_size();
        st.enqueued_total += 1;
        if let Some(b) = self.broker.upgrade() {
            b.memory_add(entry.message.memory_size());
        }
        st.ready.insert_sorted(entry);
    }

    /// The next id this queue will give (ids are never reused within an incarnation).
    pub fn next_id(&self) -> u64 {
        self.state.lock().next_id
    }

    /// Raises the next id to at least `floor` (a queue recovered from the store continues
    /// above every id it may have given before the restart).
    pub fn raise_next_id(&self, floor: u64) {
        let mut st = self.state.lock();
        st.next_id = st.next_id.max(floor);
    }

    /// The broker this queue belongs to (while it runs).
    pub fn broker(&self) -> Option<Arc<crate::broker::Broker>> {
        self.broker.upgrade()
    }

    /// Sets the incarnation (a queue recovered from the store keeps the one it had).
    pub fn set_incarnation(&self, incarnation: uuid::Uuid) {
        *self.incarnation.lock() = incarnation;
    }

    /// Removes the replicated messages whose ids are in `ids` (ids it does not hold are
    /// ignored). Returns how many it removed.
    pub fn apply_dequeue(&self, ids: &IdRanges) -> u64 {
        let mut st = self.state.lock();
        let mut n = 0;
        if ids.count() as usize > st.ready.len {
            // Many ids: walk the messages instead of the ids.
            let all = st.ready.drain();
            for e in all {
                if ids.contains(e.id) {
                    st.ready_bytes -= e.message.body_size();
                    self.record_dequeue(&mut st, &e, DequeueReason::Consumed);
                    n += 1;
                } else {
                    st.ready.push_back(e);
                }
            }
            return n;
        }
        for id in ids.ids() {
            if let Some(e) = st.ready.remove_id(id) {
                st.ready_bytes -= e.message.body_size();
                self.record_dequeue(&mut st, &e, DequeueReason::Consumed);
                n += 1;
            }
        }
        n
    }

    /// Offers a published message; delivers it at once if a consumer can take it.
    pub fn enqueue(self: &Arc<Self>, message: Message, now_ms: u64) -> EnqueueOutcome {
        self.enqueue_confirmed(message, now_ms, None)
    }

    /// [`Queue::enqueue`] for a publish in confirm mode, whose confirm observers may hold.
    pub fn enqueue_confirmed(
        self: &Arc<Self>,
        message: Message,
        now_ms: u64,
        confirm: Option<PendingConfirm<'_>>,
    ) -> EnqueueOutcome {
        let mut left = Leftovers::default();
        let outcome = {
            let mut st = self.state.lock();
            let outcome = self.enqueue_locked(&mut st, message, now_ms, confirm, &mut left);
            if outcome == EnqueueOutcome::Accepted {
                self.dispatch_locked(&mut st, now_ms, &mut left);
                // A TTL of 0 means "deliver now or never" (RabbitMQ).
                self.expire_locked(&mut st, now_ms, &mut left);
            }
            outcome
        };
        self.handle_leftovers(left);
        outcome
    }

    fn enqueue_locked(
        &self,
        st: &mut QueueState,
        message: Message,
        now_ms: u64,
        confirm: Option<PendingConfirm<'_>>,
        left: &mut Leftovers,
    ) -> EnqueueOutcome {
        if self.is_deleted() {
            return EnqueueOutcome::Accepted;
        }
        // The disk refuses writes: a persistent message cannot be made durable (a nack).
        if self.durable
            && message.persistent()
            && self.broker.upgrade().is_some_and(|b| b.store_failed())
        {
            return EnqueueOutcome::Rejected;
        }
        let size = message.body_size();
        let s = &self.settings;
        let over_count = s
            .max_length
            .is_some_and(|max| st.ready.len as u64 + 1 > max);
        let over_bytes = s
            .max_length_bytes
            .is_some_and(|max| st.ready_bytes + size > max);
        if (over_count || over_bytes) && s.overflow != Overflow::DropHead {
            return EnqueueOutcome::Rejected;
        }
        let ttl = match (s.message_ttl_ms, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expires_at_ms = ttl.map_or(u64::MAX, |t| now_ms.saturating_add(t));
        let id = st.next_id;
        st.next_id += 1;
        if let Some(key) = &s.last_value_key
            && let Some(value) = last_value_of(&message, key)
            && let Some(old) = st.last_value.insert(value, id)
            && let Some(e) = st.ready.remove_id(old)
        {
            self.record_dequeue(st, &e, DequeueReason::Replaced);
        }
        let entry = QueuedMessage {
            id,
            message,
            redelivered: false,
            expires_at_ms,
        };
        st.ready_bytes += size;
        st.enqueued_total += 1;
        for o in &st.observers {
            o.enqueued(self, &entry, confirm);
        }
        if let Some(b) = self.broker.upgrade() {
            b.memory_add(entry.message.memory_size());
        }
        st.ready.push_back(entry);
        // drop-head: make room by discarding the oldest.
        while s.max_length.is_some_and(|max| st.ready.len as u64 > max)
            || s.max_length_bytes.is_some_and(|max| st.ready_bytes > max)
        {
            let Some(e) = st.ready.pop_oldest_lowest() else {
                break;
            };
            st.ready_bytes -= e.message.body_size();
            self.record_dequeue(st, &e, DequeueReason::Overflow);
            left.dead.push((e, DequeueReason::Overflow));
        }
        EnqueueOutcome::Accepted
    }

    /// The one place a message leaves the queue for good (ready or unacked).
    fn record_dequeue(&self, st: &mut QueueState, e: &QueuedMessage, reason: DequeueReason) {
        st.dequeued_total += 1;
        if let Some(key) = &self.settings.last_value_key
            && let Some(v) = last_value_of(&e.message, key)
            && st.last_value.get(&v) == Some(&e.id)
        {
            st.last_value.remove(&v);
        }
        for o in &st.observers {
            o.dequeued(self, e, reason);
        }
        if let Some(b) = self.broker.upgrade() {
            b.memory_sub(e.message.memory_size());
        }
    }

    fn pop_ready(&self, st: &mut QueueState) -> Option<QueuedMessage> {
        let e = st.ready.pop_front()?;
        st.ready_bytes -= e.message.body_size();
        Some(e)
    }

    /// Delivers ready messages to consumers with credit, round robin.
    pub fn dispatch(self: &Arc<Self>) {
        let now = self.now_ms();
        let mut left = Leftovers::default();
        {
            let mut st = self.state.lock();
            self.dispatch_locked(&mut st, now, &mut left);
        }
        self.handle_leftovers(left);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState, now_ms: u64, left: &mut Leftovers) {
        if st.consumers.is_empty() {
            return;
        }
        'messages: while st.ready.len > 0 {
            let n = st.consumers.len();
            for i in 0..n {
                let idx = (st.next_consumer + i) % n;
                let consumer = st.consumers[idx].clone();
                let link = &consumer.link;
                if link.out.is_congested() {
                    link.out.wait_for_drain(self);
                    continue;
                }
                let ls = link.lock();
                if !ls.has_credit(Some(&consumer), consumer.no_ack) {
                    continue;
                }
                let Some(entry) = self.pop_ready(st) else {
                    break 'messages;
                };
                if entry.expires_at_ms < now_ms {
                    drop(ls);
                    self.record_dequeue(st, &entry, DequeueReason::Expired);
                    left.dead.push((entry, DequeueReason::Expired));
                    continue 'messages;
                }
                self.hand_over(st, ls, link, Some(&consumer), consumer.no_ack, entry);
                st.next_consumer = (idx + 1) % n;
                continue 'messages;
            }
            break;
        }
    }

    /// Sends `entry` on `link` (basic.deliver to `consumer`, or basic.get-ok) and either settles
    /// it (no-ack) or records it as unacked on the channel.
    fn hand_over(
        self: &Arc<Self>,
        st: &mut QueueState,
        mut ls: MutexGuard<'_, LinkState>,
        link: &ChannelLink,
        consumer: Option<&Arc<Consumer>>,
        no_ack: bool,
        entry: QueuedMessage,
    ) {
        let tag = ls.next_tag();
        write_delivery(
            link,
            consumer.map(|c| c.tag.as_str()),
            tag,
            &entry,
            st.ready.len as u32,
        );
        if no_ack {
            drop(ls);
            self.record_dequeue(st, &entry, DequeueReason::Consumed);
        } else {
            st.unacked_count += 1;
            if let Some(a) = st.acquired.as_mut() {
                a.insert(entry.clone());
            }
            let unacked = Unacked {
                queue: self.clone(),
                entry,
                consumer: consumer.cloned(),
            };
            ls.track(tag, unacked);
        }
    }

    /// Drops expired messages from the head of each priority level.
    fn expire_locked(&self, st: &mut QueueState, now_ms: u64, left: &mut Leftovers) {
        if self.is_replica() {
            return;
        }
        while st.ready.front().is_some_and(|e| e.expires_at_ms <= now_ms) {
            let Some(e) = self.pop_ready(st) else { break };
            self.record_dequeue(st, &e, DequeueReason::Expired);
            left.dead.push((e, DequeueReason::Expired));
        }
    }

    /// Periodic housekeeping: expires messages. Returns true if the queue has been unused for
    /// its `x-expires` time and should be deleted.
    pub fn sweep(self: &Arc<Self>, now_ms: u64) -> bool {
        let mut left = Leftovers::default();
        let unused = {
            let mut st = self.state.lock();
            self.expire_locked(&mut st, now_ms, &mut left);
            self.settings.expires_ms.is_some_and(|e| {
                !self.is_replica()
                    && st.consumers.is_empty()
                    && now_ms.saturating_sub(st.last_used_ms) >= e
            })
        };
        self.handle_leftovers(left);
        unused
    }

    /// basic.get: takes the head message for `link`. Returns false if the queue was empty.
    pub fn get(self: &Arc<Self>, link: &ChannelLink, no_ack: bool, now_ms: u64) -> bool {
        let mut left = Leftovers::default();
        let got = {
            let mut st = self.state.lock();
            st.last_used_ms = now_ms;
            self.expire_locked(&mut st, now_ms, &mut left);
            match self.pop_ready(&mut st) {
                None => false,
                Some(entry) => {
                    let ls = link.lock();
                    self.hand_over(&mut st, ls, link, None, no_ack, entry);
                    true
                }
            }
        };
        self.handle_leftovers(left);
        got
    }

    /// Settles deliveries from this queue that were acked (or nacked without requeue, with
    /// `reason` Rejected), then delivers more if credit was freed.
    pub fn settle(self: &Arc<Self>, entries: Vec<QueuedMessage>, reason: DequeueReason) {
        let mut left = Leftovers::default();
        {
            let mut st = self.state.lock();
            for e in entries {
                st.unacked_count -= 1;
                if let Some(a) = st.acquired.as_mut() {
                    a.remove(e.id);
                }
                if self.is_deleted() {
                    self.record_dequeue(&mut st, &e, DequeueReason::Deleted);
                    continue;
                }
                self.record_dequeue(&mut st, &e, reason);
                if reason == DequeueReason::Rejected {
                    left.dead.push((e, reason));
                }
            }
        }
        self.handle_leftovers(left);
    }

    /// Puts deliveries back, marked redelivered, in their original places.
    pub fn requeue(self: &Arc<Self>, entries: Vec<QueuedMessage>) {
        let now = self.now_ms();
        let mut left = Leftovers::default();
        {
            let mut st = self.state.lock();
            for mut e in entries {
                st.unacked_count -= 1;
                if let Some(a) = st.acquired.as_mut() {
                    a.remove(e.id);
                }
                if self.is_deleted() {
                    self.record_dequeue(&mut st, &e, DequeueReason::Deleted);
                    continue;
                }
                e.redelivered = true;
                st.ready_bytes += e.message.body_size();
                st.ready.insert_sorted(e);
            }
            self.dispatch_locked(&mut st, now, &mut left);
        }
        self.handle_leftovers(left);
    }

    /// Adds a consumer. Refuses an exclusive consumer on a queue with consumers, and any
    /// consumer on a queue with an exclusive one (403, as RabbitMQ).
    /// `on_added` runs under the queue's lock once the consumer is in, before any delivery to
    /// it, so consume-ok precedes the first basic.deliver.
    pub fn add_consumer(
        self: &Arc<Self>,
        consumer: Arc<Consumer>,
        now_ms: u64,
        on_added: impl FnOnce(),
    ) -> Result<(), AmqpError> {
        {
            let mut st = self.state.lock();
            if st.consumers.iter().any(|c| c.exclusive) {
                return Err(AmqpError::access_refused(format!(
                    "queue '{}' in vhost '/' has an exclusive consumer",
                    self.name
                )));
            }
            if consumer.exclusive && !st.consumers.is_empty() {
                return Err(AmqpError::access_refused(format!(
                    "cannot obtain exclusive access to queue '{}' in vhost '/': it has consumers",
                    self.name
                )));
            }
            st.consumers.push(consumer);
            st.had_consumers = true;
            st.last_used_ms = now_ms;
            on_added();
        }
        self.dispatch();
        Ok(())
    }

    /// Removes a consumer. Returns true if the queue is auto-delete and now has none left.
    pub fn remove_consumer(&self, consumer: &Arc<Consumer>, now_ms: u64) -> bool {
        let mut st = self.state.lock();
        st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
        st.last_used_ms = now_ms;
        if st.next_consumer >= st.consumers.len() {
            st.next_consumer = 0;
        }
        self.auto_delete && st.had_consumers && st.consumers.is_empty()
    }

    /// Marks the queue used (declare, for `x-expires`).
    pub fn touch(&self, now_ms: u64) {
        self.state.lock().last_used_ms = now_ms;
    }

    /// queue.purge: drops the ready messages; returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let all = st.ready.drain();
        st.ready_bytes = 0;
        for e in &all {
            self.record_dequeue(&mut st, e, DequeueReason::Purged);
        }
        all.len() as u32
    }

    /// Marks the queue deleted, drops its messages and returns its consumers (to cancel) and
    /// how many messages it held.
    pub fn mark_deleted(&self) -> (Vec<Arc<Consumer>>, u32) {
        self.deleted.store(true, Ordering::Release);
        let mut st = self.state.lock();
        let all = st.ready.drain();
        st.ready_bytes = 0;
        for e in &all {
            self.record_dequeue(&mut st, e, DequeueReason::Deleted);
        }
        for o in std::mem::take(&mut st.observers) {
            o.queue_deleted(self);
        }
        (std::mem::take(&mut st.consumers), all.len() as u32)
    }

    fn handle_leftovers(&self, left: Leftovers) {
        if left.dead.is_empty() {
            return;
        }
        if let Some(b) = self.broker.upgrade() {
            b.dead_letter(self, left.dead);
        }
    }
}

impl QueueState {
    /// Ready messages.
    pub fn message_count(&self) -> u32 {
        self.ready.len as u32
    }
    /// Bytes of ready message bodies.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }
    /// Deliveries not yet acknowledged.
    pub fn unacked_count(&self) -> u64 {
        self.unacked_count
    }
    /// Consumers.
    pub fn consumer_count(&self) -> u32 {
        self.consumers.len() as u32
    }
    /// The consumers themselves (management listings).
    pub fn consumers(&self) -> &[Arc<Consumer>] {
        &self.consumers
    }
    /// A consumer has subscribed since the queue was created (auto-delete needs it).
    pub fn had_consumers(&self) -> bool {
        self.had_consumers
    }

    /// The highest id given so far (0 if none).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }
}

/// Writes basic.deliver (consumer) or basic.get-ok (no consumer) with the content.
fn write_delivery(
    link: &ChannelLink,
    consumer_tag: Option<&str>,
    tag: u64,
    entry: &QueuedMessage,
    message_count: u32,
) {
    let m = &entry.message;
    link.out.write(|out| {
        out.reserve(hot::delivery_size_hint(
            consumer_tag.unwrap_or(""),
            m.exchange(),
            m.routing_key(),
            m.raw_properties(),
            m.body().len(),
            link.frame_max,
        ));
        match consumer_tag {
            Some(ct) => hot::write_deliver(
                out,
                link.channel,
                ct,
                tag,
                entry.redelivered,
                m.exchange(),
                m.routing_key(),
            ),
            None => hot::write_get_ok(
                out,
                link.channel,
                tag,
                entry.redelivered,
                m.exchange(),
                m.routing_key(),
                message_count,
            ),
        }
        hot::write_content(
            out,
            link.channel,
            m.raw_properties(),
            m.body(),
            link.frame_max,
        );
    });
}

/// The last-value key's header value, as bytes of its text or integer form.
fn last_value_of(m: &Message, key: &str) -> Option<Vec<u8>> {
    let headers = fields::decode_table(m.summary().headers?)?;
    let v = fields::get(&headers, key)?;
    if let Some(s) = fields::as_str(v) {
        return Some(s.as_bytes().to_vec());
    }
    fields::as_i64(v).map(|i| i.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserDb;
    use crate::broker::QueueDeclare;
    use crate::config::BrokerConfig;
    use crate::delivery::Outbound;
    use crate::protocol::frame::split_frame;
    use amq_protocol::types::AMQPValue;

    fn broker() -> Arc<Broker> {
        Broker::new(BrokerConfig::default(), UserDb::default())
    }

    fn queue(b: &Arc<Broker>, args: &[(&str, AMQPValue)]) -> Arc<Queue> {
        let mut arguments = FieldTable::default();
        for (k, v) in args {
            arguments.insert((*k).into(), v.clone());
        }
        let d = QueueDeclare {
            name: "q".into(),
            arguments,
            ..Default::default()
        };
        b.declare_queue(1, &d).unwrap().queue
    }

    fn msg(body: &str, priority: Option<u8>) -> Message {
        let props: Vec<u8> = match priority {
            Some(p) => vec![0x08, 0x00, p],
            None => vec![0, 0],
        };
        Message::new("", "q", &props, body.as_bytes()).unwrap()
    }

    fn link(prefetch_global: u32) -> (Arc<ChannelLink>, Arc<Outbound>) {
        let out = Arc::new(Outbound::default());
        let link = Arc::new(ChannelLink::new(1, 1, out.clone(), 131_072, true, 65_536));
        link.lock().global_prefetch = prefetch_global;
        (link, out)
    }

    /// The bodies of the deliveries written to `out`, in order.
    fn delivered(out: &Outbound) -> Vec<String> {
        let bytes = out.take_for_test();
        let mut bodies = Vec::new();
        let mut at = 0;
        while let Ok(Some((f, n))) = split_frame(&bytes[at..], 0) {
            if f.frame_type == crate::protocol::FRAME_BODY {
                bodies.push(String::from_utf8(f.payload.to_vec()).unwrap());
            }
            at += n;
        }
        bodies
    }

    fn bodies_by_get(b: &Arc<Broker>, q: &Arc<Queue>) -> Vec<String> {
        let (l, out) = link(0);
        while q.get(&l, true, b.now_ms()) {}
        delivered(&out)
    }

    #[test]
    fn higher_priority_first_and_fifo_within_a_level() {
        let b = broker();
        let q = queue(&b, &[("x-max-priority", AMQPValue::LongInt(5))]);
        for (body, p) in [("a", 1), ("b", 5), ("c", 1), ("d", 9), ("e", 0)] {
            q.enqueue(msg(body, Some(p)), 0);
        }
        // 9 counts as the maximum, 5.
        assert_eq!(bodies_by_get(&b, &q), ["b", "d", "a", "c", "e"]);
    }

    #[test]
    fn requeued_messages_return_to_their_place() {
        let b = broker();
        let q = queue(&b, &[]);
        for body in ["a", "b", "c"] {
            q.enqueue(msg(body, None), 0);
        }
        let (l, out) = link(0);
        assert!(q.get(&l, false, 0));
        assert!(q.get(&l, false, 0));
        assert_eq!(delivered(&out), ["a", "b"]);
        let mut settled = Vec::new();
        l.lock().settle(0, true, &mut settled).unwrap();
        q.requeue(settled.into_iter().map(|u| u.entry).collect());
        assert_eq!(bodies_by_get(&b, &q), ["a", "b", "c"]);
        assert_eq!(q.lock().unacked_count(), 0);
    }

    #[test]
    fn drop_head_keeps_the_newest() {
        let b = broker();
        let q = queue(&b, &[("x-max-length", AMQPValue::LongInt(2))]);
        for body in ["a", "b", "c"] {
            assert_eq!(q.enqueue(msg(body, None), 0), EnqueueOutcome::Accepted);
        }
        assert_eq!(bodies_by_get(&b, &q), ["b", "c"]);
    }

    #[test]
    fn reject_publish_refuses_at_the_limit() {
        let b = broker();
        let q = queue(&b, &[("qpid.max_count", AMQPValue::LongInt(2))]);
        assert_eq!(q.enqueue(msg("a", None), 0), EnqueueOutcome::Accepted);
        assert_eq!(q.enqueue(msg("b", None), 0), EnqueueOutcome::Accepted);
        assert_eq!(q.enqueue(msg("c", None), 0), EnqueueOutcome::Rejected);
        assert_eq!(bodies_by_get(&b, &q), ["a", "b"]);
    }

    #[test]
    fn last_value_replaces_by_key() {
        let b = broker();
        let q = queue(
            &b,
            &[(
                "qpid.last_value_queue_key",
                AMQPValue::LongString("k".into()),
            )],
        );
        let with_key = |body: &str, k: &str| {
            let mut t = FieldTable::default();
            t.insert("k".into(), AMQPValue::LongString(k.into()));
            let props = amq_protocol::protocol::BasicProperties::default().with_headers(t);
            let ctx = amq_protocol::protocol::basic::gen_properties(&props)(
                amq_protocol::frame::WriteContext::from(Vec::new()),
            )
            .unwrap();
            Message::new("", "q", &ctx.into_inner().0, body.as_bytes()).unwrap()
        };
        q.enqueue(with_key("a1", "a"), 0);
        q.enqueue(with_key("b1", "b"), 0);
        q.enqueue(with_key("a2", "a"), 0);
        assert_eq!(bodies_by_get(&b, &q), ["b1", "a2"]);
        assert_eq!(q.lock().dequeued_total, 3);
    }

    #[test]
    fn ttl_expires_at_the_head_and_zero_means_now_or_never() {
        let b = broker();
        let q = queue(&b, &[("x-message-ttl", AMQPValue::LongInt(100))]);
        q.enqueue(msg("a", None), 1000);
        assert!(!q.sweep(1099));
        assert_eq!(q.lock().message_count(), 1);
        q.sweep(1100);
        assert_eq!(q.lock().message_count(), 0);
        let q0 = {
            let mut a = FieldTable::default();
            a.insert("x-message-ttl".into(), AMQPValue::LongInt(0));
            let d = QueueDeclare {
                name: "q0".into(),
                arguments: a,
                ..Default::default()
            };
            b.declare_queue(1, &d).unwrap().queue
        };
        q0.enqueue(msg("gone", None), 5);
        assert_eq!(q0.lock().message_count(), 0);
    }

    #[test]
    fn prefetch_limits_deliveries_and_acks_release_more() {
        let b = broker();
        let q = queue(&b, &[]);
        let (l, out) = link(0);
        let c = Arc::new(Consumer::new(
            "c".into(),
            l.clone(),
            q.clone(),
            false,
            false,
            2,
            FieldTable::default(),
        ));
        q.add_consumer(c, 0, || {}).unwrap();
        for body in ["a", "b", "c", "d"] {
            q.enqueue(msg(body, None), 0);
        }
        assert_eq!(delivered(&out), ["a", "b"]);
        let mut settled = Vec::new();
        l.lock().settle(1, false, &mut settled).unwrap();
        q.settle(
            settled.into_iter().map(|u| u.entry).collect(),
            DequeueReason::Consumed,
        );
        q.dispatch();
        assert_eq!(delivered(&out), ["c"]);
        assert_eq!(q.lock().message_count(), 1);
    }

    #[test]
    fn memory_accounting_returns_to_zero() {
        let b = broker();
        let q = queue(&b, &[]);
        for body in ["a", "b", "c"] {
            q.enqueue(msg(body, None), 0);
        }
        assert!(b.message_memory_bytes() > 0);
        let (l, _out) = link(0);
        assert!(q.get(&l, false, 0));
        q.purge();
        assert!(
            b.message_memory_bytes() > 0,
            "the unacked message still counts"
        );
        let mut settled = Vec::new();
        l.lock().settle(1, false, &mut settled).unwrap();
        q.settle(
            settled.into_iter().map(|u| u.entry).collect(),
            DequeueReason::Consumed,
        );
        assert_eq!(b.message_memory_bytes(), 0);
    }

    fn ha_broker() -> Arc<Broker> {
        let mut config = BrokerConfig::default();
        config.ha.queue_replication = true;
        Broker::new(config, UserDb::default())
    }

    #[test]
    fn held_ids_include_acquired_messages_on_an_ha_broker() {
        let b = ha_broker();
        let q = queue(&b, &[]);
        for body in ["a", "b", "c", "d"] {
            q.enqueue(msg(body, None), 0);
        }
        let (l, _out) = link(0);
        assert!(q.get(&l, false, 0));
        assert_eq!(q.held_ids().ranges(), [(1, 4)]);
        let mut settled = Vec::new();
        l.lock().settle(1, false, &mut settled).unwrap();
        q.settle(
            settled.into_iter().map(|u| u.entry).collect(),
            DequeueReason::Consumed,
        );
        assert_eq!(q.held_ids().ranges(), [(2, 4)]);
    }

    #[test]
    fn applied_messages_keep_the_original_ids_and_duplicates_are_dropped() {
        let b = broker();
        let q = queue(&b, &[]);
        q.set_replica_of(Some("'q' on elsewhere".into()));
        assert!(q.apply_enqueue(5, msg("five", None), false));
        assert!(q.apply_enqueue(9, msg("nine", None), false));
        assert!(q.apply_enqueue(7, msg("seven", None), true));
        assert!(!q.apply_enqueue(7, msg("again", None), false));
        assert_eq!(q.held_ids().ranges(), [(5, 5), (7, 7), (9, 9)]);
        assert_eq!(q.lock().last_id(), 9);
        assert_eq!(q.apply_dequeue(&IdRanges::from_sorted([5, 6, 9])), 2);
        assert!(q.replica_refusal("get from").is_err());
        let before = q.incarnation();
        q.set_replica_of(None);
        assert_ne!(q.incarnation(), before, "detach makes a new incarnation");
        assert_eq!(bodies_by_get(&b, &q), ["seven"]);
        // The queue's own ids continue above the replicated ones.
        q.enqueue(msg("local", None), 0);
        assert_eq!(q.held_ids().ranges(), [(10, 10)]);
    }

    #[test]
    fn a_replica_does_not_expire_its_messages() {
        let b = broker();
        let q = queue(&b, &[("x-message-ttl", AMQPValue::LongInt(10))]);
        q.set_replica_of(Some("x".into()));
        q.apply_enqueue(1, msg("a", None), false);
        assert!(!q.sweep(1_000_000));
        assert_eq!(q.lock().message_count(), 1);
        // Detached, its messages expire again (counted from the detach).
        q.set_replica_of(None);
        q.sweep(b.now_ms() + 11);
        assert_eq!(q.lock().message_count(), 0);
    }

    #[test]
    fn acquired_keeps_order_and_compacts_holes() {
        let m = |id| QueuedMessage {
            id,
            message: msg("x", None),
            redelivered: false,
            expires_at_ms: u64::MAX,
        };
        let mut a = Acquired::default();
        for id in 1..=200 {
            a.insert(m(id));
        }
        a.insert(m(0));
        // 1 stays unacked while the rest are acked: holes are compacted.
        for id in 2..=200 {
            a.remove(id);
        }
        a.remove(0);
        assert_eq!(a.values().map(|e| e.id).collect::<Vec<_>>(), [1]);
        assert!(a.entries.len() <= 65, "{} entries kept", a.entries.len());
        a.remove(1);
        assert!(a.entries.is_empty());
        assert_eq!(a.live, 0);
    }
}
