//! One replica queue: its link to the original, the stream applied to the local queue, and
//! the state `qpid-ha query` shows (`docs/design/replication.md` sections 3, 4, 6 and 8).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use broker_core::config::LINK_RETRY_MAX;
use broker_core::message::Message;
use broker_core::mgmt::{ErrorCode, MgmtError};
use broker_core::queue::Queue;
use broker_core::replication::{self as rep, IdRanges, event};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::address::Address;
use crate::link::{Incoming, Link, LinkError, LinkSettings};

/// Where a replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No link yet, or reconnecting.
    Connecting,
    /// Subscribed, receiving what the original held.
    CatchUp,
    /// Live.
    Ready,
    /// The original refused (the text says why); retried.
    Refused(String),
    /// The original queue is gone or is another incarnation: stopped, messages kept.
    OriginalLost(String),
}

impl State {
    fn name(&self) -> String {
        match self {
            State::Connecting => "connecting".into(),
            State::CatchUp => "catchup".into(),
            State::Ready => "ready".into(),
            State::Refused(t) => format!("refused: {t}"),
            State::OriginalLost(_) => "original-lost".into(),
        }
    }
}

/// The lag the original last reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lag {
    /// Messages not yet acknowledged by this replica.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Age of the oldest unacknowledged event on the original.
    pub oldest_unacked_ms: u64,
}

#[derive(Debug)]
struct Status {
    state: State,
    connected_to: Option<String>,
    disconnected_since: Option<SystemTime>,
    last_error: Option<String>,
    lag: Option<Lag>,
    incarnation: Option<String>,
    applied_enqueues: u64,
    applied_dequeues: u64,
    reconnects: u64,
}

/// Settings of a replica's link, from the broker's HA options.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// `--ha-username` (used when the address has no credentials; "" = guest).
    pub username: String,
    /// `--ha-password`.
    pub password: String,
    /// `--ha-mechanism`.
    pub mechanism: String,
    /// `--link-heartbeat-interval`.
    pub heartbeat: Duration,
    /// `--link-maintenance-interval`.
    pub retry: Duration,
    /// `--ha-flow-messages` (the replica's prefetch).
    pub window: u32,
    /// This broker's system id.
    pub system_id: String,
    /// A cluster backup's replica: the addresses are the cluster's members, and a member that
    /// refuses the connection (530: it is a backup) is passed over like an unreachable one.
    pub cluster: bool,
}

impl ReplicaSettings {
    /// The settings of a link to `addr`: its credentials if it has some, else `--ha-username`
    /// and `--ha-password`, else guest; `admin` adds the `qpid.ha-admin` client property.
    pub fn link_settings(&self, addr: &Address, product: &str, admin: bool) -> LinkSettings {
        let (username, password) = match &addr.credentials {
            Some((u, p)) => (u.clone(), p.clone()),
            None if !self.username.is_empty() => (self.username.clone(), self.password.clone()),
            None => ("guest".into(), "guest".into()),
        };
        let mut props = FieldTable::default();
        props.insert(
            "product".into(),
            AMQPValue::LongString(LongString::from(product)),
        );
        if admin {
            props.insert("qpid.ha-admin".into(), AMQPValue::LongString("1".into()));
        }
        LinkSettings {
            host: addr.host.clone(),
            port: addr.port,
            username,
            password,
            mechanism: self.mechanism.clone(),
            heartbeat: self.heartbeat,
            timeout: self.heartbeat.max(Duration::from_secs(2)),
            client_properties: props,
        }
    }
}

/// How the first attempt ended, for `replicate`.
pub type FirstOutcome = Result<(), MgmtError>;

