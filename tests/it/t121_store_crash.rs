//! The durable store under crashes and a full disk (`docs/design/store.md`): a crash-point test
//! that kills a broker with a confirming publisher and a consumer running, fifty times over five
//! printed seeds, and checks that every confirmed message was either consumed or is still there
//! (section 8); and a full-disk test on a small tmpfs that checks the nacks, the log line and the
//! recovery of section 6.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use integration_tests::{SplitMix, confirming, declare_durable, persistent};
use integration_tests::{
    TempDir, TestBroker, assert_serves_fresh_client, channel, eventually, get, message_count,
    publish, within,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};

use lapin::types::FieldTable;
use lapin::{BasicProperties, PublisherConfirm};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

// ---- helpers ------------------------------------------------------------------------------

/// A consumer of the crash queue (manual acks) after basic.qos `prefetch`.
async fn consume_with_prefetch(ch: &lapin::Channel, prefetch: u16) -> lapin::Consumer {
    within(
        "basic.qos",
        ch.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await
    .expect("basic.qos");
    within(
        "basic.consume",
        ch.basic_consume(
            CRASH_QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume")
}

/// A broker with a store on `dir` and `extra` arguments.
fn store_broker(dir: &Path, extra: &[&str]) -> TestBroker {
    TestBroker::builder()
        .data_dir(dir)
        .args(extra.iter().copied())
        .start()
}

// ---- test 1: crash points -----------------------------------------------------------------

const CRASH_QUEUE: &str = "crash-q";
/// Unconfirmed publishes the publisher keeps in flight.
const WINDOW: usize = 1000;
/// The kill waits until the publisher sees at least this many publishes unconfirmed.
const KILL_AT_OUTSTANDING: u64 = 800;
/// What the test requires to have been outstanding at each kill (a lower bound measured after
/// the kill, counting every confirm that arrived even after it).
const REQUIRED_OUTSTANDING: u64 = 100;
const KILLS_PER_SEED: usize = 10;
/// At most this many kills per seed to get `KILLS_PER_SEED` counted ones.
const MAX_KILLS_PER_SEED: usize = 20;
const SEEDS: usize = 5;
const CONSUMER_PREFETCH: u16 = 50;

/// What one seed's run saw.
#[derive(Default)]
struct SeedRecord {
    /// The next number to publish: every number below it may have been published.
    next_number: u64,
    /// Numbers whose confirm was an ack.
    confirmed: BTreeSet<u64>,
    /// Numbers whose confirm was a nack.
    nacked: BTreeSet<u64>,
    /// How many times the consumers (and the final drain) acked each number.
    consumed: BTreeMap<u64, u32>,
    /// Deliveries flagged redelivered.
    redelivered: u64,
    /// Bodies that were not a number.
    bad_bodies: Vec<Vec<u8>>,
    /// The outstanding confirms (lower bound) at each kill.
    outstanding_at_kills: Vec<u64>,
    /// Kills at which fewer than `REQUIRED_OUTSTANDING` were provably outstanding.
    uncounted_kills: usize,
}

fn parse_number(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// The seeds: `CRASH_SEED` (a comma-separated list, to replay), else five from the clock.
fn crash_seeds() -> Vec<u64> {
    if let Ok(list) = std::env::var("CRASH_SEED") {
        let seeds: Vec<u64> = list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("CRASH_SEED {s:?}: {e}"))
            })
            .collect();
        assert!(!seeds.is_empty(), "CRASH_SEED names no seed");
        return seeds;
    }
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64;
    let mut rng = SplitMix(clock ^ u64::from(std::process::id()));
    (0..SEEDS).map(|_| rng.next() % 1_000_000_000).collect()
}

/// One round: start the broker on `dir`, run a confirming publisher (window `WINDOW`) and a
/// consumer, kill -9 the broker after a random delay while the window is full, and record what
/// the clients saw.
async fn crash_round(dir: &Path, rng: &mut SplitMix, record: &mut SeedRecord, first: bool) {
    let mut broker = store_broker(dir, &["--store-segment-size", "64KiB"]);
    let pub_conn = broker.connect().await;
    if !first {
        // The durable queue survived the kill.
        message_count(&pub_conn, CRASH_QUEUE)
            .await
            .unwrap_or_else(|e| panic!("the durable queue is gone after a kill -9: {e:?}"));
    }
    let pch = confirming(&pub_conn).await;
    declare_durable(&pch, CRASH_QUEUE, FieldTable::default()).await;

    // The consumer: its own connection, manual acks, a prefetch window.
    let cons_conn = broker.connect().await;
    let cch = channel(&cons_conn).await;
    let mut consumer = consume_with_prefetch(&cch, CONSUMER_PREFETCH).await;
    // (number or None for a bad body, body, redelivered), recorded after the ack was sent.
    type Acked = Vec<(Option<u64>, Vec<u8>, bool)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let consumer_task = {
        let acked = acked.clone();
        let cch = cch.clone();
        tokio::spawn(async move {
            // Bounded: ends when the connection dies, or after a long silence.
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
            {
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    cch.basic_ack(d.delivery_tag, BasicAckOptions::default()),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
                acked
                    .lock()
                    .unwrap()
                    .push((parse_number(&d.data), d.data, d.redelivered));
            }
        })
    };

    // The publisher: numbers from `record.next_number`, at most WINDOW unconfirmed.
    let start = record.next_number;
    let next = Arc::new(AtomicU64::new(start));
    let published = Arc::new(AtomicU64::new(0));
    let resolved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let window = Arc::new(Semaphore::new(WINDOW));
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(u64, PublisherConfirm, OwnedSemaphorePermit)>();
    let publisher_task = {
        let (next, published, stop, window) = (
            next.clone(),
            published.clone(),
            stop.clone(),
            window.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let permit = match tokio::time::timeout(
                    Duration::from_millis(50),
                    window.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => break,
                    Err(_) => continue,
                };
                let n = next.fetch_add(1, Ordering::AcqRel);
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    pch.basic_publish(
                        "".into(),
                        CRASH_QUEUE.into(),
                        BasicPublishOptions::default(),
                        n.to_string().as_bytes(),
                        persistent(),
                    ),
                )
                .await;
                match sent {
                    Ok(Ok(confirm)) => {
                        published.fetch_add(1, Ordering::AcqRel);
                        if tx.send((n, confirm, permit)).is_err() {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        eprintln!("publisher: basic.publish failed: {e:?}");
                        break;
                    }
                    Err(_) => {
                        eprintln!("publisher: basic.publish did not complete within 5 s");
                        break;
                    }
                }
            }
        })
    };
    // The confirms, in order: (number, Some(ack?)) or (number, None) when the connection died.
    type Outcomes = Vec<(u64, Option<bool>)>;
    let confirms: Arc<Mutex<Outcomes>> = Arc::default();
    let collector_task = {
        let (confirms, resolved) = (confirms.clone(), resolved.clone());
        tokio::spawn(async move {
            while let Some((n, confirm, permit)) = rx.recv().await {
                let outcome = match tokio::time::timeout(Duration::from_secs(15), confirm).await {
                    Ok(Ok(c)) => Some(c.is_ack()),
                    _ => None,
                };
                if outcome.is_some() {
                    resolved.fetch_add(1, Ordering::AcqRel);
                }
                confirms.lock().unwrap().push((n, outcome));
                drop(permit);
            }
        })
    };

    // The crash point: a random delay, then the first moment the window is (nearly) full.
    let delay = Duration::from_millis(rng.range(50, 400));
    tokio::time::sleep(delay).await;
    // The broker confirms about as fast as one lapin publisher sends, so the window alone
    // seldom fills: the broker is frozen (SIGSTOP, at whatever point of its work it is, a
    // crash point like any other) while the publisher fills the window, then killed.
    broker.signal("STOP");
    let full = eventually(Duration::from_secs(20), || {
        let outstanding = published
            .load(Ordering::Acquire)
            .saturating_sub(resolved.load(Ordering::Acquire));
        async move { outstanding >= KILL_AT_OUTSTANDING }
    })
    .await;
    let alive = broker.is_running();
    assert!(
        full,
        "the publisher never had {KILL_AT_OUTSTANDING} publishes unconfirmed (broker alive: {alive}; published {}, \
         resolved {})",
        published.load(Ordering::Acquire),
        resolved.load(Ordering::Acquire)
    );
    let published_before_kill = published.load(Ordering::Acquire);
    // SIGKILL straight from this process (dropping a `TestBroker` kills its child with
    // `Child::kill`, which is SIGKILL, and reaps it): `signal("KILL")` would first spawn
    // `kill(1)`, and in those milliseconds the broker confirms hundreds of publishes.
    drop(broker);
    stop.store(true, Ordering::Release);

    // Every client task ends once its connection notices the death (bounded anyway).
    for (what, task) in [
        ("the publisher", publisher_task),
        ("the confirm collector", collector_task),
        ("the consumer", consumer_task),
    ] {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .is_err()
        {
            abort.abort();
            panic!("{what} did not end within 30 s of the kill");
        }
    }
    drop((pub_conn, cons_conn));

    let confirms = std::mem::take(&mut *confirms.lock().unwrap());
    let end_before_kill = start + published_before_kill;
    let resolved_of_those = confirms
        .iter()
        .filter(|(n, outcome)| *n < end_before_kill && outcome.is_some())
        .count() as u64;
    let outstanding = published_before_kill - resolved_of_those;
    if outstanding >= REQUIRED_OUTSTANDING {
        record.outstanding_at_kills.push(outstanding);
    } else {
        // Still a crash whose data is checked, but not one of the kills the test counts.
        println!(
            "  a kill with only {outstanding} confirms outstanding ({published_before_kill} \
             published before it, {resolved_of_those} of them confirmed): not counted"
        );
        record.uncounted_kills += 1;
    }
    for (n, outcome) in confirms {
        match outcome {
            Some(true) => {
                record.confirmed.insert(n);
            }
            Some(false) => {
                record.nacked.insert(n);
            }
            None => {}
        }
    }
    record.next_number = next.load(Ordering::Acquire);
    let mut this_round = BTreeSet::new();
    for (n, body, redelivered) in std::mem::take(&mut *acked.lock().unwrap()) {
        if redelivered {
            record.redelivered += 1;
        }
        let Some(n) = n else {
            record.bad_bodies.push(body);
            continue;
        };
        // One broker lifetime delivers an acked message once; one consumed before a kill and
        // delivered again was recovered, so it must be flagged redelivered (section 5, step 3).
        assert!(
            this_round.insert(n),
            "message {n} was delivered and acked twice by one broker"
        );
        assert!(
            redelivered || !record.consumed.contains_key(&n),
            "message {n}, consumed before a kill, came back not flagged redelivered"
        );
        *record.consumed.entry(n).or_default() += 1;
    }
}

