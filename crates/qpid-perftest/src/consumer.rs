//! Raw consumers. Each runs on its own OS thread with a current-thread tokio runtime, reads
//! into a large buffer, walks basic.deliver + content header + body frames in place, records
//! each message's stamp (receipt bitmap, latency histogram while measuring) and, with manual
//! acks, sends one basic.ack with `multiple` set per read.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::FieldTable;
use anyhow::bail;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::frames::{
    BASIC_DELIVER, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, RawFrame, STAMP_LEN, Stamp,
    content_body_size, encode_ack, method_ids, parse_deliver,
};
use crate::raw_conn::{CHANNEL, RawConn, Target, check_close, parse_method};
use crate::shared::{Phase, Shared};
use crate::tracking::Receipts;

/// What one consumer does.
#[derive(Debug, Clone)]
pub struct ConsumerPlan {
    /// Consumer id.
    pub id: u16,
    /// Queue to consume from.
    pub queue: String,
    /// basic.qos prefetch count (manual acks only).
    pub prefetch: u16,
    /// no-ack consume.
    pub auto_ack: bool,
}

/// What one consumer saw.
#[derive(Debug, Clone)]
pub struct ConsumerResult {
    /// Messages received (duplicates and foreign messages included).
    pub received: u64,
    /// Which of this run's messages arrived.
    pub receipts: Receipts,
    /// End-to-end latency in nanoseconds of the messages received while measuring.
    pub latency_ns: Histogram<u64>,
    /// Deliveries flagged redelivered.
    pub redelivered: u64,
    /// Messages without this run's stamp (left over in the queue, or too short).
    pub foreign: u64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// A latency histogram in nanoseconds: 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

impl ConsumerResult {
    /// An empty result.
    pub fn new() -> Self {
        ConsumerResult {
            received: 0,
            receipts: Receipts::default(),
            latency_ns: new_histogram(),
            redelivered: 0,
            foreign: 0,
            error: None,
        }
    }

    /// Records one complete message whose body starts with `head`.
    #[inline]
    pub fn on_message(&mut self, head: &[u8], run_tag: u16, now_ns: u64, measuring: bool) {
        self.received += 1;
        match Stamp::decode(head) {
            Some(s) if s.run == run_tag => {
                self.receipts.record(s.producer, s.seq);
                if measuring {
                    self.latency_ns
                        .saturating_record(now_ns.saturating_sub(s.sent_ns).max(1));
                }
            }
            _ => self.foreign += 1,
        }
    }
}

/// A message whose body frames are still arriving.
#[derive(Debug, Default)]
struct Partial {
    remaining: u64,
    head: [u8; STAMP_LEN],
    have: usize,
}

/// Starts a raw consumer on its own thread; `ready` fires once basic.consume-ok arrives.
pub fn spawn(
    target: Target,
    plan: ConsumerPlan,
    shared: Arc<Shared>,
    ready: oneshot::Sender<()>,
) -> std::thread::JoinHandle<ConsumerResult> {
    std::thread::Builder::new()
        .name(format!("consumer-{}", plan.id))
        .spawn(move || {
            let mut result = ConsumerResult::new();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    result.error = Some(format!("tokio runtime: {e}"));
                    return result;
                }
            };
            if let Err(e) = rt.block_on(run(&target, &plan, &shared, ready, &mut result)) {
                result.error = Some(format!("consumer {}: {e:#}", plan.id));
            }
            result
        })
        .expect("spawning a consumer thread")
}

async fn run(
    target: &Target,
    plan: &ConsumerPlan,
    shared: &Shared,
    ready: oneshot::Sender<()>,
    result: &mut ConsumerResult,
) -> anyhow::Result<()> {
    let mut conn = RawConn::open(target, &format!("perftest-consumer-{}", plan.id)).await?;
    if !plan.auto_ack {
        let qos = basic::Qos {
            prefetch_count: plan.prefetch,
            global: false,
        };
        match conn
            .call(CHANNEL, AMQPClass::Basic(basic::AMQPMethod::Qos(qos)))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => {}
            other => bail!("expected basic.qos-ok, got {other:?}"),
        }
    }
    let consume = basic::Consume {
        queue: plan.queue.as_str().into(),
        consumer_tag: format!("perftest-c{}", plan.id).into(),
        no_local: false,
        no_ack: plan.auto_ack,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    };
    conn.send(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
    )
    .await?;

    let mut ready = Some(ready);
    let mut phase_rx = shared.watch_phase();
    let mut partial: Option<Partial> = None;
    let mut last_tag = 0u64;
    let mut acked_tag = 0u64;
    let mut ack_buf = Vec::with_capacity(32);
    let outcome: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                n = conn.reader.fill() => {
                    if n? == 0 {
                        bail!("broker closed the connection");
                    }
                }
                _ = phase_rx.changed() => {}
            }
            let now = shared.now_ns();
            let phase = shared.phase();
            let measuring = phase == Phase::Measure;
            let before = result.received;
            while let Some(f) = conn.reader.next_frame()? {
                on_frame(
                    f,
                    shared.run_tag,
                    now,
                    measuring,
                    &mut partial,
                    &mut last_tag,
                    result,
                )?;
                if f.kind == FRAME_METHOD
                    && method_ids(f.payload) == Some((60, 21))
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(());
                }
            }
            let got = result.received - before;
            if got > 0 {
                shared.received.fetch_add(got, Ordering::Relaxed);
            }
            if !plan.auto_ack && last_tag > acked_tag {
                ack_buf.clear();
                encode_ack(&mut ack_buf, CHANNEL, last_tag, true);
                conn.writer.write_all(&ack_buf).await?;
                acked_tag = last_tag;
            }
            if phase == Phase::Done {
                return Ok(());
            }
        }
    }
    .await;
    if outcome.is_ok() {
        conn.close(Duration::from_secs(2)).await;
    }
    outcome
}

