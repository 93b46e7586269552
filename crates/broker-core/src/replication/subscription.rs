//! The original side of queue replication: a replicating subscription streams a queue's
//! messages and dequeues to a replica (`docs/design/replication.md` sections 3 to 5).
//!
//! It is not a consumer of the queue: it never acquires, is not counted, keeps nothing alive.
//! It observes the queue ([`QueueObserver`]) from a snapshot taken atomically with its
//! attachment, and writes deliveries straight into its channel's outbound buffer, within a
//! window of unacknowledged deliveries. Lock order: queue → subscription → confirms →
//! outbound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::confirms::{Hold, PendingConfirm, release_all};
use crate::delivery::ChannelLink;
use crate::error::AmqpError;
use crate::message::Message;
use crate::protocol::hot;
use crate::queue::{DequeueReason, Queue, QueueObserver, QueuedMessage};

use super::ranges::IdRanges;
use super::{CHUNK_RANGES_MAX, EVENT_EXCHANGE, ID_SET_RANGES_MAX, PROTOCOL_VERSION, event};

/// Raw properties of an event delivery: no property set.
const NO_PROPERTIES: [u8; 2] = [0, 0];
/// How often the original sends its lag measure.
const LAG_INTERVAL_MS: u64 = 1000;

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Subscribed; receiving the replica's ids.
    AwaitingIds,
    /// Sending what the queue held (or catching up again after a stall).
    CatchUp,
    /// Live; holds the confirms of new publishes.
    Ready,
    /// Over (channel closed, or queue deleted).
    Closed,
}

impl Phase {
    /// The name `qpid-ha query` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::AwaitingIds => "subscribing",
            Phase::CatchUp => "catchup",
            Phase::Ready => "ready",
            Phase::Closed => "closed",
        }
    }
}

/// Who subscribed (from `qpid.ha-info` and the connection).
#[derive(Debug, Clone, Default)]
pub struct ReplicaInfo {
    /// The replica broker's system id.
    pub system_id: String,
    /// The host and port it announced.
    pub host: String,
    /// Its announced port.
    pub port: i64,
    /// The link's remote address as seen here.
    pub peer: String,
}

/// The lag of a replica, measured here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Messages not yet acknowledged by the replica (unsent or in flight).
    pub messages: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Age of the oldest unacknowledged delivery, in milliseconds (0 if none).
    pub oldest_unacked_ms: u64,
}

#[derive(Debug)]
enum Item {
    Data {
        id: u64,
        message: Message,
        redelivered: bool,
    },
    Dequeue(IdRanges),
    /// The catch-up snapshot (`State::snapshot`) goes out here, in id order.
    Snapshot,
    Ready,
}

#[derive(Debug)]
struct InFlight {
    tag: u64,
    /// Body bytes, for data deliveries.
    bytes: u64,
    data: bool,
    ready_marker: bool,
    sent_ms: u64,
    hold: Option<Hold>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    replica_ids: IdRanges,
    items: VecDeque<Item>,
    /// Ids of data items queued and not sent yet, with their body size.
    unsent: HashMap<u64, u64>,
    unsent_bytes: u64,
    /// What the queue held at subscription, minus what the replica has, by id; an entry
    /// dequeued before it was sent becomes `None`.
    snapshot: VecDeque<(u64, Option<QueuedMessage>)>,
    snapshot_live: u64,
    snapshot_bytes: u64,
    pending_holds: HashMap<u64, Hold>,
    next_tag: u64,
    in_flight: VecDeque<InFlight>,
    in_flight_data: u64,
    in_flight_bytes: u64,
    last_sent_id: u64,
    last_lag_ms: u64,
    /// Times the replica left state ready because it was too slow to acknowledge.
    stalls: u64,
    /// Dequeue events wait for the end of the current batch, to go out as one event.
    flush_at_batch_end: bool,
}