/// A replica queue and its link task.
#[derive(Debug)]
pub struct Replica {
    /// The local queue.
    pub queue: Arc<Queue>,
    /// The original as given.
    pub original: String,
    addresses: Vec<Address>,
    settings: ReplicaSettings,
    status: Mutex<Status>,
    stop: watch::Sender<bool>,
    /// Told when the replica learns its original's incarnation (a cluster primary passes its
    /// replicas' definitions to its backups).
    broker: Mutex<Option<std::sync::Weak<broker_core::broker::Broker>>>,
}

/// Why one session on the link ended.
enum Ended {
    /// Asked to stop (detach, queue deleted, broker shutdown).
    Stopped,
    /// The original is gone for good: stop trying.
    Lost(String),
    /// Refused by the original (credentials, version, arguments...): retry later.
    Refused(u16, String),
    /// The link failed (I/O, heartbeats, shutdown of the original): retry, backing off.
    Failed(String),
    /// Nothing answered the TCP connect: retry at the maintenance interval (an attempt costs
    /// the original nothing, and a restored link is found within one interval).
    Unreachable(String),
}

impl Replica {
    /// A replica of `original` into `queue`; call [`Replica::run`] to start it.
    pub fn new(
        queue: Arc<Queue>,
        original: String,
        addresses: Vec<Address>,
        settings: ReplicaSettings,
        incarnation: Option<String>,
    ) -> Arc<Replica> {
        let (stop, _) = watch::channel(false);
        Arc::new(Replica {
            queue,
            original,
            addresses,
            settings,
            status: Mutex::new(Status {
                state: State::Connecting,
                connected_to: None,
                disconnected_since: None,
                last_error: None,
                lag: None,
                incarnation,
                applied_enqueues: 0,
                applied_dequeues: 0,
                reconnects: 0,
            }),
            stop,
            broker: Mutex::new(None),
        })
    }

    /// The broker's store, if it has one.
    fn store(&self) -> Option<Arc<broker_core::store::Store>> {
        self.queue.broker().and_then(|b| b.store().cloned())
    }

    /// Sets the broker to tell when the replica definition changes.
    pub fn notify(&self, broker: &Arc<broker_core::broker::Broker>) {
        *self.broker.lock() = Some(Arc::downgrade(broker));
    }

