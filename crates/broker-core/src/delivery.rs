//! What a queue needs to hand a message to a consumer on another connection without a hop
//! through a task: the connection's outbound buffer (`Outbound`), the channel's delivery state
//! (`ChannelLink`: delivery tags, unacked messages, prefetch) and the `Consumer`.
//!
//! Lock order, always: queue state, then channel link state, then outbound buffer. Code that
//! holds a link lock never takes a queue lock (acks collect what they settle, release the link,
//! then visit the queues).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::AmqpError;
use crate::queue::{Queue, QueuedMessage};

/// Bytes queued for one connection's socket above which queues stop delivering to it (its
/// consumers are slow readers), and below which they resume.
pub const OUTBOUND_HIGH_WATER_BYTES: usize = 4 * 1024 * 1024;
/// See `OUTBOUND_HIGH_WATER_BYTES`.
pub const OUTBOUND_LOW_WATER_BYTES: usize = 1024 * 1024;

/// A connection's outgoing bytes. Anyone may append frames. They reach the socket in one of
/// two ways, and never both at once (`OutboundBuf::writing`), so bytes go out in append order:
///
/// * inline: frames appended while a reader task handles a batch of frames (`run_batch`) are
///   written by that task when the batch ends, with non-blocking writes. A publish read on one
///   thread then reaches its consumer's socket without waking any other task, which is what
///   keeps latency low;
/// * by the connection's writer task, woken when bytes are appended outside a batch, or when an
///   inline write could not finish (the socket buffer was full).
///
/// Either way, everything appended since the last write goes out in one syscall.
#[derive(Default)]
pub struct Outbound {
    buf: Mutex<OutboundBuf>,
    notify: Notify,
    /// Bytes appended and not yet written to the socket.
    pending_bytes: AtomicUsize,
    /// Queues that skipped a consumer of this connection because it was congested.
    waiting_queues: Mutex<Vec<Weak<Queue>>>,
    /// A non-blocking write to the connection's socket, set by the I/O layer.
    try_write: OnceLock<TryWrite>,
    /// Set by [`Outbound::abort`]: the connection must end now.
    aborted: AtomicBool,
    abort_notify: Notify,
}

/// A non-blocking write: how many bytes the socket took, `WouldBlock` when none.
pub type TryWrite = Box<dyn Fn(&[u8]) -> std::io::Result<usize> + Send + Sync>;

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("pending_bytes", &self.pending_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct OutboundBuf {
    bytes: Vec<u8>,
    closing: bool,
    /// The socket is gone: appended bytes are dropped instead of piling up.
    dead: bool,
    /// Someone (the writer task or an inline flush) is writing taken bytes to the socket.
    writing: bool,
    /// What an inline flush could not write (the socket was full), handed to the writer task
    /// with `writing` left set: the writer finishes it before anything appended since.
    handoff: Vec<u8>,
}

thread_local! {
    /// Outbounds that received bytes during the current batch on this thread.
    static DEFERRED: RefCell<Option<Vec<Arc<Outbound>>>> = const { RefCell::new(None) };
    /// Work deferred to the end of the current batch on this thread (before the flushes).
    static BATCH_END: RefCell<Vec<Arc<dyn EndOfBatch>>> = const { RefCell::new(Vec::new()) };
}

/// Something that coalesces work over a batch (a replicating subscription's dequeue events).
pub trait EndOfBatch: Send + Sync {
    /// Called once at the end of the batch it was deferred in.
    fn end_of_batch(&self);
}

/// Asks for `hook.end_of_batch()` when the batch running on this thread ends. Returns false
/// (and does nothing) outside a batch: the caller then does the work at once.
pub fn defer_to_end_of_batch(hook: Arc<dyn EndOfBatch>) -> bool {
    let in_batch = DEFERRED.with(|d| d.borrow().is_some());
    if in_batch {
        BATCH_END.with(|b| b.borrow_mut().push(hook));
    }
    in_batch
}

/// Runs `handle` (a batch of frames read in one go) and then writes, inline, everything it
/// appended to any connection's outbound buffer.
pub fn run_batch<R>(handle: impl FnOnce() -> R) -> R {
    let nested = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        let nested = d.is_some();
        if !nested {
            *d = Some(Vec::new());
        }
        nested
    });
    if nested {
        // The enclosing batch flushes what this one appends.
        return handle();
    }
    let r = handle();
    // Deferred work first: what it writes is flushed with the rest.
    loop {
        let hooks = BATCH_END.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if hooks.is_empty() {
            break;
        }
        for h in hooks {
            h.end_of_batch();
        }
    }
    let touched = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    let mut spare = Vec::new();
    for out in touched {
        out.flush_inline(&mut spare);
    }
    r
}

