//! The durable store (`docs/design/store.md`): a configuration journal, and one message
//! journal shared by every durable queue, written by one thread with group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde_json::{Value, json};

use super::journal::{self, End, HEADER_LEN, RECORD_OVERHEAD, Reader};
use crate::broker::{
    Broker, ExchangeDeclare, QueueDeclare, REPLICATION_CONNECTION, is_predeclared_exchange,
};
use crate::confirms::{Hold, PendingConfirm};
use crate::message::Message;
use crate::mgmt::Event;
use crate::queue::{DequeueReason, Queue, QueueObserver, QueuedMessage};
use crate::replication::cluster::{describe_binding, describe_exchange, describe_queue};

/// Message record: enqueue.
const REC_ENQUEUE: u8 = 1;
/// Message record: dequeue.
const REC_DEQUEUE: u8 = 2;
/// Message record: the next id of durable queues (pairs of key and next id).
const REC_NEXT_IDS: u8 = 3;
/// How often the writer records the next ids of queues that gave ids since the last time.
const NEXT_IDS_INTERVAL: Duration = Duration::from_secs(1);
/// Added at recovery to the highest id known of a queue: covers ids given (to transient
/// messages) after the last next-ids record, at most one interval's worth.
pub const RECOVERY_ID_MARGIN: u64 = 1 << 32;
/// Configuration records.
const REC_QUEUE: u8 = 16;
const REC_QUEUE_DELETE: u8 = 17;
const REC_EXCHANGE: u8 = 18;
const REC_EXCHANGE_DELETE: u8 = 19;
const REC_BIND: u8 = 20;
const REC_UNBIND: u8 = 21;

/// Added to a segment's name while it is being created.
const TMP_SUFFIX: &str = ".tmp";
/// The configuration journal's name.
pub const CONFIG_FILE: &str = "config.jnl";
/// How often a failed write is retried.
const RETRY: Duration = Duration::from_millis(100);
/// The configuration journal is compacted past this size (and twice its last snapshot).
const CONFIG_COMPACT_BYTES: u64 = 1 << 20;
/// A segment (older than the one before the current) whose live enqueue records take at most
/// 1/`COMPACT_FRACTION` of `--store-segment-size` has its ready messages written again to the
/// current segment, so that it can go (section 4, "Compaction").
const COMPACT_FRACTION: u64 = 4;
/// How often the writer looks for such a segment...
const COMPACT_EVERY: Duration = Duration::from_millis(100);
/// ...that has been that sparse for this long (a segment a consumer is still working through
/// empties by itself, and copying its last messages would be wasted writes)...
const COMPACT_AGE: Duration = Duration::from_secs(2);
/// ...and how long it leaves one it could not empty (its unacknowledged messages stay).
const COMPACT_RETRY: Duration = Duration::from_secs(5);

/// What the operator chose (`--store-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// `--store-segment-size`.
    pub segment_size: u64,
    /// `--store-skip-damaged`: log damage and go on instead of refusing to start.
    pub skip_damaged: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_size: 16 << 20,
            skip_damaged: false,
        }
    }
}

/// The segment file of number `n`.
pub fn segment_name(n: u64) -> String {
    format!("msg-{n:016x}.jnl")
}

