//! Publisher confirms of one channel, and the holds replication puts on them
//! (`docs/design/replication.md` section 5, DESIGN.md decision 6).
//!
//! Every publish on a channel in confirm mode gets the next sequence number. Once it is routed
//! it is *decided*; it is confirmed (`basic.ack`) when it is decided and no hold on it is left.
//! A hold is taken by a replicating subscription in state ready when the message is enqueued on
//! the original, and released (by dropping the [`Hold`]) when the replica acknowledges it, when
//! the message leaves the original before it was sent, or when the subscription stops being
//! ready. Acks are written in order, coalesced with `multiple`: everything below the oldest
//! held sequence number that is decided goes out in one frame.
//!
//! Lock order: queue → replicating subscription → `Confirms` → outbound buffer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use amq_protocol::protocol::{AMQPClass, tx};

use crate::delivery::ChannelLink;
use crate::protocol::control::write_method;
use crate::protocol::hot;

/// The confirms of one channel.
#[derive(Debug)]
pub struct Confirms {
    link: Arc<ChannelLink>,
    /// Sequence number of the last publish decided (routed, or nacked). Written by the
    /// publishing channel without the lock; a release that reads an older value leaves the
    /// newer acks to the channel's own flush at the end of its batch.
    decided: AtomicU64,
    /// A transaction's commit: sequence 1 is the whole commit, answered with tx.commit-ok.
    commit: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Acked (or nacked) up to here.
    written: u64,
    /// Holds per sequence number, ascending (publishes are held in order); entries whose count
    /// fell to 0 are dropped once they reach the front.
    held: VecDeque<(u64, u32)>,
    /// Entries of `held` with a non-zero count.
    held_live: usize,
    /// Holds taken since the channel was created (statistics).
    holds_taken: u64,
}

/// A publish that may be held: what a queue observer gets at enqueue.
#[derive(Debug, Clone, Copy)]
pub struct PendingConfirm<'a> {
    /// The channel's confirms.
    pub confirms: &'a Arc<Confirms>,
    /// The publish's sequence number.
    pub seq: u64,
}

impl PendingConfirm<'_> {
    /// Holds the confirm back until the returned `Hold` is dropped.
    pub fn hold(&self) -> Hold {
        let mut guard = self.confirms.state.lock();
        let st = &mut *guard;
        let at = match st.held.back() {
            Some(&(seq, _)) if seq < self.seq => st.held.len(),
            Some(&(seq, _)) if seq == self.seq => st.held.len() - 1,
            // Not expected (sequence numbers only grow); keep the order anyway.
            _ => st.held.partition_point(|&(s, _)| s < self.seq),
        };
        match st.held.get_mut(at) {
            Some((seq, n)) if *seq == self.seq => {
                if *n == 0 {
                    st.held_live += 1;
                }
                *n += 1;
            }
            _ => {
                st.held.insert(at, (self.seq, 1));
                st.held_live += 1;
            }
        }
        st.holds_taken += 1;
        Hold {
            confirms: Some(self.confirms.clone()),
            seq: self.seq,
        }
    }
}

/// One hold on a publish's confirm; dropping it releases it ([`release_all`] releases many
/// with one lock and one ack per channel).
#[derive(Debug)]
pub struct Hold {
    confirms: Option<Arc<Confirms>>,
    seq: u64,
}

impl Hold {
    /// Gives up waiting: the publish is refused (`basic.nack`), and the hold released.
    pub fn nack(mut self) {
        if let Some(c) = self.confirms.take() {
            let mut st = c.state.lock();
            st.release(self.seq);
            let ch = c.link.channel;
            let seq = self.seq;
            if seq > st.written {
                c.link
                    .out
                    .write(|out| hot::write_nack(out, ch, seq, false, false));
            }
            c.flush_locked(&mut st);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(c) = self.confirms.take() {
            let mut st = c.state.lock();
            st.release(self.seq);
            c.flush_locked(&mut st);
        }
    }
}

/// Releases holds, grouped by channel: one lock and at most one ack per channel, however many
/// holds (a replica's `multiple` ack releases a whole window at once).
pub fn release_all(holds: impl IntoIterator<Item = Hold>) {
    let mut pending: Vec<(Arc<Confirms>, u64)> = holds
        .into_iter()
        .filter_map(|mut h| h.confirms.take().map(|c| (c, h.seq)))
        .collect();
    if pending.is_empty() {
        return;
    }
    pending.sort_by_key(|(c, seq)| (Arc::as_ptr(c) as usize, *seq));
    let mut i = 0;
    while i < pending.len() {
        let c = pending[i].0.clone();
        let mut st = c.state.lock();
        while i < pending.len() && Arc::ptr_eq(&pending[i].0, &c) {
            st.release(pending[i].1);
            i += 1;
        }
        c.flush_locked(&mut st);
    }
}

impl Confirms {
    /// Confirms written on `link`'s channel.
    pub fn new(link: Arc<ChannelLink>) -> Arc<Confirms> {
        Arc::new(Confirms {
            link,
            decided: AtomicU64::new(0),
            commit: false,
            state: Mutex::new(State::default()),
        })
    }

    /// The record of one tx.commit: its publishes all take sequence number 1, and tx.commit-ok
    /// is written when it is decided and no hold is left.
    pub fn for_commit(link: Arc<ChannelLink>) -> Arc<Confirms> {
        Arc::new(Confirms {
            link,
            decided: AtomicU64::new(0),
            commit: true,
            state: Mutex::new(State::default()),
        })
    }

    /// The publish `seq` is routed (its holds, if any, are taken). The ack is written by the
    /// next [`Confirms::flush`] or release.
    pub fn decided(&self, seq: u64) {
        self.decided.store(seq, Ordering::Release);
    }

