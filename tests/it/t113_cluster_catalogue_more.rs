//! More of the reference HA test catalogue (reference section 5.2) ported to clusters of real
//! `qpidd` processes: configuration made with the real `qpid-config`, alternate exchanges,
//! joining an established cluster, failover to full and empty backups, the expected-backup
//! timeout, auto-delete queues with an alternate exchange, transactions (reference 4.14 and
//! tests 45 to 48) and many small queues caught up by a backup.

use std::time::{Duration, Instant};

use integration_tests::ready_cluster;
use integration_tests::{
    Run, addr, admin, free_port, loopback_url, member, promote, qpid_ha, run_tool, status,
    wait_status,
};
use integration_tests::{
    TestBroker, channel, declare, eventually, get, message_count, qpid_config_path, queue_exists,
    table, within,
};
use integration_tests::{confirming, publish};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

const FOLLOW: Duration = Duration::from_secs(15);

// ---- helpers (copied from t110_cluster / t112_cluster_catalogue) ----------------------------

/// `n` members of which the first `n - late` are a ready cluster, plus the URL of all `n`
/// (the `late` last ports are free for members started later).
async fn ready_cluster_with_room(
    n: usize,
    late: usize,
    extra: &[&str],
) -> (Vec<TestBroker>, Vec<u16>, String) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let url = loopback_url(&ports);
    let brokers: Vec<TestBroker> = ports[..n - late]
        .iter()
        .map(|p| member(*p, &url, extra))
        .collect();
    promote(&brokers[0]);
    for b in &brokers[1..] {
        wait_status(b, "ready").await;
    }
    (brokers, ports, url)
}

fn qpid_config(args: &[&str]) -> Run {
    run_tool(qpid_config_path(), args)
}

/// `qpid-config` that must succeed.
#[track_caller]
fn qpid_config_ok(args: &[&str]) -> Run {
    let r = qpid_config(args);
    assert_eq!(r.code, 0, "qpid-config {args:?}: {r:?}");
    r
}

pub(crate) fn kill(b: &mut TestBroker) {
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5));
}

/// kill -9 of `brokers[dead]`, then promotion of `brokers[next]` (which must be ready).
async fn failover(brokers: &mut [TestBroker], dead: usize, next: usize) {
    wait_status(&brokers[next], "ready").await;
    kill(&mut brokers[dead]);
    promote(&brokers[next]);
}

