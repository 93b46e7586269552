//! Raw producers. Each runs on its own OS thread with a current-thread tokio runtime (so a
//! rate-limited producer can sleep precisely with `std::thread::sleep` without holding up
//! anyone else), fills a reused buffer with copies of a [`PublishTemplate`] (only the stamp is
//! patched per message) up to `--batch-bytes`, and writes it in one call. What the broker
//! sends back is read on a second OS thread (`producer-<id>-confirms`, its own current-thread
//! runtime over a clone of the same socket), so a confirm is timestamped when it arrives even
//! while the producer sleeps until its next send. With confirms, that reader applies
//! basic.ack / basic.nack to a [`ConfirmTracker`] and the writer never has more than the
//! window outstanding.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, confirm};
use anyhow::{Context, bail};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::frames::{
    BASIC_ACK, BASIC_NACK, FRAME_METHOD, PublishTemplate, Stamp, method_ids, parse_ack_nack,
};
use crate::raw_conn::{
    CHANNEL, FrameReader, RawConn, Target, check_close, encode_method, parse_method,
};
use crate::shared::{Phase, Shared};
use crate::tracking::ConfirmTracker;

/// What one producer does.
#[derive(Debug, Clone)]
pub struct ProducerPlan {
    /// Producer id, stamped in the bodies.
    pub id: u16,
    /// Routing key (the queue name; the default exchange is used).
    pub routing_key: String,
    /// Body size.
    pub size: usize,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Confirm window (0 = no confirms).
    pub confirm_window: u32,
    /// This producer's rate in msgs/s (0 = as fast as possible).
    pub rate: f64,
    /// Offset of this producer's schedule, so that producers interleave.
    pub schedule_offset_ns: u64,
    /// Messages to send (None = until the run stops).
    pub count: Option<u64>,
    /// Bytes per socket write.
    pub batch_bytes: usize,
    /// How long to wait for the last confirms.
    pub confirm_timeout: Duration,
}