/// The end of a seed: start the broker, drain (and ack) everything left, check the queue is
/// empty, stop it cleanly and check that a restart delivers nothing again (section 8).
async fn drain_at_end(dir: &Path, record: &mut SeedRecord) {
    let mut broker = store_broker(dir, &["--store-segment-size", "64KiB"]);
    let conn = broker.connect().await;
    message_count(&conn, CRASH_QUEUE)
        .await
        .unwrap_or_else(|e| panic!("the durable queue is gone after the last kill: {e:?}"));
    let left = message_count(&conn, CRASH_QUEUE).await.unwrap();
    let ch = channel(&conn).await;
    let mut consumer = consume_with_prefetch(&ch, 1000).await;
    // Nothing publishes now, so exactly `left` deliveries come.
    for _ in 0..left {
        let d = within("a delivery of the final drain", consumer.next())
            .await
            .expect("the consumer ended")
            .expect("a delivery");
        within(
            "basic.ack",
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default()),
        )
        .await
        .expect("basic.ack");
        if d.redelivered {
            record.redelivered += 1;
        }
        match parse_number(&d.data) {
            Some(n) => {
                // Everything here was recovered after a kill (section 5, step 3).
                assert!(
                    d.redelivered,
                    "recovered message {n} not flagged redelivered"
                );
                *record.consumed.entry(n).or_default() += 1;
            }
            None => record.bad_bodies.push(d.data.clone()),
        }
    }
    let drained = left;
    // The acks are processed in order on the channel: once this get answers, they are done.
    assert!(
        get(&ch, CRASH_QUEUE, true).await.is_none(),
        "more than {left} messages were left"
    );
    assert_eq!(message_count(&conn, CRASH_QUEUE).await.unwrap(), 0);
    drop(ch);
    let _ = within("connection.close", conn.close(200, "".into())).await;
    broker.stop();
    let status = broker.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: {status:?}\n{}", broker.log());

    // After a clean stop, nothing acked comes back.
    let broker = store_broker(dir, &["--store-segment-size", "64KiB"]);
    let conn = broker.connect().await;
    assert_eq!(
        message_count(&conn, CRASH_QUEUE).await.unwrap(),
        0,
        "acked messages came back after a clean stop"
    );
    println!("  final drain: {drained} messages");
}