/// A replicating subscription on the original.
#[derive(Debug)]
pub struct ReplicatingSubscription {
    /// The consumer tag.
    pub tag: String,
    /// The original queue.
    pub queue: Arc<Queue>,
    /// Who subscribed.
    pub replica: ReplicaInfo,
    link: Arc<ChannelLink>,
    broker: Weak<Broker>,
    window_messages: u32,
    window_bytes: u64,
    ack_timeout_ms: u64,
    me: Weak<ReplicatingSubscription>,
    state: Mutex<State>,
}

impl ReplicatingSubscription {
    /// A subscription that has been accepted: writes the `init` event. `window_messages` is
    /// the replica's prefetch (bounded by `--ha-flow-messages`).
    pub fn start(
        broker: &Arc<Broker>,
        tag: String,
        queue: Arc<Queue>,
        link: Arc<ChannelLink>,
        replica: ReplicaInfo,
        window_messages: u32,
    ) -> Arc<ReplicatingSubscription> {
        let ha = &broker.config.ha;
        let sub = Arc::new_cyclic(|me| ReplicatingSubscription {
            tag,
            queue,
            replica,
            link,
            broker: Arc::downgrade(broker),
            window_messages,
            window_bytes: ha.flow_bytes,
            ack_timeout_ms: ha.effective_ack_timeout().as_millis() as u64,
            me: me.clone(),
            state: Mutex::new(State {
                phase: Phase::AwaitingIds,
                replica_ids: IdRanges::new(),
                items: VecDeque::new(),
                unsent: HashMap::new(),
                unsent_bytes: 0,
                snapshot: VecDeque::new(),
                snapshot_live: 0,
                snapshot_bytes: 0,
                pending_holds: HashMap::new(),
                next_tag: 1,
                in_flight: VecDeque::new(),
                in_flight_data: 0,
                in_flight_bytes: 0,
                last_sent_id: 0,
                last_lag_ms: 0,
                stalls: 0,
                flush_at_batch_end: false,
            }),
        });
        let init = json!({
            "version": PROTOCOL_VERSION,
            "incarnation": sub.queue.incarnation().to_string(),
            "queue": sub.queue.name,
            "original": { "system-id": broker.system_id().to_string() },
            "arguments": crate::mgmt::json::from_table(&sub.queue.arguments),
            "settings": sub.queue.settings.replication_signature(),
        });
        {
            let mut st = sub.state.lock();
            sub.write_event(&mut st, event::INIT, init.to_string().as_bytes(), false);
        }
        tracing::info!(target: "HA", "replicating subscription to queue '{}' from {} (broker {})", sub.queue.name, sub.replica.peer, sub.replica.system_id);
        sub
    }