/// What one producer did.
#[derive(Debug, Clone, Default)]
pub struct ProducerResult {
    /// Producer id.
    pub id: u16,
    /// Messages written (sequence numbers `0..sent`).
    pub sent: u64,
    /// Confirm state, when confirms were on.
    pub confirms: Option<ConfirmTracker>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

struct Confirms {
    tracker: Mutex<ConfirmTracker>,
    notify: Notify,
}

/// Starts a raw producer on its own thread.
pub fn spawn(
    target: Target,
    plan: ProducerPlan,
    shared: Arc<Shared>,
) -> std::thread::JoinHandle<ProducerResult> {
    std::thread::Builder::new()
        .name(format!("producer-{}", plan.id))
        .spawn(move || {
            let mut result = ProducerResult {
                id: plan.id,
                ..Default::default()
            };
            if plan.rate > 0.0 {
                // Sleep to within microseconds of each scheduled send.
                let _ = nix::sys::prctl::set_timerslack(1_000);
            }
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
            if let Err(e) = rt.block_on(run(&target, &plan, &shared, &mut result)) {
                result.error = Some(format!("producer {}: {e:#}", plan.id));
            }
            result
        })
        .expect("spawning a producer thread")
}

async fn run(
    target: &Target,
    plan: &ProducerPlan,
    shared: &Shared,
    result: &mut ProducerResult,
) -> anyhow::Result<()> {
    let mut conn = RawConn::open(target, &format!("perftest-producer-{}", plan.id)).await?;
    let confirms = if plan.confirm_window > 0 {
        match conn
            .call(
                CHANNEL,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                    nowait: false,
                })),
            )
            .await?
        {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => {}
            other => bail!("expected confirm.select-ok, got {other:?}"),
        }
        Some(Arc::new(Confirms {
            tracker: Mutex::new(ConfirmTracker::with_latency()),
            notify: Notify::new(),
        }))
    } else {
        None
    };
    let stamp = Stamp {
        sent_ns: 0,
        run: shared.run_tag,
        producer: plan.id,
        seq: 0,
    };
    let template = PublishTemplate::new(
        CHANNEL,
        "",
        &plan.routing_key,
        plan.size,
        plan.persistent,
        conn.frame_max,
        stamp,
    )?;
    // Built before the reader thread exists, so that no early return can leave it behind.
    let close = encode_method(
        0,
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(
            amq_protocol::protocol::connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            },
        )),
    )?;
    // Split the socket in two handles on one file description: the writer stays on this
    // thread's runtime, the reader gets its own thread and runtime (bytes already buffered
    // by the handshake's FrameReader go with it).
    let RawConn { reader, writer, .. } = conn;
    let (read_half, reader) = reader.with_inner(());
    let socket = read_half
        .reunite(writer)
        .context("reuniting the socket halves")?
        .into_std()
        .context("taking the socket out of the runtime")?;
    let reader_socket = socket.try_clone().context("cloning the socket")?;
    let shutdown_socket = socket.try_clone().context("cloning the socket")?;
    let mut writer = TcpStream::from_std(socket).context("registering the socket")?;
    let reader_task = std::thread::Builder::new()
        .name(format!("producer-{}-confirms", plan.id))
        .spawn({
            let confirms = confirms.clone();
            let base = shared.base;
            move || read_confirms_thread(reader_socket, reader, confirms, base)
        })
        .context("spawning the confirm reader thread")?;

    let per_batch = (plan.batch_bytes / template.len()).max(1) as u64;
    let mut buf = Vec::with_capacity(per_batch as usize * template.len());
    let limit = plan.count.unwrap_or(u64::MAX);
    let window = u64::from(plan.confirm_window);
    let interval_ns = if plan.rate > 0.0 {
        1e9 / plan.rate
    } else {
        0.0
    };
    let t0 = shared.now_ns() + plan.schedule_offset_ns;
    let mut seq: u64 = 0;
    let mut failed = None;
    'publish: while seq < limit && shared.phase() < Phase::StopPublishing {
        if reader_task.is_finished() {
            break;
        }
        let mut n = per_batch.min(limit - seq);
        if let Some(c) = &confirms {
            loop {
                let out = c.tracker.lock().outstanding();
                if out < window {
                    n = n.min(window - out);
                    break;
                }
                if reader_task.is_finished() || shared.phase() >= Phase::StopPublishing {
                    break 'publish;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), c.notify.notified()).await;
            }
        }
        if shared.over_backlog() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let now = shared.now_ns();
        if plan.rate > 0.0 {
            let due = if now < t0 {
                0
            } else {
                ((now - t0) as f64 / interval_ns) as u64 + 1
            };
            if due <= seq {
                let next = t0 + (seq as f64 * interval_ns) as u64;
                let wait = Duration::from_nanos(next.saturating_sub(now));
                if wait > Duration::from_millis(2) {
                    tokio::time::sleep(wait - Duration::from_millis(1)).await;
                } else {
                    std::thread::sleep(wait);
                }
                continue;
            }
            n = n.min(due - seq);
        }
        buf.clear();
        // Publish-to-confirm latency counts from the same time as the stamp: the scheduled
        // send time at a fixed rate (open loop), else the time the batch is built.
        let measuring = shared.phase() == Phase::Measure;
        let mut tracker = confirms.as_ref().map(|c| c.tracker.lock());
        for k in seq..seq + n {
            let ts = if plan.rate > 0.0 {
                t0 + (k as f64 * interval_ns) as u64
            } else {
                now
            };
            template.append(&mut buf, ts, k as u32);
            if let Some(t) = &mut tracker {
                t.published_at(ts, measuring);
            }
        }
        drop(tracker);
        if let Err(e) = writer.write_all(&buf).await {
            failed = Some(anyhow::Error::from(e).context("writing publishes"));
            // The batch may be partly written: count it, its tail is reported lost/unconfirmed.
            seq += n;
            break;
        }
        seq += n;
        shared.sent.fetch_add(n, Ordering::Relaxed);
    }
    result.sent = seq;

    // Collect the last confirms.
    if let Some(c) = &confirms {
        let deadline = tokio::time::Instant::now() + plan.confirm_timeout;
        while failed.is_none()
            && !reader_task.is_finished()
            && c.tracker.lock().outstanding() > 0
            && tokio::time::Instant::now() < deadline
        {
            let _ = tokio::time::timeout(Duration::from_millis(50), c.notify.notified()).await;
        }
        result.confirms = Some(c.tracker.lock().clone());
    }
    if failed.is_none() && !reader_task.is_finished() {
        let _ = writer.write_all(&close).await;
    }
    // Wait up to 2 s for the reader (it returns on close-ok or an error); past that, shut the
    // socket down so that it ends, and leave it if even that does not stop it soon.
    let reader_outcome = match join_within(reader_task, Duration::from_secs(2)).await {
        Ok(outcome) => Some(outcome),
        Err(reader_task) => {
            let _ = shutdown_socket.shutdown(std::net::Shutdown::Both);
            let _ = join_within(reader_task, Duration::from_millis(500)).await;
            None
        }
    };
    drop(shutdown_socket);
    if let Some(c) = &confirms {
        result.confirms = Some(c.tracker.lock().clone());
    }
    if let Some(e) = failed {
        return Err(e);
    }
    match reader_outcome {
        Some(Ok(Err(e))) => Err(e),
        _ => Ok(()),
    }
}