fn segment_number(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("msg-")?.strip_suffix(".jnl")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The store of one broker.
pub struct Store {
    dir: PathBuf,
    shared: Arc<Shared>,
    config: Mutex<ConfigJournal>,
    next_key: AtomicU64,
    queues: Mutex<HashMap<String, u64>>,
    exchanges: Mutex<HashSet<String>>,
    /// The records of the queues recovered at start, until each one's first change: their
    /// replica definition and origin stay stored until the HA module takes them up.
    recovered: Mutex<HashMap<String, Value>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wall-clock milliseconds at the broker's time 0 (expiry times are kept in wall-clock).
    wall_base_ms: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

struct ConfigJournal {
    file: File,
    len: u64,
    snapshot_len: u64,
}

/// A durable queue and its journal, as the writer holds them.
type DurableQueue = (Weak<Queue>, Weak<QueueJournal>);

/// What the message writer shares with the queues' observers.
struct Shared {
    /// The durable queues by store key, with their journals (next-ids records, compaction).
    durable: Mutex<HashMap<u64, DurableQueue>>,
    dir: PathBuf,
    segment_size: u64,
    pending: Mutex<Pending>,
    wake: Condvar,
    failed: AtomicBool,
    stop: AtomicBool,
}

#[derive(Default)]
struct Pending {
    /// Records to write, by segment, in order.
    chunks: Vec<(u64, Vec<u8>)>,
    /// Confirms released once the records taken with them are on disk.
    holds: Vec<Hold>,
    /// Told once the records buffered before them are on disk.
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// A round is being written; `round_waiters` are told when it is on disk.
    in_flight: bool,
    round_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The segment new records go to, and its size with them.
    segment: u64,
    segment_len: u64,
    /// Per segment, the enqueue records whose message is still queued, and their bytes.
    live: BTreeMap<u64, u64>,
    live_bytes: HashMap<u64, u64>,
    /// Per segment, the later segments holding dequeue records of its enqueues: while it
    /// exists, they are needed (a dequeue record is what keeps its message from coming back).
    dependents: HashMap<u64, BTreeSet<u64>>,
    /// Per segment, the older segments whose enqueue records of some messages its compaction
    /// copies replace: while any of those exists, it is kept (not deleted, its dequeue records
    /// not carried forward), or the older record would be read without the newer one.
    copies_from: HashMap<u64, BTreeSet<u64>>,
    /// Per segment, how many older segments still exist that its dequeue records refer to.
    needed_by: HashMap<u64, u64>,
    /// Buffers of written rounds, emptied, for the next rounds: a fresh buffer per round
    /// costs its growth (copies) and page faults at every round.
    spare: Vec<Vec<u8>>,
}

/// How many emptied round buffers are kept, and the largest kept.
const SPARE_BUFFERS: usize = 4;
const SPARE_BUFFER_MAX: usize = 8 << 20;

impl Pending {
    /// Keeps the written round's buffers (a few, not too large) for the next rounds.
    fn recycle(&mut self, chunks: Vec<(u64, Vec<u8>)>) {
        for (_, mut b) in chunks {
            if self.spare.len() < SPARE_BUFFERS && b.capacity() <= SPARE_BUFFER_MAX {
                b.clear();
                self.spare.push(b);
            }
        }
    }

    /// One more live enqueue record of `len` bytes in `seg`.
    fn add_live(&mut self, seg: u64, len: usize) {
        *self.live.entry(seg).or_default() += 1;
        *self.live_bytes.entry(seg).or_default() += len as u64;
    }

    /// One live enqueue record of `len` bytes less in `seg`.
    fn sub_live(&mut self, seg: u64, len: usize) {
        if let Some(n) = self.live.get_mut(&seg) {
            *n = n.saturating_sub(1);
        }
        if let Some(b) = self.live_bytes.get_mut(&seg) {
            *b = b.saturating_sub(len as u64);
        }
    }

    /// True while `seg` holds compaction copies of records in a segment that still exists.
    fn holds_needed_copies(&self, seg: u64) -> bool {
        self.copies_from
            .get(&seg)
            .is_some_and(|from| from.iter().any(|s| self.live.contains_key(s)))
    }

    /// A dequeue record in segment `at` for an enqueue in segment `of`.
    fn depends(&mut self, of: u64, at: u64) {
        if of < at && self.dependents.entry(of).or_default().insert(at) {
            *self.needed_by.entry(at).or_default() += 1;
        }
    }

    /// The segment a record of `len` bytes goes to (starting a new one when the current one
    /// is full), with room for it in `chunks`.
    fn buffer_for(&mut self, len: usize, segment_size: u64) -> (u64, &mut Vec<u8>) {
        if self.segment_len >= segment_size {
            self.segment += 1;
            self.segment_len = HEADER_LEN as u64;
            self.live.insert(self.segment, 0);
        }
        self.segment_len += len as u64;
        let seg = self.segment;
        if self.chunks.last().is_none_or(|(s, _)| *s != seg) {
            let buf = match self.spare.pop() {
                Some(mut b) => {
                    b.reserve(len);
                    b
                }
                None => Vec::with_capacity(len.max(64 * 1024)),
            };
            self.chunks.push((seg, buf));
        }
        let chunk = &mut self.chunks.last_mut().expect("just pushed").1;
        (seg, chunk)
    }
}

impl Shared {
    /// Appends one record; returns its segment.
    fn append(&self, record_len: usize, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) -> u64 {
        self.push(
            record_len,
            |out| journal::append_record(out, kind, payload),
            |_, _| {},
        )
    }

    /// Appends `len` bytes written by `write` to the current segment, then runs `then` with
    /// that segment under the same lock (live counts, holds, dependencies), and wakes the
    /// writer if it had nothing to do. Returns the segment.
    fn push(
        &self,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
        then: impl FnOnce(&mut Pending, u64),
    ) -> u64 {
        let mut p = self.pending.lock();
        let was_empty = p.chunks.is_empty();
        let (seg, out) = p.buffer_for(len, self.segment_size);
        write(out);
        then(&mut p, seg);
        drop(p);
        if was_empty {
            self.wake.notify_one();
        }
        seg
    }
}

impl Store {
    /// Opens (or creates) the store under `<data_dir>/store`, recovers what it holds into
    /// `broker` (exchanges, queues, bindings, messages), and starts the writer. Refuses
    /// damage (unless `skip_damaged`) and newer formats.
    pub fn open(
        broker: &Arc<Broker>,
        data_dir: &Path,
        options: StoreOptions,
    ) -> Result<Arc<Store>, String> {
        let started = Instant::now();
        let dir = data_dir.join("store");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let max_record = broker.config.max_message_size as usize + 64 * 1024;
        let model = read_config(&dir, max_record, options.skip_damaged)?;
        let (mut messages, last_segment) =
            read_messages(&dir, max_record, options.skip_damaged, &model)?;
        let wall_now = wall_ms();
        let wall_base_ms = wall_now.saturating_sub(broker.now_ms());
        let shared = Arc::new(Shared {
            durable: Mutex::new(HashMap::new()),
            dir: dir.clone(),
            segment_size: options.segment_size.max(64 * 1024),
            pending: Mutex::new(Pending {
                segment: last_segment + 1,
                segment_len: HEADER_LEN as u64,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        // Every old segment is there from the start; the writer deletes those left empty.
        {
            let mut p = shared.pending.lock();
            for seg in messages.segments.iter().copied() {
                p.live.insert(seg, 0);
            }
            for (&of, ats) in &messages.dependents {
                for &at in ats {
                    p.depends(of, at);
                }
            }
            p.copies_from = std::mem::take(&mut messages.copies_from);
            p.live.insert(last_segment + 1, 0);
        }
        let mut config = open_config_file(&dir)?;
        // Recreate the configuration, then rewrite the journal as a snapshot of it.
        let store = Arc::new(Store {
            dir: dir.clone(),
            shared: shared.clone(),
            config: Mutex::new(ConfigJournal {
                file: config.try_clone().map_err(|e| e.to_string())?,
                len: 0,
                snapshot_len: 0,
            }),
            next_key: AtomicU64::new(model.next_key),
            queues: Mutex::new(HashMap::new()),
            exchanges: Mutex::new(HashSet::new()),
            recovered: Mutex::new(HashMap::new()),
            writer: Mutex::new(None),
            wall_base_ms,
        });
        let counts = store.recreate(broker, &model, messages, wall_now)?;
        let snapshot = store.snapshot(broker);
        write_config_snapshot(&dir, &snapshot)?;
        config = OpenOptions::new()
            .append(true)
            .open(dir.join(CONFIG_FILE))
            .map_err(|e| format!("cannot open {}: {e}", dir.join(CONFIG_FILE).display()))?;
        *store.config.lock() = ConfigJournal {
            file: config,
            len: snapshot.len() as u64,
            snapshot_len: snapshot.len() as u64,
        };
        create_segment(&dir, last_segment + 1)
            .map_err(|e| format!("cannot create a segment in {}: {e}", dir.display()))?;
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("qpidd-store".into())
            .spawn(move || write_loop(&writer_shared, last_segment + 1))
            .map_err(|e| format!("cannot start the store writer: {e}"))?;
        *store.writer.lock() = Some(handle);
        tracing::info!(target: "Store", notice = true,
            "Store: recovered {} queues, {} exchanges, {} bindings, {} messages from {} in {} ms",
            counts.0, counts.1, counts.2, counts.3, dir.display(), started.elapsed().as_millis());
        Ok(store)
    }

    /// True while the disk refuses writes: persistent publishes to durable queues are nacks.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// A receiver told once every record appended so far is on disk, or `None` when nothing
    /// is waiting to be written (a replica acknowledges what it applied only after that).
    pub fn synced(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let mut p = self.shared.pending.lock();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !p.chunks.is_empty() {
            p.waiters.push(tx);
        } else if p.in_flight {
            p.round_waiters.push(tx);
        } else {
            return None;
        }
        Some(rx)
    }

    /// Writes what is buffered, waits for it, and stops the writer (clean shutdown).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }

    /// One row per durable queue: what the store holds of it (`queue`, `incarnation`,
    /// `lastId`: the highest id it gave, `messages`), for `qpid-ha query`.
    pub fn rows(&self, broker: &Broker) -> Vec<Value> {
        let mut names: Vec<String> = self.queues.lock().keys().cloned().collect();
        names.sort();
        names
            .iter()
            .filter_map(|n| broker.queue(n))
            .map(|q| {
                json!({
                    "queue": q.name,
                    "incarnation": q.incarnation().to_string(),
                    "lastId": q.next_id().saturating_sub(1),
                    "messages": q.lock().message_count(),
                })
            })
            .collect()
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A configuration change (called under the broker's configuration lock): durable objects
    /// are recorded, synced before the caller answers.
    pub fn config_event(&self, broker: &Broker, event: &Event<'_>) {
        let record = match event {
            Event::QueueDeclare(q) if q.durable && !q.exclusive => {
                let key = self.next_key.fetch_add(1, Ordering::Relaxed);
                self.queues.lock().insert(q.name.clone(), key);
                if let Some(queue) = broker.queue(&q.name) {
                    self.attach(&queue, key);
                }
                self.recovered.lock().remove(&q.name);
                Some((REC_QUEUE, self.describe(broker, q, key)))
            }
            Event::QueueDelete(name) => self.queues.lock().remove(*name).map(|key| {
                self.shared.durable.lock().remove(&key);
                (REC_QUEUE_DELETE, json!({ "name": name, "key": key }))
            }),
            Event::ExchangeDeclare(e) if e.durable => {
                self.exchanges.lock().insert(e.name.clone());
                Some((REC_EXCHANGE, describe_exchange(e)))
            }
            Event::ExchangeDelete(name) => self
                .exchanges
                .lock()
                .remove(*name)
                .then(|| (REC_EXCHANGE_DELETE, json!({ "name": name }))),
            Event::Bind(b) | Event::Unbind(b) if self.binding_is_durable(b.exchange, b.queue) => {
                let kind = if matches!(event, Event::Bind(_)) {
                    REC_BIND
                } else {
                    REC_UNBIND
                };
                Some((
                    kind,
                    describe_binding(b.exchange, b.queue, b.key, b.arguments),
                ))
            }
            _ => None,
        };
        if let Some((kind, body)) = record {
            self.write_config(broker, kind, &body);
        }
    }

    /// A durable queue's replica definition or origin changed: recorded again.
    pub fn queue_changed(&self, broker: &Broker, q: &Queue) {
        self.recovered.lock().remove(&q.name);
        let key = self.queues.lock().get(&q.name).copied();
        if let Some(key) = key {
            let d = self.describe(broker, q, key);
            self.write_config(broker, REC_QUEUE, &d);
        }
    }

    /// The stored record of a queue recovered at start, while nothing has changed it since.
    pub fn recovered_queue(&self, name: &str) -> Option<Value> {
        self.recovered.lock().get(name).cloned()
    }

    /// The queues recovered at start with a replica definition (`replica-of`) still stored.
    pub fn recovered_replicas(&self) -> Vec<(String, Value)> {
        self.recovered
            .lock()
            .iter()
            .filter_map(|(n, v)| {
                v.get("replica-of")
                    .filter(|d| d.is_object())
                    .map(|d| (n.clone(), d.clone()))
            })
            .collect()
    }

    /// How a durable queue is recorded: as described to backups, plus its key and the
    /// incarnation of the original it replicates (`origin`).
    fn describe(&self, broker: &Broker, q: &Queue, key: u64) -> Value {
        let mut d = describe_queue(broker, q);
        d["key"] = json!(key);
        let origin = broker.ha_module().and_then(|m| m.replica_origin(&q.name));
        match (origin, self.recovered.lock().get(&q.name)) {
            (Some(o), _) => d["origin"] = json!(o),
            (None, Some(r)) => {
                d["origin"] = r.get("origin").cloned().unwrap_or(Value::Null);
                if d["replica-of"].is_null() {
                    d["replica-of"] = r.get("replica-of").cloned().unwrap_or(Value::Null);
                }
            }
            (None, None) => {}
        }
        d
    }

    fn binding_is_durable(&self, exchange: &str, queue: &str) -> bool {
        self.queues.lock().contains_key(queue)
            && (is_predeclared_exchange(exchange) || self.exchanges.lock().contains(exchange))
    }

    fn write_config(&self, broker: &Broker, kind: u8, body: &Value) {
        let mut record = Vec::new();
        let text = body.to_string();
        journal::append_record(&mut record, kind, |o| o.extend_from_slice(text.as_bytes()));
        let mut c = self.config.lock();
        let r = c.file.write_all(&record).and_then(|_| c.file.sync_data());
        match r {
            Ok(()) => c.len += record.len() as u64,
            Err(e) => {
                tracing::error!(target: "Store", "Store: cannot write {}: {e}; this configuration change is not durable",
                    self.dir.join(CONFIG_FILE).display());
                return;
            }
        }
        if c.len > CONFIG_COMPACT_BYTES && c.len > 2 * c.snapshot_len {
            let snapshot = self.snapshot(broker);
            match write_config_snapshot(&self.dir, &snapshot).and_then(|_| {
                OpenOptions::new()
                    .append(true)
                    .open(self.dir.join(CONFIG_FILE))
                    .map_err(|e| e.to_string())
            }) {
                Ok(file) => {
                    *c = ConfigJournal {
                        file,
                        len: snapshot.len() as u64,
                        snapshot_len: snapshot.len() as u64,
                    };
                }
                Err(e) => {
                    tracing::warn!(target: "Store", "Store: cannot compact the configuration journal: {e}");
                    c.snapshot_len = c.len;
                }
            }
        }
    }

    /// The configuration journal as a snapshot of the durable objects now.
    fn snapshot(&self, broker: &Broker) -> Vec<u8> {
        let mut out = journal::header(journal::CONFIG_MAGIC, 0).to_vec();
        let queues = self.queues.lock().clone();
        let exchanges = self.exchanges.lock().clone();
        for e in broker.exchanges() {
            if exchanges.contains(&e.name) {
                let text = describe_exchange(&e).to_string();
                journal::append_record(&mut out, REC_EXCHANGE, |o| {
                    o.extend_from_slice(text.as_bytes())
                });
            }
        }
        for q in broker.queues() {
            if let Some(key) = queues.get(&q.name) {
                let text = self.describe(broker, &q, *key).to_string();
                journal::append_record(&mut out, REC_QUEUE, |o| {
                    o.extend_from_slice(text.as_bytes())
                });
            }
        }
        for e in broker.exchanges() {
            if !(exchanges.contains(&e.name) || is_predeclared_exchange(&e.name)) {
                continue;
            }
            for b in e.bindings() {
                if queues.contains_key(&b.queue.name) {
                    let text =
                        describe_binding(&e.name, &b.queue.name, &b.key, &b.arguments).to_string();
                    journal::append_record(&mut out, REC_BIND, |o| {
                        o.extend_from_slice(text.as_bytes())
                    });
                }
            }
        }
        out
    }

    /// Attaches the message journal to a durable queue.
    fn attach(&self, q: &Arc<Queue>, key: u64) -> Arc<QueueJournal> {
        let j = Arc::new(QueueJournal {
            shared: Arc::downgrade(&self.shared),
            key,
            wall_base_ms: self.wall_base_ms,
            state: Mutex::new(QueueJournalState::default()),
        });
        self.shared
            .durable
            .lock()
            .insert(key, (Arc::downgrade(q), Arc::downgrade(&j)));
        q.add_observer(j.clone());
        j
    }

    /// Recovery: creates the objects of `model` and restores the messages. Returns the counts
    /// (queues, exchanges, bindings, messages).
    fn recreate(
        &self,
        broker: &Arc<Broker>,
        model: &ConfigModel,
        mut messages: Recovered,
        wall_now: u64,
    ) -> Result<(usize, usize, usize, u64), String> {
        let table = |v: Option<&Value>| match v {
            Some(Value::Object(m)) => crate::mgmt::json::to_table(m).unwrap_or_default(),
            _ => Default::default(),
        };
        for (name, e) in &model.exchanges {
            let d = ExchangeDeclare {
                name: name.clone(),
                kind: e
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("direct")
                    .to_string(),
                passive: false,
                durable: true,
                auto_delete: e.get("auto_delete").and_then(Value::as_bool) == Some(true),
                internal: e.get("internal").and_then(Value::as_bool) == Some(true),
                arguments: table(e.get("arguments")),
            };
            broker
                .declare_exchange(&d)
                .map_err(|err| format!("Store: cannot recreate exchange '{name}': {}", err.text))?;
            self.exchanges.lock().insert(name.clone());
        }
        let mut restored = 0u64;
        for (name, (key, q)) in &model.queues {
            let d = QueueDeclare {
                name: name.clone(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: q.get("auto_delete").and_then(Value::as_bool) == Some(true),
                arguments: table(q.get("arguments")),
            };
            let declared = broker
                .declare_queue(REPLICATION_CONNECTION, &d)
                .map_err(|err| format!("Store: cannot recreate queue '{name}': {}", err.text))?;
            let queue = declared.queue;
            if let Some(i) = q
                .get("incarnation")
                .and_then(Value::as_str)
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
            {
                queue.set_incarnation(i);
            }
            self.queues.lock().insert(name.clone(), *key);
            self.recovered.lock().insert(name.clone(), q.clone());
            let j = self.attach(&queue, *key);
            // Above every id this queue may have given before (never reuse one): the highest
            // the journal names, plus a margin for ids given after the last record of them.
            let highest = messages.highest.get(key).copied().unwrap_or(0);
            queue.raise_next_id(highest.saturating_add(RECOVERY_ID_MARGIN));
            let Some(msgs) = messages.by_key.remove(key) else {
                continue;
            };
            let now = broker.now_ms();
            let mut placed = Vec::with_capacity(msgs.len());
            for (id, m) in msgs {
                if m.expires != 0 && m.expires <= wall_now {
                    continue;
                }
                let expires_at_ms = if m.expires == 0 {
                    u64::MAX
                } else {
                    now.saturating_add(m.expires - wall_now)
                };
                placed.push((id, m.segment, enqueue_record_len(&m.message)));
                queue.restore(id, m.message, expires_at_ms);
                restored += 1;
            }
            // Not under the queue's lock (the order everywhere else is queue, then these).
            let mut st = j.state.lock();
            let mut p = self.shared.pending.lock();
            for (id, seg, len) in placed {
                st.note(id, seg);
                p.add_live(seg, len);
            }
        }
        let mut bindings = 0;
        for b in &model.bindings {
            let (Some(e), Some(q), Some(k)) = (
                b.get("exchange").and_then(Value::as_str),
                b.get("queue").and_then(Value::as_str),
                b.get("key").and_then(Value::as_str),
            ) else {
                continue;
            };
            if broker.exchange(e).is_none() || broker.queue(q).is_none() {
                continue;
            }
            broker
                .bind(REPLICATION_CONNECTION, q, e, k, &table(b.get("arguments")))
                .map_err(|err| {
                    format!(
                        "Store: cannot recreate the binding of '{q}' to '{e}': {}",
                        err.text
                    )
                })?;
            bindings += 1;
        }
        Ok((
            model.queues.len(),
            model.exchanges.len(),
            bindings,
            restored,
        ))
    }
}

// ---- the per-queue observer ---------------------------------------------------------------

/// Writes the persistent messages of one durable queue.
struct QueueJournal {
    shared: Weak<Shared>,
    key: u64,
    wall_base_ms: u64,
    state: Mutex<QueueJournalState>,
}

impl std::fmt::Debug for QueueJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueJournal")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Where this queue's records are: ids grow within a queue, so the first id written to each
/// segment says where every later id is; ids that arrive out of order are kept one by one.
#[derive(Default)]
struct QueueJournalState {
    max_id: Option<u64>,
    bounds: VecDeque<(u64, u64)>,
    out_of_order: HashMap<u64, u64>,
    /// `bounds` is pruned when it reaches this length.
    prune_at: usize,
}

/// The shortest `bounds` that is pruned.
const BOUNDS_PRUNE_MIN: usize = 64;

impl QueueJournalState {
    /// Drops the bounds of segments that no longer exist (every persistent message in a
    /// deleted segment was dequeued, so none of their ids is looked up again), keeping the
    /// newest. Done when the list has doubled since the last time, so it costs O(1) a message
    /// and the list stays within twice the segments on disk (a queue whose oldest message
    /// nobody consumes would otherwise keep an entry for every segment written since).
    fn prune_if_due(&mut self, exists: impl Fn(u64) -> bool) {
        if self.bounds.len() < self.prune_at.max(BOUNDS_PRUNE_MIN) {
            return;
        }
        let newest = self.bounds.back().copied();
        self.bounds.retain(|b| exists(b.1) || Some(*b) == newest);
        self.prune_at = 2 * self.bounds.len();
    }

    fn note(&mut self, id: u64, segment: u64) {
        if self.max_id.is_none_or(|m| id > m) {
            self.max_id = Some(id);
            if self.bounds.back().is_none_or(|&(_, s)| s != segment) {
                self.bounds.push_back((id, segment));
            }
        } else {
            self.out_of_order.insert(id, segment);
        }
    }

    /// The segment of `id`'s enqueue record, forgotten if it was kept one by one (a dequeue
    /// looks it up once).
    fn segment_of(&mut self, id: u64) -> Option<u64> {
        if let Some(s) = self.out_of_order.remove(&id) {
            return Some(s);
        }
        self.peek(id)
    }

    /// The segment of `id`'s enqueue record.
    fn peek(&self, id: u64) -> Option<u64> {
        if let Some(&s) = self.out_of_order.get(&id) {
            return Some(s);
        }
        let at = self.bounds.partition_point(|&(first, _)| first <= id);
        self.bounds.get(at.checked_sub(1)?).map(|&(_, s)| s)
    }

    /// The id ranges `lo..hi` that may have records in `segment`: those of its bounds, and
    /// one per id kept one by one there.
    fn ranges_in(&self, segment: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .bounds
            .iter()
            .enumerate()
            .filter(|(_, b)| b.1 == segment)
            .map(|(i, b)| (b.0, self.bounds.get(i + 1).map_or(u64::MAX, |n| n.0)))
            .collect();
        out.extend(
            self.out_of_order
                .iter()
                .filter(|&(_, &s)| s == segment)
                .map(|(&id, _)| (id, id + 1)),
        );
        out
    }
}

/// The length of a message's enqueue record.
fn enqueue_record_len(message: &Message) -> usize {
    RECORD_OVERHEAD + 1 + 30 + message.layout().3.len()
}

impl QueueJournal {
    /// Writes the enqueue record of `entry` (section 2).
    fn enqueue_record<'a>(&'a self, entry: &'a QueuedMessage) -> impl FnOnce(&mut Vec<u8>) + 'a {
        move |out| {
            let expires = if entry.expires_at_ms == u64::MAX {
                0
            } else {
                self.wall_base_ms.saturating_add(entry.expires_at_ms)
            };
            let (exchange_len, routing_key_len, properties_len, data) = entry.message.layout();
            journal::append_record(out, REC_ENQUEUE, |o| {
                o.extend_from_slice(&self.key.to_le_bytes());
                o.extend_from_slice(&entry.id.to_le_bytes());
                o.extend_from_slice(&expires.to_le_bytes());
                o.push(exchange_len);
                o.push(routing_key_len);
                o.extend_from_slice(&properties_len.to_le_bytes());
                o.extend_from_slice(data);
            })
        }
    }

    /// Compaction: writes the enqueue record of every ready persistent message of `queue`
    /// whose record is in segment `from` again, to the current segment, under the queue's lock
    /// (so no dequeue of it can come between), and counts it there from now on. The current
    /// segment is kept while `from` exists (at recovery the newer record of an id replaces the
    /// older one, and the older one must never be read without it). Returns how many moved.
    fn relocate(&self, queue: &Queue, shared: &Shared, from: u64) -> usize {
        let ranges = self.state.lock().ranges_in(from);
        let mut moved = 0;
        for (lo, hi) in ranges {
            queue.for_each_ready_in(lo, hi, |entry| {
                if !entry.message.persistent() {
                    return;
                }
                let mut st = self.state.lock();
                if st.peek(entry.id) != Some(from) {
                    return;
                }
                let len = enqueue_record_len(&entry.message);
                let to = shared.push(len, self.enqueue_record(entry), |p, to| {
                    p.sub_live(from, len);
                    p.add_live(to, len);
                    if from < to {
                        p.copies_from.entry(to).or_default().insert(from);
                    }
                });
                st.out_of_order.insert(entry.id, to);
                moved += 1;
            });
        }
        moved
    }
}

impl QueueObserver for QueueJournal {
    fn enqueued(&self, _queue: &Queue, entry: &QueuedMessage, confirm: Option<PendingConfirm<'_>>) {
        if !entry.message.persistent() {
            return;
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let record_len = enqueue_record_len(&entry.message);
        let seg = shared.push(record_len, self.enqueue_record(entry), |p, seg| {
            p.add_live(seg, record_len);
            if let Some(c) = confirm {
                p.holds.push(c.hold());
            }
        });
        let mut st = self.state.lock();
        st.note(entry.id, seg);
        // Lock order: this queue's journal state, then the store's pending records.
        if st.bounds.len() >= st.prune_at.max(BOUNDS_PRUNE_MIN) {
            let p = shared.pending.lock();
            st.prune_if_due(|seg| p.live.contains_key(&seg));
        }
    }

    fn dequeued(&self, _queue: &Queue, entry: &QueuedMessage, reason: DequeueReason) {
        if !entry.message.persistent() {
            return;
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let seg = self.state.lock().segment_of(entry.id);
        let len = enqueue_record_len(&entry.message);
        // Its enqueue's segment has one live message less; a dequeue record written in a later
        // segment is needed while that segment exists. One lock for both.
        let settle = |p: &mut Pending, at: Option<u64>| {
            if let Some(seg) = seg {
                p.sub_live(seg, len);
                if let Some(at) = at {
                    p.depends(seg, at);
                }
            }
        };
        if reason == DequeueReason::Deleted {
            // The queue's deletion record says it all.
            settle(&mut shared.pending.lock(), None);
        } else {
            let write = |out: &mut Vec<u8>| {
                journal::append_record(out, REC_DEQUEUE, |o| {
                    o.extend_from_slice(&self.key.to_le_bytes());
                    o.extend_from_slice(&entry.id.to_le_bytes());
                })
            };
            shared.push(RECORD_OVERHEAD + 1 + 16, write, |p, at| settle(p, Some(at)));
        }
    }
}

// ---- the writer ---------------------------------------------------------------------------

fn create_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    // Under a temporary name until its header is on disk: a file with a segment's name always
    // has a whole header (recovery deletes a leftover temporary file).
    let path = dir.join(segment_name(n));
    let tmp = dir.join(format!("{}{TMP_SUFFIX}", segment_name(n)));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)?;
    f.write_all(&journal::header(journal::MESSAGE_MAGIC, n))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    // Appending: after a failed write is truncated away, the next write goes to the new end
    // (a positioned handle would leave a hole there).
    OpenOptions::new().append(true).open(&path)
}

/// The writer's helper thread: creates the next segment before the writer needs it and
/// deletes reclaimed ones, so neither (a few milliseconds each, an unlink of a full segment
/// about ten) stalls a round and the confirms waiting on it.
struct FileKeeper {
    jobs: std::sync::mpsc::Sender<FileJob>,
    /// The segment being created ahead, and where its file will come.
    ahead: Option<(u64, std::sync::mpsc::Receiver<std::io::Result<File>>)>,
}

enum FileJob {
    Create(u64, std::sync::mpsc::SyncSender<std::io::Result<File>>),
    /// Deleted, then closed (the last close of an unlinked file frees its space).
    Delete(Vec<(PathBuf, Option<File>)>),
}

impl FileKeeper {
    fn start(dir: PathBuf) -> FileKeeper {
        let (jobs, rx) = std::sync::mpsc::channel::<FileJob>();
        let spawned = std::thread::Builder::new()
            .name("qpidd-store-files".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        FileJob::Create(n, done) => {
                            let _ = done.send(create_segment(&dir, n));
                        }
                        FileJob::Delete(doomed) => delete_files(doomed),
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the helper, the writer does both itself.
            tracing::warn!(target: "Store", "Store: cannot start the store's file thread: {e}");
        }
        FileKeeper { jobs, ahead: None }
    }

    /// Segment `n`, opened for appending: the one created ahead if it is that one, else
    /// created now. Asks for `n + 1` to be created ahead.
    fn segment(&mut self, dir: &Path, n: u64) -> std::io::Result<File> {
        let made = match self.ahead.take() {
            Some((m, rx)) if m == n => rx.recv().ok().and_then(|r| r.ok()),
            _ => None,
        };
        let file = match made {
            Some(f) => f,
            None => create_segment(dir, n)?,
        };
        self.prepare(n + 1);
        Ok(file)
    }

    /// Has segment `n` created ahead.
    fn prepare(&mut self, n: u64) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.jobs.send(FileJob::Create(n, tx)).is_ok() {
            self.ahead = Some((n, rx));
        }
    }

    fn delete(&self, doomed: Vec<(PathBuf, Option<File>)>) {
        if let Err(std::sync::mpsc::SendError(FileJob::Delete(doomed))) =
            self.jobs.send(FileJob::Delete(doomed))
        {
            delete_files(doomed);
        }
    }
}

/// Deletes each segment, then closes its file (the last close of an unlinked file frees its
/// space).
fn delete_files(doomed: Vec<(PathBuf, Option<File>)>) {
    for (path, file) in doomed {
        delete_segment(&path);
        drop(file);
    }
}

fn delete_segment(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(target: "Store", "Store: deleted {} (no live message)", path.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(target: "Store", "Store: cannot delete {}: {e}", path.display())
        }
    }
}

/// One round after another: take what is buffered, write it, sync, release the confirms;
/// then delete the segments left without live messages that no older one needs.
fn write_loop(shared: &Shared, first: u64) {
    let mut files: BTreeMap<u64, (File, u64)> = BTreeMap::new();
    match OpenOptions::new()
        .append(true)
        .open(shared.dir.join(segment_name(first)))
    {
        Ok(f) => {
            files.insert(first, (f, HEADER_LEN as u64));
        }
        Err(e) => {
            tracing::error!(target: "Store", "Store: cannot open {}: {e}", segment_name(first));
        }
    }
    let mut keeper = FileKeeper::start(shared.dir.clone());
    keeper.prepare(first + 1);
    let mut reported = false;
    let mut ids = NextIds::default();
    let mut doomed: Vec<u64> = Vec::new();
    let mut carried: HashSet<u64> = HashSet::new();
    let mut compactor = Compactor::default();
    loop {
        if ids.last.elapsed() >= NEXT_IDS_INTERVAL {
            ids.record(shared, false);
        }
        // Before a round (and at least each second when idle): the copies go into it, and the
        // segments they empty are found after it and deleted after the next one.
        compactor.run(shared);
        let (chunks, holds, waiters) = {
            let mut p = shared.pending.lock();
            while p.chunks.is_empty() && !shared.stop.load(Ordering::Acquire) {
                let wait = NEXT_IDS_INTERVAL.saturating_sub(ids.last.elapsed());
                if shared.wake.wait_for(&mut p, wait).timed_out() {
                    break;
                }
            }
            if p.chunks.is_empty() && !shared.stop.load(Ordering::Acquire) {
                continue; // time for a next-ids record
            }
            if p.chunks.is_empty() {
                return;
            }
            p.in_flight = true;
            (
                std::mem::take(&mut p.chunks),
                std::mem::take(&mut p.holds),
                std::mem::take(&mut p.waiters),
            )
        };
        match write_round(shared, &mut files, &mut keeper, &chunks) {
            Ok(()) => {
                if shared.failed.swap(false, Ordering::Relaxed) {
                    tracing::info!(target: "Store", notice = true, "Store: writing again; persistent publishes are accepted");
                }
                reported = false;
                crate::confirms::release_all(holds);
                let round_waiters = {
                    let mut p = shared.pending.lock();
                    p.in_flight = false;
                    p.recycle(chunks);
                    std::mem::take(&mut p.round_waiters)
                };
                for w in waiters.into_iter().chain(round_waiters) {
                    let _ = w.send(());
                }
                // Segments found empty last round go now that a full next-ids record (written
                // in this round) keeps what their records said about ids.
                delete_segments(shared, &mut files, &keeper, std::mem::take(&mut doomed));
                carry_dequeues_forward(shared, &mut carried);
                doomed = reclaim(shared);
                if !doomed.is_empty() {
                    ids.record(shared, true);
                }
            }
            Err((path, e)) => {
                if !reported {
                    tracing::error!(target: "Store", "Store: cannot write {}: {e}; persistent publishes are refused until it succeeds", path.display());
                    reported = true;
                }
                shared.failed.store(true, Ordering::Relaxed);
                for h in holds {
                    h.nack();
                }
                // Put the records back in front of anything buffered since, and retry.
                let mut p = shared.pending.lock();
                let newer = std::mem::replace(&mut p.chunks, chunks);
                p.chunks.extend(newer);
                let round_waiters = std::mem::take(&mut p.round_waiters);
                p.waiters
                    .splice(0..0, waiters.into_iter().chain(round_waiters));
                p.in_flight = false;
                drop(p);
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Writes `chunks` and syncs every file written; on failure, truncates what was written of
/// this round so the files end at a record boundary. A segment is synced before the next
/// one gets a record, so after a crash only the newest segment holding records can end in a
/// torn one (the segments after it hold only their header).
fn write_round(
    shared: &Shared,
    files: &mut BTreeMap<u64, (File, u64)>,
    keeper: &mut FileKeeper,
    chunks: &[(u64, Vec<u8>)],
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut touched = Vec::new();
    let mut result = Ok(());
    for (i, (seg, bytes)) in chunks.iter().enumerate() {
        let path = shared.dir.join(segment_name(*seg));
        if !files.contains_key(seg) {
            match keeper.segment(&shared.dir, *seg) {
                Ok(f) => {
                    files.insert(*seg, (f, HEADER_LEN as u64));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    result = Err((path, e));
                    break;
                }
            }
        }
        let (f, _) = files.get_mut(seg).expect("opened above");
        touched.push(*seg);
        let last_of_segment = chunks.get(i + 1).is_none_or(|(next, _)| next != seg);
        if let Err(e) = f.write_all(bytes).and_then(|_| {
            if last_of_segment {
                f.sync_data()
            } else {
                Ok(())
            }
        }) {
            result = Err((path, e));
            break;
        }
    }
    match result {
        Ok(()) => {
            for (seg, bytes) in chunks {
                if let Some((_, len)) = files.get_mut(seg) {
                    *len += bytes.len() as u64;
                }
            }
            Ok(())
        }
        Err(e) => {
            for seg in &touched {
                if let Some((f, len)) = files.get_mut(seg) {
                    let _ = f.set_len(*len);
                    let _ = f.sync_data();
                }
            }
            Err(e)
        }
    }
}

/// The segments that hold no live message, are not the current one, and whose dequeue records
/// no older segment still on disk needs (oldest first, so a run of them goes at once).
fn reclaim(shared: &Shared) -> Vec<u64> {
    let mut doomed = Vec::new();
    let mut guard = shared.pending.lock();
    let p = &mut *guard;
    let current = p.segment;
    let candidates: Vec<u64> = p
        .live
        .iter()
        .filter(|&(&seg, &live)| live == 0 && seg < current)
        .map(|(&seg, _)| seg)
        .collect();
    // Oldest first: deleting a segment can free the later ones that only it needed.
    for seg in candidates {
        if p.needed_by.get(&seg).copied().unwrap_or(0) > 0
            || p.holds_needed_copies(seg)
            || p.chunks.iter().any(|(s, _)| *s == seg)
        {
            continue;
        }
        p.live.remove(&seg);
        p.live_bytes.remove(&seg);
        p.needed_by.remove(&seg);
        p.copies_from.remove(&seg);
        for later in p.dependents.remove(&seg).unwrap_or_default() {
            if let Some(n) = p.needed_by.get_mut(&later) {
                *n = n.saturating_sub(1);
            }
        }
        doomed.push(seg);
    }
    doomed
}

/// The writer's next-ids records: each interval the queues that gave ids since, and a full
/// record before segments are deleted, so the highest id of every durable queue survives in
/// the journal (a recovered queue continues above it).
struct NextIds {
    last: Instant,
    written: HashMap<u64, u64>,
}

impl Default for NextIds {
    fn default() -> Self {
        NextIds {
            last: Instant::now(),
            written: HashMap::new(),
        }
    }
}

impl NextIds {
    fn record(&mut self, shared: &Shared, full: bool) {
        self.last = Instant::now();
        let queues: Vec<(u64, Arc<Queue>)> = shared
            .durable
            .lock()
            .iter()
            .filter_map(|(k, (q, _))| q.upgrade().map(|q| (*k, q)))
            .collect();
        let mut pairs = Vec::new();
        for (key, q) in queues {
            let next = q.next_id();
            if full || self.written.get(&key) != Some(&next) {
                self.written.insert(key, next);
                pairs.push((key, next));
            }
        }
        if pairs.is_empty() && !full {
            return;
        }
        shared.append(RECORD_OVERHEAD + 1 + 16 * pairs.len(), REC_NEXT_IDS, |o| {
            for (k, n) in &pairs {
                o.extend_from_slice(&k.to_le_bytes());
                o.extend_from_slice(&n.to_le_bytes());
            }
        });
    }
}

/// A segment with no live message that is kept only because its dequeue records refer to an
/// older segment still on disk (one pinned by an unconsumed message) would keep its own space,
/// and through its own enqueues the next such segment's, and so on. Its dequeue records are
/// copied to the current segment instead (each segment's once, and not the one just before
/// the current one, which usually frees itself), which moves the dependency there and lets it
/// go. A copied dequeue record of a message already gone is ignored at recovery.
fn carry_dequeues_forward(shared: &Shared, carried: &mut HashSet<u64>) {
    let stuck: Vec<u64> = {
        let p = shared.pending.lock();
        p.live
            .iter()
            .filter(|&(&seg, &live)| {
                live == 0
                    && seg + 1 < p.segment
                    && p.needed_by.get(&seg).copied().unwrap_or(0) > 0
                    && !p.holds_needed_copies(seg)
                    && !carried.contains(&seg)
                    && !p.chunks.iter().any(|(s, _)| *s == seg)
            })
            .map(|(&seg, _)| seg)
            .collect()
    };
    for seg in stuck {
        carried.insert(seg);
        let path = shared.dir.join(segment_name(seg));
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut records = Vec::new();
        let end = journal::scan(&path, &bytes, usize::MAX, |r| {
            if r.kind == REC_DEQUEUE {
                journal::append_record(&mut records, REC_DEQUEUE, |o| {
                    o.extend_from_slice(r.payload)
                });
            }
            Ok(())
        });
        if end != End::Clean {
            continue;
        }
        shared.push(
            records.len(),
            |out| out.extend_from_slice(&records),
            |p, to| {
                let older: Vec<u64> = p
                    .dependents
                    .iter()
                    .filter(|(_, later)| later.contains(&seg))
                    .map(|(&of, _)| of)
                    .collect();
                for of in older {
                    if let Some(later) = p.dependents.get_mut(&of) {
                        later.remove(&seg);
                    }
                    p.depends(of, to);
                }
                p.needed_by.remove(&seg);
            },
        );
        tracing::debug!(target: "Store", "Store: carried the dequeue records of {} forward", path.display());
    }
}

/// Compaction (section 4): a segment whose few live messages would otherwise keep it whole.
struct Compactor {
    last: Instant,
    /// Since when each segment has been sparse enough.
    sparse_since: HashMap<u64, Instant>,
    /// Segments tried, and when: one that kept unacknowledged messages is left for a while.
    tried: HashMap<u64, Instant>,
}

impl Default for Compactor {
    fn default() -> Self {
        Compactor {
            last: Instant::now(),
            sparse_since: HashMap::new(),
            tried: HashMap::new(),
        }
    }
}

impl Compactor {
    /// At most every `COMPACT_EVERY`: the segments older than the one before the current
    /// whose live records have taken at most 1/`COMPACT_FRACTION` of a segment for
    /// `COMPACT_AGE`, oldest first and
    /// about one segment's worth of records at most, have their ready messages written again
    /// to the current segment. Each is then deleted like any other segment without live
    /// messages, after a round that synced the copies (`reclaim` runs after the round that
    /// writes them, and what it finds goes after the next one).
    fn run(&mut self, shared: &Shared) {
        if self.last.elapsed() < COMPACT_EVERY {
            return;
        }
        self.last = Instant::now();
        let chosen: Vec<u64> = {
            let p = shared.pending.lock();
            self.tried.retain(|seg, _| p.live.contains_key(seg));
            // A segment kept for the copies it holds (their originals' segment is pinned by an
            // unacknowledged message) would stay anyway: copying its messages again would only
            // add one more kept segment each time.
            let sparse = |seg: u64, live: u64| {
                live > 0
                    && seg + 2 <= p.segment
                    && p.live_bytes.get(&seg).copied().unwrap_or(0) * COMPACT_FRACTION
                        <= shared.segment_size
                    && !p.holds_needed_copies(seg)
            };
            self.sparse_since
                .retain(|seg, _| p.live.get(seg).is_some_and(|&live| sparse(*seg, live)));
            let mut budget = shared.segment_size;
            let mut chosen = Vec::new();
            for (&seg, &live) in &p.live {
                if !sparse(seg, live) {
                    continue;
                }
                let bytes = p.live_bytes.get(&seg).copied().unwrap_or(0);
                if self
                    .sparse_since
                    .entry(seg)
                    .or_insert_with(Instant::now)
                    .elapsed()
                    < COMPACT_AGE
                    || self
                        .tried
                        .get(&seg)
                        .is_some_and(|t| t.elapsed() < COMPACT_RETRY)
                {
                    continue;
                }
                if bytes > budget && !chosen.is_empty() {
                    break;
                }
                budget = budget.saturating_sub(bytes);
                chosen.push(seg);
            }
            chosen
        };
        if chosen.is_empty() {
            return;
        }
        let journals: Vec<(Arc<Queue>, Arc<QueueJournal>)> = shared
            .durable
            .lock()
            .values()
            .filter_map(|(q, j)| Some((q.upgrade()?, j.upgrade()?)))
            .collect();
        for from in chosen {
            self.tried.insert(from, Instant::now());
            let moved: usize = journals
                .iter()
                .map(|(q, j)| j.relocate(q, shared, from))
                .sum();
            if moved > 0 {
                tracing::debug!(target: "Store", "Store: compaction wrote the {moved} ready messages of {} again", segment_name(from));
            }
        }
    }
}

/// Hands the segments `reclaim` found empty to the file thread.
fn delete_segments(
    shared: &Shared,
    files: &mut BTreeMap<u64, (File, u64)>,
    keeper: &FileKeeper,
    doomed: Vec<u64>,
) {
    if doomed.is_empty() {
        return;
    }
    let doomed = doomed
        .into_iter()
        .map(|seg| {
            (
                shared.dir.join(segment_name(seg)),
                files.remove(&seg).map(|(f, _)| f),
            )
        })
        .collect();
    keeper.delete(doomed);
}

// ---- recovery -----------------------------------------------------------------------------

/// The configuration as the journal says it is.
#[derive(Default)]
struct ConfigModel {
    queues: BTreeMap<String, (u64, Value)>,
    exchanges: BTreeMap<String, Value>,
    bindings: Vec<Value>,
    next_key: u64,
}

fn open_config_file(dir: &Path) -> Result<File, String> {
    let path = dir.join(CONFIG_FILE);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn write_config_snapshot(dir: &Path, snapshot: &[u8]) -> Result<(), String> {
    super::write_durably(dir, CONFIG_FILE, snapshot)
        .map_err(|e| format!("cannot write {}: {e}", dir.join(CONFIG_FILE).display()))
}

/// Reads a whole journal file into `buf` (reused from file to file: fresh pages for every
/// segment cost more than reading it), checks its header and scans it; a torn tail is cut off
/// (when `last`), damage is an error unless skipped.
fn read_file(
    path: &Path,
    buf: &mut Vec<u8>,
    magic: &[u8; 8],
    max_record: usize,
    skip_damaged: bool,
    last: bool,
    mut each: impl FnMut(journal::Record<'_>) -> Result<(), String>,
) -> Result<Option<u64>, String> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, buf))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bytes = &buf[..];
    let segment = match journal::check_header(path, bytes, magic) {
        Ok(s) => s,
        Err(d) if skip_damaged && d.what.contains("shorter") => {
            tracing::warn!(target: "Store", "Store: skipping {d} (--store-skip-damaged)");
            return Ok(None);
        }
        Err(d) => return Err(format!("Store: cannot read {d}")),
    };
    match journal::scan(path, bytes, max_record, &mut each) {
        End::Clean => {}
        End::Torn { offset, what } if last => {
            tracing::warn!(target: "Store", "Store: dropped a torn record at the end of {} (offset {offset}: {what}); its publish was never confirmed",
                path.display());
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            f.set_len(offset)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
        }
        End::Torn { offset, what } => {
            let d = journal::Damage {
                file: path.to_path_buf(),
                offset,
                what: format!("{what} (not the newest file holding records, so not a torn write)"),
            };
            if !skip_damaged {
                return Err(format!(
                    "Store: damaged record in {d}; refusing to start (--store-skip-damaged yes skips it, losing what follows in that file)"
                ));
            }
            tracing::warn!(target: "Store", "Store: damaged record in {d}; skipped (--store-skip-damaged), the rest of the file is lost");
        }
        End::Damaged(d) => {
            if !skip_damaged {
                return Err(format!(
                    "Store: damaged record in {d}; refusing to start (--store-skip-damaged yes skips it, losing what follows in that file)"
                ));
            }
            tracing::warn!(target: "Store", "Store: damaged record in {d}; skipped (--store-skip-damaged), the rest of the file is lost");
        }
    }
    Ok(Some(segment))
}

fn read_config(dir: &Path, max_record: usize, skip_damaged: bool) -> Result<ConfigModel, String> {
    let path = dir.join(CONFIG_FILE);
    let mut model = ConfigModel {
        next_key: 1,
        ..ConfigModel::default()
    };
    if !path.exists() || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(model);
    }
    read_file(
        &path,
        &mut Vec::new(),
        journal::CONFIG_MAGIC,
        max_record,
        skip_damaged,
        true,
        |r| {
            let v: Value =
                serde_json::from_slice(r.payload).map_err(|e| format!("bad JSON: {e}"))?;
            let name = || {
                v.get("name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| "a record without a name".to_string())
            };
            let same_binding = |a: &Value, b: &Value| {
                ["exchange", "queue", "key", "arguments"]
                    .iter()
                    .all(|k| a.get(k) == b.get(k))
            };
            match r.kind {
                REC_QUEUE => {
                    let key = v
                        .get("key")
                        .and_then(Value::as_u64)
                        .ok_or("a queue without a key")?;
                    model.next_key = model.next_key.max(key + 1);
                    model.queues.insert(name()?, (key, v));
                }
                REC_QUEUE_DELETE => {
                    let n = name()?;
                    model.queues.remove(&n);
                    model
                        .bindings
                        .retain(|b| b.get("queue").and_then(Value::as_str) != Some(n.as_str()));
                }
                REC_EXCHANGE => {
                    model.exchanges.insert(name()?, v);
                }
                REC_EXCHANGE_DELETE => {
                    let n = name()?;
                    model.exchanges.remove(&n);
                    model
                        .bindings
                        .retain(|b| b.get("exchange").and_then(Value::as_str) != Some(n.as_str()));
                }
                REC_BIND => {
                    if !model.bindings.iter().any(|b| same_binding(b, &v)) {
                        model.bindings.push(v);
                    }
                }
                REC_UNBIND => model.bindings.retain(|b| !same_binding(b, &v)),
                k => return Err(format!("unknown configuration record type {k}")),
            }
            Ok(())
        },
    )?;
    Ok(model)
}

struct RecoveredMessage {
    message: Message,
    expires: u64,
    segment: u64,
}

/// The live messages by queue key, in id order, and the segments seen.
#[derive(Default)]
struct Recovered {
    by_key: HashMap<u64, BTreeMap<u64, RecoveredMessage>>,
    /// Per queue key, the highest id any record names (enqueue, dequeue, next ids).
    highest: HashMap<u64, u64>,
    segments: Vec<u64>,
    /// Per segment, the later segments with dequeue records of its enqueues.
    dependents: BTreeMap<u64, BTreeSet<u64>>,
    /// Per segment, the older segments whose records of some ids its records replace.
    copies_from: HashMap<u64, BTreeSet<u64>>,
}

fn read_messages(
    dir: &Path,
    max_record: usize,
    skip_damaged: bool,
    model: &ConfigModel,
) -> Result<(Recovered, u64), String> {
    let mut numbers: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = segment_number(&name) {
            numbers.push(n);
        } else if name
            .strip_suffix(TMP_SUFFIX)
            .and_then(segment_number)
            .is_some()
        {
            // A segment whose creation a crash interrupted: it never held a record.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    numbers.sort_unstable();
    // The segments at the end that hold only their header (the next one, created ahead of
    // need): the writer syncs a segment before it writes to the next, so a torn record can
    // be at the end of the newest segment before them too.
    let mut torn_allowed_from = numbers.len().saturating_sub(1);
    while torn_allowed_from > 0
        && std::fs::metadata(dir.join(segment_name(numbers[torn_allowed_from])))
            .is_ok_and(|m| m.len() == HEADER_LEN as u64)
    {
        torn_allowed_from -= 1;
    }
    let keys: HashSet<u64> = model.queues.values().map(|(k, _)| *k).collect();
    let mut out = Recovered::default();
    let last = numbers.last().copied().unwrap_or(0);
    let mut buf = Vec::new();
    for (i, &n) in numbers.iter().enumerate() {
        let path = dir.join(segment_name(n));
        let by_key = &mut out.by_key;
        let highest = &mut out.highest;
        let dependents = &mut out.dependents;
        let copies_from = &mut out.copies_from;
        let mut saw = |key: u64, id: u64| {
            let h = highest.entry(key).or_insert(0);
            *h = (*h).max(id);
        };
        read_file(
            &path,
            &mut buf,
            journal::MESSAGE_MAGIC,
            max_record,
            skip_damaged,
            i >= torn_allowed_from,
            |r| {
                let mut rd = Reader(r.payload);
                match r.kind {
                    REC_ENQUEUE => {
                        let key = rd.u64()?;
                        let id = rd.u64()?;
                        let expires = rd.u64()?;
                        let ex_len = rd.u8()? as usize;
                        let rk_len = rd.u8()? as usize;
                        let props_len = rd.u32()? as usize;
                        if !keys.contains(&key) {
                            return Ok(());
                        }
                        saw(key, id);
                        let exchange = std::str::from_utf8(rd.take(ex_len)?)
                            .map_err(|_| "exchange name is not UTF-8")?;
                        let routing_key = std::str::from_utf8(rd.take(rk_len)?)
                            .map_err(|_| "routing key is not UTF-8")?;
                        let props = rd.take(props_len)?;
                        let message = Message::new(exchange, routing_key, props, rd.0)
                            .map_err(|e| format!("bad message properties: {e}"))?;
                        // A record written again by compaction replaces the older one; this
                        // segment is kept while that one exists.
                        if let Some(older) = by_key.entry(key).or_default().insert(
                            id,
                            RecoveredMessage {
                                message,
                                expires,
                                segment: n,
                            },
                        ) && older.segment < n
                        {
                            copies_from.entry(n).or_default().insert(older.segment);
                        }
                    }
                    REC_DEQUEUE => {
                        let key = rd.u64()?;
                        let id = rd.u64()?;
                        saw(key, id);
                        if let Some(m) = by_key.get_mut(&key)
                            && let Some(gone) = m.remove(&id)
                            && gone.segment < n
                        {
                            dependents.entry(gone.segment).or_default().insert(n);
                        }
                    }
                    REC_NEXT_IDS => {
                        while !rd.0.is_empty() {
                            let key = rd.u64()?;
                            let next = rd.u64()?;
                            saw(key, next.saturating_sub(1));
                        }
                    }
                    k => return Err(format!("unknown message record type {k}")),
                }
                Ok(())
            },
        )?;
        out.segments.push(n);
    }
    Ok((out, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_by_number_and_parse_back() {
        assert_eq!(segment_name(26), "msg-000000000000001a.jnl");
        assert_eq!(segment_number("msg-000000000000001a.jnl"), Some(26));
        assert_eq!(segment_number("msg-1a.jnl"), None);
        assert_eq!(segment_number("config.jnl"), None);
    }

    #[test]
    fn ids_map_to_their_segments_in_and_out_of_order() {
        let mut s = QueueJournalState::default();
        s.note(1, 5);
        s.note(2, 5);
        s.note(3, 6);
        s.note(10, 7);
        s.note(4, 8); // out of order (a replica applying a gap)
        assert_eq!(s.segment_of(1), Some(5));
        assert_eq!(s.segment_of(2), Some(5));
        assert_eq!(s.segment_of(3), Some(6));
        assert_eq!(s.segment_of(9), Some(6));
        assert_eq!(s.segment_of(10), Some(7));
        assert_eq!(s.segment_of(4), Some(8));
        assert_eq!(s.segment_of(4), Some(6), "remembered once");
    }

    #[test]
    fn a_segments_id_ranges_cover_its_bounds_and_its_single_ids() {
        let mut s = QueueJournalState::default();
        s.note(1, 5);
        s.note(3, 6);
        s.note(7, 5); // after a recovery of compacted records, a segment can come back
        s.note(2, 9); // out of order
        let mut in5 = s.ranges_in(5);
        in5.sort_unstable();
        assert_eq!(in5, vec![(1, 3), (7, u64::MAX)]);
        assert_eq!(s.ranges_in(6), vec![(3, 7)]);
        assert_eq!(s.ranges_in(9), vec![(2, 3)]);
        assert!(s.ranges_in(4).is_empty());
        // Compaction points an id at a new segment: peek does not forget it, a dequeue does.
        s.out_of_order.insert(8, 12);
        assert_eq!(s.peek(8), Some(12));
        assert_eq!(s.peek(8), Some(12));
        assert_eq!(s.ranges_in(12), vec![(8, 9)]);
        assert_eq!(s.segment_of(8), Some(12));
        assert_eq!(s.peek(8), Some(5));
    }

    #[test]
    fn bounds_of_deleted_segments_are_pruned_and_live_ids_still_found() {
        let mut s = QueueJournalState::default();
        // Id 0 stays queued in segment 0; ids 1..=200 go to segments 1..=200, one each.
        for seg in 0..=200u64 {
            s.note(seg, seg);
        }
        s.note(300, 500); // the newest segment
        assert_eq!(s.bounds.len(), 202);
        // Segments 1..=150 were deleted: all their messages are gone.
        let exists = |seg: u64| seg == 0 || seg > 150;
        s.prune_if_due(exists);
        assert_eq!(s.bounds.len(), 202 - 150);
        assert_eq!(s.segment_of(0), Some(0), "the message pinning segment 0");
        assert_eq!(s.segment_of(151), Some(151));
        assert_eq!(s.segment_of(200), Some(200));
        assert_eq!(s.segment_of(300), Some(500));
        // Not again until the list has doubled.
        s.prune_if_due(|_| false);
        assert_eq!(s.bounds.len(), 52);
        // The newest bound is always kept.
        for id in 301..400u64 {
            s.note(id, 500 + id);
        }
        s.prune_if_due(|_| false);
        assert_eq!(s.bounds.back(), Some(&(399, 899)));
        assert_eq!(s.bounds.len(), 1);
    }
}