async fn run_seed(seed: u64) {
    println!("crash-point seed {seed}");
    let started = Instant::now();
    let dir = TempDir::new("crash-point");
    let mut rng = SplitMix(seed);
    let mut record = SeedRecord::default();
    let mut kills = 0;
    while record.outstanding_at_kills.len() < KILLS_PER_SEED {
        assert!(
            kills < MAX_KILLS_PER_SEED,
            "seed {seed}: only {} of {kills} kills had {REQUIRED_OUTSTANDING} confirms \
             outstanding",
            record.outstanding_at_kills.len()
        );
        crash_round(dir.path(), &mut rng, &mut record, kills == 0).await;
        kills += 1;
    }
    drain_at_end(dir.path(), &mut record).await;

    assert!(
        record.bad_bodies.is_empty(),
        "seed {seed}: bodies that were never published: {:?}",
        record.bad_bodies
    );
    let never_published: Vec<u64> = record
        .consumed
        .keys()
        .copied()
        .filter(|&n| n >= record.next_number)
        .collect();
    assert!(
        never_published.is_empty(),
        "seed {seed}: numbers consumed that were never published: {never_published:?}"
    );
    let lost: Vec<u64> = record
        .confirmed
        .iter()
        .copied()
        .filter(|n| !record.consumed.contains_key(n))
        .collect();
    assert!(
        lost.is_empty(),
        "seed {seed}: {} confirmed messages were neither consumed nor in the queue at the end, \
         e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    let duplicates = record.consumed.values().filter(|&&c| c > 1).count();
    let unconfirmed_present = record
        .consumed
        .keys()
        .filter(|n| !record.confirmed.contains(n))
        .count();
    println!(
        "  seed {seed}: published {} (numbers issued), confirmed {}, nacked {}, consumed {} \
         distinct, consumed twice or more {duplicates}, redelivered deliveries {}, unconfirmed \
         but delivered {unconfirmed_present}, outstanding at the kills {:?} (+{} kills not counted), {:.1} s",
        record.next_number,
        record.confirmed.len(),
        record.nacked.len(),
        record.consumed.len(),
        record.redelivered,
        record.outstanding_at_kills,
        record.uncounted_kills,
        started.elapsed().as_secs_f64()
    );
}

/// Kills the broker (SIGKILL) 10 times for each of 5 seeds while a confirming publisher has at
/// least 100 publishes unconfirmed and a consumer is acking, then checks (section 8) that every
/// message confirmed with an ack was consumed and acked in some round or was still in the queue
/// at the end, that nothing appears that was never published, that one broker lifetime never
/// delivers an acked message twice, and that what comes back after a kill is flagged redelivered
/// (section 5). "Outstanding" is a lower bound measured after the kill: the publishes sent before
/// it minus every confirm that arrived for them, even after it. A kill below 100 is checked all
/// the same but not counted; a seed may take up to 20 kills to count 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_never_loses_a_confirmed_message() {
    let started = Instant::now();
    for seed in crash_seeds() {
        run_seed(seed).await;
    }
    println!(
        "crash-point test: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

// ---- test 2: a full disk ------------------------------------------------------------------

/// A size-limited tmpfs the test mounted; unmounted on drop (also when the test fails).
pub(crate) struct TmpfsMount(PathBuf);

impl TmpfsMount {
    pub(crate) fn mount(dir: &Path, size: &str) -> Result<TmpfsMount, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(TmpfsMount(dir.to_path_buf()))
        } else {
            Err(format!(
                "mount -t tmpfs on {} failed ({}): {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Free bytes on the file system of `dir`, from `df`.
pub(crate) fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("run df");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read df's output: {text:?}"))
}

/// Writes zeros to `path` until `dir` has about `leave` bytes free (or the disk is full).
pub(crate) fn fill_until(path: &Path, dir: &Path, leave: u64) {
    use std::io::Write;
    let chunk = vec![0u8; 256 * 1024];
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let mut to_write = free_bytes(dir).saturating_sub(leave);
    while to_write > 0 {
        let n = (to_write as usize).min(chunk.len());
        if file.write_all(&chunk[..n]).is_err() {
            break;
        }
        to_write -= n as u64;
    }
    let _ = file.sync_all();
}

const BIG: usize = 64 * 1024;

/// A 64 KiB body starting with `n`.
fn big_body(n: u64) -> Vec<u8> {
    let mut body = vec![b'.'; BIG];
    body[..8].copy_from_slice(&n.to_be_bytes());
    body
}

fn big_number(body: &[u8]) -> Option<u64> {
    (body.len() == BIG).then(|| u64::from_be_bytes(body[..8].try_into().unwrap()))
}

/// On a 16 MiB tmpfs filled to 6 MiB free, persistent 64 KiB publishes are eventually nacked
/// and the broker logs `Store: cannot write` (section 6) but stays alive, serves new clients and
/// transient messages; when space returns, persistent publishes are acked again by themselves;
/// after a SIGTERM and a restart every message that was acked is there and the start reported no
/// damage.
///
/// This test found (and guards) a bug: after a failed write the writer truncated the segment
/// back, but the segment's descriptor was not opened for appending, so the retried round was
/// written behind a hole of zeros and the restart refused the store as damaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_nacks_persistent_publishes_and_recovers() {
    let tmp = TempDir::new("store-full");
    let mount = match TmpfsMount::mount(tmp.path(), "16m") {
        Ok(m) => m,
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the full-disk test needs a tmpfs mount (root) in CI: {why}");
            }
            println!("skipping the full-disk test: {why}");
            return;
        }
    };
    let data = tmp.path().join("data");
    let filler = tmp.path().join("filler");
    let args = ["--store-segment-size", "1MiB"];
    let mut broker = store_broker(&data, &args);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "full-q", FieldTable::default()).await;
    within(
        "queue.declare",
        ch.queue_declare(
            "transient-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare transient-q");

    fill_until(&filler, tmp.path(), 6 * 1024 * 1024);
    println!(
        "full disk: {} bytes free after the filler",
        free_bytes(tmp.path())
    );

    // Persistent 64 KiB publishes until one is nacked (16 MiB cannot take 400 of them).
    let mut acked = BTreeSet::new();
    let mut nacked = BTreeSet::new();
    let mut n = 0u64;
    while n < 400 && nacked.is_empty() {
        let c = publish(&ch, "", "full-q", &big_body(n), persistent())
            .await
            .unwrap_or_else(|e| panic!("persistent publish {n}: {e:?}"));
        if c.is_ack() {
            acked.insert(n);
        } else {
            nacked.insert(n);
        }
        n += 1;
    }
    println!(
        "full disk: {} acked before the first nack (publish {})",
        acked.len(),
        n - 1
    );
    assert!(!nacked.is_empty(), "no persistent publish was nacked");
    let logged = eventually(Duration::from_secs(5), || {
        let has = broker.log().contains("Store: cannot write");
        async move { has }
    })
    .await;
    assert!(
        logged,
        "the log does not say `Store: cannot write`:\n{}",
        broker.log()
    );
    broker.assert_alive();
    assert_serves_fresh_client(&broker).await;

    // Transient messages are not written, so they still work, on any queue.
    for queue in ["transient-q", "full-q"] {
        let c = publish(&ch, "", queue, b"transient", BasicProperties::default())
            .await
            .expect("transient publish");
        assert!(
            c.is_ack(),
            "a transient publish to {queue} was not acked: {c:?}"
        );
    }
    let m = get(&ch, "transient-q", true)
        .await
        .expect("the transient message");
    assert_eq!(m.delivery.data, b"transient");

    // Space returns: the writer recovers by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    // `eventually` wants a bool: the outcomes are recorded on the side.
    let outcomes: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let recovered = {
        let mut n2 = n;
        let outcomes = outcomes.clone();
        eventually(Duration::from_secs(10), move || {
            let this = n2;
            n2 += 1;
            let ch = ch.clone();
            let outcomes = outcomes.clone();
            async move {
                let c = publish(&ch, "", "full-q", &big_body(this), persistent())
                    .await
                    .unwrap_or_else(|e| panic!("persistent publish {this}: {e:?}"));
                outcomes.lock().unwrap().push((this, c.is_ack()));
                c.is_ack()
            }
        })
        .await
    };
    for (this, ok) in outcomes.lock().unwrap().iter() {
        if *ok {
            acked.insert(*this);
        } else {
            nacked.insert(*this);
        }
        n = n.max(this + 1);
    }
    assert!(
        recovered,
        "persistent publishes were still refused 10 s after the filler was removed:\n{}",
        broker.log()
    );
    broker.assert_alive();
    println!(
        "full disk: before the restart {} acked, {} nacked",
        acked.len(),
        nacked.len()
    );
    let _ = within("connection.close", conn.close(200, "".into())).await;

    // A clean stop and a restart: every acked message is there, and no damage was reported.
    broker.stop();
    let status = broker.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: {status:?}\n{}", broker.log());
    let first_log = broker.log();
    println!(
        "full disk: the first broker's store lines:\n{}",
        first_log
            .lines()
            .filter(|l| l.contains("Store"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(broker);
    let broker = TestBroker::builder()
        .data_dir(&data)
        .args(args)
        .try_start()
        .unwrap_or_else(|e| panic!("the restart after the full disk failed: {e}"));
    // The port line may come before the recovery (which can still refuse the start), so the
    // start is judged by a connection and the log.
    let conn = match broker
        .try_connect_url(&broker.amqp_url(), Default::default())
        .await
    {
        Ok(conn) => conn,
        Err(e) => {
            let mut broker = broker;
            let status = broker.wait_exit(Duration::from_secs(10));
            panic!(
                "the restart after the full disk failed ({e}; exit {status:?}):\n{}",
                broker.log()
            );
        }
    };
    let log = broker.log();
    assert!(
        !log.to_lowercase().contains("damage"),
        "the restart reported damage:\n{log}"
    );
    let ch = channel(&conn).await;
    let mut present = BTreeSet::new();
    let mut others = Vec::new();
    for _ in 0..=n + 10 {
        let Some(m) = get(&ch, "full-q", true).await else {
            break;
        };
        match big_number(&m.delivery.data) {
            Some(k) => {
                present.insert(k);
            }
            None => others.push(m.delivery.data),
        }
    }
    assert!(
        others.is_empty(),
        "messages other than the persistent ones came back: {:?}",
        others
            .iter()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(20)]).into_owned())
            .collect::<Vec<_>>()
    );
    let missing: Vec<u64> = acked.difference(&present).copied().collect();
    assert!(
        missing.is_empty(),
        "acked messages missing after the restart: {missing:?}"
    );
    let unknown: Vec<u64> = present.iter().copied().filter(|&k| k >= n).collect();
    assert!(unknown.is_empty(), "never published: {unknown:?}");
    println!(
        "full disk: {} acked, {} nacked, {} present after the restart ({} of them nacked)",
        acked.len(),
        nacked.len(),
        present.len(),
        present.intersection(&nacked).count()
    );
    drop(conn);
    drop(broker);
    drop(mount);
}
