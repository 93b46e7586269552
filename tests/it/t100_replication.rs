//! Queue replication between two real brokers (issue 4): the seed's two commands, catch-up,
//! every kind of enqueue and dequeue, priority/LVQ/ring queues, acquired messages, protection of
//! the replica, detach, original-lost, restarts, link cuts and stalls through a TCP proxy, and
//! confirms held by a ready replica.

use std::time::Duration;

use integration_tests::{
    TcpProxy, TestBroker, channel, declare, eventually, expect_code, get, message_count,
    qpid_config_path, table, within,
};
use integration_tests::{addr, qpid_ha, run_tool};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

/// How long replication may take to show a change in these tests.
const FOLLOW: Duration = Duration::from_secs(10);

fn ha_broker() -> TestBroker {
    TestBroker::builder()
        .args(["--ha-queue-replication", "yes"])
        .start()
}

/// `qpid-ha replicate -b REPLICA ORIGINAL QUEUE`, which must succeed without a warning.
#[track_caller]
fn replicate(replica: &TestBroker, original: &str, queue: &str) {
    let r = qpid_ha(&["replicate", "-b", &addr(replica), original, queue]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
}

/// The HA object's `replicas` rows of `broker`, through `qpid-ha query --json`.
fn replica_rows(broker: &TestBroker) -> Vec<Value> {
    let r = qpid_ha(&["query", "--json", "-b", &addr(broker)]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).expect("query --json is JSON");
    v["brokers"][0]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn replica_state(broker: &TestBroker, queue: &str) -> String {
    replica_rows(broker)
        .iter()
        .find(|r| r["queue"] == queue)
        .and_then(|r| r["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn wait_state(broker: &TestBroker, queue: &str, prefix: &str) {
    let ok = eventually(FOLLOW, || async {
        replica_state(broker, queue).starts_with(prefix)
    })
    .await;
    assert!(
        ok,
        "replica '{queue}' never reached state '{prefix}': {:?}",
        replica_rows(broker)
    );
}

async fn count(conn: &lapin::Connection, queue: &str) -> u32 {
    message_count(conn, queue).await.expect("queue exists")
}

/// Waits until `queue` on `conn` holds `n` messages.
async fn wait_count(conn: &lapin::Connection, queue: &str, n: u32) {
    let ok = eventually(FOLLOW, || async { count(conn, queue).await == n }).await;
    assert!(
        ok,
        "queue '{queue}' holds {} messages, expected {n}",
        count(conn, queue).await
    );
}

async fn publish_with(ch: &lapin::Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("publish confirm");
}

async fn publish_n(ch: &lapin::Channel, queue: &str, range: std::ops::Range<u32>) {
    for i in range {
        publish_with(
            ch,
            queue,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
}

/// Everything in `queue` as (body, properties), taken with basic.get and acked.
async fn take_all(ch: &lapin::Channel, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("get")
    {
        out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    out
}

/// Two brokers with queue replication, and `queue` on the original.
async fn pair(
    queue: &str,
    args: FieldTable,
) -> (TestBroker, TestBroker, lapin::Connection, lapin::Connection) {
    let original = ha_broker();
    let replica = ha_broker();
    let oc = original.connect().await;
    let rc = replica.connect().await;
    declare(&channel(&oc).await, queue, args.clone()).await;
    declare(&channel(&rc).await, queue, args).await;
    (original, replica, oc, rc)
}

#[tokio::test(flavor = "multi_thread")]
async fn qpid_ha_replicate_copies_the_queue_and_follows_enqueues_and_dequeues() {
    let (original, replica, oc, rc) = pair("myqueue", FieldTable::default()).await;
    let och = channel(&oc).await;
    // Already there before replication starts: caught up.
    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongString("v".into()));
    headers.insert("n".into(), AMQPValue::LongLongInt(-5));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_message_id("id-1".into())
        .with_priority(3)
        .with_headers(headers);
    publish_with(&och, "myqueue", b"first", props.clone()).await;
    publish_n(&och, "myqueue", 1..10).await;
    replicate(&replica, &addr(&original), "myqueue");
    wait_count(&rc, "myqueue", 10).await;
    wait_state(&replica, "myqueue", "ready").await;
    // Live enqueues.
    publish_n(&och, "myqueue", 10..20).await;
    wait_count(&rc, "myqueue", 20).await;
    // Dequeues: five consumed and acked on the original.
    for _ in 0..5 {
        let m = get(&och, "myqueue", false).await.expect("a message");
        m.ack(BasicAckOptions::default()).await.expect("ack");
    }
    wait_count(&rc, "myqueue", 15).await;
    // Byte for byte: detach and compare what is left on both sides.
    let r = qpid_ha(&["detach", "-b", &addr(&replica), "myqueue"]);
    assert_eq!(r.code, 0, "{r:?}");
    let left_original = take_all(&och, "myqueue").await;
    let left_replica = take_all(&channel(&rc).await, "myqueue").await;
    assert_eq!(left_original.len(), 15);
    assert_eq!(left_replica, left_original);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_message_keeps_its_properties_and_headers() {
    let (original, replica, oc, rc) = pair("props", FieldTable::default()).await;
    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongString("v".into()));
    headers.insert("i".into(), AMQPValue::ShortInt(7));
    let props = BasicProperties::default()
        .with_content_type("application/octet-stream".into())
        .with_delivery_mode(2)
        .with_correlation_id("c-9".into())
        .with_headers(headers);
    replicate(&replica, &addr(&original), "props");
    publish_with(&channel(&oc).await, "props", &[0, 1, 2, 255], props.clone()).await;
    wait_count(&rc, "props", 1).await;
    assert_eq!(qpid_ha(&["detach", "-b", &addr(&replica), "props"]).code, 0);
    let got = take_all(&channel(&rc).await, "props").await;
    assert_eq!(got, vec![(vec![0, 1, 2, 255], props)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn qpid_config_start_replica_creates_the_queue_and_replicates_it() {
    let original = ha_broker();
    let replica = ha_broker();
    let oc = original.connect().await;
    declare(&channel(&oc).await, "seed", FieldTable::default()).await;
    publish_n(&channel(&oc).await, "seed", 0..3).await;
    let r = run_tool(
        qpid_config_path(),
        &[
            &format!("--broker={}", addr(&replica)),
            "add",
            "queue",
            "--start-replica",
            &addr(&original),
            "seed",
        ],
    );
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let rc = replica.connect().await;
    wait_count(&rc, "seed", 3).await;
    publish_n(&channel(&oc).await, "seed", 3..5).await;
    wait_count(&rc, "seed", 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_replica_of_a_missing_original_fails_and_leaves_nothing() {
    let original = ha_broker();
    let replica = ha_broker();
    let r = run_tool(
        qpid_config_path(),
        &[
            &format!("--broker={}", addr(&replica)),
            "add",
            "queue",
            "--start-replica",
            &addr(&original),
            "nowhere",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("404"), "{r:?}");
    let rc = replica.connect().await;
    assert!(!integration_tests::queue_exists(&rc, "nowhere").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acquired_unacked_message_is_copied_and_its_ack_removes_it() {
    let (original, replica, oc, rc) = pair("acq", FieldTable::default()).await;
    let och = channel(&oc).await;
    publish_n(&och, "acq", 0..3).await;
    let held = get(&och, "acq", false).await.expect("a message");
    replicate(&replica, &addr(&original), "acq");
    wait_count(&rc, "acq", 3).await;
    held.ack(BasicAckOptions::default()).await.expect("ack");
    wait_count(&rc, "acq", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_ttl_ring_overflow_reject_and_get_are_all_replicated() {
    let args = table(&[
        ("x-message-ttl", AMQPValue::LongInt(1500)),
        ("x-max-length", AMQPValue::LongInt(5)),
    ]);
    let (original, replica, oc, rc) = pair("kinds", args).await;
    let och = channel(&oc).await;
    replicate(&replica, &addr(&original), "kinds");
    wait_state(&replica, "kinds", "ready").await;
    // Ring (drop-head) overflow: 8 published, 5 kept.
    publish_n(&och, "kinds", 0..8).await;
    wait_count(&rc, "kinds", 5).await;
    // get with no-ack, and a reject without requeue.
    assert!(get(&och, "kinds", true).await.is_some());
    let m = get(&och, "kinds", false).await.expect("a message");
    m.reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    wait_count(&rc, "kinds", 3).await;
    // TTL expiry on the original only: the replica is passive and follows.
    wait_count(&oc, "kinds", 0).await;
    wait_count(&rc, "kinds", 0).await;
    // Purge.
    publish_n(&och, "kinds", 0..4).await;
    wait_count(&rc, "kinds", 4).await;
    och.queue_purge("kinds".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    wait_count(&rc, "kinds", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_and_last_value_queues_replicate_in_their_order() {
    let prio = table(&[("x-max-priority", AMQPValue::ShortShortUInt(9))]);
    let (original, replica, oc, rc) = pair("prio", prio).await;
    let och = channel(&oc).await;
    for (body, p) in [("low", 1u8), ("high", 8), ("mid", 5)] {
        publish_with(
            &och,
            "prio",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    replicate(&replica, &addr(&original), "prio");
    wait_count(&rc, "prio", 3).await;
    assert_eq!(qpid_ha(&["detach", "-b", &addr(&replica), "prio"]).code, 0);
    let bodies: Vec<Vec<u8>> = take_all(&channel(&rc).await, "prio")
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(bodies, [b"high".to_vec(), b"mid".to_vec(), b"low".to_vec()]);
    drop((original, replica));

    let lvq = table(&[(
        "qpid.last_value_queue_key",
        AMQPValue::LongString("key".into()),
    )]);
    let (original, replica, oc, rc) = pair("lvq", lvq).await;
    let och = channel(&oc).await;
    replicate(&replica, &addr(&original), "lvq");
    wait_state(&replica, "lvq", "ready").await;
    for (body, key) in [("a1", "a"), ("b1", "b"), ("a2", "a")] {
        let mut h = FieldTable::default();
        h.insert("key".into(), AMQPValue::LongString(key.into()));
        publish_with(
            &och,
            "lvq",
            body.as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    wait_count(&oc, "lvq", 2).await;
    wait_count(&rc, "lvq", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_arguments_differ_is_refused() {
    let original = ha_broker();
    let replica = ha_broker();
    declare(
        &channel(&original.connect().await).await,
        "q",
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    )
    .await;
    declare(
        &channel(&replica.connect().await).await,
        "q",
        FieldTable::default(),
    )
    .await;
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&original), "q"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("arguments differ"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replica_is_protected_until_detached() {
    let (original, replica, oc, rc) = pair("prot", FieldTable::default()).await;
    publish_n(&channel(&oc).await, "prot", 0..2).await;
    replicate(&replica, &addr(&original), "prot");
    wait_count(&rc, "prot", 2).await;
    // Local publishes are skipped.
    publish_n(&channel(&rc).await, "prot", 0..3).await;
    // Consume, get, purge, bind: 405 naming the original.
    let ch = channel(&rc).await;
    let e = expect_code(
        ch.basic_consume(
            "prot".into(),
            "c".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        405,
    );
    assert!(e.contains(&addr(&original)), "{e}");
    let ch = channel(&rc).await;
    expect_code(
        ch.basic_get("prot".into(), BasicGetOptions::default())
            .await
            .map(|_| ()),
        405,
    );
    let ch = channel(&rc).await;
    expect_code(
        ch.queue_purge("prot".into(), QueuePurgeOptions::default())
            .await
            .map(|_| ()),
        405,
    );
    let ch = channel(&rc).await;
    expect_code(
        ch.queue_bind(
            "prot".into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        405,
    );
    assert_eq!(count(&rc, "prot").await, 2);
    // Detached: an ordinary queue with its messages.
    let r = qpid_ha(&["detach", "-b", &addr(&replica), "prot"]);
    assert_eq!(r.code, 0, "{r:?}");
    let ch = channel(&rc).await;
    publish_n(&ch, "prot", 2..3).await;
    assert_eq!(take_all(&ch, "prot").await.len(), 3);
    // And no longer follows the original.
    publish_n(&channel(&oc).await, "prot", 3..4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&rc, "prot").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_original_leaves_the_replica_original_lost_with_its_messages() {
    let (original, replica, oc, rc) = pair("gone", FieldTable::default()).await;
    publish_n(&channel(&oc).await, "gone", 0..4).await;
    replicate(&replica, &addr(&original), "gone");
    wait_count(&rc, "gone", 4).await;
    channel(&oc)
        .await
        .queue_delete("gone".into(), Default::default())
        .await
        .expect("delete");
    wait_state(&replica, "gone", "original-lost").await;
    assert_eq!(count(&rc, "gone").await, 4);
    // A new, empty original of the same name does not empty it.
    declare(&channel(&oc).await, "gone", FieldTable::default()).await;
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&original), "gone"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(replica_state(&replica, "gone").starts_with("original-lost"));
    assert_eq!(count(&rc, "gone").await, 4);
    // Still protected.
    expect_code(
        channel(&rc)
            .await
            .basic_get("gone".into(), BasicGetOptions::default())
            .await
            .map(|_| ()),
        405,
    );
    assert!(
        eventually(FOLLOW, || async {
            replica.log().contains("original is lost")
        })
        .await,
        "log lacks original is lost: {}",
        replica.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_of_the_original_the_replica_keeps_everything_and_reports_original_lost() {
    let (mut original, replica, oc, rc) = pair("k9", FieldTable::default()).await;
    publish_n(&channel(&oc).await, "k9", 0..6).await;
    replicate(&replica, &addr(&original), "k9");
    wait_count(&rc, "k9", 6).await;
    let port = original.port();
    original.signal("KILL");
    original.wait_exit(Duration::from_secs(5));
    drop(oc);
    wait_state(&replica, "k9", "disconnected since").await;
    assert_eq!(count(&rc, "k9").await, 6);
    // The original broker comes back without the queue (no store yet).
    let _back = TestBroker::builder()
        .port(port)
        .args(["--ha-queue-replication", "yes"])
        .start();
    wait_state(&replica, "k9", "original-lost").await;
    assert_eq!(count(&rc, "k9").await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_replica_broker_catches_up_with_start_replica_again() {
    let original = ha_broker();
    let oc = original.connect().await;
    declare(&channel(&oc).await, "rs", FieldTable::default()).await;
    publish_n(&channel(&oc).await, "rs", 0..5).await;
    let mut replica = ha_broker();
    let start = |r: &TestBroker| {
        run_tool(
            qpid_config_path(),
            &[
                &format!("--broker={}", addr(r)),
                "add",
                "queue",
                "--start-replica",
                &addr(&original),
                "rs",
            ],
        )
    };
    assert_eq!(start(&replica).code, 0);
    wait_count(&replica.connect().await, "rs", 5).await;
    replica.signal("KILL");
    replica.wait_exit(Duration::from_secs(5));
    // The original serves on meanwhile.
    publish_n(&channel(&oc).await, "rs", 5..8).await;
    let m = get(&channel(&oc).await, "rs", true).await;
    assert!(m.is_some());
    let replica = ha_broker();
    assert_eq!(start(&replica).code, 0);
    wait_count(&replica.connect().await, "rs", 7).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_link_reconnects_and_ends_identical_without_gaps_or_duplicates() {
    let (original, replica, oc, rc) = pair("cut", FieldTable::default()).await;
    let proxy = TcpProxy::start(original.port());
    let och = channel(&oc).await;
    // Many messages with scattered acks: the id set on reconnect is fragmented into chunks.
    publish_n(&och, "cut", 0..10_000).await;
    replicate(&replica, &format!("127.0.0.1:{}", proxy.port()), "cut");
    wait_count(&rc, "cut", 10_000).await;
    wait_state(&replica, "cut", "ready").await;
    proxy.cut(true);
    wait_state(&replica, "cut", "disconnected since").await;
    // While the link is down: every other message consumed, more published.
    let mut held = Vec::new();
    for i in 0..10_000 {
        let m = get(&och, "cut", false).await.expect("a message");
        if i % 2 == 0 {
            m.ack(BasicAckOptions::default()).await.expect("ack");
        } else {
            held.push(m);
        }
    }
    for m in held {
        m.nack(lapin::options::BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .expect("requeue");
    }
    publish_n(&och, "cut", 10_000..10_010).await;
    wait_count(&oc, "cut", 5_010).await;
    proxy.restore();
    wait_state(&replica, "cut", "ready").await;
    wait_count(&rc, "cut", 5_010).await;
    assert!(proxy.accepted() >= 2);
    assert_eq!(qpid_ha(&["detach", "-b", &addr(&replica), "cut"]).code, 0);
    let a = take_all(&och, "cut").await;
    let b = take_all(&channel(&rc).await, "cut").await;
    assert_eq!(a.len(), 5_010);
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread")]
async fn confirms_wait_for_a_ready_replica_and_are_released_when_it_stalls() {
    let original = TestBroker::builder()
        .args(["--ha-queue-replication", "yes", "--ha-ack-timeout", "1s"])
        .start();
    let replica = ha_broker();
    let oc = original.connect().await;
    declare(&channel(&oc).await, "cf", FieldTable::default()).await;
    declare(
        &channel(&replica.connect().await).await,
        "cf",
        FieldTable::default(),
    )
    .await;
    let proxy = TcpProxy::start(original.port());
    replicate(&replica, &format!("127.0.0.1:{}", proxy.port()), "cf");
    wait_state(&replica, "cf", "ready").await;
    let ch = channel(&oc).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirm mode");
    // With the replica live, confirms come.
    within(
        "a confirm with a live replica",
        publish_with(&ch, "cf", b"a", BasicProperties::default()),
    )
    .await;
    // Stall the link: the confirm is held until the ack timeout (1 s) drops the replica from
    // ready, then released.
    proxy.stall(true);
    let started = std::time::Instant::now();
    within(
        "a confirm released after the ack timeout",
        publish_with(&ch, "cf", b"b", BasicProperties::default()),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "confirmed after {waited:?}: not held"
    );
    assert!(
        eventually(FOLLOW, || async {
            original.log().contains("back to catch-up")
        })
        .await,
        "log lacks back to catch-up: {}",
        original.log()
    );
    proxy.stall(false);
    wait_state(&replica, "cf", "ready").await;
    let rc = replica.connect().await;
    wait_count(&rc, "cf", 2).await;
    // A transaction's commit-ok waits the same way.
    let tx = channel(&oc).await;
    tx.tx_select().await.expect("tx mode");
    tx.basic_publish(
        "".into(),
        "cf".into(),
        BasicPublishOptions::default(),
        b"t",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    proxy.stall(true);
    let started = std::time::Instant::now();
    within("commit-ok after the ack timeout", tx.tx_commit())
        .await
        .expect("commit");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "committed after {waited:?}: not held"
    );
    proxy.stall(false);
    wait_count(&rc, "cf", 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_refusals_fail_replicate_with_the_reason() {
    // The original without queue replication.
    let plain = TestBroker::start();
    let replica = ha_broker();
    declare(
        &channel(&plain.connect().await).await,
        "q",
        FieldTable::default(),
    )
    .await;
    declare(
        &channel(&replica.connect().await).await,
        "q",
        FieldTable::default(),
    )
    .await;
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&plain), "q"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("ha-queue-replication=yes"), "{r:?}");
    // The broker's own address.
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&replica), "q"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("own"), "{r:?}");
    // A local queue that already holds messages.
    let original = ha_broker();
    declare(
        &channel(&original.connect().await).await,
        "q",
        FieldTable::default(),
    )
    .await;
    publish_n(&channel(&replica.connect().await).await, "q", 0..1).await;
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&original), "q"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not copied"), "{r:?}");
    // A missing local queue.
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &addr(&original), "none"]);
    assert_eq!(r.code, 1, "{r:?}");
}

/// Bodies `m<i>` of what `queue` holds after detaching it, as numbers.
async fn detached_numbers(replica: &TestBroker, queue: &str) -> Vec<u32> {
    let r = qpid_ha(&["detach", "-b", &addr(replica), queue]);
    assert_eq!(r.code, 0, "{r:?}");
    let ch = channel(&replica.connect().await).await;
    take_all(&ch, queue)
        .await
        .into_iter()
        .map(|(b, _)| String::from_utf8(b).unwrap()[1..].parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_original_mid_stream_leaves_a_gapless_prefix_on_the_replica() {
    let (mut original, replica, oc, rc) = pair("mid", FieldTable::default()).await;
    replicate(&replica, &addr(&original), "mid");
    wait_state(&replica, "mid", "ready").await;
    let och = channel(&oc).await;
    let publisher = tokio::spawn(async move {
        for i in 0..1_000_000u32 {
            let r = och
                .basic_publish(
                    "".into(),
                    "mid".into(),
                    BasicPublishOptions::default(),
                    format!("m{i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await;
            if r.is_err() {
                break;
            }
        }
    });
    let ok = eventually(FOLLOW, || async { count(&rc, "mid").await >= 2_000 }).await;
    assert!(ok, "the replica is not following");
    original.signal("KILL");
    original.wait_exit(Duration::from_secs(5));
    let _ = publisher.await;
    wait_state(&replica, "mid", "disconnected since").await;
    let got = detached_numbers(&replica, "mid").await;
    assert!(got.len() >= 2_000);
    let expected: Vec<u32> = (0..got.len() as u32).collect();
    assert!(
        got == expected,
        "not a gapless prefix: {} messages",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_replica_mid_stream_and_start_replica_again_catches_up_exactly() {
    let original = ha_broker();
    let oc = original.connect().await;
    declare(&channel(&oc).await, "mid2", FieldTable::default()).await;
    let start = |r: &TestBroker| {
        run_tool(
            qpid_config_path(),
            &[
                &format!("--broker={}", addr(r)),
                "add",
                "queue",
                "--start-replica",
                &addr(&original),
                "mid2",
            ],
        )
    };
    let mut replica = ha_broker();
    assert_eq!(start(&replica).code, 0);
    let och = channel(&oc).await;
    let publisher = tokio::spawn(async move {
        for i in 0..20_000u32 {
            publish_with(
                &och,
                "mid2",
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
        }
        och
    });
    let rc = replica.connect().await;
    let ok = eventually(FOLLOW, || async { count(&rc, "mid2").await >= 1_000 }).await;
    assert!(ok, "the replica is not following");
    replica.signal("KILL");
    replica.wait_exit(Duration::from_secs(5));
    let och = publisher.await.expect("publisher");
    // Consume a few on the original meanwhile.
    for _ in 0..10 {
        get(&och, "mid2", true).await.expect("a message");
    }
    let replica = ha_broker();
    assert_eq!(start(&replica).code, 0);
    wait_count(&replica.connect().await, "mid2", 19_990).await;
    let got = detached_numbers(&replica, "mid2").await;
    assert_eq!(got, (10..20_000).collect::<Vec<u32>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_broker_stops_holding_confirms_and_catches_up_when_continued() {
    let original = TestBroker::builder()
        .args(["--ha-queue-replication", "yes", "--ha-ack-timeout", "1s"])
        .start();
    let (replica, rc) = {
        let r = ha_broker();
        let c = r.connect().await;
        (r, c)
    };
    let oc = original.connect().await;
    declare(&channel(&oc).await, "st", FieldTable::default()).await;
    declare(&channel(&rc).await, "st", FieldTable::default()).await;
    replicate(&replica, &addr(&original), "st");
    wait_state(&replica, "st", "ready").await;
    let ch = channel(&oc).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirm mode");
    replica.signal("STOP");
    let started = std::time::Instant::now();
    within(
        "confirms released after the ack timeout",
        publish_n(&ch, "st", 0..50),
    )
    .await;
    let waited = started.elapsed();
    replica.signal("CONT");
    assert!(
        waited >= Duration::from_millis(900),
        "confirmed after {waited:?}: not held"
    );
    wait_count(&rc, "st", 50).await;
    wait_state(&replica, "st", "ready").await;
    // Ready again: holds again.
    within(
        "a confirm with the replica back",
        publish_n(&ch, "st", 50..51),
    )
    .await;
    wait_count(&rc, "st", 51).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_user_without_the_ha_tag_is_refused_with_403() {
    let dir = integration_tests::TempDir::new("ha-auth");
    integration_tests::add_user(dir.path(), "plain", "", "pw");
    integration_tests::add_user(dir.path(), "admin", "admin", "pw");
    let original = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .args(["--ha-queue-replication", "yes"])
        .start();
    let replica = ha_broker();
    let oc = original
        .try_connect_url(&original.url_for("admin", "pw"), Default::default())
        .await
        .expect("admin connects");
    declare(&channel(&oc).await, "sec", FieldTable::default()).await;
    declare(
        &channel(&replica.connect().await).await,
        "sec",
        FieldTable::default(),
    )
    .await;
    let r = qpid_ha(&[
        "replicate",
        "-b",
        &addr(&replica),
        &format!("plain/pw@{}", addr(&original)),
        "sec",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("403") && r.stderr.contains("'ha' tag"),
        "{r:?}"
    );
    let r = qpid_ha(&[
        "replicate",
        "-b",
        &addr(&replica),
        &format!("plain/wrong@{}", addr(&original)),
        "sec",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("403"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_is_invisible_to_the_originals_clients() {
    let original = ha_broker();
    let replica = ha_broker();
    let oc = original.connect().await;
    let rc = replica.connect().await;
    // An exclusive queue of a client, and a queue that expires when unused.
    let och = channel(&oc).await;
    och.queue_declare(
        "excl".into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exclusive queue");
    declare(
        &och,
        "exp",
        table(&[("x-expires", AMQPValue::LongInt(1500))]),
    )
    .await;
    for q in ["excl", "exp"] {
        declare(&channel(&rc).await, q, FieldTable::default()).await;
    }
    // The replica's own x-expires (not an argument replicas must share) never fires.
    channel(&rc)
        .await
        .queue_delete("exp".into(), Default::default())
        .await
        .expect("delete");
    declare(
        &channel(&rc).await,
        "exp",
        table(&[("x-expires", AMQPValue::LongInt(500))]),
    )
    .await;
    replicate(&replica, &addr(&original), "excl");
    replicate(&replica, &addr(&original), "exp");
    wait_state(&replica, "excl", "ready").await;
    publish_n(&och, "excl", 0..2).await;
    wait_count(&rc, "excl", 2).await;
    // Not counted as a consumer.
    let d = och
        .queue_declare(
            "excl".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(d.consumer_count(), 0);
    // The unused queue still expires on the original, and the replica keeps its messages.
    wait_state(&replica, "exp", "original-lost").await;
    assert!(!integration_tests::queue_exists(&oc, "exp").await);
    // The replica's own x-expires does not delete it while it replicates.
    assert!(integration_tests::queue_exists(&rc, "exp").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replica_goes_through_the_address_list() {
    let (original, replica, oc, rc) = pair("list", FieldTable::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    publish_n(&channel(&oc).await, "list", 0..3).await;
    let list = format!("127.0.0.1:{dead},{}", addr(&original));
    let r = qpid_ha(&["replicate", "-b", &addr(&replica), &list, "list"]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_count(&rc, "list", 3).await;
    let row = replica_rows(&replica)
        .into_iter()
        .find(|r| r["queue"] == "list")
        .unwrap();
    assert_eq!(row["connectedTo"], addr(&original).as_str());
}
