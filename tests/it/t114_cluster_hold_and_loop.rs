//! Two more of the reference HA test catalogue (reference section 5.2) ported to clusters of
//! real `qpidd` processes: `test_queue_hold` (RecoveryTests, test 39: a promoted backup is
//! `recovering` and holds the confirms of publishes to replicated queues until every backup that
//! was ready under the old primary is ready again under it) and a long form of
//! `test_failover_send_receive` (LongTests, test 35: many failovers while numbered publishers
//! and consumers run).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{
    TempDir, TestBroker, addr, admin, channel, declare, eventually, free_port, get, loopback_url,
    member, promote, qpid_ha, ready_cluster, status, wait_status, within, within_for,
};
use integration_tests::{confirming, publish};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;

use crate::t113_cluster_catalogue_more::{kill, wait_count, wait_log, wait_subscriptions_ready};

const FOLLOW: Duration = Duration::from_secs(15);

// ---- helpers (copied from t112_cluster_catalogue / t113_cluster_catalogue_more) -------------

/// The members the broker lists (`qpid-ha query --json`), for failure messages.
fn members(b: &TestBroker) -> String {
    let r = qpid_ha(&["query", "--json", "-b", &addr(b)]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    j["brokers"][0]["members"].to_string()
}

/// The line a promoted broker logs naming the backups it expects.
fn expected_line(b: &TestBroker) -> String {
    b.log()
        .lines()
        .filter(|l| l.contains("waiting for"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Publishes on a confirming channel and returns whether the broker acked.
async fn publish_to(ch: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    publish(ch, "", queue, body, BasicProperties::default())
        .await
        .expect("publish")
        .is_ack()
}

/// Every message of `queue` (basic.get + ack), bodies in order.
async fn drain_bodies(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, false).await {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        m.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

fn numbers(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

// ---- test_queue_hold ------------------------------------------------------------------------

/// `member()` of the harness with `--data-dir dir` (kept across restarts, as the reference's
/// brokers keep theirs).
fn member_in(port: u16, url: &str, extra: &[&str], dir: &TempDir) -> TestBroker {
    TestBroker::builder()
        .port(port)
        .data_dir(dir.path())
        .args(["--ha-cluster", "yes", "--ha-brokers-url", url])
        .args([
            "--link-maintenance-interval",
            "0.1s",
            "--link-heartbeat-interval",
            "1s",
        ])
        .args(extra.iter().copied())
        .start()
}

/// Reference `test_queue_hold` (RecoveryTests): four members with `--ha-replicate all` and
/// `--ha-backup-timeout 120s`; `q1` holds 0..9 (confirmed, on every backup). The primary [0] is
/// killed first (were a backup killed first, the primary could tell [3] that it left, and [3]
/// would not expect it), then [1] and [2]; [3] is promoted and is `recovering`. On it `q2` is
/// declared and 10..19 are published to each of `q1` and `q2` with publisher confirms: no
/// confirm arrives while the expected backups are away. A client can still read `q1`: 0-9-1
/// has no browse, so the equivalent used is a passive declare counting 20 messages plus a
/// `basic.get` without ack of the head (`0`) and a `basic.reject` with requeue, which reads a
/// message and leaves the queue as it was (a browse leaves it untouched too). Restarting only
/// [1] (on its port, as a backup), until it is `ready` with every message, releases nothing and
/// [3] stays `recovering`. Once [2] is back and `ready` too, all 20 confirms arrive (acks) well
/// before the 120 s timeout, [3] logs `All backups recovered.` and is `active`. The backups hold
/// `q1` = 20 and `q2` = 10 messages (admin connections), so does [0] restarted, which ends
/// `ready`; drained on [3], `q1` is 0..19 and `q2` 10..19 in order. Each member keeps its own
/// `--data-dir` across its restart, as the reference's brokers do.
#[tokio::test(flavor = "multi_thread")]
async fn queue_hold_keeps_confirms_pending_until_every_expected_backup_is_back() {
    let extra = ["--ha-replicate", "all", "--ha-backup-timeout", "120s"];
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new("hold")).collect();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let url = loopback_url(&ports);
    let mut brokers: Vec<TestBroker> = ports
        .iter()
        .zip(&dirs)
        .map(|(p, d)| member_in(*p, &url, &extra, d))
        .collect();
    promote(&brokers[0]);
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "q1", FieldTable::default()).await;
    let ch = confirming(&pc).await;
    for n in 0..10 {
        assert!(publish_to(&ch, "q1", n.to_string().as_bytes()).await);
    }
    for b in &brokers[1..] {
        wait_count(&admin(b).await, "q1", 10).await;
        wait_status(b, "ready").await;
    }
    wait_subscriptions_ready(&brokers[0], "q1", 3).await;
    let _ = pc.close(200, "".into()).await;
    // The primary first, then the two backups.
    kill(&mut brokers[0]);
    kill(&mut brokers[1]);
    kill(&mut brokers[2]);
    promote(&brokers[3]);
    assert_eq!(status(&brokers[3]), "recovering", "just after promotion");
    let nc = brokers[3].connect().await;
    let plain = channel(&nc).await;
    declare(&plain, "q2", FieldTable::default()).await;
    let ch = confirming(&nc).await;
    let mut pending = Vec::new();
    for n in 10..20 {
        for q in ["q1", "q2"] {
            let confirm = within(
                "basic.publish",
                ch.basic_publish(
                    "".into(),
                    q.into(),
                    BasicPublishOptions::default(),
                    n.to_string().as_bytes(),
                    BasicProperties::default(),
                ),
            )
            .await
            .expect("publish");
            pending.push((q, n, tokio::spawn(confirm)));
        }
    }
    let settled = |pending: &[(&str, u32, tokio::task::JoinHandle<_>)]| {
        pending
            .iter()
            .filter(|(_, _, h)| h.is_finished())
            .map(|(q, n, _)| format!("{q}:{n}"))
            .collect::<Vec<_>>()
    };
    // A negative check: nothing may be confirmed within a second.
    let any = eventually(Duration::from_secs(1), || async {
        !settled(&pending).is_empty()
    })
    .await;
    assert!(!any, "confirmed while recovering: {:?}", settled(&pending));
    // Reading q1 still works (the browse equivalent): 20 messages, the head can be read and
    // put back.
    wait_count(&nc, "q1", 20).await;
    let head = get(&plain, "q1", false).await.expect("q1's head");
    assert_eq!(head.delivery.data, b"0");
    head.reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    wait_count(&nc, "q1", 20).await;
    assert_eq!(status(&brokers[3]), "recovering");
    // Only [1] back: still held.
    brokers[1] = member_in(ports[1], &url, &extra, &dirs[1]);
    wait_status(&brokers[1], "ready").await;
    let ac = admin(&brokers[1]).await;
    wait_count(&ac, "q1", 20).await;
    wait_count(&ac, "q2", 10).await;
    let any = eventually(Duration::from_millis(500), || async {
        !settled(&pending).is_empty()
    })
    .await;
    assert!(
        !any,
        "confirmed with only [1] back: {:?}",
        settled(&pending)
    );
    assert_eq!(status(&brokers[3]), "recovering", "with only [1] back");
    // [2] back: everything is confirmed, long before the backup timeout.
    brokers[2] = member_in(ports[2], &url, &extra, &dirs[2]);
    wait_status(&brokers[2], "ready").await;
    let back = Instant::now();
    for (q, n, h) in pending {
        let confirmed = within_for(
            Duration::from_secs(20),
            &format!(
                "the confirm of {q}:{n} once [1] and [2] are ready (members {}; [3] logged {:?})",
                members(&brokers[3]),
                expected_line(&brokers[3])
            ),
            h,
        )
        .await
        .expect("the confirm task")
        .expect("a confirm");
        assert!(confirmed.is_ack(), "{q}:{n}: {confirmed:?}");
    }
    eprintln!("released {:?} after [2] was ready", back.elapsed());
    wait_log(&brokers[3], "All backups recovered.").await;
    wait_status(&brokers[3], "active").await;
    assert!(
        !brokers[3]
            .log()
            .contains("not ready within --ha-backup-timeout"),
        "{}",
        brokers[3].log()
    );
    for b in &brokers[1..3] {
        let ac = admin(b).await;
        wait_count(&ac, "q1", 20).await;
        wait_count(&ac, "q2", 10).await;
    }
    // [0] back too, as a backup.
    brokers[0] = member_in(ports[0], &url, &extra, &dirs[0]);
    wait_status(&brokers[0], "ready").await;
    let ac = admin(&brokers[0]).await;
    wait_count(&ac, "q1", 20).await;
    wait_count(&ac, "q2", 10).await;
    assert_eq!(drain_bodies(&plain, "q1").await, numbers(0..20));
    assert_eq!(drain_bodies(&plain, "q2").await, numbers(10..20));
}

// ---- test_failover_send_receive, long -------------------------------------------------------

/// Connects to whichever member accepts an ordinary client (the primary), trying each in turn
/// until `FOLLOW` passes.
pub(crate) async fn connect_any(ports: &[u16]) -> (lapin::Connection, u16) {
    let end = Instant::now() + FOLLOW;
    loop {
        for p in ports {
            let url = format!("amqp://guest:guest@127.0.0.1:{p}/%2f");
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                lapin::Connection::connect(&url, Default::default()),
            )
            .await;
            if let Ok(Ok(c)) = r {
                return (c, *p);
            }
        }
        assert!(Instant::now() < end, "no member accepted a client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
pub(crate) struct Numbered {
    /// Highest number whose publish was confirmed (acked), if any.
    pub(crate) confirmed: Option<u32>,
    /// Numbers published more than once (republished after a lost confirm).
    pub(crate) republished: BTreeSet<u32>,
    /// Every delivery: (number, redelivered flag).
    pub(crate) received: Vec<(u32, bool)>,
    /// Tells the publisher to publish no new number.
    pub(crate) stop_publishing: bool,
    /// Tells the consumer to return.
    pub(crate) stop: bool,
}

/// Awaits one client step for at most 10 s; a broker that never answers fails the test with
/// the step and the member's port.
async fn step<T>(what: &str, port: u16, f: impl std::future::Future<Output = T>) -> T {
    within_for(
        Duration::from_secs(10),
        &format!("{what} on the member at port {port}"),
        f,
    )
    .await
}

/// Publishes 0, 1, 2... to `queue`, one in flight, each until confirmed (republished on a new
/// connection when the confirm was lost), until told to stop or, with `total`, until
/// `total - 1` is confirmed; a number once published is always confirmed before it stops.
pub(crate) async fn numbered_publisher(
    ports: Vec<u16>,
    queue: &'static str,
    state: Arc<Mutex<Numbered>>,
    total: Option<u32>,
) {
    let mut next = 0u32;
    let mut attempts: BTreeMap<u32, u32> = BTreeMap::new();
    'connection: loop {
        let (conn, port) = connect_any(&ports).await;
        let Ok(ch) = step("publisher channel.open", port, conn.create_channel()).await else {
            continue;
        };
        let select = ch.confirm_select(Default::default());
        if step("confirm.select", port, select).await.is_err() {
            continue;
        }
        loop {
            let done = total.is_some_and(|t| next >= t);
            if done || !attempts.contains_key(&next) && state.lock().unwrap().stop_publishing {
                let _ = step("publisher close", port, conn.close(200, "done".into())).await;
                return;
            }
            *attempts.entry(next).or_default() += 1;
            if attempts[&next] > 1 {
                state.lock().unwrap().republished.insert(next);
            }
            let body = next.to_string();
            let publish = ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            );
            // basic.publish has no reply of its own: a publish that cannot be written within
            // 2 s means this connection is gone.
            let Ok(Ok(confirm)) = tokio::time::timeout(Duration::from_secs(2), publish).await
            else {
                continue 'connection;
            };
            // A confirm never answered (the primary died) shows as a closed connection.
            match step(&format!("the confirm of {queue}:{next}"), port, confirm).await {
                Ok(c) if c.is_ack() => {
                    state.lock().unwrap().confirmed = Some(next);
                    next += 1;
                }
                Ok(c) => panic!("message {queue}:{next} nacked: {c:?}"),
                Err(_) => continue 'connection,
            }
        }
    }
}

/// Consumes `queue` (prefetch 10, acks) on whichever member is primary, recording every
/// delivery, until told to stop.
pub(crate) async fn numbered_consumer(
    ports: Vec<u16>,
    queue: &'static str,
    state: Arc<Mutex<Numbered>>,
) {
    use futures_lite::StreamExt;
    loop {
        if state.lock().unwrap().stop {
            return;
        }
        let (conn, port) = connect_any(&ports).await;
        let Ok(ch) = step("consumer channel.open", port, conn.create_channel()).await else {
            continue;
        };
        let _ = step("basic.qos", port, ch.basic_qos(10, Default::default())).await;
        let consume = ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let Ok(mut consumer) = step("basic.consume", port, consume).await else {
            continue;
        };
        loop {
            if state.lock().unwrap().stop {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(d))) => {
                    let n: u32 = String::from_utf8_lossy(&d.data).parse().unwrap();
                    state.lock().unwrap().received.push((n, d.redelivered));
                    // basic.ack has no reply: lapin's future only says it was written, and it
                    // can stay pending when the connection died under it.
                    let ack = d.ack(BasicAckOptions::default());
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(2), ack).await,
                        Ok(Ok(_))
                    ) {
                        break;
                    }
                }
                Ok(_) => break,
            }
        }
    }
}