    fn now_ms(&self) -> u64 {
        self.broker.upgrade().map_or(0, |b| b.now_ms())
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// One id-set chunk from the replica; on the last one, the stream starts.
    pub fn id_chunk(&self, body: &[u8], last: bool) -> Result<(), AmqpError> {
        // Read before taking the subscription's lock (the order is queue, then subscription).
        let highest = self.queue.lock().last_id();
        {
            let mut st = self.state.lock();
            if st.phase != Phase::AwaitingIds {
                return Err(AmqpError::precondition_failed(format!(
                    "replicating subscription '{}' is not expecting ids",
                    self.tag
                )));
            }
            st.replica_ids
                .extend_from_wire(body)
                .map_err(|e| AmqpError::precondition_failed(format!("id set: {e}")))?;
            if st.replica_ids.ranges().len() > ID_SET_RANGES_MAX {
                return Err(AmqpError::precondition_failed(format!(
                    "id set of more than {ID_SET_RANGES_MAX} ranges"
                )));
            }
            if st
                .replica_ids
                .ranges()
                .last()
                .is_some_and(|&(_, l)| l > highest)
            {
                return Err(AmqpError::precondition_failed(format!(
                    "id set names ids above {highest}, the highest queue '{}' has given",
                    self.queue.name
                )));
            }
            if !last {
                return Ok(());
            }
        }
        let Some(me) = self.me.upgrade() else {
            return Ok(());
        };
        let observer: Arc<dyn QueueObserver> = me;
        self.queue.observe_from_snapshot(observer, |snapshot| {
            let mut st = self.state.lock();
            let snapshot: Vec<QueuedMessage> = snapshot;
            let present: Vec<u64> = snapshot.iter().map(|e| e.id).collect();
            let gone = st.replica_ids.minus_sorted(&present);
            for chunk in gone.ranges().chunks(CHUNK_RANGES_MAX) {
                st.items.push_back(Item::Dequeue(IdRanges::from_ranges(chunk)));
            }
            // References only, under the queue's lock: no per-message bookkeeping here.
            let mut snap: VecDeque<(u64, Option<QueuedMessage>)> =
                snapshot.into_iter().map(|e| (e.id, Some(e))).collect();
            if !st.replica_ids.is_empty() {
                let have = &st.replica_ids;
                snap.retain(|(id, _)| !have.contains(*id));
            }
            let sent = snap.len() as u64;
            st.snapshot_bytes = snap
                .iter()
                .filter_map(|(_, e)| e.as_ref())
                .map(|e| e.message.body_size())
                .sum();
            st.snapshot_live = sent;
            // A promoted primary kept the confirms of what was published for this backup since
            // the promotion: they are released as this subscription delivers those messages
            // (or at once for what the backup has already).
            if let Some(b) = self.broker.upgrade() {
                for (id, hold) in b.take_expected_holds(&self.queue.name, &self.replica.system_id) {
                    let at = snap.partition_point(|&(x, _)| x < id);
                    if snap.get(at).is_some_and(|&(x, _)| x == id) {
                        st.pending_holds.insert(id, hold);
                    }
                }
            }
            st.snapshot = snap;
            st.items.push_back(Item::Snapshot);
            st.items.push_back(Item::Ready);
            st.phase = Phase::CatchUp;
            tracing::info!(target: "HA", "queue '{}': catch-up of {} for {}: {sent} messages to send, {} ids to dequeue, {} already there",
                self.queue.name, self.tag, self.replica.peer, gone.count(), st.replica_ids.count() - gone.count());
            st.replica_ids = IdRanges::new();
            self.pump(&mut st);
        });
        Ok(())
    }

    /// basic.ack from the replica.
    pub fn acked(&self, tag: u64, multiple: bool) -> Result<(), AmqpError> {
        let mut released: Vec<InFlight> = Vec::new();
        let mut st = self.state.lock();
        if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            while st.in_flight.front().is_some_and(|f| f.tag <= upto) {
                released.extend(st.in_flight.pop_front());
            }
            if released.is_empty() && tag != 0 && tag >= st.next_tag {
                return Err(unknown_tag(tag));
            }
        } else {
            match st.in_flight.iter().position(|f| f.tag == tag) {
                Some(i) => released.extend(st.in_flight.remove(i)),
                None => return Err(unknown_tag(tag)),
            }
        }
        for f in &released {
            if f.data {
                st.in_flight_data -= 1;
                st.in_flight_bytes -= f.bytes;
            }
            if f.ready_marker && st.phase == Phase::CatchUp {
                st.phase = Phase::Ready;
                tracing::info!(target: "HA", "queue '{}': replica {} is ready", self.queue.name, self.replica.peer);
            }
        }
        self.pump(&mut st);
        drop(st);
        // Released after the subscription's lock (the order is subscription → confirms either
        // way; this keeps the lock short), all at once: one ack per publishing channel.
        release_all(released.into_iter().filter_map(|f| f.hold));
        Ok(())
    }