    fn definition_changed(&self) {
        let b = self
            .broker
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade);
        if let Some(b) = b {
            b.replica_definition_changed(&self.queue.name);
        }
    }

    /// The original incarnation this replica's messages come from, once known.
    pub fn incarnation(&self) -> Option<String> {
        self.status.lock().incarnation.clone()
    }

    /// True for a cluster backup's replica.
    pub fn settings_cluster(&self) -> bool {
        self.settings.cluster
    }

    /// The state.
    pub fn state(&self) -> State {
        self.status.lock().state.clone()
    }

    /// Asks the link task to stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow() || self.queue.is_deleted()
    }

    /// The row `qpid-ha query` shows.
    pub fn row(&self) -> Value {
        let st = self.status.lock();
        let mut state = st.state.name();
        if let Some(since) = st.disconnected_since
            && !matches!(st.state, State::OriginalLost(_))
        {
            state = format!("disconnected since {}", format_time(since));
        }
        json!({
            "queue": self.queue.name,
            "original": self.original,
            "state": state,
            "link": st.state.name(),
            "connectedTo": st.connected_to,
            "disconnectedSince": st.disconnected_since.map(format_time),
            "lastError": st.last_error,
            "lag": st.lag.map(|l| json!({"messages": l.messages, "bytes": l.bytes, "oldestUnackedMs": l.oldest_unacked_ms})),
            "incarnation": st.incarnation,
            "messages": self.queue.lock().message_count(),
            "appliedEnqueues": st.applied_enqueues,
            "appliedDequeues": st.applied_dequeues,
            "reconnects": st.reconnects,
        })
    }

    fn set_state(&self, state: State) {
        let mut st = self.status.lock();
        if st.state != state {
            tracing::info!(target: "HA", "replica '{}' of {}: {}", self.queue.name, self.original, state.name());
        }
        st.state = state;
    }

    /// The link task: connects through the address list until stopped or the original is
    /// lost. `first` is told how the first attempt ended.
    pub async fn run(self: Arc<Self>, first: oneshot::Sender<FirstOutcome>) {
        let mut first = Some(first);
        let mut stop = self.stop.subscribe();
        let mut backoff = self.settings.retry;
        let mut at = 0usize;
        // An attempt in this pass over the list reached the original and failed.
        let mut pass_failed = false;
        loop {
            if self.stopped() {
                break;
            }
            let addr = self.addresses[at % self.addresses.len()].clone();
            self.set_state_connecting();
            let ended = tokio::select! {
                e = self.session(&addr, &mut first) => e,
                _ = stop.wait_for(|s| *s) => Ended::Stopped,
            };
            let was_live = matches!(self.state(), State::Ready | State::CatchUp);
            match ended {
                Ended::Stopped => break,
                Ended::Lost(text) => {
                    tracing::warn!(target: "HA", "replica '{}': the original is lost ({text}); keeping its {} messages, still protected, until `qpid-ha detach` or a new `replicate`",
                        self.queue.name, self.queue.lock().message_count());
                    self.disconnected(State::OriginalLost(text.clone()), text.clone());
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(MgmtError::new(ErrorCode::PreconditionFailed, text)));
                    }
                    return;
                }
                Ended::Refused(code, text) => {
                    let shown = format!("{code} {text}");
                    tracing::warn!(target: "HA", "replica '{}': {} refused the link: {shown}", self.queue.name, addr);
                    pass_failed = true;
                    self.disconnected(State::Refused(shown.clone()), shown.clone());
                    if let Some(f) = first.take() {
                        let code = match code {
                            404 => ErrorCode::NotFound,
                            403 => ErrorCode::AccessDenied,
                            _ => ErrorCode::PreconditionFailed,
                        };
                        let _ = f.send(Err(MgmtError::new(
                            code,
                            format!(
                                "the original {addr} refused replication of '{}': {shown}",
                                self.queue.name
                            ),
                        )));
                        return;
                    }
                }
                Ended::Unreachable(text) => {
                    tracing::debug!(target: "HA", "replica '{}': {addr} unreachable: {text}", self.queue.name);
                    let next = match self.state() {
                        State::Refused(t) => State::Refused(t),
                        _ => State::Connecting,
                    };
                    self.disconnected(next, text);
                }
                Ended::Failed(text) => {
                    pass_failed = true;
                    tracing::info!(target: "HA", "replica '{}': link to {addr} failed: {text}", self.queue.name);
                    let next = match self.state() {
                        State::Refused(t) => State::Refused(t),
                        _ => State::Connecting,
                    };
                    self.disconnected(next, text);
                }
            }
            at += 1;
            if was_live {
                // It worked until now: retry at once, and the backoff starts again.
                backoff = self.settings.retry;
                continue;
            }
            // One pass over the whole list, then wait.
            if at.is_multiple_of(self.addresses.len()) {
                let wait = if pass_failed {
                    let w = backoff;
                    backoff = (backoff * 2).min(LINK_RETRY_MAX);
                    w
                } else {
                    self.settings.retry
                };
                pass_failed = false;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
        self.set_state(State::Connecting);
    }

    /// The link is down: remember since when, and why.
    fn disconnected(&self, state: State, error: String) {
        {
            let mut st = self.status.lock();
            st.connected_to = None;
            st.last_error = Some(error);
            st.reconnects += 1;
            if st.disconnected_since.is_none() {
                st.disconnected_since = Some(SystemTime::now());
            }
        }
        self.set_state(state);
    }

    fn set_state_connecting(&self) {
        let mut st = self.status.lock();
        if !matches!(st.state, State::Refused(_)) {
            st.state = State::Connecting;
        }
    }

    async fn session(
        &self,
        addr: &Address,
        first: &mut Option<oneshot::Sender<FirstOutcome>>,
    ) -> Ended {
        let s = &self.settings;
        let settings = s.link_settings(addr, "qpidd-rs ha link", false);
        let mut link = match Link::connect(&settings).await {
            Ok(l) => l,
            Err(e @ (LinkError::Io(_) | LinkError::Timeout("TCP connect"))) => {
                return Ended::Unreachable(e.to_string());
            }
            Err(e) => return failure(e, self.settings.cluster),
        };
        let window = u16::try_from(s.window).unwrap_or(u16::MAX);
        if let Err(e) = link.qos(window).await {
            return failure(e, self.settings.cluster);
        }
        let tag = rep::consumer_tag(&self.queue.name, &s.system_id);
        let incarnation = self.incarnation().unwrap_or_default();
        let mut info = FieldTable::default();
        info.insert(
            "system-id".into(),
            AMQPValue::LongString(LongString::from(s.system_id.as_str())),
        );
        let mut args = FieldTable::default();
        args.insert(
            rep::ARG_REPSUB.into(),
            AMQPValue::LongString(LongString::from(rep::REPSUB_QUEUE)),
        );
        args.insert(
            rep::ARG_VERSION.into(),
            AMQPValue::LongInt(rep::PROTOCOL_VERSION as i32),
        );
        args.insert(rep::ARG_INFO.into(), AMQPValue::FieldTable(info));
        args.insert(
            rep::ARG_INCARNATION.into(),
            AMQPValue::LongString(LongString::from(incarnation.as_str())),
        );
        if s.cluster {
            // Fencing: a primary of an older epoch refuses this link.
            let epoch = self
                .broker
                .lock()
                .as_ref()
                .and_then(std::sync::Weak::upgrade)
                .map_or(0, |b| b.epoch());
            args.insert(rep::ARG_EPOCH.into(), AMQPValue::LongLongInt(epoch as i64));
        }
        if let Err(e) = link.consume(&self.queue.name, &tag, args).await {
            return match e {
                LinkError::ChannelClosed { code: 404, text } if !incarnation.is_empty() => {
                    Ended::Lost(format!("the original queue is gone: {text}"))
                }
                LinkError::ChannelClosed { code: 406, text }
                    if text.contains("incarnation mismatch") =>
                {
                    Ended::Lost(format!("the original queue is another incarnation: {text}"))
                }
                other => failure(other, self.settings.cluster),
            };
        }
        {
            let mut st = self.status.lock();
            st.connected_to = Some(addr.to_string());
            st.disconnected_since = None;
        }
        // The ids this replica holds, in bounded chunks.
        let ids = self.queue.held_ids();
        let chunks = ids.to_wire_chunks();
        let n = chunks.len();
        for (i, chunk) in chunks.iter().enumerate() {
            link.publish(
                rep::CONTROL_EXCHANGE,
                &tag,
                &ids_properties(i + 1 == n),
                chunk,
            );
        }
        if let Err(e) = link.flush().await {
            return failure(e, self.settings.cluster);
        }
        let mut apply = Apply {
            replica: self,
            // The first data delivery without an `id` event before it has id 1.
            next_id: 1,
            last_tag: 0,
            persisted: false,
            applied: 0,
            ended: None,
            first,
        };
        // Batches applied but not acknowledged yet: a batch holding a persistent message is
        // acknowledged only once this broker's store has synced it. The sync of one batch
        // overlaps the reading and applying of the next; acknowledgements go out in order.
        let mut unacked: VecDeque<(u64, Option<oneshot::Receiver<()>>)> = VecDeque::new();
        loop {
            if self.stopped() {
                link.close().await;
                return Ended::Stopped;
            }
            let mut ack = 0;
            while let Some((tag, synced)) = unacked.front_mut() {
                let done = synced.as_mut().is_none_or(|rx| {
                    !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                });
                if !done {
                    break;
                }
                ack = *tag;
                unacked.pop_front();
            }
            if ack != 0 {
                link.ack(ack, true);
                if let Err(e) = link.flush().await {
                    return failure(e, self.settings.cluster);
                }
            }
            // Syncs pending and nothing buffered: wait for a sync or for input, whichever
            // comes first, without blocking in a read (an acknowledgement must not wait for
            // the original's next frame).
            if let Some((_, Some(synced))) = unacked.front_mut()
                && !link.has_buffered_frame()
            {
                // A slow sync must not look like a dead replica: heartbeats go on meanwhile.
                let beat = link
                    .heartbeat_at()
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                let synced_first = tokio::select! {
                    _ = synced => true,
                    r = link.readable() => match r {
                        Ok(()) => false,
                        Err(e) => return failure(e, self.settings.cluster),
                    },
                    _ = tokio::time::sleep_until(beat) => {
                        if let Err(e) = link.keep_alive().await {
                            return failure(e, self.settings.cluster);
                        }
                        continue;
                    }
                };
                if synced_first {
                    continue;
                }
                match link.try_fill() {
                    Ok(_) if !link.has_buffered_frame() => continue,
                    Ok(_) => {}
                    Err(e) => return failure(e, self.settings.cluster),
                }
            }
            let r = link.next_batch(|incoming| apply.incoming(incoming)).await;
            if apply.applied != 0 {
                self.status.lock().applied_enqueues += std::mem::take(&mut apply.applied);
            }
            if let Some(ended) = apply.ended.take() {
                link.close().await;
                return ended;
            }
            if let Err(e) = r {
                return failure(e, self.settings.cluster);
            }
            if apply.last_tag != 0 {
                // A persistent message is acknowledged (which releases the publisher's
                // confirm on the original) only once it is on this broker's disk too.
                let synced = if std::mem::take(&mut apply.persisted) {
                    self.store().and_then(|s| s.synced())
                } else {
                    None
                };
                unacked.push_back((apply.last_tag, synced));
                apply.last_tag = 0;
            }
        }
    }
}