impl Outbound {
    /// Sets the non-blocking write used for inline flushes.
    pub fn set_try_write(&self, try_write: TryWrite) {
        let _ = self.try_write.set(try_write);
    }

    /// Appends frames with `write`. Bytes appended to an idle buffer are flushed at the end of
    /// the current batch, or, outside a batch, by waking the writer task.
    pub fn write<R>(self: &Arc<Self>, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut b = self.buf.lock();
        let before = b.bytes.len();
        let r = write(&mut b.bytes);
        let added = b.bytes.len() - before;
        if b.dead {
            b.bytes.clear();
            return r;
        }
        // Counted before the lock is released: a writer that takes these bytes (under the
        // lock) and reports them written must find them counted.
        self.pending_bytes.fetch_add(added, Ordering::Relaxed);
        drop(b);
        if added > 0 && before == 0 && !self.defer() {
            self.notify.notify_one();
        }
        r
    }

    /// Appends frames like [`Outbound::write`], but leaves the writing to the connection's
    /// writer task even inside a batch: the socket write then runs on another thread than the
    /// reader that produced the frames (replication streams, whose writes would otherwise add
    /// to the publishing connection's thread).
    pub fn write_by_writer<R>(&self, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut b = self.buf.lock();
        let before = b.bytes.len();
        let r = write(&mut b.bytes);
        let added = b.bytes.len() - before;
        if b.dead {
            b.bytes.clear();
            return r;
        }
        // Counted under the lock, as in `write`.
        self.pending_bytes.fetch_add(added, Ordering::Relaxed);
        drop(b);
        if added > 0 && before == 0 {
            self.notify.notify_one();
        }
        r
    }

