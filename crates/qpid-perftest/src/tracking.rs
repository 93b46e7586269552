//! Loss and duplicate accounting.
//!
//! Each consumer keeps its own [`Receipts`] (one growable [`Bitmap`] per producer, indexed by
//! sequence number), so the hot path shares nothing; a message seen twice by one consumer is a
//! duplicate at once, and merging the consumers' receipts at the end adds the messages seen by
//! more than one consumer. Each producer with confirms keeps a [`ConfirmTracker`]. [`account`]
//! then compares what was sent (and, with confirms, acked by the broker) with what arrived.

/// A growable set of `u32` sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// Sets bit `i`; returns whether it was already set.
    #[inline]
    pub fn test_and_set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            self.words.resize((w + 1).next_power_of_two().max(1024), 0);
        }
        let mask = 1u64 << (i % 64);
        let was = self.words[w] & mask != 0;
        self.words[w] |= mask;
        was
    }

    /// Whether bit `i` is set.
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// How many bits are set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds `other` to this set; returns how many bits were in both.
    pub fn merge(&mut self, other: &Bitmap) -> u64 {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        let mut both = 0;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            both += u64::from((*a & *b).count_ones());
            *a |= *b;
        }
        both
    }
}

/// What one consumer (or, merged, all of them) received.
#[derive(Debug, Clone, Default)]
pub struct Receipts {
    per_producer: Vec<Bitmap>,
    /// Receipts of a (producer, seq) already received.
    pub duplicates: u64,
}

impl Receipts {
    /// Records the receipt of (producer, seq).
    #[inline]
    pub fn record(&mut self, producer: u16, seq: u32) {
        let p = producer as usize;
        if p >= self.per_producer.len() {
            self.per_producer.resize_with(p + 1, Bitmap::default);
        }
        if self.per_producer[p].test_and_set(u64::from(seq)) {
            self.duplicates += 1;
        }
    }

    /// Whether (producer, seq) was received.
    pub fn contains(&self, producer: u16, seq: u32) -> bool {
        self.per_producer
            .get(producer as usize)
            .is_some_and(|b| b.get(u64::from(seq)))
    }

    /// Distinct messages received.
    pub fn unique(&self) -> u64 {
        self.per_producer.iter().map(Bitmap::count).sum()
    }

    /// Adds another consumer's receipts; a message both saw counts as a duplicate.
    pub fn merge(&mut self, other: &Receipts) {
        if other.per_producer.len() > self.per_producer.len() {
            self.per_producer
                .resize_with(other.per_producer.len(), Bitmap::default);
        }
        for (mine, theirs) in self.per_producer.iter_mut().zip(&other.per_producer) {
            self.duplicates += mine.merge(theirs);
        }
        self.duplicates += other.duplicates;
    }
}

/// Publisher-confirm state of one producer channel: delivery tags 1, 2, 3, ... in publish
/// order, so tag `n` is the message with sequence number `n - 1`.
#[derive(Debug, Clone, Default)]
pub struct ConfirmTracker {
    acked: Bitmap,
    nacked: Bitmap,
    published: u64,
    /// Lowest tag not yet settled (acked or nacked).
    low: u64,
    outstanding: u64,
    /// Acks for tags never published or settled twice (a broker bug).
    pub bogus: u64,
    /// Publish-to-confirm latency, when enabled with [`ConfirmTracker::with_latency`].
    latency: Option<ConfirmLatency>,
}

/// Send times of the unsettled publishes and the histogram of publish-to-confirm latencies.
#[derive(Debug, Clone)]
struct ConfirmLatency {
    /// Send time (ns) of tags `first..`, None for a publish outside the measurement window.
    sent_ns: std::collections::VecDeque<Option<u64>>,
    /// Tag of `sent_ns[0]`.
    first: u64,
    /// Nanoseconds from the send to the broker's basic.ack, of acked measured publishes.
    hist: hdrhistogram::Histogram<u64>,
}

impl ConfirmTracker {
    /// A tracker with nothing published.
    pub fn new() -> Self {
        ConfirmTracker {
            low: 1,
            ..Default::default()
        }
    }

    /// A tracker that also records publish-to-confirm latency: publishes are then noted with
    /// [`ConfirmTracker::published_at`] and acks applied with [`ConfirmTracker::settle_at`].
    pub fn with_latency() -> Self {
        ConfirmTracker {
            latency: Some(ConfirmLatency {
                sent_ns: std::collections::VecDeque::new(),
                first: 1,
                hist: crate::consumer::new_histogram(),
            }),
            ..ConfirmTracker::new()
        }
    }