/// Handles one frame of the consume stream.
#[inline]
fn on_frame(
    f: RawFrame<'_>,
    run_tag: u16,
    now: u64,
    measuring: bool,
    partial: &mut Option<Partial>,
    last_tag: &mut u64,
    result: &mut ConsumerResult,
) -> anyhow::Result<()> {
    match f.kind {
        FRAME_METHOD => {
            if method_ids(f.payload) == Some(BASIC_DELIVER) {
                let (tag, redelivered) = parse_deliver(f.payload)?;
                *last_tag = tag;
                result.redelivered += u64::from(redelivered);
            } else {
                check_close(&parse_method(f.payload)?)?;
            }
        }
        FRAME_HEADER => {
            let size = content_body_size(f.payload)?;
            if size == 0 {
                result.on_message(&[], run_tag, now, measuring);
            } else {
                *partial = Some(Partial {
                    remaining: size,
                    ..Default::default()
                });
            }
        }
        FRAME_BODY => {
            let Some(p) = partial.as_mut() else {
                bail!("body frame without a content header")
            };
            let len = f.payload.len() as u64;
            if len > p.remaining {
                bail!("body frames exceed the announced body size");
            }
            p.remaining -= len;
            if p.have == 0 && p.remaining == 0 {
                // The common case: the whole body in one frame.
                result.on_message(f.payload, run_tag, now, measuring);
                *partial = None;
                return Ok(());
            }
            let take = (STAMP_LEN - p.have).min(f.payload.len());
            p.head[p.have..p.have + take].copy_from_slice(&f.payload[..take]);
            p.have += take;
            if p.remaining == 0 {
                let head = p.head;
                let have = p.have;
                result.on_message(&head[..have], run_tag, now, measuring);
                *partial = None;
            }
        }
        _ => {} // heartbeats
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_counts_not_averages() {
        let mut a = ConsumerResult::new();
        let mut b = ConsumerResult::new();
        let mut body = [0u8; 16];
        // consumer a: 99 fast messages (1 µs); consumer b: 1 slow message (10 ms)
        for seq in 0..99 {
            Stamp {
                sent_ns: 1_000,
                run: 5,
                producer: 0,
                seq,
            }
            .encode(&mut body);
            a.on_message(&body, 5, 2_000, true);
        }
        Stamp {
            sent_ns: 0,
            run: 5,
            producer: 0,
            seq: 99,
        }
        .encode(&mut body);
        b.on_message(&body, 5, 10_000_000, true);
        let mut all = new_histogram();
        all.add(&a.latency_ns).unwrap();
        all.add(&b.latency_ns).unwrap();
        assert_eq!(all.len(), 100);
        // p99 of the merged data is the fast value; p99.5+ reaches the slow one. Averaging
        // the two consumers' p99s would give ~5 ms, which no message had.
        assert!(all.value_at_quantile(0.99) < 1_100);
        assert!(all.value_at_quantile(0.995) > 9_000_000);
        assert!(all.max() >= 10_000_000);
    }

    #[test]
    fn frames_to_messages_including_split_bodies() {
        let mut r = ConsumerResult::new();
        let mut partial = None;
        let mut tag = 0;
        let mut body = vec![7u8; 40];
        Stamp {
            sent_ns: 10,
            run: 1,
            producer: 2,
            seq: 3,
        }
        .encode(&mut body);
        let deliver = {
            let mut p = vec![0, 60, 0, 60, 1, b'c'];
            p.extend_from_slice(&9u64.to_be_bytes());
            p.extend_from_slice(&[1, 0, 1, b'q']);
            p
        };
        let mut header = vec![0, 60, 0, 0];
        header.extend_from_slice(&40u64.to_be_bytes());
        header.extend_from_slice(&[0, 0]);
        let frames = [
            RawFrame {
                kind: FRAME_METHOD,
                channel: 1,
                payload: &deliver,
            },
            RawFrame {
                kind: FRAME_HEADER,
                channel: 1,
                payload: &header,
            },
            RawFrame {
                kind: FRAME_BODY,
                channel: 1,
                payload: &body[..10],
            },
            RawFrame {
                kind: FRAME_BODY,
                channel: 1,
                payload: &body[10..30],
            },
            RawFrame {
                kind: FRAME_BODY,
                channel: 1,
                payload: &body[30..],
            },
        ];
        for f in frames {
            on_frame(f, 1, 1_010, true, &mut partial, &mut tag, &mut r).unwrap();
        }
        assert_eq!((tag, r.redelivered, r.received, r.foreign), (9, 1, 1, 0));
        assert!(r.receipts.contains(2, 3));
        assert_eq!(r.latency_ns.len(), 1);
        // A body of another run is foreign.
        on_frame(frames[1], 1, 0, true, &mut partial, &mut tag, &mut r).unwrap();
        let mut other = body.clone();
        Stamp {
            sent_ns: 10,
            run: 99,
            producer: 2,
            seq: 4,
        }
        .encode(&mut other);
        let f = RawFrame {
            kind: FRAME_BODY,
            channel: 1,
            payload: &other,
        };
        on_frame(f, 1, 0, true, &mut partial, &mut tag, &mut r).unwrap();
        assert_eq!((r.received, r.foreign), (2, 1));
    }
}