/// The properties of an id-set chunk.
fn ids_properties(last: bool) -> Vec<u8> {
    use amq_protocol::frame::WriteContext;
    use amq_protocol::protocol::basic::{AMQPProperties, gen_properties};
    let mut h = FieldTable::default();
    h.insert(rep::HEADER_LAST.into(), AMQPValue::Boolean(last));
    let p = AMQPProperties::default()
        .with_content_type(rep::IDS_CONTENT_TYPE.into())
        .with_headers(h);
    gen_properties(&p)(WriteContext::from(Vec::new()))
        .map(|c| c.into_inner().0)
        .unwrap_or_else(|_| vec![0, 0])
}

fn failure(e: LinkError, cluster: bool) -> Ended {
    match e {
        // 530 at connection.open is a cluster backup's answer: not the primary, try the next
        // address (an original that is a cluster is given as the list of its members).
        LinkError::ConnectionClosed { code: 530, text } => Ended::Unreachable(text),
        LinkError::ChannelClosed { code: 406, text }
            if cluster
                && (text.contains("is itself a replica") || text.contains("stale primary")) =>
        {
            Ended::Unreachable(text)
        }
        LinkError::ConnectionClosed { code, text } if code == 403 || code == 530 => {
            Ended::Refused(code, text)
        }
        LinkError::ChannelClosed { code, text } => Ended::Refused(code, text),
        other => Ended::Failed(other.to_string()),
    }
}