    /// Periodic work: the ack timeout of a ready replica, and the lag event.
    pub fn tick(&self, now_ms: u64) {
        let mut dropped: Vec<Hold> = Vec::new();
        let mut st = self.state.lock();
        if st.phase == Phase::Ready
            && st
                .in_flight
                .front()
                .is_some_and(|f| now_ms.saturating_sub(f.sent_ms) > self.ack_timeout_ms)
        {
            st.stalls += 1;
            st.phase = Phase::CatchUp;
            dropped.extend(st.pending_holds.drain().map(|(_, h)| h));
            for f in st.in_flight.iter_mut() {
                dropped.extend(f.hold.take());
            }
            st.items.push_back(Item::Ready);
            tracing::warn!(target: "HA", "queue '{}': replica {} left a delivery unacknowledged for more than {} ms: back to catch-up, no longer holding {} confirms (stall {})",
                self.queue.name, self.replica.peer, self.ack_timeout_ms, dropped.len(), st.stalls);
        }
        if matches!(st.phase, Phase::CatchUp | Phase::Ready)
            && now_ms.saturating_sub(st.last_lag_ms) >= LAG_INTERVAL_MS
            && self.has_credit(&st)
        {
            st.last_lag_ms = now_ms;
            let lag = lag_of(&st, now_ms);
            let body = json!({
                "messages": lag.messages,
                "bytes": lag.bytes,
                "oldest_unacked_ms": lag.oldest_unacked_ms,
                "at_ms": now_ms,
            });
            self.write_event(&mut st, event::LAG, body.to_string().as_bytes(), false);
        }
        drop(st);
        release_all(dropped);
    }

    /// The channel or connection closed: stop observing and release every hold.
    pub fn close(&self) {
        let was_open = {
            let mut st = self.state.lock();
            let open = st.phase != Phase::Closed;
            st.phase = Phase::Closed;
            open
        };
        if let Some(me) = self.me.upgrade() {
            let observer: Arc<dyn QueueObserver> = me;
            self.queue.remove_observer(&observer);
        }
        let held = {
            let mut st = self.state.lock();
            st.items.clear();
            st.unsent.clear();
            st.snapshot.clear();
            let mut held: Vec<Hold> = st.pending_holds.drain().map(|(_, h)| h).collect();
            held.extend(st.in_flight.drain(..).filter_map(|f| f.hold));
            held
        };
        release_all(held);
        if was_open {
            tracing::info!(target: "HA", "replicating subscription to queue '{}' from {} ended", self.queue.name, self.replica.peer);
        }
    }

    /// The lag now.
    pub fn lag(&self) -> Lag {
        let st = self.state.lock();
        lag_of(&st, self.now_ms())
    }

    /// A row for `qpid-ha query` on the original.
    pub fn row(&self) -> Value {
        let now = self.now_ms();
        let st = self.state.lock();
        let lag = lag_of(&st, now);
        let holds =
            st.pending_holds.len() + st.in_flight.iter().filter(|f| f.hold.is_some()).count();
        json!({
            "queue": self.queue.name,
            "replica": self.replica.peer,
            "replicaHost": format!("{}:{}", self.replica.host, self.replica.port),
            "replicaSystemId": self.replica.system_id,
            "state": st.phase.as_str(),
            "lag": { "messages": lag.messages, "bytes": lag.bytes, "oldestUnackedMs": lag.oldest_unacked_ms },
            "confirmsHeld": holds,
            "stalls": st.stalls,
        })
    }

    fn has_credit(&self, st: &State) -> bool {
        (self.window_messages == 0 || st.in_flight.len() < self.window_messages as usize)
            && (self.window_bytes == 0
                || st.in_flight_bytes < self.window_bytes
                || st.in_flight_data == 0)
    }

