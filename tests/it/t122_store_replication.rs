//! The store with replication and clusters (issue 6, `docs/design/store.md` section 7,
//! reference 4.13): a restarted standalone replica broker resumes replicating by itself with
//! the ids it stored; a non-durable replica queue does not come back; a restarted backup keeps
//! its stored copy of a queue of the same incarnation and catches up only what it lacks; a
//! one-member cluster recovers from its store (`test_store_recovery`).

use std::time::Duration;

use integration_tests::{
    TempDir, TestBroker, addr, admin, channel, eventually, free_port, loopback_url, message_count,
    promote, qpid_ha, status, wait_status, within,
};
use integration_tests::{confirming, declare_durable, persistent, publish};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use serde_json::Value;

const FOLLOW: Duration = Duration::from_secs(15);

/// Declares a durable direct exchange.
async fn durable_direct_exchange(ch: &lapin::Channel, name: &str) {
    let options = lapin::options::ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Direct,
            options,
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name:?}: {e:?}"));
}

/// Publishes `m<from>..m<to>` persistent, each confirmed with an ack.
async fn publish_range(ch: &lapin::Channel, queue: &str, range: std::ops::Range<u32>) {
    for i in range {
        let answer = publish(ch, "", queue, format!("m{i}").as_bytes(), persistent())
            .await
            .unwrap();
        assert!(answer.is_ack(), "m{i} nacked");
    }
}

async fn count(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    message_count(conn, queue).await.ok()
}

async fn wait_count(conn: &lapin::Connection, queue: &str, n: u32) {
    let ok = eventually(FOLLOW, || async { count(conn, queue).await == Some(n) }).await;
    assert!(
        ok,
        "'{queue}' holds {:?}, expected {n}",
        count(conn, queue).await
    );
}

/// Every body of `queue`, in order (basic.get + ack).
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