/// Applies one session's stream to the queue.
struct Apply<'a> {
    replica: &'a Replica,
    next_id: u64,
    last_tag: u64,
    /// A persistent message went to a durable queue in this batch.
    persisted: bool,
    /// Enqueues applied in this batch, added to the status once per batch.
    applied: u64,
    ended: Option<Ended>,
    first: &'a mut Option<oneshot::Sender<FirstOutcome>>,
}

impl Apply<'_> {
    fn incoming(&mut self, incoming: Incoming<'_>) {
        if self.ended.is_some() {
            return;
        }
        match incoming {
            Incoming::Cancelled { .. } => {
                self.ended = Some(Ended::Lost("the original queue was deleted".into()));
            }
            Incoming::Deliver {
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                raw_properties,
                body,
            } => {
                self.last_tag = delivery_tag;
                if exchange == rep::EVENT_EXCHANGE {
                    self.event(routing_key, body);
                    return;
                }
                let id = self.next_id;
                self.next_id += 1;
                match Message::new(exchange, routing_key, raw_properties, body) {
                    Ok(m) => {
                        self.persisted |= m.persistent() && self.replica.queue.durable;
                        if self.replica.queue.apply_enqueue(id, m, redelivered) {
                            self.applied += 1;
                        }
                    }
                    Err(e) => {
                        self.ended = Some(Ended::Failed(format!(
                            "replicated message {id} is malformed: {e}"
                        )));
                    }
                }
            }
        }
    }

    fn event(&mut self, name: &str, body: &[u8]) {
        let r = self.replica;
        match name {
            event::INIT => self.init(body),
            event::ID => match <[u8; 8]>::try_from(body) {
                Ok(b) => self.next_id = u64::from_be_bytes(b),
                Err(_) => self.ended = Some(Ended::Failed("malformed id event".into())),
            },
            event::DEQUEUE => match IdRanges::from_wire(body) {
                Ok(ids) => {
                    let n = r.queue.apply_dequeue(&ids);
                    r.status.lock().applied_dequeues += n;
                }
                Err(e) => self.ended = Some(Ended::Failed(format!("malformed dequeue event: {e}"))),
            },
            event::READY => r.set_state(State::Ready),
            event::LAG => {
                if let Ok(v) = serde_json::from_slice::<Value>(body) {
                    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                    r.status.lock().lag = Some(Lag {
                        messages: n("messages"),
                        bytes: n("bytes"),
                        oldest_unacked_ms: n("oldest_unacked_ms"),
                    });
                }
            }
            other => {
                tracing::debug!(target: "HA", "replica '{}': unknown event '{other}' ignored", r.queue.name)
            }
        }
    }

    fn init(&mut self, body: &[u8]) {
        let r = self.replica;
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            self.ended = Some(Ended::Failed("malformed init event".into()));
            return;
        };
        let incarnation = v
            .get("incarnation")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(known) = r.incarnation()
            && known != incarnation
        {
            self.ended = Some(Ended::Lost(format!(
                "the original queue is another incarnation ({incarnation}, expected {known})"
            )));
            return;
        }
        let theirs = v.get("settings").cloned().unwrap_or(Value::Null);
        let ours = r.queue.settings.replication_signature();
        if theirs != ours {
            self.ended = Some(Ended::Refused(
                406,
                format!("queue arguments differ: the original has {theirs}, the replica {ours}"),
            ));
            return;
        }
        {
            let mut st = r.status.lock();
            st.incarnation = Some(incarnation);
        }
        r.definition_changed();
        r.set_state(State::CatchUp);
        if let Some(f) = self.first.take() {
            let _ = f.send(Ok(()));
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC.
fn format_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_636_551);
        assert_eq!(format_time(t), "2026-11-25 19:55:51");
        assert_eq!(format_time(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00");
    }

    #[test]
    fn id_chunk_properties_carry_the_last_flag() {
        let raw = ids_properties(true);
        let s = broker_core::protocol::hot::summarize_properties(&raw).unwrap();
        let h = broker_core::fields::decode_table(s.headers.unwrap()).unwrap();
        assert_eq!(
            broker_core::fields::get(&h, rep::HEADER_LAST).and_then(broker_core::fields::as_bool),
            Some(true)
        );
    }
}