    /// Sends queued items while the window allows.
    fn pump(&self, st: &mut State) {
        while self.has_credit(st) {
            if matches!(st.items.front(), Some(Item::Snapshot)) {
                match st.snapshot.pop_front() {
                    None => {
                        st.items.pop_front();
                    }
                    Some((_, None)) => {}
                    Some((id, Some(e))) => {
                        st.snapshot_live -= 1;
                        st.snapshot_bytes -= e.message.body_size();
                        let hold = st.pending_holds.remove(&id);
                        self.send_data(st, id, &e.message, e.redelivered, hold);
                    }
                }
                continue;
            }
            let Some(item) = st.items.pop_front() else {
                break;
            };
            match item {
                Item::Snapshot => {}
                Item::Data {
                    id,
                    message,
                    redelivered,
                } => {
                    let Some(size) = st.unsent.remove(&id) else {
                        continue; // dequeued before it was sent
                    };
                    st.unsent_bytes -= size;
                    let hold = st.pending_holds.remove(&id);
                    self.send_data(st, id, &message, redelivered, hold);
                }
                Item::Dequeue(ids) => {
                    let body = ids.to_wire_chunks().concat();
                    self.write_event(st, event::DEQUEUE, &body, false);
                }
                Item::Ready => self.write_event(st, event::READY, &[], true),
            }
        }
    }

    /// Writes one data delivery (with an `id` event first when the id does not follow).
    fn send_data(
        &self,
        st: &mut State,
        id: u64,
        m: &Message,
        redelivered: bool,
        hold: Option<Hold>,
    ) {
        if id != st.last_sent_id + 1 {
            self.write_event(st, event::ID, &id.to_be_bytes(), false);
        }
        st.last_sent_id = id;
        let size = m.body_size();
        let tag = self.next_tag(st);
        let ch = self.link.channel;
        let frame_max = self.link.frame_max;
        let ctag = self.tag.as_str();
        self.link.out.write_by_writer(|out| {
            out.reserve(hot::delivery_size_hint(
                ctag,
                m.exchange(),
                m.routing_key(),
                m.raw_properties(),
                m.body().len(),
                frame_max,
            ));
            hot::write_deliver(
                out,
                ch,
                ctag,
                tag,
                redelivered,
                m.exchange(),
                m.routing_key(),
            );
            hot::write_content(out, ch, m.raw_properties(), m.body(), frame_max);
        });
        st.in_flight_data += 1;
        st.in_flight_bytes += size;
        st.in_flight.push_back(InFlight {
            tag,
            bytes: size,
            data: true,
            ready_marker: false,
            sent_ms: self.now_ms(),
            hold,
        });
    }

    fn next_tag(&self, st: &mut State) -> u64 {
        let t = st.next_tag;
        st.next_tag += 1;
        t
    }

    fn write_event(&self, st: &mut State, name: &str, body: &[u8], ready_marker: bool) {
        let tag = self.next_tag(st);
        let ch = self.link.channel;
        let frame_max = self.link.frame_max;
        let ctag = self.tag.as_str();
        self.link.out.write_by_writer(|out| {
            hot::write_deliver(out, ch, ctag, tag, false, EVENT_EXCHANGE, name);
            hot::write_content(out, ch, &NO_PROPERTIES, body, frame_max);
        });
        st.in_flight.push_back(InFlight {
            tag,
            bytes: 0,
            data: false,
            ready_marker,
            sent_ms: self.now_ms(),
            hold: None,
        });
    }
}

fn lag_of(st: &State, now_ms: u64) -> Lag {
    Lag {
        messages: st.in_flight_data + st.unsent.len() as u64 + st.snapshot_live,
        bytes: st.in_flight_bytes + st.unsent_bytes + st.snapshot_bytes,
        oldest_unacked_ms: st
            .in_flight
            .front()
            .map_or(0, |f| now_ms.saturating_sub(f.sent_ms)),
    }
}

fn unknown_tag(tag: u64) -> AmqpError {
    AmqpError::precondition_failed(format!("unknown delivery tag {tag}"))
}

impl crate::delivery::EndOfBatch for ReplicatingSubscription {
    fn end_of_batch(&self) {
        let mut st = self.state.lock();
        st.flush_at_batch_end = false;
        if matches!(st.phase, Phase::CatchUp | Phase::Ready) {
            self.pump(&mut st);
        }
    }
}