fn names(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

fn replica_rows(b: &TestBroker) -> Vec<Value> {
    let r = qpid_ha(&["query", "--json", "-b", &addr(b)]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v["brokers"][0]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn wait_replica_ready(b: &TestBroker, queue: &str) {
    let ok = eventually(FOLLOW, || async {
        replica_rows(b)
            .iter()
            .any(|r| r["queue"] == queue && r["state"] == "ready")
    })
    .await;
    assert!(ok, "replica '{queue}' not ready: {:?}", replica_rows(b));
}

/// Declares durable `queue` on the original (on `och`) and on the replica broker, then makes
/// the replica's a replica of the original's with `qpid-ha replicate`.
async fn replicate_durable(
    original: &TestBroker,
    replica: &TestBroker,
    och: &lapin::Channel,
    queue: &str,
) {
    declare_durable(och, queue, FieldTable::default()).await;
    declare_durable(
        &channel(&replica.connect().await).await,
        queue,
        FieldTable::default(),
    )
    .await;
    let r = qpid_ha(&["replicate", "-b", &addr(replica), &addr(original), queue]);
    assert_eq!(r.code, 0, "{r:?}");
}

fn ha_broker(dir: &TempDir, port: u16) -> TestBroker {
    TestBroker::builder()
        .port(port)
        .data_dir(dir.path())
        .args([
            "--ha-queue-replication",
            "yes",
            "--link-maintenance-interval",
            "0.1s",
        ])
        .start()
}

/// A standalone replica broker restarted (clean, then kill -9) goes on replicating its durable
/// replica queue by itself, with the messages it stored: it is `ready` again, holds exactly
/// what the original holds (what was published while it was down included, nothing twice),
/// and still refuses local publishes (it is still a replica).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_replica_broker_resumes_replicating_with_what_it_stored() {
    let (od, rd) = (TempDir::new("orig"), TempDir::new("repl"));
    let (op, rp) = (free_port(), free_port());
    let original = ha_broker(&od, op);
    let mut replica = ha_broker(&rd, rp);
    let oc = original.connect().await;
    let och = confirming(&oc).await;
    replicate_durable(&original, &replica, &och, "rq").await;
    publish_range(&och, "rq", 0..20).await;
    wait_replica_ready(&replica, "rq").await;
    wait_count(&admin(&replica).await, "rq", 20).await;

    for (round, signal) in [(1u32, "TERM"), (2, "KILL")] {
        replica.signal(signal);
        replica.wait_exit(Duration::from_secs(10));
        // Published while the replica is down: it must catch these up, and only these.
        publish_range(&och, "rq", 20 * round..20 * round + 20).await;
        replica = ha_broker(&rd, rp);
        wait_replica_ready(&replica, "rq").await;
        let n = 20 * round + 20;
        wait_count(&admin(&replica).await, "rq", n).await;
        assert!(
            replica.log().contains("resuming replication"),
            "round {round}:\n{}",
            replica.log()
        );
    }
    // Still a replica: a local basic.get is refused with 405.
    let rc = replica.connect().await;
    let text = integration_tests::expect_code(
        channel(&rc)
            .await
            .basic_get("rq".into(), BasicGetOptions::default())
            .await,
        405,
    );
    assert!(text.contains("replica"), "{text}");
    // Consumed on the original: the replica follows, and its copy is exactly the original's.
    assert_eq!(drain(&och, "rq").await, names(0..60));
    wait_count(&admin(&replica).await, "rq", 0).await;
}

/// A non-durable replica queue is not kept by the store: after a restart of the replica
/// broker the queue is gone and nothing replicates it (the docs say so).
#[tokio::test(flavor = "multi_thread")]
async fn a_non_durable_replica_queue_does_not_survive_a_restart() {
    let (od, rd) = (TempDir::new("orig"), TempDir::new("repl"));
    let (op, rp) = (free_port(), free_port());
    let original = ha_broker(&od, op);
    let mut replica = ha_broker(&rd, rp);
    let oc = original.connect().await;
    let och = confirming(&oc).await;
    integration_tests::declare(&och, "tq", FieldTable::default()).await;
    integration_tests::declare(
        &channel(&replica.connect().await).await,
        "tq",
        FieldTable::default(),
    )
    .await;
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&original), "tq"]);
    assert_eq!(r.code, 0, "{r:?}");
    publish_range(&och, "tq", 0..5).await;
    wait_replica_ready(&replica, "tq").await;
    replica.stop();
    replica.wait_exit(Duration::from_secs(10));
    let replica = ha_broker(&rd, rp);
    assert!(!integration_tests::queue_exists(&replica.connect().await, "tq").await);
    assert!(
        replica_rows(&replica).is_empty(),
        "{:?}",
        replica_rows(&replica)
    );
}

fn cluster_member(dir: &TempDir, port: u16, url: &str) -> TestBroker {
    TestBroker::builder()
        .port(port)
        .data_dir(dir.path())
        .args([
            "--ha-cluster",
            "yes",
            "--ha-brokers-url",
            url,
            "--ha-replicate",
            "all",
        ])
        .args([
            "--link-maintenance-interval",
            "0.1s",
            "--link-heartbeat-interval",
            "1s",
        ])
        .start()
}