/// Checks one queue's record: every number up to the last confirmed one was received; numbers
/// arrive without gaps (each at most one above the highest seen so far); a number received
/// again is flagged redelivered or was published twice. Returns a summary line.
fn check_numbered(queue: &str, s: &Numbered) -> String {
    let total = s.confirmed.map_or(0, |c| c + 1);
    let mut highest: Option<u32> = None;
    let mut seen = BTreeSet::new();
    for (n, redelivered) in &s.received {
        let limit = highest.map_or(0, |h| h + 1);
        assert!(*n <= limit, "{queue}: gap: {n} after highest {highest:?}");
        if !seen.insert(*n) {
            assert!(
                *redelivered || s.republished.contains(n),
                "{queue}: {n} received twice, neither redelivered nor republished"
            );
        }
        highest = Some(highest.map_or(*n, |h| h.max(*n)));
    }
    let missing: Vec<u32> = (0..total).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{queue}: confirmed but never received: {missing:?}"
    );
    assert_eq!(
        highest.map_or(0, |h| h + 1),
        total,
        "{queue}: received a number never confirmed"
    );
    format!(
        "{queue}: {total} numbers, {} deliveries, {} redelivered, republished {:?}",
        s.received.len(),
        s.received.iter().filter(|(_, r)| *r).count(),
        s.republished
    )
}