    /// Adds this buffer to the current batch's list, if a batch runs on this thread.
    fn defer(self: &Arc<Self>) -> bool {
        if self.try_write.get().is_none() {
            return false;
        }
        DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some(list) => {
                if !list.iter().any(|o| Arc::ptr_eq(o, self)) {
                    list.push(self.clone());
                }
                true
            }
            None => false,
        })
    }

    /// Writes what is queued with non-blocking writes; what the socket does not take is left
    /// for the writer task, which is woken.
    fn flush_inline(&self, spare: &mut Vec<u8>) {
        let Some(try_write) = self.try_write.get() else {
            self.notify.notify_one();
            return;
        };
        spare.clear();
        if self.begin_inline_write(spare).is_none() {
            // The writer task is writing; it looks for more when it finishes.
            return;
        }
        let mut at = 0;
        while at < spare.len() {
            match try_write(&spare[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.mark_dead();
                    break;
                }
            }
        }
        if at == spare.len() {
            self.end_write();
        } else {
            // The socket is full: the writer task takes over the rest (and, until it is done,
            // inline flushes of this connection are skipped instead of retried per batch).
            spare.drain(..at);
            self.hand_off(spare);
        }
        self.written(at);
        spare.clear();
    }

    fn hand_off(&self, rest: &mut Vec<u8>) {
        let mut b = self.buf.lock();
        debug_assert!(b.writing && b.handoff.is_empty());
        if b.dead {
            // Nothing more will be written: release the write so the writer task can see the
            // close and end.
            b.writing = false;
        } else {
            std::mem::swap(&mut b.handoff, rest);
        }
        drop(b);
        self.notify.notify_one();
    }

    /// Asks the writer to flush what is queued and then shut the socket down. Frames appended
    /// after this are still written if they arrive before the writer sees the flag.
    pub fn close(&self) {
        self.buf.lock().closing = true;
        self.notify.notify_one();
    }

    /// Ends the connection from the sending side (a peer that left too much unread): what is
    /// queued is dropped, nothing more is appended, and [`Outbound::aborted`] completes, on
    /// which the connection's reader hangs up.
    pub fn abort(&self) {
        self.mark_dead();
        self.aborted.store(true, Ordering::Release);
        self.abort_notify.notify_waiters();
    }

    /// Completes once [`Outbound::abort`] was called.
    pub async fn aborted(&self) {
        loop {
            let notified = self.abort_notify.notified();
            if self.aborted.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Bytes appended and not yet written to the socket.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    /// The writer could not write: from now on appended bytes are discarded.
    pub fn mark_dead(&self) {
        let mut b = self.buf.lock();
        b.dead = true;
        b.bytes.clear();
    }

    /// Takes the bytes to write next into `spare` (which must be empty): what an inline flush
    /// handed off, else the queued bytes, unless someone else is writing (`None`). Only the
    /// writer task may take a hand-off. Returns whether a close was requested.
    pub fn begin_write(&self, spare: &mut Vec<u8>) -> Option<bool> {
        debug_assert!(spare.is_empty());
        let mut b = self.buf.lock();
        if !b.handoff.is_empty() {
            // Left by an inline flush; `writing` is still set on our behalf.
            std::mem::swap(&mut b.handoff, spare);
            return Some(b.closing);
        }
        if b.writing {
            return None;
        }
        std::mem::swap(&mut b.bytes, spare);
        b.writing = !spare.is_empty();
        Some(b.closing)
    }

    /// `begin_write` for an inline flush: never takes a hand-off (that is the writer's).
    fn begin_inline_write(&self, spare: &mut Vec<u8>) -> Option<bool> {
        debug_assert!(spare.is_empty());
        let mut b = self.buf.lock();
        if b.writing {
            return None;
        }
        std::mem::swap(&mut b.bytes, spare);
        b.writing = !spare.is_empty();
        Some(b.closing)
    }

    /// Ends a write begun with `begin_write`; the writer task is woken if anything is left to
    /// do.
    pub fn end_write(&self) {
        let mut b = self.buf.lock();
        b.writing = false;
        let more = !b.bytes.is_empty() || b.closing;
        drop(b);
        if more {
            self.notify.notify_one();
        }
    }

    /// Wakes the writer task (its heartbeat interval changed).
    pub fn wake_writer(&self) {
        self.notify.notify_one();
    }

    /// Waits until something is appended, a write ends or a close is requested.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Called after `n` bytes reached the socket. Wakes queues that were waiting for this
    /// connection to drain.
    pub fn written(&self, n: usize) {
        if n == 0 {
            return;
        }
        let left = self.pending_bytes.fetch_sub(n, Ordering::Relaxed) - n;
        if left < OUTBOUND_LOW_WATER_BYTES {
            let waiting = std::mem::take(&mut *self.waiting_queues.lock());
            for q in waiting.iter().filter_map(Weak::upgrade) {
                q.dispatch();
            }
        }
    }

    /// True if queues should not deliver more to this connection for now.
    pub fn is_congested(&self) -> bool {
        self.pending_bytes.load(Ordering::Relaxed) > OUTBOUND_HIGH_WATER_BYTES
    }

    /// Registers a queue to be re-dispatched once this connection drains.
    pub fn wait_for_drain(&self, queue: &Arc<Queue>) {
        let mut w = self.waiting_queues.lock();
        if !w.iter().any(|x| x.as_ptr() == Arc::as_ptr(queue)) {
            w.push(Arc::downgrade(queue));
        }
    }

    /// Test support: takes everything queued, as a writer would.
    pub fn take_for_test(&self) -> Vec<u8> {
        std::mem::take(&mut self.buf.lock().bytes)
    }
}

/// A delivery awaiting acknowledgement.
#[derive(Debug)]
pub struct Unacked {
    /// Where it came from.
    pub queue: Arc<Queue>,
    /// The message and its id in that queue.
    pub entry: QueuedMessage,
    /// The consumer it went to (`None` for basic.get).
    pub consumer: Option<Arc<Consumer>>,
}

/// The part of a channel that queues deliver through.
#[derive(Debug)]
pub struct ChannelLink {
    /// The channel number.
    pub channel: u16,
    /// The connection's id (exclusive queues belong to one).
    pub connection_id: u64,
    /// The connection's outbound buffer.
    pub out: Arc<Outbound>,
    /// The negotiated frame_max, for splitting bodies.
    pub frame_max: u32,
    /// The client understands server-sent basic.cancel.
    pub cancel_notify: bool,
    state: Mutex<LinkState>,
}

/// Delivery state of a channel.
#[derive(Debug)]
pub struct LinkState {
    next_delivery_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// basic.qos global: a limit on the channel's unacked deliveries (0 = none).
    pub global_prefetch: u32,
    max_unacked: u32,
    /// channel.flow: deliveries paused when false.
    pub flow_active: bool,
    open: bool,
    /// The channel's consumers by tag.
    pub consumers: HashMap<String, Arc<Consumer>>,
}

impl ChannelLink {
    /// A new open channel.
    pub fn new(
        channel: u16,
        connection_id: u64,
        out: Arc<Outbound>,
        frame_max: u32,
        cancel_notify: bool,
        max_unacked: u32,
    ) -> ChannelLink {
        ChannelLink {
            channel,
            connection_id,
            out,
            frame_max,
            cancel_notify,
            state: Mutex::new(LinkState {
                next_delivery_tag: 1,
                unacked: BTreeMap::new(),
                global_prefetch: 0,
                max_unacked,
                flow_active: true,
                open: true,
                consumers: HashMap::new(),
            }),
        }
    }

    /// Locks the delivery state.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, LinkState> {
        self.state.lock()
    }

    /// Marks the channel closed and takes every unacked delivery and consumer, for requeueing
    /// and cancelling.
    pub fn close(&self) -> (Vec<Unacked>, Vec<Arc<Consumer>>) {
        let mut s = self.state.lock();
        s.open = false;
        let unacked = std::mem::take(&mut s.unacked).into_values().collect();
        let consumers = s.consumers.drain().map(|(_, c)| c).collect();
        (unacked, consumers)
    }
}