/// Reference 4.13 for a backup: a backup restarted with its store keeps its stored copy of a
/// durable queue (same incarnation as the primary's: logged), catches up only what it lacks,
/// and ends `ready` with exactly the primary's messages; after a failover to it, they are all
/// there, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_backup_keeps_its_stored_copy_and_catches_up_the_rest() {
    let dirs = [TempDir::new("m0"), TempDir::new("m1")];
    let ports = [free_port(), free_port()];
    let url = loopback_url(&ports);
    let mut primary = cluster_member(&dirs[0], ports[0], &url);
    let mut backup = cluster_member(&dirs[1], ports[1], &url);
    promote(&primary);
    wait_status(&backup, "ready").await;
    let pc = primary.connect().await;
    let pch = confirming(&pc).await;
    declare_durable(&pch, "bq", FieldTable::default()).await;
    publish_range(&pch, "bq", 0..30).await;
    wait_count(&admin(&backup).await, "bq", 30).await;
    backup.signal("KILL");
    backup.wait_exit(Duration::from_secs(10));
    publish_range(&pch, "bq", 30..40).await;
    backup = cluster_member(&dirs[1], ports[1], &url);
    wait_status(&backup, "ready").await;
    wait_count(&admin(&backup).await, "bq", 40).await;
    assert!(
        backup
            .log()
            .contains("keeping the stored copy of queue 'bq'"),
        "{}",
        backup.log()
    );
    // Failover: the restarted backup serves everything, in order.
    drop(pc);
    primary.signal("KILL");
    primary.wait_exit(Duration::from_secs(10));
    promote(&backup);
    wait_status(&backup, "active").await;
    let nc = backup.connect().await;
    assert_eq!(drain(&channel(&nc).await, "bq").await, names(0..40));
}

/// Reference `test_store_recovery`: a one-member cluster with a durable queue bound to a
/// durable direct exchange and persistent messages (one consumed) is bounced and recovered from
/// its store (promoted again); a backup added then copies it; the primary killed, the backup
/// promoted has the data; bounced and promoted again, it still has it.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_member_cluster_recovers_from_its_store_and_a_new_backup_copies_it() {
    let dirs = [TempDir::new("s0"), TempDir::new("s1")];
    let ports = [free_port(), free_port()];
    let url = loopback_url(&ports);
    let mut first = cluster_member(&dirs[0], ports[0], &url);
    promote(&first);
    wait_status(&first, "active").await;
    {
        let c = first.connect().await;
        let ch = confirming(&c).await;
        declare_durable(&ch, "qq", FieldTable::default()).await;
        durable_direct_exchange(&ch, "exx").await;
        ch.queue_bind(
            "qq".into(),
            "exx".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        for i in 0..3 {
            let c = ch
                .basic_publish(
                    "exx".into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    format!("x{i}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            assert!(c.await.unwrap().is_ack());
        }
        let m = ch
            .basic_get("qq".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        wait_count(&c, "qq", 2).await;
    }
    first.stop();
    first.wait_exit(Duration::from_secs(10));
    first = cluster_member(&dirs[0], ports[0], &url);
    assert_eq!(status(&first), "joining");
    promote(&first);
    wait_status(&first, "active").await;
    {
        let c = first.connect().await;
        let ch = confirming(&c).await;
        // The binding came back: routed through exx.
        let conf = ch
            .basic_publish(
                "exx".into(),
                "k".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"x3",
                persistent(),
            )
            .await
            .unwrap();
        assert!(conf.await.unwrap().is_ack());
        wait_count(&c, "qq", 3).await;
    }
    let second = cluster_member(&dirs[1], ports[1], &url);
    wait_status(&second, "ready").await;
    wait_count(&admin(&second).await, "qq", 3).await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    promote(&second);
    wait_status(&second, "active").await;
    let c = second.connect().await;
    wait_count(&c, "qq", 3).await;
    drop(c);
    let mut second = second;
    second.stop();
    second.wait_exit(Duration::from_secs(10));
    let second = cluster_member(&dirs[1], ports[1], &url);
    promote(&second);
    wait_status(&second, "active").await;
    let c = second.connect().await;
    assert_eq!(
        drain(&channel(&c).await, "qq").await,
        vec!["x1".to_string(), "x2".into(), "x3".into()]
    );
}

/// After a total failure, the most recent store wins: a joining member whose epoch is older
/// than another reachable joining member's is refused promotion (exit 1, the text names the
/// newer member and says `--force`), `promote --force` overrides it, and the member with the
/// newest epoch is promoted without question and serves what was confirmed last.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_total_failure_a_member_with_an_older_epoch_is_not_promoted_without_force() {
    let dirs = [TempDir::new("e0"), TempDir::new("e1")];
    let ports = [free_port(), free_port()];
    let url = loopback_url(&ports);
    let mut a = cluster_member(&dirs[0], ports[0], &url);
    let mut b = cluster_member(&dirs[1], ports[1], &url);
    promote(&a); // epoch 1, which b learns
    wait_status(&b, "ready").await;
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(10));
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    // a alone comes back and is promoted: epoch 2, with data b never saw.
    a = cluster_member(&dirs[0], ports[0], &url);
    promote(&a);
    wait_status(&a, "active").await;
    {
        let c = a.connect().await;
        let ch = confirming(&c).await;
        declare_durable(&ch, "late", FieldTable::default()).await;
        publish_range(&ch, "late", 0..5).await;
    }
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    // Total failure: both restart joining; b (epoch 1) must not win over a (epoch 2).
    a = cluster_member(&dirs[0], ports[0], &url);
    b = cluster_member(&dirs[1], ports[1], &url);
    let refused = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&b)]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("newer epoch (2)") && refused.stderr.contains("--force"),
        "{refused:?}"
    );
    assert_eq!(status(&b), "joining");
    // The newest is promoted, serves the late messages, and b follows it.
    promote(&a);
    wait_status(&a, "active").await;
    wait_status(&b, "ready").await;
    wait_count(&a.connect().await, "late", 5).await;
    // --force overrides the check: both stopped, b's stored epoch made older again (as if
    // it had been down during a's last promotion), b refused, then forced.
    drop(b);
    let epoch_file = dirs[1].path().join("ha-epoch");
    let text = std::fs::read_to_string(&epoch_file).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words[..2], ["qpidd-ha-epoch", "1"], "{text}");
    std::fs::write(&epoch_file, format!("qpidd-ha-epoch 1 1 {}\n", words[3])).unwrap();
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    let a = cluster_member(&dirs[0], ports[0], &url);
    let b = cluster_member(&dirs[1], ports[1], &url);
    let refused = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&b)]);
    assert_eq!(refused.code, 1, "{refused:?}");
    let forced = qpid_ha(&["promote", "--cluster-manager", "--force", "-b", &addr(&b)]);
    assert_eq!(forced.code, 0, "{forced:?}");
    wait_status(&b, "active").await;
    wait_status(&a, "ready").await;
    assert!(b.log().contains("promotion forced"), "{}", b.log());
}