/// The states of the primary's replicating subscriptions on `queue` (`qpid-ha query --json`).
pub(crate) fn subscription_states(primary: &TestBroker, queue: &str) -> Vec<String> {
    let r = qpid_ha(&["query", "--json", "-b", &addr(primary)]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    j["brokers"][0]["subscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["queue"] == queue)
                .filter_map(|s| s["state"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn subscription_rows(primary: &TestBroker, queue: &str) -> String {
    let r = qpid_ha(&["query", "--json", "-b", &addr(primary)]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    let rows: Vec<serde_json::Value> = j["brokers"][0]["subscriptions"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["queue"] == queue).cloned().collect())
        .unwrap_or_default();
    format!(
        "{} members={}",
        serde_json::Value::Array(rows),
        j["brokers"][0]["members"]
    )
}

/// Waits until the primary has `n` replicating subscriptions on `queue`, all `ready`: only
/// then are that queue's confirms and commit-oks sure to wait for each backup (a backup's own
/// status can still say `ready` for a moment after a new queue was declared).
pub(crate) async fn wait_subscriptions_ready(primary: &TestBroker, queue: &str, n: usize) {
    let ok = eventually(FOLLOW, || async {
        let states = subscription_states(primary, queue);
        states.len() == n && states.iter().all(|s| s == "ready")
    })
    .await;
    assert!(
        ok,
        "subscriptions on '{queue}': {:?}",
        subscription_states(primary, queue)
    );
}

pub(crate) async fn count(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    message_count(conn, queue).await.ok()
}

pub(crate) async fn wait_count(conn: &lapin::Connection, queue: &str, n: u32) {
    let ok = eventually(FOLLOW, || async { count(conn, queue).await == Some(n) }).await;
    assert!(
        ok,
        "'{queue}' holds {:?}, expected {n}",
        count(conn, queue).await
    );
}

async fn wait_exists(conn: &lapin::Connection, queue: &str, exists: bool) {
    let ok = eventually(FOLLOW, || async {
        queue_exists(conn, queue).await == exists
    })
    .await;
    assert!(ok, "'{queue}' exists should be {exists}");
}

/// Polls a broker's log (read by another thread) until it contains `text`.
pub(crate) async fn wait_log(b: &TestBroker, text: &str) {
    let ok = eventually(FOLLOW, || async { b.log().contains(text) }).await;
    assert!(ok, "log of {} lacks {text:?}:\n{}", addr(b), b.log());
}

/// Publishes on a confirming channel and returns whether the broker acked.
async fn publish_to(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) -> bool {
    publish(ch, exchange, key, body, BasicProperties::default())
        .await
        .expect("publish")
        .is_ack()
}

async fn publish_confirmed(ch: &lapin::Channel, queue: &str, bodies: &[&str]) {
    for b in bodies {
        assert!(publish_to(ch, "", queue, b.as_bytes()).await, "{b} nacked");
    }
}

/// Publishes without waiting for anything (a transactional channel).
async fn publish_plain(ch: &lapin::Channel, queue: &str, body: &str) {
    within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
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

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

async fn exchange(ch: &lapin::Channel, name: &str, kind: lapin::ExchangeKind, args: FieldTable) {
    within(
        "exchange.declare",
        ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), args),
    )
    .await
    .unwrap_or_else(|e| panic!("exchange.declare {name}: {e:?}"));
}

async fn bind(ch: &lapin::Channel, queue: &str, exchange: &str, key: &str) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.bind {queue} {exchange} {key}: {e:?}"));
}

// ---- test_qpid_config_replication -----------------------------------------------------------

/// Reference `test_qpid_config_replication`: queues (with `--replicate` and `--argument`),
/// an exchange and a binding made with the real `qpid-config` on the primary are on the
/// backup (listed by `qpid-config --ha-admin` there, messages included for level `all`), and
/// route after a failover; `qpid-config` changes against a backup fail with the backup's 405
/// text and exit 1.
#[tokio::test(flavor = "multi_thread")]
async fn objects_made_with_qpid_config_on_the_primary_are_on_the_backups() {
    // Default level none: only what qpid-config asks for is replicated.
    let (mut brokers, _) = ready_cluster(2, &[]).await;
    let p = addr(&brokers[0]);
    let b = addr(&brokers[1]);
    qpid_config_ok(&["-b", &p, "add", "queue", "qc-all", "--replicate", "all"]);
    qpid_config_ok(&[
        "-b",
        &p,
        "add",
        "queue",
        "qc-conf",
        "--replicate",
        "configuration",
        "--argument",
        "x-message-ttl=60000",
    ]);
    qpid_config_ok(&["-b", &p, "add", "queue", "qc-local"]);
    qpid_config_ok(&[
        "-b",
        &p,
        "add",
        "exchange",
        "topic",
        "qc-ex",
        "--replicate",
        "all",
    ]);
    qpid_config_ok(&["-b", &p, "bind", "qc-ex", "qc-all", "k.#"]);
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    assert!(publish_to(&ch, "qc-ex", "k.1", b"routed").await);
    publish_confirmed(&ch, "qc-conf", &["not copied"]).await;
    let bc = admin(&brokers[1]).await;
    wait_count(&bc, "qc-all", 1).await;
    wait_count(&bc, "qc-conf", 0).await;
    assert!(!queue_exists(&bc, "qc-local").await);
    // The tool sees them on the backup (as an administrator), arguments included.
    let queues = qpid_config_ok(&["--ha-admin", "-b", &b, "queues", "qc-"]).stdout;
    assert!(
        queues.contains("qc-all") && queues.contains("qc-conf"),
        "{queues}"
    );
    assert!(!queues.contains("qc-local"), "{queues}");
    assert!(queues.contains("x-message-ttl"), "{queues}");
    let exchanges = qpid_config_ok(&["--ha-admin", "-b", &b, "-r", "exchanges", "qc-ex"]).stdout;
    assert!(exchanges.contains("qc-ex"), "{exchanges}");
    assert!(
        exchanges.contains("k.#") && exchanges.contains("qc-all"),
        "{exchanges}"
    );
    // Changes through the tool on a backup: refused. Without --ha-admin the connection itself.
    let r = qpid_config(&["-b", &b, "add", "queue", "qc-refused"]);
    assert_eq!(r.code, 1, "{r:?}");
    let want = format!(
        "530 NOT_ALLOWED - this broker is an HA backup (ready), not the primary: connect to {p}"
    );
    assert!(r.stderr.contains(&want), "{r:?}");
    for args in [
        vec!["--ha-admin", "-b", &b, "add", "queue", "qc-refused"],
        vec![
            "--ha-admin",
            "-b",
            &b,
            "add",
            "exchange",
            "direct",
            "qc-ex2",
        ],
        vec!["--ha-admin", "-b", &b, "bind", "qc-ex", "qc-all", "other"],
        vec!["--ha-admin", "-b", &b, "del", "queue", "qc-all", "--force"],
    ] {
        // 405 is `ResourceLocked` in the tool's `Failed: <kind>: <text>`.
        let r = qpid_config(&args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        let want = format!(
            "Failed: ResourceLocked: this broker is an HA backup (ready): make changes on the primary ({p})"
        );
        assert!(r.stderr.contains(&want), "{args:?}: {r:?}");
    }
    assert!(!queue_exists(&bc, "qc-refused").await);
    assert_eq!(count(&bc, "qc-all").await, Some(1));
    drop((ch, pc, bc));
    // After failover the binding made by the tool routes on the new primary.
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    assert!(publish_to(&ch, "qc-ex", "k.2", b"after").await);
    assert_eq!(drain_bodies(&ch, "qc-all").await, ["routed", "after"]);
    assert_eq!(count(&nc, "qc-conf").await, Some(0));
}

// ---- test_alternate_exchange ----------------------------------------------------------------

/// Reference `test_alternate_exchange`: an exchange whose `alternate-exchange` is `altex`, a
/// queue `altq` bound to `altex`, a queue whose dead-letter exchange (the 0-9-1 form of a
/// queue's alternate exchange) is `altex`, and 200 more exchanges (a large configuration
/// snapshot). The primary routes unmatched and rejected messages to `altq`; a member started
/// afterwards catches up, is promoted after the primary dies, and routes the same way.
/// (The reference's "altex cannot be deleted while in use" is Qpid's, not 0-9-1's: not ported.)
#[tokio::test(flavor = "multi_thread")]
async fn an_alternate_exchange_is_replicated_and_takes_unroutable_messages_after_failover() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, ports, url) = ready_cluster_with_room(3, 1, &extra).await;
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    exchange(
        &ch,
        "altex",
        lapin::ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    exchange(
        &ch,
        "ex",
        lapin::ExchangeKind::Direct,
        table(&[("alternate-exchange", s("altex"))]),
    )
    .await;
    declare(&ch, "altq", FieldTable::default()).await;
    bind(&ch, "altq", "altex", "").await;
    declare(&ch, "q", table(&[("x-dead-letter-exchange", s("altex"))])).await;
    bind(&ch, "q", "ex", "k").await;
    for i in 0..200 {
        exchange(
            &ch,
            &format!("extra-{i}"),
            lapin::ExchangeKind::Direct,
            table(&[("alternate-exchange", s("altex"))]),
        )
        .await;
    }
    // On the primary: unmatched goes to altq, matched to q; a rejected message of q too.
    assert!(publish_to(&ch, "ex", "nomatch", b"unmatched-1").await);
    assert!(publish_to(&ch, "ex", "k", b"matched-1").await);
    assert!(publish_to(&ch, "extra-199", "any", b"unmatched-extra").await);
    let m = get(&ch, "q", false).await.expect("matched-1");
    m.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    wait_count(&pc, "altq", 3).await;
    assert_eq!(count(&pc, "q").await, Some(0));
    // The running backup, and a member started now (catch-up from the snapshot).
    brokers.push(member(ports[2], &url, &extra));
    for b in &brokers[1..] {
        wait_status(b, "ready").await;
        let a = admin(b).await;
        wait_count(&a, "altq", 3).await;
        wait_count(&a, "q", 0).await;
    }
    drop((ch, pc));
    // The late member becomes the primary.
    failover(&mut brokers, 0, 2).await;
    let nc = brokers[2].connect().await;
    let ch = confirming(&nc).await;
    assert!(publish_to(&ch, "ex", "nomatch", b"unmatched-2").await);
    assert!(publish_to(&ch, "extra-7", "any", b"unmatched-extra-2").await);
    assert!(publish_to(&ch, "ex", "k", b"matched-2").await);
    let m = get(&ch, "q", false).await.expect("matched-2");
    m.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    wait_count(&nc, "altq", 6).await;
    assert_eq!(
        drain_bodies(&ch, "altq").await,
        [
            "unmatched-1",
            "unmatched-extra",
            "matched-1",
            "unmatched-2",
            "unmatched-extra-2",
            "matched-2"
        ]
    );
    // The remaining backup follows.
    wait_status(&brokers[1], "ready").await;
    wait_count(&admin(&brokers[1]).await, "altq", 0).await;
}

// ---- test_join_ready_cluster ----------------------------------------------------------------

/// Reference `test_join_ready_cluster` (first half): a member started while the primary is
/// active joins and becomes ready with the queues' messages; the primary dies and restarts
/// (same port, no promotion): it is joining while the other members are ready, and promoting
/// it is refused with Qpid's `Joining active cluster, cannot be promoted.`; the cluster
/// manager promotes a ready member instead, and the restarted one becomes its backup.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_member_joins_an_active_cluster_and_a_joining_member_is_not_promoted() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, ports, url) = ready_cluster_with_room(3, 1, &extra).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "jq", FieldTable::default()).await;
    let ch = confirming(&pc).await;
    publish_confirmed(&ch, "jq", &["a", "b", "c"]).await;
    assert_eq!(status(&brokers[0]), "active");
    brokers.push(member(ports[2], &url, &extra));
    wait_status(&brokers[2], "ready").await;
    wait_count(&admin(&brokers[2]).await, "jq", 3).await;
    drop((ch, pc));
    // The primary dies and comes back unpromoted.
    wait_status(&brokers[1], "ready").await;
    kill(&mut brokers[0]);
    brokers[0] = member(ports[0], &url, &extra);
    assert_eq!(status(&brokers[0]), "joining");
    let r = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&brokers[0])]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("Joining active cluster, cannot be promoted."),
        "{r:?}"
    );
    assert_eq!(status(&brokers[0]), "joining");
    // A ready member is promoted; the restarted one follows it.
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    wait_status(&brokers[0], "ready").await;
    wait_status(&brokers[2], "ready").await;
    wait_count(&admin(&brokers[0]).await, "jq", 3).await;
    let nc = brokers[1].connect().await;
    assert_eq!(
        drain_bodies(&channel(&nc).await, "jq").await,
        ["a", "b", "c"]
    );
}

