//! State shared by the coordinator, producers and consumers of one run: the clock base that
//! stamps are relative to, the run phase, and the running totals the coordinator samples.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::watch;

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Traffic flows, nothing is recorded yet.
    Warmup = 0,
    /// Latencies are recorded.
    Measure = 1,
    /// Producers finish (and collect their last confirms); consumers drain.
    StopPublishing = 2,
    /// Consumers stop.
    Done = 3,
}

/// One run's shared state.
#[derive(Debug)]
pub struct Shared {
    /// Stamps are nanoseconds since this instant.
    pub base: Instant,
    /// Random tag of this run, stamped in every body.
    pub run_tag: u16,
    phase: AtomicU8,
    phase_tx: watch::Sender<Phase>,
    /// Messages written by all producers.
    pub sent: AtomicU64,
    /// Messages received by all consumers (duplicates included).
    pub received: AtomicU64,
    /// Producers pause while `sent - received` exceeds this (0 = never).
    pub max_backlog: u64,
}

impl Shared {
    /// Fresh state in the warm-up phase.
    pub fn new(run_tag: u16, max_backlog: u64) -> Self {
        let (phase_tx, _) = watch::channel(Phase::Warmup);
        Shared {
            base: Instant::now(),
            run_tag,
            phase: AtomicU8::new(Phase::Warmup as u8),
            phase_tx,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            max_backlog,
        }
    }

    /// Nanoseconds since the base.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The current phase (one relaxed load).
    #[inline]
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Warmup,
            1 => Phase::Measure,
            2 => Phase::StopPublishing,
            _ => Phase::Done,
        }
    }

    /// Moves to `phase` and wakes whoever waits for a change.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.phase_tx.send_replace(phase);
    }

    /// A receiver that sees phase changes (for tasks blocked in a read).
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// Whether a producer should hold back for the backlog limit.
    #[inline]
    pub fn over_backlog(&self) -> bool {
        self.max_backlog != 0
            && self
                .sent
                .load(Ordering::Relaxed)
                .saturating_sub(self.received.load(Ordering::Relaxed))
                >= self.max_backlog
    }
}