/// `qpid-ha query` shows what the store holds: the epoch, and per durable queue its
/// incarnation, the highest id it gave and its messages (text table and `--json`); after a
/// restart the incarnation is the same and the ids continue above the old ones.
#[tokio::test(flavor = "multi_thread")]
async fn qpid_ha_query_shows_the_store_epoch_and_each_durable_queues_ids() {
    let dir = TempDir::new("q0");
    let port = free_port();
    let url = loopback_url(&[port]);
    let mut b = cluster_member(&dir, port, &url);
    promote(&b);
    wait_status(&b, "active").await;
    {
        let c = b.connect().await;
        let ch = confirming(&c).await;
        declare_durable(&ch, "sq", FieldTable::default()).await;
        publish_range(&ch, "sq", 0..3).await;
    }
    let row = |b: &TestBroker| {
        let r = qpid_ha(&["query", "--json", "-b", &addr(b)]);
        assert_eq!(r.code, 0, "{r:?}");
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        let broker = v["brokers"][0].clone();
        let store = broker["store"].as_array().cloned().unwrap_or_default();
        let sq = store
            .into_iter()
            .find(|r| r["queue"] == "sq")
            .expect("a store row for sq");
        (broker["epoch"].as_u64(), sq)
    };
    let (epoch, sq) = row(&b);
    assert_eq!(epoch, Some(1));
    assert_eq!(sq["lastId"], 3);
    assert_eq!(sq["messages"], 3);
    let text = qpid_ha(&["query", "-b", &addr(&b)]).stdout;
    assert!(
        text.contains("Store (epoch 1)") && text.contains("sq"),
        "{text}"
    );
    b.stop();
    b.wait_exit(Duration::from_secs(10));
    let b = cluster_member(&dir, port, &url);
    promote(&b);
    wait_status(&b, "active").await;
    {
        let c = b.connect().await;
        publish_range(&confirming(&c).await, "sq", 3..4).await;
    }
    let (epoch, after) = row(&b);
    assert_eq!(epoch, Some(2));
    assert_eq!(after["incarnation"], sq["incarnation"]);
    assert_eq!(after["messages"], 4);
    assert!(
        after["lastId"].as_u64().unwrap() > (1u64 << 32),
        "ids continue above the old ones with the recovery margin: {after}"
    );
}