/// Reference `test_join_ready_cluster` (second half): the only other member is frozen
/// (SIGSTOP), so a restarted member's status check gets no answer from it (at most 2 s) and
/// its promotion succeeds; the frozen member, continued, follows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_joining_member_is_promoted_when_the_other_member_does_not_answer() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, url) = ready_cluster(2, &extra).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "jf", FieldTable::default()).await;
    drop(pc);
    wait_status(&brokers[1], "ready").await;
    brokers[1].signal("STOP");
    let port = brokers[0].port();
    kill(&mut brokers[0]);
    brokers[0] = member(port, &url, &extra);
    assert_eq!(status(&brokers[0]), "joining");
    let started = Instant::now();
    let r = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&brokers[0])]);
    let took = started.elapsed();
    brokers[1].signal("CONT");
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    // The status check waited for the frozen member's answer (at most 2 s).
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "promotion took {took:?}"
    );
    wait_status(&brokers[0], "active").await;
    // The continued member takes the new primary's (empty) configuration.
    wait_status(&brokers[1], "ready").await;
    let a = admin(&brokers[1]).await;
    wait_exists(&a, "jf", false).await;
    let nc = brokers[0].connect().await;
    declare(&channel(&nc).await, "jf2", FieldTable::default()).await;
    publish_confirmed(&confirming(&nc).await, "jf2", &["x"]).await;
    wait_count(&a, "jf2", 1).await;
}