impl LinkState {
    /// True if `consumer` (or basic.get when `None`) may take one more unacked delivery.
    pub fn has_credit(&self, consumer: Option<&Consumer>, no_ack: bool) -> bool {
        if !self.open {
            return false;
        }
        if no_ack {
            return consumer.is_none() || self.flow_active;
        }
        if consumer.is_some() && !self.flow_active {
            return false;
        }
        let unacked = self.unacked.len() as u32;
        if unacked >= self.max_unacked {
            return false;
        }
        if self.global_prefetch != 0 && unacked >= self.global_prefetch && consumer.is_some() {
            return false;
        }
        match consumer {
            Some(c) => c.prefetch == 0 || c.unacked.load(Ordering::Relaxed) < c.prefetch,
            None => true,
        }
    }

    /// Takes the next delivery tag.
    pub fn next_tag(&mut self) -> u64 {
        let t = self.next_delivery_tag;
        self.next_delivery_tag += 1;
        t
    }

    /// Records an unacked delivery under `tag`.
    pub fn track(&mut self, tag: u64, unacked: Unacked) {
        if let Some(c) = &unacked.consumer {
            c.unacked.fetch_add(1, Ordering::Relaxed);
        }
        let previous = self.unacked.insert(tag, unacked);
        debug_assert!(previous.is_none(), "delivery tag {tag} reused");
    }