async fn bind_direct(ch: &lapin::Channel, queue: &str, exchange: &str, key: &str, bind: bool) {
    if bind {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    } else {
        ch.queue_unbind(
            queue.into(),
            exchange.into(),
            key.into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

/// Routes `body` through `exchange` with `key` on a confirming channel; returns whether it was
/// routed (a mandatory publish that no queue takes comes back).
async fn routed(ch: &lapin::Channel, exchange: &str, key: &str, body: &str) -> bool {
    let c = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    c.is_ack() && c.take_message().is_none()
}

/// Reference `test_catchup_store`: a primary and a backup with stores; with the backup down the
/// primary consumes q1, publishes x, y, z to q1 (through ex with key k1), unbinds ex/q2 k2 and
/// binds ex/q1 k1. Both restart from their stores (the backup's copy is stale) and the first is
/// promoted: the backup mirrors the primary exactly (q1 = [x, y, z], the new binding routes,
/// the old one is gone), as a failover to it shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_restarted_from_a_stale_store_mirrors_the_primary_exactly() {
    let dirs = [TempDir::new("c0"), TempDir::new("c1")];
    let ports = [free_port(), free_port()];
    let url = loopback_url(&ports);
    let mut primary = cluster_member(&dirs[0], ports[0], &url);
    let mut backup = cluster_member(&dirs[1], ports[1], &url);
    promote(&primary);
    wait_status(&backup, "ready").await;
    {
        let c = primary.connect().await;
        let ch = confirming(&c).await;
        declare_durable(&ch, "q1", FieldTable::default()).await;
        declare_durable(&ch, "q2", FieldTable::default()).await;
        durable_direct_exchange(&ch, "ex").await;
        bind_direct(&ch, "q2", "ex", "k2", true).await;
        publish_range(&ch, "q1", 0..3).await;
        assert!(routed(&ch, "ex", "k2", "b0").await);
        wait_count(&admin(&backup).await, "q1", 3).await;
        wait_count(&admin(&backup).await, "q2", 1).await;
    }
    backup.signal("KILL");
    backup.wait_exit(Duration::from_secs(10));
    {
        let c = primary.connect().await;
        let ch = confirming(&c).await;
        assert_eq!(drain(&ch, "q1").await, names(0..3));
        bind_direct(&ch, "q2", "ex", "k2", false).await;
        bind_direct(&ch, "q1", "ex", "k1", true).await;
        for b in ["x", "y", "z"] {
            assert!(routed(&ch, "ex", "k1", b).await, "{b} not routed");
        }
    }
    primary.stop();
    primary.wait_exit(Duration::from_secs(10));
    // Both from their stores; the one with the newer data is promoted.
    primary = cluster_member(&dirs[0], ports[0], &url);
    backup = cluster_member(&dirs[1], ports[1], &url);
    promote(&primary);
    wait_status(&primary, "active").await;
    wait_status(&backup, "ready").await;
    let bc = admin(&backup).await;
    wait_count(&bc, "q1", 3).await;
    wait_count(&bc, "q2", 1).await;
    // Failover to the backup: it routes and holds exactly what the primary had.
    primary.signal("KILL");
    primary.wait_exit(Duration::from_secs(10));
    promote(&backup);
    wait_status(&backup, "active").await;
    let c = backup.connect().await;
    let ch = confirming(&c).await;
    assert!(
        routed(&ch, "ex", "k1", "w").await,
        "the new binding is missing"
    );
    assert!(
        !routed(&ch, "ex", "k2", "v").await,
        "the old binding is still there"
    );
    assert_eq!(drain(&ch, "q1").await, ["x", "y", "z", "w"]);
    assert_eq!(drain(&ch, "q2").await, ["b0"]);
}

/// A replica acknowledges a persistent message only once it is on its own disk: with the
/// replica broker's data directory on a tmpfs that the test fills up, a persistent publish on
/// the original is confirmed only when the original stops waiting for the replica
/// (`--ha-ack-timeout 1s`), while with room on the replica's disk a confirm is quick; once the
/// filler is removed the replica writes again, catches up and holds every message.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_acknowledges_a_persistent_message_only_after_its_own_fsync() {
    use crate::t121_store_crash::{TmpfsMount, fill_until};
    let tmp = TempDir::new("repl-full");
    let _mount = match TmpfsMount::mount(tmp.path(), "16m") {
        Ok(m) => m,
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("this test needs a tmpfs mount (root) in CI: {why}");
            }
            println!("skipping: {why}");
            return;
        }
    };
    let od = TempDir::new("orig-full");
    let original = TestBroker::builder()
        .data_dir(od.path())
        .args(["--ha-queue-replication", "yes", "--ha-ack-timeout", "1s"])
        .start();
    let replica = TestBroker::builder()
        .data_dir(tmp.path().join("data"))
        .args([
            "--ha-queue-replication",
            "yes",
            "--link-maintenance-interval",
            "0.1s",
        ])
        .args(["--store-segment-size", "1MiB"])
        .start();
    let oc = original.connect().await;
    let och = confirming(&oc).await;
    replicate_durable(&original, &replica, &och, "fq").await;
    wait_replica_ready(&replica, "fq").await;
    // 256 KiB bodies: a write that needs new pages of the tmpfs (a small record could still
    // fit in the last page of the segment file).
    let timed = |n: u32| {
        let och = och.clone();
        async move {
            let t = std::time::Instant::now();
            let mut body = vec![b'.'; 256 * 1024];
            body[..4].copy_from_slice(&n.to_be_bytes());
            let c = och
                .basic_publish(
                    "".into(),
                    "fq".into(),
                    BasicPublishOptions::default(),
                    &body,
                    persistent(),
                )
                .await
                .unwrap();
            assert!(c.await.unwrap().is_ack(), "{n} nacked");
            t.elapsed()
        }
    };
    let quick = timed(0).await;
    assert!(quick < Duration::from_millis(700), "with room: {quick:?}");
    let filler = tmp.path().join("filler");
    fill_until(&filler, tmp.path(), 0);
    let held = timed(1).await;
    assert!(
        held >= Duration::from_millis(900),
        "confirmed after {held:?} although the replica could not write it"
    );
    let ok = eventually(FOLLOW, || async {
        replica.log().contains("Store: cannot write")
    })
    .await;
    assert!(ok, "{}", replica.log());
    std::fs::remove_file(&filler).unwrap();
    wait_replica_ready(&replica, "fq").await;
    let ok = eventually(FOLLOW, || async {
        timed(2).await < Duration::from_millis(700)
    })
    .await;
    assert!(
        ok,
        "confirms stay slow once the replica's disk has room again"
    );
    let n = count(&oc, "fq").await.unwrap();
    assert!(n >= 3, "{n}");
    wait_count(&admin(&replica).await, "fq", n).await;
}