// ---- test_backup_failover / test_empty_backup_failover --------------------------------------

/// Reference `test_backup_failover`: three members, "a" on the primary; the primary dies and
/// [1] is promoted; "b" sent to it reaches [2], which then holds [a, b]; consuming "a" on the
/// new primary leaves [b] on [2].
#[tokio::test(flavor = "multi_thread")]
async fn failover_to_a_backup_holding_messages_keeps_them_and_the_other_backup_follows() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "bf", FieldTable::default()).await;
    publish_confirmed(&confirming(&pc).await, "bf", &["a"]).await;
    for b in &brokers[1..] {
        wait_count(&admin(b).await, "bf", 1).await;
    }
    drop(pc);
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    publish_confirmed(&ch, "bf", &["b"]).await;
    wait_status(&brokers[1], "active").await;
    let b2 = admin(&brokers[2]).await;
    wait_count(&b2, "bf", 2).await;
    let m = get(&ch, "bf", false).await.expect("a");
    assert_eq!(m.delivery.data, b"a");
    assert!(
        m.delivery.redelivered,
        "inherited messages are flagged redelivered"
    );
    m.ack(BasicAckOptions::default()).await.unwrap();
    wait_count(&b2, "bf", 1).await;
    assert_eq!(drain_bodies(&ch, "bf").await, ["b"]);
    wait_count(&b2, "bf", 0).await;
}

/// Reference `test_empty_backup_failover` (QPID-5430): the primary dies while no queue exists
/// at all; the promoted backup becomes active, and clients work on it (a queue declared
/// there reaches the other backup with its messages).
#[tokio::test(flavor = "multi_thread")]
async fn failover_to_an_empty_backup_makes_it_active_and_it_serves_clients() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    failover(&mut brokers, 0, 1).await;
    wait_status(&brokers[1], "active").await;
    wait_status(&brokers[2], "ready").await;
    let nc = brokers[1].connect().await;
    declare(&channel(&nc).await, "fresh", FieldTable::default()).await;
    let ch = confirming(&nc).await;
    publish_confirmed(&ch, "fresh", &["one", "two"]).await;
    wait_count(&admin(&brokers[2]).await, "fresh", 2).await;
    assert_eq!(drain_bodies(&ch, "fresh").await, ["one", "two"]);
}

// ---- test_expected_backup_timeout -----------------------------------------------------------