    /// Removes the deliveries an ack, nack or reject names, appending them to `out`. A tag that
    /// is not outstanding is a 406 channel error (as RabbitMQ), unless it is `multiple` with
    /// tag 0, which means "everything".
    pub fn settle(
        &mut self,
        tag: u64,
        multiple: bool,
        out: &mut Vec<Unacked>,
    ) -> Result<(), AmqpError> {
        if multiple {
            if tag != 0 && !self.unacked.contains_key(&tag) && tag >= self.next_delivery_tag {
                return Err(AmqpError::precondition_failed(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            let upto = if tag == 0 { u64::MAX } else { tag };
            let rest = self.unacked.split_off(&upto.saturating_add(1));
            let taken = std::mem::replace(&mut self.unacked, rest);
            out.extend(taken.into_values());
        } else {
            match self.unacked.remove(&tag) {
                Some(u) => out.push(u),
                None => {
                    return Err(AmqpError::precondition_failed(format!(
                        "unknown delivery tag {tag}"
                    )));
                }
            }
        }
        for u in out.iter() {
            if let Some(c) = &u.consumer {
                c.unacked.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Takes every unacked delivery (basic.recover).
    pub fn take_all(&mut self) -> Vec<Unacked> {
        let all: Vec<Unacked> = std::mem::take(&mut self.unacked).into_values().collect();
        for u in &all {
            if let Some(c) = &u.consumer {
                c.unacked.fetch_sub(1, Ordering::Relaxed);
            }
        }
        all
    }

    /// Number of unacked deliveries.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }
}

/// A subscription of a channel to a queue.
#[derive(Debug)]
pub struct Consumer {
    /// The consumer tag.
    pub tag: String,
    /// The channel it delivers on.
    pub link: Arc<ChannelLink>,
    /// The queue it consumes from.
    pub queue: Arc<Queue>,
    /// Messages are settled when sent.
    pub no_ack: bool,
    /// The only consumer of its queue.
    pub exclusive: bool,
    /// Per-consumer prefetch (basic.qos with global=false before consume; 0 = none).
    pub prefetch: u32,
    /// basic.consume arguments.
    pub arguments: FieldTable,
    unacked: AtomicU32,
    cancelled: AtomicBool,
}

impl Consumer {
    /// A new consumer.
    pub fn new(
        tag: String,
        link: Arc<ChannelLink>,
        queue: Arc<Queue>,
        no_ack: bool,
        exclusive: bool,
        prefetch: u32,
        arguments: FieldTable,
    ) -> Consumer {
        Consumer {
            tag,
            link,
            queue,
            no_ack,
            exclusive,
            prefetch,
            arguments,
            unacked: AtomicU32::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Marks it cancelled; returns false if it already was.
    pub fn mark_cancelled(&self) -> bool {
        !self.cancelled.swap(true, Ordering::AcqRel)
    }

    /// Its unacked deliveries.
    pub fn unacked(&self) -> u32 {
        self.unacked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// An outbound whose "socket" takes at most `take` bytes per call, then would block, and
    /// fails every write once `fail` is set.
    fn outbound(take: usize, fail: bool) -> (Arc<Outbound>, Arc<StdMutex<Vec<u8>>>) {
        let out = Arc::new(Outbound::default());
        let sink = Arc::new(StdMutex::new(Vec::new()));
        let written = sink.clone();
        let calls = AtomicUsize::new(0);
        out.set_try_write(Box::new(move |bytes: &[u8]| {
            if fail {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            if calls.fetch_add(1, Ordering::Relaxed) > 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WouldBlock));
            }
            let n = bytes.len().min(take);
            written.lock().unwrap().extend_from_slice(&bytes[..n]);
            Ok(n)
        }));
        (out, sink)
    }

    /// Bytes are counted before a writer can take them: a writer thread that takes what is
    /// queued and reports it written while another thread appends never finds more written
    /// than counted (an underflow panicked a broker worker in a debug build), and the count is
    /// zero once all is written.
    #[test]
    fn written_bytes_are_never_more_than_the_bytes_counted() {
        let out = Arc::new(Outbound::default());
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (out, done) = (out.clone(), done.clone());
            std::thread::spawn(move || {
                let mut spare = Vec::new();
                let mut total = 0usize;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    spare.clear();
                    if out.begin_write(&mut spare).is_some() && !spare.is_empty() {
                        let n = spare.len();
                        out.end_write();
                        out.written(n);
                        total += n;
                    } else if finished {
                        return total;
                    }
                }
            })
        };
        for _ in 0..200_000 {
            out.write(|b| b.push(7));
        }
        done.store(true, Ordering::Release);
        assert_eq!(writer.join().expect("the writer thread"), 200_000);
        assert_eq!(out.pending_bytes(), 0);
    }

    #[test]
    fn a_batch_writes_inline_what_it_appended() {
        let (out, sink) = outbound(usize::MAX, false);
        run_batch(|| out.write(|b| b.extend_from_slice(b"hello")));
        assert_eq!(&*sink.lock().unwrap(), b"hello");
        let mut spare = Vec::new();
        assert_eq!(out.begin_write(&mut spare), Some(false));
        assert!(spare.is_empty(), "nothing left for the writer");
        assert!(!out.is_congested());
    }

    #[test]
    fn a_full_socket_hands_the_rest_to_the_writer_in_order() {
        let (out, sink) = outbound(3, false);
        run_batch(|| out.write(|b| b.extend_from_slice(b"abcdef")));
        assert_eq!(&*sink.lock().unwrap(), b"abc");
        // Appended after the hand-off: must go out after it, and no inline write is tried.
        run_batch(|| out.write(|b| b.extend_from_slice(b"gh")));
        assert_eq!(&*sink.lock().unwrap(), b"abc");
        let mut spare = Vec::new();
        assert_eq!(out.begin_write(&mut spare), Some(false));
        assert_eq!(spare, b"def");
        out.end_write();
        out.written(spare.len());
        spare.clear();
        assert_eq!(out.begin_write(&mut spare), Some(false));
        assert_eq!(spare, b"gh");
    }

    #[test]
    fn a_failed_inline_write_lets_the_writer_see_the_close() {
        let (out, _sink) = outbound(0, true);
        run_batch(|| out.write(|b| b.extend_from_slice(b"lost")));
        out.close();
        let mut spare = Vec::new();
        assert_eq!(
            out.begin_write(&mut spare),
            Some(true),
            "the writer is not locked out"
        );
        assert!(spare.is_empty());
    }
}
