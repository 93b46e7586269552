//! The tokio layer: accepts connections, runs one reader task (frames in, through the
//! `Connection` state machine) and one writer task (the `Outbound` buffer out, heartbeats) per
//! connection, sweeps queues periodically, and shuts everything down cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use crate::broker::Broker;
use crate::connection::{Connection, Next, Phase};
use crate::delivery::{self, Outbound};
use crate::error::AmqpError;
use crate::protocol::frame::{split_frame, write_heartbeat};
use crate::protocol::reply;

/// How long we wait for connection.close-ok after sending connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(2);
/// How much free space the read buffer gets before each read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The largest write buffer a connection keeps between bursts.
const WRITE_BUFFER_KEEP_BYTES: usize = 1024 * 1024;
/// How long `run` waits for connections to finish closing at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves AMQP on `listeners` until `shutdown` completes (or the management `shutdown` method
/// is called), then closes every client connection
/// with 320 (connection-forced), waits for them to finish and returns.
pub async fn run(
    broker: Arc<Broker>,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    for l in listeners {
        tokio::spawn(accept_loop(
            broker.clone(),
            l,
            stop_rx.clone(),
            done_tx.clone(),
        ));
    }
    let sweeper = tokio::spawn(sweep_loop(broker.clone()));
    let ha_ticker = tokio::spawn(ha_tick_loop(broker.clone()));
    tokio::select! {
        _ = shutdown => {}
        _ = broker.mgmt.shutdown_requested() => {
            tracing::info!(target: "Broker", notice = true, "Shutdown requested through management, shutting down");
        }
    }
    tracing::info!(target: "Broker", "shutting down: closing client connections");
    let _ = stop_tx.send(true);
    drop(done_tx);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv()).await;
    sweeper.abort();
    ha_ticker.abort();
    if let Some(ha) = broker.ha_module() {
        ha.shutdown();
    }
    Ok(())
}

async fn sweep_loop(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(broker.config.queue_purge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        broker.sweep();
    }
}

/// How often replicating subscriptions check their ack timeout and send their lag.
const HA_TICK: std::time::Duration = std::time::Duration::from_millis(100);

async fn ha_tick_loop(broker: Arc<Broker>) {
    if !broker.config.ha.enabled() {
        return;
    }
    let mut tick = tokio::time::interval(HA_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        crate::delivery::run_batch(|| broker.ha_tick());
    }
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(target: "Network", "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let c = &broker.config;
        let hard_cap = if c.max_connections == 0 {
            usize::MAX
        } else {
            c.max_connections + c.reserved_admin_connections
        };
        if broker.connections_total.load(Ordering::Acquire) >= hard_cap {
            tracing::warn!(target: "Network", "refusing connection from {peer}: {hard_cap} connections open (--max-connections plus the reserve)");
            drop(stream);
            continue;
        }
        broker.connections_total.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(serve(
            broker.clone(),
            stream,
            peer,
            stop.clone(),
            done.clone(),
        ));
    }
}