/// Reference `test_expected_backup_timeout`, with `--ha-backup-timeout 1s`: the primary and
/// one of two ready backups die; the other is promoted and is `recovering`; a publish to a
/// replicated queue is held (a confirm, and a transaction's commit-ok), then released once
/// the timeout gives up the dead backup; the status becomes `active` and the log says why.
#[tokio::test(flavor = "multi_thread")]
async fn an_expected_backup_that_never_returns_is_given_up_after_the_backup_timeout() {
    let (mut brokers, _) =
        ready_cluster(3, &["--ha-replicate", "all", "--ha-backup-timeout", "1s"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "eb", FieldTable::default()).await;
    wait_count(&admin(&brokers[2]).await, "eb", 0).await;
    drop(pc);
    wait_subscriptions_ready(&brokers[0], "eb", 2).await;
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    // The primary first: were [2] killed first, the primary could tell [1] (a new
    // membership) that [2] had left, and [1] would expect no one.
    kill(&mut brokers[0]);
    kill(&mut brokers[2]);
    let started = Instant::now();
    promote(&brokers[1]);
    let first = status(&brokers[1]);
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    let tx = transactional(&nc).await;
    // A confirm and a transaction's commit-ok, both held.
    let (held, committed) = tokio::join!(
        async {
            publish_confirmed(&ch, "eb", &["held"]).await;
            started.elapsed()
        },
        async {
            publish_plain(&tx, "eb", "committed").await;
            within("tx.commit", tx.tx_commit()).await.unwrap();
            started.elapsed()
        }
    );
    wait_status(&brokers[1], "active").await;
    wait_log(&brokers[1], "not ready within --ha-backup-timeout").await;
    assert!(!brokers[1].log().contains("All backups recovered."));
    assert_eq!(first, "recovering", "just after promotion");
    assert!(
        held >= Duration::from_millis(700) && held < Duration::from_secs(5),
        "confirmed {held:?} after the promotion"
    );
    assert!(
        committed >= Duration::from_millis(700) && committed < Duration::from_secs(5),
        "commit-ok {committed:?} after the promotion"
    );
    // Active: confirms no longer wait.
    let t = Instant::now();
    publish_confirmed(&ch, "eb", &["free"]).await;
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
}

/// Reference `test_expected_backup_timeout`, the other way: an expected backup that is
/// frozen at the failover and continued well within `--ha-backup-timeout` (here 8 s) is ready
/// again under the new primary, which then logs `All backups recovered.` and is `active`,
/// before the timeout and without giving anyone up.
#[tokio::test(flavor = "multi_thread")]
async fn an_expected_backup_that_returns_in_time_makes_all_backups_recovered() {
    let (mut brokers, _) =
        ready_cluster(3, &["--ha-replicate", "all", "--ha-backup-timeout", "8s"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "rb", FieldTable::default()).await;
    publish_confirmed(&confirming(&pc).await, "rb", &["m0"]).await;
    wait_count(&admin(&brokers[2]).await, "rb", 1).await;
    drop(pc);
    wait_subscriptions_ready(&brokers[0], "rb", 2).await;
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    brokers[2].signal("STOP");
    kill(&mut brokers[0]);
    let started = Instant::now();
    promote(&brokers[1]);
    assert_eq!(status(&brokers[1]), "recovering");
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    // A publish while recovering waits for the frozen expected backup.
    let pending = {
        let ch = ch.clone();
        tokio::spawn(async move { publish_to(&ch, "", "rb", b"m1").await })
    };
    let quiet = eventually(Duration::from_millis(500), || async {
        pending.is_finished()
    })
    .await;
    brokers[2].signal("CONT");
    assert!(!quiet, "confirmed while the expected backup was frozen");
    assert!(within("the held confirm", pending).await.unwrap());
    wait_log(&brokers[1], "All backups recovered.").await;
    let took = started.elapsed();
    wait_status(&brokers[1], "active").await;
    assert!(took < Duration::from_secs(8), "recovered after {took:?}");
    assert!(
        !brokers[1].log().contains("--ha-backup-timeout"),
        "{}",
        brokers[1].log()
    );
    wait_status(&brokers[2], "ready").await;
    wait_count(&admin(&brokers[2]).await, "rb", 2).await;
}

// ---- test_auto_delete_close -----------------------------------------------------------------

/// Reference `test_auto_delete_close` (QPID-4349, no message rerouted twice), as far as 0-9-1
/// goes: an auto-delete queue `ad` whose dead-letter exchange (its alternate) is `altex`,
/// bound to `altq`. In 0-9-1 deleting a queue dead-letters nothing (user guide section 4),
/// unlike Qpid's reroute at delete; what is rerouted here is what is rejected or expires.
/// On the primary two of five messages are rejected (requeue=false) and one expires (TTL);
/// then the consumer closes and `ad` is auto-deleted. `altq` holds the three rerouted
/// messages exactly once on the primary, on the backup (which applies the dequeues without
/// dead-lettering them again, and deletes `ad` without rerouting), and after a failover.
#[tokio::test(flavor = "multi_thread")]
async fn an_auto_delete_queue_closed_on_the_primary_is_deleted_once_and_reroutes_once() {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    exchange(
        &ch,
        "altex",
        lapin::ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    declare(&ch, "altq", FieldTable::default()).await;
    bind(&ch, "altq", "altex", "").await;
    let auto_delete = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(
        "ad".into(),
        auto_delete,
        table(&[("x-dead-letter-exchange", s("altex"))]),
    )
    .await
    .unwrap();
    let cch = channel(&pc).await;
    cch.basic_qos(2, Default::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "ad".into(),
            "ad-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert!(publish_to(&ch, "", "ad", format!("m{i}").as_bytes()).await);
    }
    // One with a short TTL, behind the prefetch window: it expires while the queue lives.
    let expiring = ch
        .basic_publish(
            "".into(),
            "ad".into(),
            BasicPublishOptions::default(),
            b"expiring",
            BasicProperties::default().with_expiration("200".into()),
        )
        .await
        .unwrap();
    assert!(within("confirm", expiring).await.unwrap().is_ack());
    use futures_lite::StreamExt;
    for _ in 0..2 {
        let d = within("a delivery", consumer.next())
            .await
            .expect("a delivery")
            .unwrap();
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    // The two rejected and the expired one are in altq on the primary.
    wait_count(&pc, "altq", 3).await;
    let b = admin(&brokers[1]).await;
    wait_exists(&b, "ad", true).await;
    wait_count(&b, "altq", 3).await;
    // The consumer goes (unacked deliveries return to ad first): ad is deleted.
    cch.close(200, "bye".into()).await.unwrap();
    drop(consumer);
    wait_exists(&pc, "ad", false).await;
    wait_exists(&b, "ad", false).await;
    // Nothing more arrives in altq, neither on the primary nor on the backup.
    let extra = eventually(Duration::from_millis(500), || async {
        count(&pc, "altq").await != Some(3) || count(&b, "altq").await != Some(3)
    })
    .await;
    assert!(
        !extra,
        "altq: primary {:?}, backup {:?}",
        count(&pc, "altq").await,
        count(&b, "altq").await
    );
    drop((ch, pc, b));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    assert!(!queue_exists(&nc, "ad").await);
    let mut got = drain_bodies(&channel(&nc).await, "altq").await;
    got.sort();
    assert_eq!(got, ["expiring", "m0", "m1"]);
}

// ---- transactions (reference 4.14, tests 45 to 48) ------------------------------------------

/// A transactional channel.
async fn transactional(conn: &lapin::Connection) -> lapin::Channel {
    let ch = channel(conn).await;
    within("tx.select", ch.tx_select()).await.unwrap();
    ch
}

/// Queues `a` = [x, y, z] and `b` = [] on the primary of a ready cluster of `n`; then, on a
/// transactional channel, x, y, z taken from `a` and acknowledged, and sent to `b`,
/// interleaved with 0, 1, 2 sent to `b` outside the transaction. Returns the transactional
/// channel (transaction open) and the primary's connection.
async fn open_transaction(brokers: &[TestBroker]) -> (lapin::Connection, lapin::Channel) {
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "a", FieldTable::default()).await;
    declare(&channel(&pc).await, "b", FieldTable::default()).await;
    let plain = confirming(&pc).await;
    publish_confirmed(&plain, "a", &["x", "y", "z"]).await;
    let tx = transactional(&pc).await;
    for (i, body) in ["x", "y", "z"].iter().enumerate() {
        let m = get(&tx, "a", false).await.expect("a message of a");
        assert_eq!(m.delivery.data, body.as_bytes());
        m.ack(BasicAckOptions::default()).await.unwrap();
        publish_plain(&tx, "b", body).await;
        publish_confirmed(&plain, "b", &[&i.to_string()]).await;
    }
    (pc, tx)
}

/// Before the commit or rollback: the primary's `a` is empty (acquired), every backup still
/// has x, y, z in `a`, and `b` holds only 0, 1, 2 everywhere.
async fn assert_before_end(brokers: &[TestBroker], pc: &lapin::Connection) {
    assert_eq!(count(pc, "a").await, Some(0));
    assert_eq!(count(pc, "b").await, Some(3));
    for b in &brokers[1..] {
        let a = admin(b).await;
        wait_count(&a, "b", 3).await;
        assert_eq!(count(&a, "a").await, Some(3));
    }
}

/// Reference `test_tx_simple_commit` (45): before commit the transaction's acks and publishes
/// are nowhere but on its channel; at commit-ok every backup already has the publishes, and
/// then a = [] and b = [0, 1, 2, x, y, z] (checked in order after a failover, with no transaction in flight).
#[tokio::test(flavor = "multi_thread")]
async fn a_committed_transactions_publishes_and_acks_reach_the_backups() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let (pc, tx) = open_transaction(&brokers).await;
    assert_before_end(&brokers, &pc).await;
    // Both backups' subscriptions on b ready, so commit-ok waits for both.
    wait_subscriptions_ready(&brokers[0], "b", 2).await;
    let backups = [admin(&brokers[1]).await, admin(&brokers[2]).await];
    within("tx.commit", tx.tx_commit()).await.unwrap();
    assert_eq!(count(&pc, "b").await, Some(6));
    // commit-ok waited for every ready backup to have the publishes: no waiting here.
    for a in &backups {
        assert_eq!(count(a, "b").await, Some(6), "just after commit-ok");
    }
    for a in &backups {
        wait_count(a, "b", 6).await;
        wait_count(a, "a", 0).await;
    }
    drop((tx, pc));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    assert_eq!(count(&nc, "a").await, Some(0));
    assert_eq!(drain_bodies(&ch, "b").await, ["0", "1", "2", "x", "y", "z"]);
    wait_status(&brokers[2], "ready").await;
    wait_count(&admin(&brokers[2]).await, "b", 0).await;
}

/// Reference `test_tx_simple_rollback` (46): after rollback (and the channel's close, which
/// in 0-9-1 returns the acquired messages) every member has a = [x, y, z], b = [0, 1, 2].
#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_transaction_leaves_nothing_on_the_backups() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let (pc, tx) = open_transaction(&brokers).await;
    assert_before_end(&brokers, &pc).await;
    within("tx.rollback", tx.tx_rollback()).await.unwrap();
    within("channel.close", tx.close(200, "done".into()))
        .await
        .unwrap();
    wait_count(&pc, "a", 3).await;
    assert_eq!(count(&pc, "b").await, Some(3));
    // A marker published after the rollback: once on the backups, all before it is too.
    declare(&channel(&pc).await, "marker", FieldTable::default()).await;
    publish_confirmed(&confirming(&pc).await, "marker", &["m"]).await;
    for b in &brokers[1..] {
        let a = admin(b).await;
        wait_count(&a, "marker", 1).await;
        assert_eq!(count(&a, "a").await, Some(3));
        assert_eq!(count(&a, "b").await, Some(3));
    }
    drop(pc);
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    assert_eq!(drain_bodies(&ch, "a").await, ["x", "y", "z"]);
    assert_eq!(drain_bodies(&ch, "b").await, ["0", "1", "2"]);
}

/// Reference `test_tx_simple_failure` (47): the primary dies with a transaction open (acks
/// and publishes not committed); the client's commit fails (its connection is gone), and the
/// new primary has exactly the committed state: a = [x, y, z] (redelivered), b = [0, 1, 2].
#[tokio::test(flavor = "multi_thread")]
async fn the_primary_dying_mid_transaction_leaves_the_committed_state_on_the_new_primary() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let (pc, tx) = open_transaction(&brokers).await;
    assert_before_end(&brokers, &pc).await;
    failover(&mut brokers, 0, 1).await;
    let r = within("tx.commit on a dead primary", tx.tx_commit()).await;
    assert!(r.is_err(), "commit on a dead primary: {r:?}");
    drop(pc);
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    assert_eq!(drain_bodies(&ch, "a").await, ["x", "y", "z"]);
    assert_eq!(drain_bodies(&ch, "b").await, ["0", "1", "2"]);
    wait_status(&brokers[2], "ready").await;
    let a = admin(&brokers[2]).await;
    wait_count(&a, "a", 0).await;
    wait_count(&a, "b", 0).await;
}