    /// Notes `n` more publishes.
    pub fn published(&mut self, n: u64) {
        self.published += n;
        self.outstanding += n;
        if let Some(l) = &mut self.latency {
            l.sent_ns.extend(std::iter::repeat_n(None, n as usize));
        }
    }

    /// Notes one more publish sent at `sent_ns`; `measured` says whether its confirm latency
    /// counts (inside the measurement window).
    pub fn published_at(&mut self, sent_ns: u64, measured: bool) {
        self.published += 1;
        self.outstanding += 1;
        if let Some(l) = &mut self.latency {
            l.sent_ns.push_back(measured.then_some(sent_ns));
        }
    }

    /// Publish-to-confirm latencies recorded so far (None when not enabled).
    pub fn latency(&self) -> Option<&hdrhistogram::Histogram<u64>> {
        self.latency.as_ref().map(|l| &l.hist)
    }

    /// [`ConfirmTracker::settle`], received at `now_ns`: each newly acked measured publish
    /// adds `now_ns - its send time` to the latency histogram.
    pub fn settle_at(&mut self, tag: u64, multiple: bool, nack: bool, now_ns: u64) {
        if !nack
            && tag >= 1
            && tag <= self.published
            && let Some(l) = &mut self.latency
        {
            let from = if multiple { self.low } else { tag };
            for t in from..=tag {
                if self.acked.get(t) || self.nacked.get(t) {
                    continue;
                }
                if let Some(slot) = t
                    .checked_sub(l.first)
                    .and_then(|i| l.sent_ns.get_mut(i as usize))
                    && let Some(sent) = slot.take()
                {
                    let _ = l.hist.record(now_ns.saturating_sub(sent).max(1));
                }
            }
        }
        self.settle(tag, multiple, nack);
    }

    /// Messages published so far.
    pub fn published_count(&self) -> u64 {
        self.published
    }

    /// Messages published and neither acked nor nacked yet.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Applies basic.ack (`nack == false`) or basic.nack from the broker.
    pub fn settle(&mut self, tag: u64, multiple: bool, nack: bool) {
        if tag == 0 || tag > self.published {
            self.bogus += 1;
            return;
        }
        let from = if multiple { self.low } else { tag };
        for t in from..=tag {
            if self.acked.get(t) || self.nacked.get(t) {
                if !multiple {
                    self.bogus += 1;
                }
                continue;
            }
            if nack {
                self.nacked.test_and_set(t);
            } else {
                self.acked.test_and_set(t);
            }
            self.outstanding -= 1;
        }
        while self.low <= self.published && (self.acked.get(self.low) || self.nacked.get(self.low))
        {
            self.low += 1;
        }
        if let Some(l) = &mut self.latency {
            while l.first < self.low && l.sent_ns.pop_front().is_some() {
                l.first += 1;
            }
        }
    }

    /// Whether the message with sequence number `seq` was acked.
    pub fn acked(&self, seq: u32) -> bool {
        self.acked.get(u64::from(seq) + 1)
    }

    /// How many messages were nacked.
    pub fn nacked(&self) -> u64 {
        self.nacked.count()
    }
}

/// The end-of-run balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Messages sent by all producers.
    pub sent: u64,
    /// Distinct messages of this run received.
    pub received_unique: u64,
    /// Extra receipts of messages already received.
    pub duplicates: u64,
    /// Sent (and acked, where confirms are on) but never received.
    pub lost: u64,
    /// Sent with confirms, neither confirmed nor received (not counted as lost).
    pub unconfirmed_missing: u64,
    /// Nacked by the broker.
    pub nacked: u64,
}

/// One producer's side of the balance.
#[derive(Debug, Clone, Copy)]
pub struct Sent<'a> {
    /// Producer id (as stamped in the bodies).
    pub producer: u16,
    /// How many it sent (sequence numbers `0..count`).
    pub count: u64,
    /// Its confirms, when they were on.
    pub confirms: Option<&'a ConfirmTracker>,
}