/// Reference `test_failover_send_receive` (long): `FAILOVERS` failovers among three members
/// with `--ha-replicate all` while two numbered publishers (one message in flight each,
/// confirms, persistent) and two consumers (prefetch 10, acks) run throughout, one of each on
/// queues `la` and `lb`. Each round: traffic flows on the primary (each publisher gets at least
/// `PER_ROUND` more confirms), both backups are `ready` with ready subscriptions on both
/// queues, the primary is killed (-9), the next member is promoted and becomes `active`, and
/// the killed member is restarted on its port and is `ready` before the next round, so each
/// failure leaves a ready backup. Asserted per queue, after the publishers stop and the
/// consumers have drained: every confirmed number was received, no gap, no duplicate that is
/// neither redelivered nor republished, nothing received beyond the last confirmed number; and
/// all three members are alive with one `active` and two `ready`.
#[tokio::test(flavor = "multi_thread")]
async fn ten_failovers_with_two_publishers_and_two_consumers_lose_nothing_confirmed() {
    const FAILOVERS: usize = 10;
    const PER_ROUND: u32 = 30;
    const QUEUES: [&str; 2] = ["la", "lb"];
    let started = Instant::now();
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, url) = ready_cluster(3, &extra).await;
    let ports: Vec<u16> = brokers.iter().map(TestBroker::port).collect();
    let pc = brokers[0].connect().await;
    let pch = channel(&pc).await;
    for q in QUEUES {
        declare(&pch, q, FieldTable::default()).await;
    }
    let _ = pc.close(200, "".into()).await;
    let states: Vec<Arc<Mutex<Numbered>>> = QUEUES
        .iter()
        .map(|_| Arc::new(Mutex::new(Numbered::default())))
        .collect();
    let mut publishers = Vec::new();
    let mut consumers = Vec::new();
    for (q, s) in QUEUES.iter().zip(&states) {
        publishers.push(tokio::spawn(numbered_publisher(
            ports.clone(),
            q,
            s.clone(),
            None,
        )));
        consumers.push(tokio::spawn(numbered_consumer(ports.clone(), q, s.clone())));
    }
    let confirmed = |s: &Arc<Mutex<Numbered>>| s.lock().unwrap().confirmed.map_or(0, |c| c + 1);
    // Every publisher has had `PER_ROUND` more publishes confirmed than when it was called.
    let progress = || async {
        let from: Vec<u32> = states.iter().map(confirmed).collect();
        eventually(FOLLOW, || async {
            states
                .iter()
                .zip(&from)
                .all(|(s, f)| confirmed(s) >= f + PER_ROUND)
        })
        .await
    };
    let mut primary = 0;
    for round in 0..FAILOVERS {
        let next = (primary + 1) % 3;
        let other = (primary + 2) % 3;
        // Let traffic flow on this primary.
        assert!(
            progress().await,
            "round {round}: no progress on the primary"
        );
        wait_status(&brokers[next], "ready").await;
        wait_status(&brokers[other], "ready").await;
        for q in QUEUES {
            wait_subscriptions_ready(&brokers[primary], q, 2).await;
        }
        kill(&mut brokers[primary]);
        promote(&brokers[next]);
        // The dead member comes back as a backup on its port.
        let port = brokers[primary].port();
        brokers[primary] = member(port, &url, &extra);
        wait_status(&brokers[next], "active").await;
        wait_status(&brokers[primary], "ready").await;
        eprintln!(
            "round {round}: {:?} confirmed, at {:?}",
            states.iter().map(confirmed).collect::<Vec<_>>(),
            started.elapsed()
        );
        primary = next;
    }
    // Some traffic on the last primary, then the publishers stop.
    assert!(progress().await, "no progress on the last primary");
    for s in &states {
        s.lock().unwrap().stop_publishing = true;
    }
    for p in publishers {
        within_for(Duration::from_secs(30), "a publisher to stop", p)
            .await
            .expect("the publisher panicked");
    }
    // The consumers get everything that was confirmed.
    let ok = eventually(FOLLOW, || async {
        states.iter().all(|s| {
            let s = s.lock().unwrap();
            let total = s.confirmed.map_or(0, |c| c + 1);
            let seen: BTreeSet<u32> = s.received.iter().map(|(n, _)| *n).collect();
            (0..total).all(|n| seen.contains(&n))
        })
    })
    .await;
    for s in &states {
        s.lock().unwrap().stop = true;
    }
    for c in consumers {
        within_for(Duration::from_secs(30), "a consumer to stop", c)
            .await
            .expect("the consumer panicked");
    }
    for (q, s) in QUEUES.iter().zip(&states) {
        let summary = check_numbered(q, &s.lock().unwrap());
        eprintln!("{summary}");
    }
    assert!(ok, "not every confirmed message arrived");
    for b in &mut brokers {
        b.assert_alive();
    }
    wait_status(&brokers[primary], "active").await;
    for b in (1..3).map(|i| &brokers[(primary + i) % 3]) {
        wait_status(b, "ready").await;
    }
    eprintln!("{FAILOVERS} failovers in {:?}", started.elapsed());
}