/// Reference `test_tx_join_leave` (48): a transaction spans a backup being killed and a new
/// member joining: after commit every live member has [a, b, foo].
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_spanning_a_backup_leaving_and_a_member_joining_commits_everywhere() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, ports, url) = ready_cluster_with_room(4, 1, &extra).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "jl", FieldTable::default()).await;
    wait_status(&brokers[2], "ready").await;
    let tx = transactional(&pc).await;
    publish_plain(&tx, "jl", "a").await;
    kill(&mut brokers[2]);
    publish_plain(&tx, "jl", "b").await;
    brokers.push(member(ports[3], &url, &extra));
    wait_status(&brokers[3], "ready").await;
    publish_plain(&tx, "jl", "foo").await;
    assert_eq!(count(&pc, "jl").await, Some(0));
    within("tx.commit", tx.tx_commit()).await.unwrap();
    assert_eq!(count(&pc, "jl").await, Some(3));
    for i in [1, 3] {
        wait_count(&admin(&brokers[i]).await, "jl", 3).await;
    }
    drop((tx, pc));
    failover(&mut brokers, 0, 3).await;
    let nc = brokers[3].connect().await;
    assert_eq!(
        drain_bodies(&channel(&nc).await, "jl").await,
        ["a", "b", "foo"]
    );
}

