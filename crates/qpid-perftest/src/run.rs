//! One run from start to report: set-up through lapin, consumers first (waiting for each
//! consume-ok), then producers; warm-up, measurement window (backlog sampled every 100 ms),
//! stop publishing, drain, stop consuming, clean-up; then the merged balance and histograms.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::oneshot;

use crate::cli::{Args, Client};
use crate::consumer::{self, ConsumerPlan, ConsumerResult, new_histogram};
use crate::lapin_client;
use crate::procstat::{CpuSnapshot, Pid, rss_kib};
use crate::producer::{self, ProducerPlan, ProducerResult};
use crate::raw_conn::Target;
use crate::report::{Backlog, Latency, Report};
use crate::setup::Setup;
use crate::shared::{Phase, Shared};
use crate::tracking::{ConfirmTracker, Receipts, Sent, account};

/// A producer or consumer: an OS thread (raw) or a tokio task (lapin).
enum Worker<T> {
    Thread(std::thread::JoinHandle<T>),
    Task(tokio::task::JoinHandle<T>),
}

impl<T: Send + 'static> Worker<T> {
    fn is_finished(&self) -> bool {
        match self {
            Worker::Thread(h) => h.is_finished(),
            Worker::Task(h) => h.is_finished(),
        }
    }

    async fn join(self) -> anyhow::Result<T> {
        match self {
            Worker::Thread(h) => tokio::task::spawn_blocking(move || h.join())
                .await?
                .map_err(|_| anyhow::anyhow!("worker thread panicked")),
            Worker::Task(h) => Ok(h.await?),
        }
    }
}

/// Counters read at one instant.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    sent: u64,
    received: u64,
    cpu: CpuSnapshot,
}

impl Mark {
    fn take(shared: &Shared, broker: Option<u32>) -> anyhow::Result<Mark> {
        Ok(Mark {
            at: Instant::now(),
            sent: shared.sent.load(Ordering::Relaxed),
            received: shared.received.load(Ordering::Relaxed),
            cpu: CpuSnapshot::take(broker)?,
        })
    }
}