/// Joins `thread` if it finishes within `wait` (polled with short async sleeps, so the
/// runtime is not blocked); else hands it back.
async fn join_within<T>(
    thread: std::thread::JoinHandle<T>,
    wait: Duration,
) -> Result<std::thread::Result<T>, std::thread::JoinHandle<T>> {
    let deadline = tokio::time::Instant::now() + wait;
    while !thread.is_finished() {
        if tokio::time::Instant::now() >= deadline {
            return Err(thread);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(thread.join())
}

/// The confirm reader's thread: its own current-thread runtime, on which `socket` (a clone
/// of the producer's) is registered and read by [`read_confirms`].
fn read_confirms_thread(
    socket: std::net::TcpStream,
    reader: FrameReader<()>,
    confirms: Option<Arc<Confirms>>,
    base: std::time::Instant,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime for the confirm reader")?;
    rt.block_on(async move {
        let socket = TcpStream::from_std(socket).context("registering the reader's socket")?;
        let (_, reader) = reader.with_inner(socket);
        read_confirms(reader, confirms, base).await
    })
}

/// Reads what the broker sends a producer: confirms, and errors.
async fn read_confirms(
    mut reader: FrameReader<TcpStream>,
    confirms: Option<Arc<Confirms>>,
    base: std::time::Instant,
) -> anyhow::Result<()> {
    loop {
        let mut settled = false;
        while let Some(f) = reader.next_frame()? {
            if f.kind != FRAME_METHOD {
                continue; // heartbeats; header and body of a basic.return
            }
            let ids = method_ids(f.payload);
            match ids {
                Some(BASIC_ACK) | Some(BASIC_NACK) => {
                    let (tag, multiple) = parse_ack_nack(f.payload)?;
                    let Some(c) = &confirms else {
                        bail!("confirm received without confirm.select")
                    };
                    let now_ns = base.elapsed().as_nanos() as u64;
                    c.tracker
                        .lock()
                        .settle_at(tag, multiple, ids == Some(BASIC_NACK), now_ns);
                    settled = true;
                }
                Some((10, 51)) => return Ok(()), // connection.close-ok
                _ => check_close(&parse_method(f.payload)?)?,
            }
        }
        if settled && let Some(c) = &confirms {
            c.notify.notify_one();
        }
        if reader.fill().await? == 0 {
            bail!("broker closed the connection");
        }
    }
}