/// Reference 4.14 (commit-ok waits for the ready backups) with a stalled backup (SIGSTOP) and
/// `--ha-ack-timeout 1s`: with the backup running a commit is quick; frozen, the commit-ok
/// comes only after about 1 s, when the primary stops waiting for it; continued, it is ready
/// again and holds every committed message.
#[tokio::test(flavor = "multi_thread")]
async fn commit_ok_waits_for_a_stalled_ready_backup_until_the_ack_timeout() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all", "--ha-ack-timeout", "1s"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "tq", FieldTable::default()).await;
    wait_subscriptions_ready(&brokers[0], "tq", 1).await;
    let tx = transactional(&pc).await;
    publish_plain(&tx, "tq", "quick").await;
    let t = Instant::now();
    within("tx.commit", tx.tx_commit()).await.unwrap();
    let quick = t.elapsed();
    brokers[1].signal("STOP");
    publish_plain(&tx, "tq", "stalled-1").await;
    publish_plain(&tx, "tq", "stalled-2").await;
    let t = Instant::now();
    let r =
        integration_tests::within_for(Duration::from_secs(10), "tx.commit", tx.tx_commit()).await;
    let stalled = t.elapsed();
    // What the primary says right after the commit-ok, while the backup is still frozen.
    let seen = format!(
        "backup still frozen: {}; primary's count of tq: {:?}; its subscriptions on tq: {}",
        brokers[1].is_frozen(),
        count(&pc, "tq").await,
        subscription_rows(&brokers[0], "tq")
    );
    brokers[1].signal("CONT");
    r.unwrap();
    assert!(
        quick < Duration::from_millis(700),
        "a commit took {quick:?}"
    );
    assert!(
        stalled >= Duration::from_millis(900),
        "commit-ok after {stalled:?}: not held by the stalled backup; {seen}"
    );
    assert_eq!(count(&pc, "tq").await, Some(3));
    wait_status(&brokers[1], "ready").await;
    wait_count(&admin(&brokers[1]).await, "tq", 3).await;
}