/// Runs the load described by `args` and reports.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    args.validate()?;
    let target = Target::parse(&args.uri)?;
    let shared = Arc::new(Shared::new(rand::random(), args.max_backlog));
    let fresh_queue = args.queue.is_none();
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| format!("perftest-{:08x}", rand::random::<u32>()));
    let setup = Setup::connect(&args.uri)
        .await
        .context("set-up connection (lapin)")?;
    if args.predeclared {
        setup
            .check(&queue)
            .await
            .with_context(|| format!("checking queue {queue}"))?;
    } else {
        setup
            .declare(&queue, args.persistent)
            .await
            .with_context(|| format!("declaring queue {queue}"))?;
    }
    let broker = args.broker_pid;
    let rss_start = broker.map(|p| rss_kib(Pid::Other(p))).transpose()?;

    // Consumers first, each ready once its consume-ok arrived.
    let mut consumers = Vec::new();
    let mut readies = Vec::new();
    for id in 0..args.consumer_count() {
        let plan = ConsumerPlan {
            id,
            queue: queue.clone(),
            prefetch: args.prefetch,
            auto_ack: args.auto_ack,
        };
        let (tx, rx) = oneshot::channel();
        consumers.push(match args.client {
            Client::Raw => {
                Worker::Thread(consumer::spawn(target.clone(), plan, shared.clone(), tx))
            }
            Client::Lapin => Worker::Task(tokio::spawn(lapin_client::consumer(
                args.uri.clone(),
                plan,
                shared.clone(),
                tx,
            ))),
        });
        readies.push(rx);
    }
    let mut errors = Vec::new();
    for rx in readies {
        if tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .is_err()
        {
            errors.push("a consumer did not get consume-ok within 10 s".to_string());
        }
    }

    let mut producers = Vec::new();
    for id in 0..args.producers {
        let plan = ProducerPlan {
            id,
            routing_key: queue.clone(),
            size: args.size,
            persistent: args.persistent,
            confirm_window: args.confirm,
            rate: args.rate / f64::from(args.producers),
            schedule_offset_ns: if args.rate > 0.0 {
                (f64::from(id) * 1e9 / args.rate) as u64
            } else {
                0
            },
            count: args.count.map(|total| {
                let n = u64::from(args.producers);
                total / n + u64::from(u64::from(id) < total % n)
            }),
            batch_bytes: args.batch_bytes,
            confirm_timeout: Duration::from_secs_f64(args.drain_timeout),
        };
        producers.push(match args.client {
            Client::Raw => Worker::Thread(producer::spawn(target.clone(), plan, shared.clone())),
            Client::Lapin => Worker::Task(tokio::spawn(lapin_client::producer(
                args.uri.clone(),
                plan,
                shared.clone(),
            ))),
        });
    }

    let any_failed = |p: &[Worker<ProducerResult>], c: &[Worker<ConsumerResult>]| {
        c.iter().any(Worker::is_finished)
            || (args.count.is_none() && p.iter().any(Worker::is_finished))
    };
    let tick = Duration::from_millis(100);
    let mut samples = Vec::new();
    let start_mark;
    let end_mark;
    match args.measure_seconds() {
        Some(secs) => {
            let warm_until = Instant::now() + Duration::from_secs_f64(args.warmup_seconds);
            while Instant::now() < warm_until && !any_failed(&producers, &consumers) {
                tokio::time::sleep(tick.min(warm_until - Instant::now())).await;
            }
            start_mark = Mark::take(&shared, broker)?;
            shared.set_phase(Phase::Measure);
            let until = start_mark.at + Duration::from_secs_f64(secs);
            loop {
                let m = Mark::take(&shared, broker)?;
                samples.push((
                    (m.at - start_mark.at).as_secs_f64(),
                    m.sent as f64 - m.received as f64,
                ));
                if m.at >= until || any_failed(&producers, &consumers) {
                    end_mark = m;
                    break;
                }
                tokio::time::sleep(tick.min(until - m.at)).await;
            }
            shared.set_phase(Phase::StopPublishing);
        }
        None => {
            start_mark = Mark::take(&shared, broker)?;
            shared.set_phase(Phase::Measure);
            while !producers.iter().all(Worker::is_finished)
                && !consumers.iter().any(Worker::is_finished)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let m = Mark::take(&shared, broker)?;
                samples.push((
                    (m.at - start_mark.at).as_secs_f64(),
                    m.sent as f64 - m.received as f64,
                ));
            }
            end_mark = Mark::take(&shared, broker)?;
        }
    }

    let mut producer_results = Vec::new();
    for p in producers {
        producer_results.push(p.join().await?);
    }
    let sent_total: u64 = producer_results.iter().map(|p| p.sent).sum();
    let published_mark = Mark::take(&shared, broker)?;

    // Drain: until everything sent has arrived, or nothing arrives for 2 s, or the timeout.
    let mut last_change = Instant::now();
    let mut last_received = shared.received.load(Ordering::Relaxed);
    if !consumers.is_empty() {
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
        loop {
            let r = shared.received.load(Ordering::Relaxed);
            if r != last_received {
                last_received = r;
                last_change = Instant::now();
            }
            if r >= sent_total
                || last_change.elapsed() > Duration::from_secs(2)
                || Instant::now() > deadline
                || consumers.iter().all(Worker::is_finished)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let drained_mark = Mark::take(&shared, broker)?;
    let rss_end = broker.map(|p| rss_kib(Pid::Other(p))).transpose()?;
    shared.set_phase(Phase::Done);
    let mut consumer_results = Vec::new();
    for c in consumers {
        consumer_results.push(c.join().await?);
    }
    if fresh_queue
        && !args.no_consume
        && let Err(e) = setup.delete(&queue).await
    {
        errors.push(format!("deleting queue {queue}: {e:#}"));
    }
    setup.close().await;

    // Balance and histograms.
    let mut receipts = Receipts::default();
    let mut latency = new_histogram();
    let (mut redelivered, mut foreign) = (0, 0);
    for c in &consumer_results {
        receipts.merge(&c.receipts);
        latency.add(&c.latency_ns).context("merging histograms")?;
        redelivered += c.redelivered;
        foreign += c.foreign;
        errors.extend(c.error.clone());
    }
    let mut confirm_latency = new_histogram();
    for p in &producer_results {
        errors.extend(p.error.clone());
        if let Some(h) = p.confirms.as_ref().and_then(ConfirmTracker::latency) {
            confirm_latency
                .add(h)
                .context("merging confirm histograms")?;
        }
    }
    let sent: Vec<Sent<'_>> = producer_results
        .iter()
        .map(|p| Sent {
            producer: p.id,
            count: p.sent,
            confirms: p.confirms.as_ref(),
        })
        .collect();
    let accounting = if consumer_results.is_empty() {
        crate::tracking::Accounting {
            sent: sent_total,
            ..Default::default()
        }
    } else {
        account(&sent, &receipts)
    };

    // Windows: time mode uses start..end of the window for both directions; count mode runs
    // from the start to the last publish and to the last delivery.
    let (published, publish_window_s, consumed, consume_window_s, cpu_from, cpu_to);
    if args.count.is_none() {
        let w = (end_mark.at - start_mark.at).as_secs_f64();
        published = end_mark.sent - start_mark.sent;
        consumed = end_mark.received - start_mark.received;
        (publish_window_s, consume_window_s) = (w, w);
        (cpu_from, cpu_to) = (start_mark, end_mark);
    } else {
        published = published_mark.sent - start_mark.sent;
        publish_window_s = (published_mark.at - start_mark.at).as_secs_f64();
        consumed = drained_mark.received - start_mark.received;
        consume_window_s = (last_change.min(drained_mark.at) - start_mark.at).as_secs_f64();
        cpu_from = start_mark;
        cpu_to = if consumer_results.is_empty() {
            published_mark
        } else {
            drained_mark
        };
    }
    let window_s = (cpu_to.at - cpu_from.at).as_secs_f64();
    let tool_cpu_s = cpu_to.cpu.tool - cpu_from.cpu.tool;
    let broker_cpu_s = broker.map(|_| cpu_to.cpu.broker - cpu_from.cpu.broker);
    // Clock ticks are 10 ms: the difference can come out slightly negative on a quiet machine.
    let other_cpu_s = ((cpu_to.cpu.machine_busy - cpu_from.cpu.machine_busy)
        - tool_cpu_s
        - broker_cpu_s.unwrap_or(0.0))
    .max(0.0);
    let disk_written_bytes = cpu_to
        .cpu
        .disk_written
        .zip(cpu_from.cpu.disk_written)
        .map(|(to, from)| to.saturating_sub(from));

    let backlog = Backlog::from_samples(&samples);
    let mut problems = Vec::new();
    if !errors.is_empty() {
        problems.push(format!("{} error(s)", errors.len()));
    }
    if accounting.lost > 0 {
        problems.push(format!("{} message(s) lost", accounting.lost));
    }
    if accounting.duplicates > 0 {
        problems.push(format!("{} duplicate(s)", accounting.duplicates));
    }
    if !consumer_results.is_empty() {
        if consumed == 0 {
            problems.push("nothing consumed in the window".into());
        }
        if args.count.is_none() && args.producers > 0 && backlog.keeps_growing(consumed) {
            problems.push(format!(
                "backlog kept growing ({:.0} messages over the window, {:.0}/s)",
                backlog.growth, backlog.slope
            ));
        }
    }
    if args.rate > 0.0 && args.count.is_none() && publish_window_s > 0.0 {
        let achieved = published as f64 / publish_window_s;
        if achieved < 0.95 * args.rate {
            problems.push(format!(
                "published {achieved:.0} msg/s, below the --rate {}",
                args.rate
            ));
        }
    }

    Ok(Report {
        client: match args.client {
            Client::Raw => "raw",
            Client::Lapin => "lapin",
        },
        config: json!({
            "producers": args.producers, "consumers": args.consumer_count(), "size": args.size,
            "count": args.count, "seconds": args.measure_seconds(),
            "warmup_seconds": args.warmup_seconds, "confirm": args.confirm,
            "persistent": args.persistent, "prefetch": args.prefetch, "auto_ack": args.auto_ack,
            "rate": args.rate, "queue": queue, "max_backlog": args.max_backlog,
        }),
        problems,
        window_s,
        published,
        consumed,
        publish_window_s,
        consume_window_s,
        accounting,
        redelivered,
        foreign,
        latency: Latency::from_histogram(&latency),
        confirm_latency: Latency::from_histogram(&confirm_latency),
        backlog,
        tool_cpu_s,
        broker_cpu_s,
        other_cpu_s,
        disk_written_bytes,
        broker_rss_kib: rss_start.zip(rss_end),
        errors,
    })
}