    /// The publish `seq` was refused by a queue: writes the acks that can go before it, then
    /// its nack.
    pub fn nack(&self, seq: u64) {
        let mut st = self.state.lock();
        self.decided.store(seq, Ordering::Release);
        let before = ack_upto(&st, self.decided.load(Ordering::Acquire)).min(seq - 1);
        let written = st.written;
        let ch = self.link.channel;
        self.link.out.write(|out| {
            if before > written {
                hot::write_ack(out, ch, before, true);
            }
            hot::write_nack(out, ch, seq, false, false);
        });
        if !st.held_below(seq) {
            st.written = seq;
        }
    }

    /// Writes the acks that are due, as one `multiple` ack.
    pub fn flush(&self) {
        let mut st = self.state.lock();
        self.flush_locked(&mut st);
    }

    fn flush_locked(&self, st: &mut State) {
        st.drop_released_front();
        let upto = ack_upto(st, self.decided.load(Ordering::Acquire));
        if upto > st.written {
            st.written = upto;
            let ch = self.link.channel;
            if self.commit {
                let ok = AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}));
                self.link.out.write(|out| write_method(out, ch, ok));
            } else {
                self.link
                    .out
                    .write(|out| hot::write_ack(out, ch, upto, true));
            }
        }
    }

    /// Publishes whose confirm is held now.
    pub fn held_count(&self) -> usize {
        self.state.lock().held_live
    }
}

impl State {
    fn release(&mut self, seq: u64) {
        let at = match self.held.front() {
            Some(&(s, _)) if s == seq => 0,
            _ => self.held.partition_point(|&(s, _)| s < seq),
        };
        if let Some((s, n)) = self.held.get_mut(at)
            && *s == seq
            && *n > 0
        {
            *n -= 1;
            if *n == 0 {
                self.held_live -= 1;
            }
        }
    }

    fn drop_released_front(&mut self) {
        while self.held.front().is_some_and(|&(_, n)| n == 0) {
            self.held.pop_front();
        }
    }

    fn held_below(&self, seq: u64) -> bool {
        self.held
            .iter()
            .take_while(|&&(s, _)| s < seq)
            .any(|&(_, n)| n > 0)
    }
}

/// The highest sequence number that can be acked: decided, and below every held one.
fn ack_upto(st: &State, decided: u64) -> u64 {
    match st.held.iter().find(|&&(_, n)| n > 0) {
        Some(&(first, _)) => decided.min(first - 1),
        None => decided,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Outbound;
    use crate::protocol::frame::split_frame;

    fn confirms() -> (Arc<Confirms>, Arc<Outbound>) {
        let out = Arc::new(Outbound::default());
        let link = Arc::new(ChannelLink::new(1, 1, out.clone(), 131_072, true, 65_536));
        (Confirms::new(link), out)
    }

    /// (method id, delivery tag, multiple) of each frame written.
    fn written(out: &Outbound) -> Vec<(u16, u64, bool)> {
        let bytes = out.take_for_test();
        let mut v = Vec::new();
        let mut at = 0;
        while let Ok(Some((f, n))) = split_frame(&bytes[at..], 0) {
            let (_, m, args) = hot::method_ids(f.payload).unwrap();
            let s = hot::parse_ack(args).unwrap();
            v.push((m, s.delivery_tag, s.multiple));
            at += n;
        }
        v
    }

    #[test]
    fn unheld_publishes_are_acked_together_at_flush() {
        let (c, out) = confirms();
        c.decided(1);
        c.decided(2);
        c.flush();
        assert_eq!(written(&out), [(80, 2, true)]);
        c.flush();
        assert!(written(&out).is_empty());
    }

    #[test]
    fn a_hold_stops_acks_at_its_sequence_until_released() {
        let (c, out) = confirms();
        c.decided(1);
        let h = PendingConfirm {
            confirms: &c,
            seq: 2,
        }
        .hold();
        c.decided(2);
        c.decided(3);
        c.flush();
        assert_eq!(written(&out), [(80, 1, true)]);
        assert_eq!(c.held_count(), 1);
        drop(h);
        assert_eq!(written(&out), [(80, 3, true)]);
    }

    #[test]
    fn two_holds_on_one_publish_both_must_go() {
        let (c, out) = confirms();
        let p = PendingConfirm {
            confirms: &c,
            seq: 1,
        };
        let (a, b) = (p.hold(), p.hold());
        c.decided(1);
        c.flush();
        drop(a);
        assert!(written(&out).is_empty());
        drop(b);
        assert_eq!(written(&out), [(80, 1, true)]);
    }

    #[test]
    fn a_nack_goes_after_the_acks_before_it() {
        let (c, out) = confirms();
        c.decided(1);
        c.nack(2);
        c.decided(3);
        c.flush();
        assert_eq!(
            written(&out),
            [(80, 1, true), (120, 2, false), (80, 3, true)]
        );
    }

    #[test]
    fn a_commit_answers_commit_ok_once_its_holds_are_released() {
        let out = Arc::new(Outbound::default());
        let link = Arc::new(ChannelLink::new(1, 1, out.clone(), 131_072, true, 65_536));
        let c = Confirms::for_commit(link);
        let h = PendingConfirm {
            confirms: &c,
            seq: 1,
        }
        .hold();
        c.decided(1);
        c.flush();
        assert!(out.take_for_test().is_empty());
        drop(h);
        let bytes = out.take_for_test();
        let (f, _) = split_frame(&bytes, 0).unwrap().unwrap();
        assert_eq!(&f.payload[..4], &[0, 90, 0, 21], "tx.commit-ok");
    }
}