impl QueueObserver for ReplicatingSubscription {
    fn enqueued(&self, _queue: &Queue, entry: &QueuedMessage, confirm: Option<PendingConfirm<'_>>) {
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::CatchUp | Phase::Ready) {
            return;
        }
        let hold = match (st.phase, confirm) {
            (Phase::Ready, Some(c)) => Some(c.hold()),
            _ => None,
        };
        if st.items.is_empty() && self.has_credit(&st) {
            // Nothing waits before it: straight to the replica.
            self.send_data(&mut st, entry.id, &entry.message, entry.redelivered, hold);
            return;
        }
        let size = entry.message.body_size();
        if let Some(h) = hold {
            st.pending_holds.insert(entry.id, h);
        }
        st.unsent.insert(entry.id, size);
        st.unsent_bytes += size;
        st.items.push_back(Item::Data {
            id: entry.id,
            message: entry.message.clone(),
            redelivered: entry.redelivered,
        });
        self.pump(&mut st);
    }

    fn dequeued(&self, _queue: &Queue, entry: &QueuedMessage, reason: DequeueReason) {
        let id = entry.id;
        if reason == DequeueReason::Deleted {
            return; // the replica keeps its messages when the original goes
        }
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::CatchUp | Phase::Ready) {
            return;
        }
        if let Some(size) = st.unsent.remove(&id) {
            // Never sent: the replica sees neither the message nor its dequeue.
            st.unsent_bytes -= size;
            let hold = st.pending_holds.remove(&id);
            drop(st);
            drop(hold);
            return;
        }
        if st.snapshot.front().is_some_and(|&(first, _)| first <= id) {
            let at = st.snapshot.partition_point(|&(x, _)| x < id);
            if let Some((x, slot)) = st.snapshot.get_mut(at)
                && *x == id
                && let Some(e) = slot.take()
            {
                // Never sent: the replica sees neither the message nor its dequeue.
                st.snapshot_live -= 1;
                st.snapshot_bytes -= e.message.body_size();
                let hold = st.pending_holds.remove(&id);
                drop(st);
                drop(hold);
                return;
            }
        }
        let appended = match st.items.back_mut() {
            Some(Item::Dequeue(r)) if r.ranges().len() < CHUNK_RANGES_MAX => r.push(id),
            _ => false,
        };
        if !appended {
            st.items
                .push_back(Item::Dequeue(IdRanges::from_sorted([id])));
        }
        if st.flush_at_batch_end {
            return;
        }
        // Coalesce the dequeues of this batch (an ack frame settles many) into one event.
        let me: Option<Arc<dyn crate::delivery::EndOfBatch>> = self
            .me
            .upgrade()
            .map(|m| m as Arc<dyn crate::delivery::EndOfBatch>);
        if let Some(me) = me
            && crate::delivery::defer_to_end_of_batch(me)
        {
            st.flush_at_batch_end = true;
            return;
        }
        self.pump(&mut st);
    }

    fn queue_deleted(&self, queue: &Queue) {
        let held = {
            let mut st = self.state.lock();
            st.phase = Phase::Closed;
            st.items.clear();
            st.unsent.clear();
            st.snapshot.clear();
            let mut held: Vec<Hold> = st.pending_holds.drain().map(|(_, h)| h).collect();
            held.extend(st.in_flight.iter_mut().filter_map(|f| f.hold.take()));
            held
        };
        release_all(held);
        tracing::info!(target: "HA", "queue '{}' deleted: cancelling the replicating subscription of {}", queue.name, self.replica.peer);
        crate::channel::write_server_cancel(&self.link, &self.tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserDb;
    use crate::broker::QueueDeclare;
    use crate::config::BrokerConfig;
    use crate::confirms::Confirms;
    use crate::delivery::Outbound;
    use crate::protocol::FRAME_BODY;
    use crate::protocol::frame::split_frame;

    fn setup() -> (Arc<Broker>, Arc<Queue>, Arc<ChannelLink>, Arc<Outbound>) {
        setup_with(0)
    }

    fn setup_with(flow_bytes: u64) -> (Arc<Broker>, Arc<Queue>, Arc<ChannelLink>, Arc<Outbound>) {
        let mut config = BrokerConfig::default();
        config.ha.queue_replication = true;
        config.ha.flow_bytes = flow_bytes;
        let b = Broker::new(config, UserDb::default());
        let d = QueueDeclare {
            name: "q".into(),
            ..Default::default()
        };
        let q = b.declare_queue(1, &d).unwrap().queue;
        let out = Arc::new(Outbound::default());
        let link = Arc::new(ChannelLink::new(1, 9, out.clone(), 131_072, true, 65_536));
        (b, q, link, out)
    }

    fn msg(body: &str) -> Message {
        Message::new("", "q", &[0, 0], body.as_bytes()).unwrap()
    }

    /// (delivery tag, exchange, routing key, body) of each delivery written.
    fn deliveries(out: &Outbound) -> Vec<(u64, String, String, Vec<u8>)> {
        let bytes = out.take_for_test();
        let mut v: Vec<(u64, String, String, Vec<u8>)> = Vec::new();
        let mut at = 0;
        while let Ok(Some((f, n))) = split_frame(&bytes[at..], 0) {
            at += n;
            if f.frame_type == FRAME_BODY {
                v.last_mut().unwrap().3.extend_from_slice(f.payload);
                continue;
            }
            let Ok((60, 60, args)) = hot::method_ids(f.payload) else {
                continue;
            };
            let mut r = hot::Reader::new(args);
            r.short_str("ctag").unwrap();
            let tag = r.u64("tag").unwrap();
            r.u8("redelivered").unwrap();
            let ex = r.short_str("exchange").unwrap().to_string();
            let rk = r.short_str("rk").unwrap().to_string();
            v.push((tag, ex, rk, Vec::new()));
        }
        v
    }

    fn names(d: &[(u64, String, String, Vec<u8>)]) -> Vec<String> {
        d.iter()
            .map(|(_, ex, rk, body)| {
                if ex == EVENT_EXCHANGE {
                    rk.clone()
                } else {
                    String::from_utf8_lossy(body).into_owned()
                }
            })
            .collect()
    }

    #[test]
    fn catch_up_skips_what_the_replica_holds_and_sends_its_missing_dequeues() {
        let (b, q, link, out) = setup();
        for body in ["a", "b", "c", "d"] {
            q.enqueue(msg(body), 0);
        }
        // Message 1 consumed on the original while the replica was away.
        let get_link = Arc::new(ChannelLink::new(
            2,
            9,
            Arc::new(Outbound::default()),
            131_072,
            true,
            10,
        ));
        assert!(q.get(&get_link, true, 0));
        let sub = ReplicatingSubscription::start(
            &b,
            "t".into(),
            q.clone(),
            link,
            ReplicaInfo::default(),
            100,
        );
        // The replica holds 1 (gone here) and 2 (still here: skipped).
        let ids = IdRanges::from_sorted([1, 2]).to_wire_chunks().concat();
        sub.id_chunk(&ids, true).unwrap();
        let d = deliveries(&out);
        assert_eq!(names(&d), ["init", "dequeue", "id", "c", "d", "ready"]);
        assert_eq!(IdRanges::from_wire(&d[1].3).unwrap().ranges(), [(1, 1)]);
        assert_eq!(u64::from_be_bytes(d[2].3.clone().try_into().unwrap()), 3);
        assert_eq!(sub.phase(), Phase::CatchUp);
        sub.acked(d.last().unwrap().0, true).unwrap();
        assert_eq!(sub.phase(), Phase::Ready);
    }

    #[test]
    fn a_ready_replica_holds_confirms_until_it_acks_and_unsent_dequeues_vanish() {
        let (b, q, link, out) = setup();
        let sub = ReplicatingSubscription::start(
            &b,
            "t".into(),
            q.clone(),
            link,
            ReplicaInfo::default(),
            2,
        );
        sub.id_chunk(&[], true).unwrap();
        let d = deliveries(&out);
        assert_eq!(names(&d), ["init", "ready"]);
        sub.acked(d[1].0, true).unwrap();
        assert_eq!(sub.phase(), Phase::Ready);
        // A publish in confirm mode: held by the ready replica until it acks.
        let pub_out = Arc::new(Outbound::default());
        let pub_link = Arc::new(ChannelLink::new(1, 3, pub_out.clone(), 131_072, true, 10));
        let confirms = Confirms::new(pub_link);
        q.enqueue_confirmed(
            msg("x"),
            0,
            Some(PendingConfirm {
                confirms: &confirms,
                seq: 1,
            }),
        );
        confirms.decided(1);
        confirms.flush();
        assert_eq!(confirms.held_count(), 1);
        assert!(pub_out.take_for_test().is_empty(), "no ack while held");
        let d = deliveries(&out);
        assert_eq!(names(&d), ["x"]);
        assert_eq!(sub.lag().messages, 1);
        sub.acked(d[0].0, false).unwrap();
        assert_eq!(confirms.held_count(), 0);
        assert!(!pub_out.take_for_test().is_empty(), "the ack went out");
        // A window of 2: the third message waits; dequeued before it is sent, it vanishes.
        for body in ["m1", "m2", "m3"] {
            q.enqueue(msg(body), 0);
        }
        let d = deliveries(&out);
        assert_eq!(names(&d), ["m1", "m2"]);
        // x (sent and acked), m1 and m2 (sent) and m3 (not sent) go.
        assert_eq!(q.purge(), 4);
        sub.acked(d[1].0, true).unwrap();
        let d = deliveries(&out);
        assert_eq!(names(&d), ["dequeue"]);
        assert_eq!(IdRanges::from_wire(&d[0].3).unwrap().ranges(), [(1, 3)]);
        assert!(sub.acked(999, false).is_err(), "unknown tag");
    }

    #[test]
    fn the_byte_window_bounds_what_is_in_flight() {
        let (b, q, link, out) = setup_with(10);
        for body in ["aaaaaaaa", "bbbbbbbb", "cccccccc"] {
            q.enqueue(msg(body), 0);
        }
        let sub = ReplicatingSubscription::start(
            &b,
            "t".into(),
            q.clone(),
            link,
            ReplicaInfo::default(),
            100,
        );
        sub.id_chunk(&[], true).unwrap();
        let d = deliveries(&out);
        // 8 bytes in flight < 10: one more goes; 16 >= 10: the rest waits.
        assert_eq!(names(&d), ["init", "aaaaaaaa", "bbbbbbbb"]);
        assert_eq!(sub.lag().bytes, 24);
        sub.acked(d[2].0, true).unwrap();
        assert_eq!(names(&deliveries(&out)), ["cccccccc", "ready"]);
    }

    #[test]
    fn snapshot_messages_dequeued_before_they_are_sent_vanish() {
        let (b, q, link, out) = setup();
        for body in ["a", "b", "c"] {
            q.enqueue(msg(body), 0);
        }
        let sub = ReplicatingSubscription::start(
            &b,
            "t".into(),
            q.clone(),
            link,
            ReplicaInfo::default(),
            2,
        );
        sub.id_chunk(&[], true).unwrap();
        let d = deliveries(&out);
        assert_eq!(names(&d), ["init", "a"]);
        assert_eq!(sub.lag().messages, 3);
        assert_eq!(q.purge(), 3);
        assert_eq!(sub.lag().messages, 1, "b and c vanished; a is in flight");
        sub.acked(d[1].0, true).unwrap();
        let d = deliveries(&out);
        assert_eq!(names(&d), ["ready", "dequeue"]);
        assert_eq!(IdRanges::from_wire(&d[1].3).unwrap().ranges(), [(1, 1)]);
    }
}