/// Balances what was sent against the merged receipts.
pub fn account(sent: &[Sent<'_>], received: &Receipts) -> Accounting {
    let mut a = Accounting {
        received_unique: received.unique(),
        duplicates: received.duplicates,
        ..Default::default()
    };
    for s in sent {
        a.sent += s.count;
        a.nacked += s.confirms.map_or(0, ConfirmTracker::nacked);
        for seq in 0..s.count.min(u64::from(u32::MAX) + 1) {
            let seq = seq as u32;
            if received.contains(s.producer, seq) {
                continue;
            }
            match s.confirms {
                None => a.lost += 1,
                Some(c) if c.acked(seq) => a.lost += 1,
                Some(c) if c.nacked.get(u64::from(seq) + 1) => {}
                Some(_) => a.unconfirmed_missing += 1,
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_grows_and_merges() {
        let mut a = Bitmap::default();
        assert!(!a.test_and_set(3));
        assert!(a.test_and_set(3));
        assert!(!a.test_and_set(100_000));
        assert!(a.get(100_000) && !a.get(99_999) && !a.get(10_000_000));
        let mut b = Bitmap::default();
        b.test_and_set(3);
        b.test_and_set(4);
        assert_eq!(a.merge(&b), 1);
        assert_eq!(a.count(), 3);
    }

    #[test]
    fn duplicates_within_and_across_consumers() {
        let mut c1 = Receipts::default();
        let mut c2 = Receipts::default();
        let mut c3 = Receipts::default();
        for seq in 0..10 {
            c1.record(0, seq);
        }
        c1.record(0, 5); // duplicate within c1
        c2.record(0, 7); // seen by c1 too
        c2.record(1, 0);
        c3.record(0, 7); // seen by c1 and c2
        assert_eq!(c1.duplicates, 1);
        let mut all = Receipts::default();
        for c in [&c1, &c2, &c3] {
            all.merge(c);
        }
        assert_eq!(all.duplicates, 3);
        assert_eq!(all.unique(), 11);
    }

    #[test]
    fn confirm_tracker_single_multiple_and_nack() {
        let mut t = ConfirmTracker::new();
        t.published(10);
        assert_eq!(t.outstanding(), 10);
        t.settle(3, false, false); // single, out of order
        assert_eq!(t.outstanding(), 9);
        t.settle(5, true, false); // 1..=5 (3 already)
        assert_eq!(t.outstanding(), 5);
        t.settle(6, false, true); // nack 6
        t.settle(8, true, false); // 7, 8
        assert_eq!(t.outstanding(), 2);
        assert!(t.acked(0) && t.acked(7) && !t.acked(5) && !t.acked(8));
        assert_eq!(t.nacked(), 1);
        t.settle(11, false, false); // never published
        t.settle(8, false, false); // twice
        assert_eq!(t.bogus, 2);
        assert_eq!(t.outstanding(), 2);
    }

    #[test]
    fn confirm_latency_from_send_to_ack() {
        let mut t = ConfirmTracker::with_latency();
        t.published_at(1_000, false); // tag 1: warm-up, not measured
        t.published_at(2_000, true); // tag 2
        t.published_at(3_000, true); // tag 3
        t.published_at(4_000, true); // tag 4
        t.published_at(5_000, true); // tag 5
        t.settle_at(3, false, false, 10_000); // single, out of order: 7 µs
        t.settle_at(3, true, false, 20_000); // 1..=3: tag 2 at 18 µs (3 is settled already)
        t.settle_at(4, false, true, 30_000); // nack: no latency
        t.settle_at(5, true, false, 45_000); // 5 at 40 µs
        let h = t.latency().unwrap();
        assert_eq!(h.len(), 3);
        assert!(h.equivalent(h.min(), 7_000));
        assert!(h.equivalent(h.max(), 40_000));
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.nacked(), 1);
        // Settled publishes are forgotten; later tags still find their send times.
        assert_eq!(t.latency.as_ref().unwrap().sent_ns.len(), 0);
        t.published(2); // tags 6, 7 without times
        t.published_at(50_000, true); // tag 8
        t.settle_at(8, true, false, 51_000);
        assert_eq!(t.latency().unwrap().len(), 4);
        assert!(ConfirmTracker::new().latency().is_none());
    }

    #[test]
    fn accounting_counts_loss_only_for_confirmed_or_unconfirmed_mode() {
        let mut confirms = ConfirmTracker::new();
        confirms.published(6);
        confirms.settle(4, true, false); // seq 0..=3 acked
        confirms.settle(5, false, true); // seq 4 nacked; seq 5 unconfirmed
        let mut r = Receipts::default();
        r.record(0, 0);
        r.record(0, 2);
        r.record(0, 2);
        // producer 1 without confirms sent 3, one arrived
        r.record(1, 1);
        let a = account(
            &[
                Sent {
                    producer: 0,
                    count: 6,
                    confirms: Some(&confirms),
                },
                Sent {
                    producer: 1,
                    count: 3,
                    confirms: None,
                },
            ],
            &r,
        );
        assert_eq!(
            a,
            Accounting {
                sent: 9,
                received_unique: 3,
                duplicates: 1,
                lost: 2 + 2, // seq 1 and 3 of p0 (acked), seq 0 and 2 of p1
                unconfirmed_missing: 1,
                nacked: 1,
            }
        );
    }
}