async fn serve(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    // The reader owns the read half (its reads count against tokio's cooperative budget, so a
    // flooding publisher cannot starve other tasks); the write half is shared by the writer
    // task and inline flushes at the end of a batch (never writing at the same time: see
    // `Outbound`).
    let (rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    let out = Arc::new(Outbound::default());
    let inline = wr.clone();
    out.set_try_write(Box::new(move |bytes| inline.try_write(bytes)));
    let heartbeat = Arc::new(AtomicU16::new(0));
    let writer = tokio::spawn(write_loop(wr, out.clone(), heartbeat.clone()));
    let mut conn = Connection::new(broker.clone(), peer, out.clone());
    tracing::debug!(target: "Network", "connection {} accepted from {peer}", conn.id);
    if let Err(e) = read_loop(&broker, &mut conn, rd, stop, (&heartbeat, &out)).await {
        tracing::debug!(target: "Network", "connection {} from {peer}: {e}", conn.id);
    }
    delivery::run_batch(|| conn.teardown());
    out.close();
    let _ = writer.await;
    broker.connections_total.fetch_sub(1, Ordering::AcqRel);
    tracing::debug!(target: "Network", "connection {} from {peer} closed", conn.id);
}

async fn read_loop(
    broker: &Arc<Broker>,
    conn: &mut Connection,
    mut rd: OwnedReadHalf,
    mut stop: watch::Receiver<bool>,
    (heartbeat, out): (&AtomicU16, &Outbound),
) -> std::io::Result<()> {
    let started = Instant::now();
    let negotiate_deadline = started + broker.config.max_negotiate_time;
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // The protocol header.
    while buf.len() < 8 {
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r?,
            _ = tokio::time::sleep_until(negotiate_deadline) => {
                tracing::info!(target: "Network", "connection {}: no protocol header within --max-negotiate-time", conn.id);
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
    }
    if conn.protocol_header(&buf[..8]) == Next::Terminate {
        return Ok(());
    }
    buf.advance(8);
    let mut last_read = Instant::now();
    let mut closing_since: Option<Instant> = None;
    let mut stopping = false;
    let mut evict = broker.eviction();
    // One future for the connection's life: it registers with the Outbound once, not on every
    // pass of the loop.
    let aborted = out.aborted();
    tokio::pin!(aborted);
    loop {
        // Every complete frame in the buffer, then what they produced goes out inline.
        let ended = delivery::run_batch(|| process_frames(conn, &mut buf));
        if ended {
            return Ok(());
        }
        if heartbeat.swap(conn.heartbeat_s, Ordering::Relaxed) != conn.heartbeat_s {
            // The writer sleeps on the old interval; inline writes do not wake it.
            out.wake_writer();
        }
        if conn.phase() == Phase::Closing && closing_since.is_none() {
            closing_since = Some(Instant::now());
        }
        if conn.phase() != Phase::Open
            && conn.phase() != Phase::Closing
            && Instant::now() > negotiate_deadline
        {
            tracing::info!(target: "Network", "connection {}: handshake not finished within --max-negotiate-time", conn.id);
            return Ok(());
        }
        if conn.has_published && broker.memory_alarm() && conn.phase() == Phase::Open {
            wait_while_blocked(broker, conn, &mut stop).await;
        }
        let deadline = match (closing_since, conn.heartbeat_s) {
            (Some(t), _) => t + CLOSE_OK_TIMEOUT,
            (None, 0) if conn.phase() != Phase::Open => negotiate_deadline,
            (None, 0) => last_read + Duration::from_secs(24 * 3600),
            (None, hb) => last_read + Duration::from_secs(2 * u64::from(hb)),
        };
        buf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                if r? == 0 {
                    return Ok(());
                }
                last_read = Instant::now();
            }
            _ = tokio::time::sleep_until(deadline) => {
                if closing_since.is_none() && conn.phase() == Phase::Open {
                    tracing::warn!(target: "Network", "connection {}: no frame for two heartbeat intervals ({} s): closing", conn.id, 2 * conn.heartbeat_s);
                }
                return Ok(());
            }
            _ = &mut aborted => {
                tracing::warn!(target: "Network", "connection {}: dropped by the broker (see above)", conn.id);
                return Ok(());
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.close_connection(AmqpError::new(reply::CONNECTION_FORCED, "broker shutdown"), 0, 0);
                closing_since = Some(Instant::now());
            }
            _ = evict.changed(), if !stopping => {
                if !conn.is_admin() && conn.phase() == Phase::Open {
                    stopping = true;
                    let text = format!("this broker is no longer the primary: connect to {}", broker.redirect_text());
                    delivery::run_batch(|| conn.close_connection(AmqpError::new(reply::CONNECTION_FORCED, text), 0, 0));
                    closing_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Handles every complete frame in `buf`, then the end of the batch (coalesced confirms).
/// Returns true if the connection must end now.
fn process_frames(conn: &mut Connection, buf: &mut BytesMut) -> bool {
    loop {
        match split_frame(buf, conn.frame_max) {
            Ok(Some((frame, n))) => {
                let next = conn.frame(frame);
                buf.advance(n);
                if next == Next::Terminate {
                    return true;
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The stream is out of step: say why, then hang up without waiting.
                conn.frame_error(e.to_string());
                return true;
            }
        }
    }
    conn.end_of_batch();
    false
}

/// Writes all of `bytes`, waiting for the socket as needed.
async fn write_all(stream: &OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        stream.writable().await?;
        match stream.try_write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Blocks a publishing connection while the memory alarm is on (connection.blocked first, for
/// clients that understand it).
async fn wait_while_blocked(
    broker: &Arc<Broker>,
    conn: &mut Connection,
    stop: &mut watch::Receiver<bool>,
) {
    let mut alarm = broker.watch_memory_alarm();
    conn.send_blocked(true);
    tracing::info!(target: "Network", "connection {} blocked: memory high watermark", conn.id);
    tokio::select! {
        _ = alarm.wait_for(|on| !*on) => {}
        _ = stop.changed() => {}
    }
    conn.send_blocked(false);
}

async fn write_loop(stream: Arc<OwnedWriteHalf>, out: Arc<Outbound>, heartbeat: Arc<AtomicU16>) {
    let mut buf = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut last_write = Instant::now();
    loop {
        let Some(closing) = out.begin_write(&mut buf) else {
            // An inline flush is writing; it wakes us when it ends.
            out.wait().await;
            continue;
        };
        if !buf.is_empty() {
            let result = write_all(&stream, &buf).await;
            out.end_write();
            if result.is_err() {
                out.mark_dead();
                break;
            }
            out.written(buf.len());
            buf.clear();
            // A burst (a slow consumer catching up) may have grown the buffer; do not keep
            // megabytes per idle connection.
            if buf.capacity() > WRITE_BUFFER_KEEP_BYTES {
                buf = Vec::with_capacity(READ_CHUNK_BYTES);
            }
            last_write = Instant::now();
            continue;
        }
        if closing {
            break;
        }
        let hb = heartbeat.load(Ordering::Relaxed);
        if hb == 0 {
            out.wait().await;
        } else {
            let due = last_write + Duration::from_secs(u64::from(hb));
            tokio::select! {
                _ = out.wait() => {}
                _ = tokio::time::sleep_until(due) => {
                    // Inline writes do not move `last_write`, so a busy connection may get
                    // a heartbeat it did not need: harmless, and no clock read per message.
                    out.write(write_heartbeat);
                    last_write = Instant::now();
                }
            }
        }
    }
    let socket: &TcpStream = (*stream).as_ref();
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
}