// ---- test_sync (many small queues) ----------------------------------------------------------

/// Reference `test_sync`, with many queues: 50 queues of 20 messages each on the primary; a
/// backup that was there all along and a member started afterwards (catch-up) are ready and
/// hold exactly 20 messages in each queue; a few consumed on the primary follow.
#[tokio::test(flavor = "multi_thread")]
async fn many_small_queues_are_caught_up_by_a_late_backup_with_matching_counts() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, ports, url) = ready_cluster_with_room(3, 1, &extra).await;
    let pc = brokers[0].connect().await;
    let decl = channel(&pc).await;
    let ch = confirming(&pc).await;
    let names: Vec<String> = (0..50).map(|i| format!("sync-{i:02}")).collect();
    for name in &names {
        declare(&decl, name, FieldTable::default()).await;
        // Publish the 20 at once, then await their confirms.
        let mut confirms = Vec::new();
        for i in 0..20 {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{name}-{i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(within("a confirm", c).await.unwrap().is_ack());
        }
    }
    brokers.push(member(ports[2], &url, &extra));
    wait_status(&brokers[2], "ready").await;
    wait_status(&brokers[1], "ready").await;
    for b in &brokers[1..] {
        let a = admin(b).await;
        for name in &names {
            wait_count(&a, name, 20).await;
        }
    }
    // Live changes follow: 5 consumed from the first queue.
    for _ in 0..5 {
        get(&ch, &names[0], false)
            .await
            .expect("a message")
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    for b in &brokers[1..] {
        wait_count(&admin(b).await, &names[0], 15).await;
    }
    let primary_counts: Vec<Option<u32>> = {
        let mut v = Vec::new();
        for name in &names {
            v.push(count(&pc, name).await);
        }
        v
    };
    let a = admin(&brokers[2]).await;
    let mut late_counts = Vec::new();
    for name in &names {
        late_counts.push(count(&a, name).await);
    }
    assert_eq!(late_counts, primary_counts);
}

// ---- the configuration backlog of a stalled backup --------------------------------------------

/// `--ha-max-config-backlog` (here its minimum, 64 KiB): a frozen backup whose configuration
/// events pile up (bindings carrying 32 KiB arguments, several MiB in all, more than the
/// sockets buffer) is dropped by the primary, which logs why, instead of buffering without
/// bound; continued, the backup reconnects, reconciles and has every binding and the queue
/// declared after the drop, and is ready again.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_that_leaves_too_many_configuration_events_unread_is_dropped_and_reconciles() {
    let extra = [
        "--ha-replicate",
        "configuration",
        "--ha-max-config-backlog",
        "64KiB",
        "--link-heartbeat-interval",
        "30s",
    ];
    let (brokers, _) = ready_cluster(2, &extra).await;
    let pc = brokers[0].connect().await;
    let ch = channel(&pc).await;
    declare(&ch, "bl-q", FieldTable::default()).await;
    exchange(
        &ch,
        "bl-x",
        lapin::ExchangeKind::Direct,
        FieldTable::default(),
    )
    .await;
    wait_exists(&admin(&brokers[1]).await, "bl-q", true).await;
    brokers[1].signal("STOP");
    let pad = "p".repeat(32 * 1024);
    let args = table(&[("pad", s(&pad))]);
    const BINDINGS: usize = 400;
    let mut dropped_after = None;
    for i in 0..BINDINGS {
        within(
            "queue.bind",
            ch.queue_bind(
                "bl-q".into(),
                "bl-x".into(),
                format!("k-{i}").as_str().into(),
                QueueBindOptions::default(),
                args.clone(),
            ),
        )
        .await
        .unwrap();
        if dropped_after.is_none() && brokers[0].log().contains("over --ha-max-config-backlog") {
            dropped_after = Some(i);
        }
    }
    wait_log(&brokers[0], "over --ha-max-config-backlog 65536").await;
    declare(&ch, "bl-after", FieldTable::default()).await;
    assert!(brokers[1].is_frozen(), "the backup ran during the test");
    brokers[1].signal("CONT");
    let bc = admin(&brokers[1]).await;
    wait_exists(&bc, "bl-after", true).await;
    wait_status(&brokers[1], "ready").await;
    let b = addr(&brokers[1]);
    let ok = eventually(FOLLOW, || async {
        let listing = qpid_config(&["--ha-admin", "-b", &b, "-r", "exchanges", "bl-x"]).stdout;
        (0..BINDINGS).all(|i| listing.contains(&format!("bind [k-{i}] => bl-q")))
    })
    .await;
    assert!(
        ok,
        "the backup lacks bindings of bl-x (dropped after binding {dropped_after:?})"
    );
}
