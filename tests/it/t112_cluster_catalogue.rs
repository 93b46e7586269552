//! The reference HA test catalogue (reference section 5.2) ported to clusters of real `qpidd`
//! processes: replication of every kind of message and queue, replication levels, bindings,
//! exclusive and temporary queues, reconciliation after a backup was away, authentication,
//! a stalled backup, repeated failovers with numbered publishers and consumers, and clients
//! given [backup, primary].

use crate::t114_cluster_hold_and_loop::{Numbered, numbered_consumer, numbered_publisher};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::confirming;
use integration_tests::ready_cluster;
use integration_tests::{
    TestBroker, amqp_code, channel, declare, eventually, expect_code, get, message_count,
    queue_exists, table, try_declare, within,
};
use integration_tests::{
    addr, admin, free_port, loopback_url, member, promote, promote_at, qpid_ha, status_at,
    wait_status, wait_status_at,
};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

const FOLLOW: Duration = Duration::from_secs(15);

// ---- helpers (copied from t110_cluster, plus a few of this file's own) --------------------

/// kill -9 of `brokers[dead]`, then promotion of `brokers[next]` (which must be ready).
async fn failover(brokers: &mut [TestBroker], dead: usize, next: usize) {
    wait_status(&brokers[next], "ready").await;
    brokers[dead].signal("KILL");
    brokers[dead].wait_exit(Duration::from_secs(5));
    promote(&brokers[next]);
}

/// The statuses of the backups the primary at `address` lists as members (`qpid-ha query
/// --json`; the primary itself, `active` or `recovering`, left out). The address column names
/// a backup's client-side socket, not its listening address, so backups are not told apart.
fn backup_statuses(address: &str) -> Vec<String> {
    let r = qpid_ha(&["query", "--json", "-b", address]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    j["brokers"][0]["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["status"].as_str())
                .filter(|s| !matches!(*s, "active" | "recovering"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
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

async fn wait_exists(conn: &lapin::Connection, queue: &str, exists: bool) {
    let ok = eventually(FOLLOW, || async {
        queue_exists(conn, queue).await == exists
    })
    .await;
    assert!(ok, "'{queue}' exists should be {exists}");
}

/// Publishes and returns whether the broker acked (true) or nacked (false).
async fn publish_props(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> bool {
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ),
    )
    .await
    .expect("publish");
    within("the confirm", confirm)
        .await
        .expect("confirm")
        .is_ack()
}

async fn publish_confirmed(ch: &lapin::Channel, queue: &str, range: std::ops::Range<u32>) {
    for i in range {
        let acked = publish_props(
            ch,
            "",
            queue,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
        assert!(acked, "m{i} nacked");
    }
}

/// Every message of `queue` (basic.get + ack), bodies and properties, in order.
async fn drain_all(ch: &lapin::Channel, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, false).await {
        out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
        m.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

async fn drain_bodies(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    drain_all(ch, queue)
        .await
        .into_iter()
        .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn replicate(level: &str) -> FieldTable {
    table(&[("qpid.replicate", s(level))])
}

fn with(args: &FieldTable, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = args.clone();
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

// ---- test_replication / test_send_receive -------------------------------------------------

/// Reference `test_replication` and `test_send_receive`: messages with properties, headers,
/// the persistent flag, empty and large bodies (bigger than frame_max 131072) are on every
/// backup, which holds exactly what was not consumed, and after a failover they are consumed
/// from the new primary byte for byte with the same properties.
#[tokio::test(flavor = "multi_thread")]
async fn messages_of_every_kind_reach_the_backups_and_come_back_byte_for_byte_after_failover() {
    let (mut brokers, _) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "kinds", FieldTable::default()).await;
    let ch = confirming(&pc).await;
    let mut headers = FieldTable::default();
    headers.insert("text".into(), s("héllo"));
    headers.insert("int".into(), AMQPValue::LongInt(-42));
    headers.insert("long".into(), AMQPValue::LongLongInt(1 << 40));
    headers.insert("bool".into(), AMQPValue::Boolean(true));
    headers.insert("float".into(), AMQPValue::Double(2.5));
    let mut inner = FieldTable::default();
    inner.insert("nested".into(), s("yes"));
    headers.insert("table".into(), AMQPValue::FieldTable(inner));
    let large: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let messages: Vec<(Vec<u8>, BasicProperties)> = vec![
        (b"consumed first".to_vec(), BasicProperties::default()),
        (b"plain".to_vec(), BasicProperties::default()),
        (
            b"{\"with\":\"properties\"}".to_vec(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_correlation_id("corr-1".into())
                .with_reply_to("replies".into())
                .with_message_id("id-1".into())
                .with_timestamp(1_700_000_000)
                .with_type("kind".into())
                .with_app_id("app".into())
                .with_priority(3),
        ),
        (
            b"headers".to_vec(),
            BasicProperties::default().with_headers(headers),
        ),
        (
            b"persistent".to_vec(),
            BasicProperties::default().with_delivery_mode(2),
        ),
        (Vec::new(), BasicProperties::default()),
        (
            large.clone(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/octet-stream".into()),
        ),
    ];
    for (body, props) in &messages {
        assert!(publish_props(&ch, "", "kinds", body, props.clone()).await);
    }
    // As test_send_receive: the first is consumed, the backups hold exactly the rest.
    let first = get(&ch, "kinds", false).await.expect("a message");
    assert_eq!(first.delivery.data, messages[0].0);
    first.ack(BasicAckOptions::default()).await.unwrap();
    let rest = messages.len() as u32 - 1;
    for b in &brokers[1..] {
        wait_count(&admin(b).await, "kinds", rest).await;
    }
    drop((ch, pc));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let got = drain_all(&channel(&nc).await, "kinds").await;
    assert_eq!(got.len(), messages.len() - 1);
    for ((body, props), (want_body, want_props)) in got.iter().zip(&messages[1..]) {
        assert_eq!(body.len(), want_body.len());
        assert!(body == want_body, "body differs ({} bytes)", body.len());
        assert_eq!(props, want_props);
    }
    // The other backup follows the new primary's dequeues.
    wait_status(&brokers[2], "ready").await;
    wait_count(&admin(&brokers[2]).await, "kinds", 0).await;
}

// ---- queue semantics: lvq, ring, reject, priority ----------------------------------------

/// Publishes `messages` to a replicated queue "q" and to a twin "twin" that is not replicated
/// (same arguments, `qpid.replicate=none`), checks the backup's count equals the primary's,
/// then reads the twin on the primary (the primary's semantics), fails over, and checks that
/// the new primary's "q" holds the same bodies in the same order. Returns the bodies.
async fn same_semantics_after_failover(
    args: FieldTable,
    messages: &[(&str, BasicProperties)],
) -> (Vec<String>, Vec<bool>) {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "q", args.clone()).await;
    declare(
        &channel(&pc).await,
        "twin",
        with(&args, &[("qpid.replicate", s("none"))]),
    )
    .await;
    let ch = confirming(&pc).await;
    let backup = admin(&brokers[1]).await;
    wait_exists(&backup, "q", true).await;
    let mut acks = Vec::new();
    for (body, props) in messages {
        let a = publish_props(&ch, "", "q", body.as_bytes(), props.clone()).await;
        let b = publish_props(&ch, "", "twin", body.as_bytes(), props.clone()).await;
        assert_eq!(a, b, "replicated and plain queues confirm {body} alike");
        acks.push(a);
        // After each publish the backup's copy has the primary's count (test_lvq).
        let n = count(&pc, "q").await.unwrap();
        wait_count(&backup, "q", n).await;
    }
    let expected = drain_bodies(&ch, "twin").await;
    assert!(!queue_exists(&backup, "twin").await);
    drop((ch, pc, backup));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let got = drain_bodies(&channel(&nc).await, "q").await;
    assert_eq!(
        got, expected,
        "the new primary's order differs from the old one's"
    );
    (got, acks)
}

fn keyed(key: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("lvq-key".into(), s(key));
    BasicProperties::default().with_headers(h)
}

/// Reference `test_lvq`: a last-value queue's copy follows each replacement; after failover
/// the new primary holds the last value of each key, in the primary's order.
#[tokio::test(flavor = "multi_thread")]
async fn a_last_value_queue_is_replicated_with_its_replacements() {
    let args = table(&[("qpid.last_value_queue_key", s("lvq-key"))]);
    let seq = [
        ("a-1", "a"),
        ("b-1", "b"),
        ("a-2", "a"),
        ("a-3", "a"),
        ("c-1", "c"),
        ("b-2", "b"),
        ("c-2", "c"),
    ];
    let messages: Vec<(&str, BasicProperties)> =
        seq.iter().map(|(body, k)| (*body, keyed(k))).collect();
    let (got, _) = same_semantics_after_failover(args, &messages).await;
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, ["a-3", "b-2", "c-2"]);
}

/// Reference `test_ring`: a ring queue of 5 given 10 messages keeps 5..9 on the backup and
/// after failover.
#[tokio::test(flavor = "multi_thread")]
async fn a_ring_queue_is_replicated_with_its_overflow() {
    let args = table(&[("x-max-length", AMQPValue::LongInt(5))]);
    let bodies: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let messages: Vec<(&str, BasicProperties)> = bodies
        .iter()
        .map(|b| (b.as_str(), BasicProperties::default()))
        .collect();
    let (got, _) = same_semantics_after_failover(args, &messages).await;
    assert_eq!(got, ["m5", "m6", "m7", "m8", "m9"]);
}

/// Reference `test_reject`: a queue of 5 with reject-publish given 10 messages nacks 5..9;
/// the backup and the new primary hold 0..4.
#[tokio::test(flavor = "multi_thread")]
async fn a_reject_publish_queue_is_replicated_without_the_rejected_messages() {
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(5)),
        ("x-overflow", s("reject-publish")),
    ]);
    let bodies: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let messages: Vec<(&str, BasicProperties)> = bodies
        .iter()
        .map(|b| (b.as_str(), BasicProperties::default()))
        .collect();
    let (got, acks) = same_semantics_after_failover(args, &messages).await;
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(acks, [[true; 5], [false; 5]].concat());
}

/// Reference `test_priority`: a priority queue's copy delivers in descending priority order
/// after failover (FIFO within a priority).
#[tokio::test(flavor = "multi_thread")]
async fn a_priority_queue_is_replicated_in_priority_order() {
    let args = table(&[("x-max-priority", AMQPValue::ShortShortUInt(9))]);
    let prios = [2u8, 9, 0, 5, 9, 2, 7, 0, 5, 1];
    let bodies: Vec<String> = prios
        .iter()
        .enumerate()
        .map(|(i, p)| format!("p{p}-{i}"))
        .collect();
    let messages: Vec<(&str, BasicProperties)> = bodies
        .iter()
        .zip(prios)
        .map(|(b, p)| (b.as_str(), BasicProperties::default().with_priority(p)))
        .collect();
    let (got, _) = same_semantics_after_failover(args, &messages).await;
    assert_eq!(
        got,
        [
            "p9-1", "p9-4", "p7-6", "p5-3", "p5-8", "p2-0", "p2-5", "p1-9", "p0-2", "p0-7"
        ]
    );
}

/// Reference `test_backup_acquired`: plain, ring, priority and last-value queues with 10
/// messages each, one of them acquired but not acknowledged; a backup restarted afterwards
/// (catch-up) holds the acquired message too, like the one that followed live; after the
/// primary dies the acquired message is back on the new primary.
#[tokio::test(flavor = "multi_thread")]
async fn acquired_unacked_messages_are_on_the_backups_and_come_back_after_failover() {
    let (mut brokers, url) = ready_cluster(3, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let kinds: [(&str, FieldTable, u32); 4] = [
        ("plain", FieldTable::default(), 10),
        ("ring", table(&[("x-max-length", AMQPValue::LongInt(5))]), 5),
        (
            "prio",
            table(&[("x-max-priority", AMQPValue::ShortShortUInt(9))]),
            10,
        ),
        (
            "lvq",
            table(&[("qpid.last_value_queue_key", s("lvq-key"))]),
            1,
        ),
    ];
    let ch = confirming(&pc).await;
    let mut held = Vec::new();
    for (name, args, _) in &kinds {
        declare(&channel(&pc).await, name, args.clone()).await;
        for i in 0..10u8 {
            let props = keyed("k").with_priority(i % 10);
            assert!(publish_props(&ch, "", name, format!("m{i}").as_bytes(), props).await);
        }
        // Acquired, never acknowledged.
        held.push(get(&ch, name, false).await.expect("a message"));
    }
    // The third member restarts on its port, empty, and catches up.
    brokers[2].signal("KILL");
    brokers[2].wait_exit(Duration::from_secs(5));
    let port = brokers[2].port();
    brokers[2] = member(port, &url, &["--ha-replicate", "all"]);
    wait_status(&brokers[2], "ready").await;
    for b in &brokers[1..] {
        let a = admin(b).await;
        for (name, _, n) in &kinds {
            wait_count(&a, name, *n).await;
        }
    }
    // The primary counts only what is not acquired.
    for (name, _, n) in &kinds {
        assert_eq!(count(&pc, name).await, Some(n - 1), "{name}");
    }
    drop((held, ch, pc));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    for (name, _, n) in &kinds {
        wait_count(&nc, name, *n).await;
    }
    let lvq = drain_bodies(&channel(&nc).await, "lvq").await;
    assert_eq!(lvq, ["m9"]);
}

// ---- replication levels and bindings -----------------------------------------------------

/// Reference `test_replicate_default` (default none): with `--ha-replicate` unset a queue is
/// not replicated unless its `qpid.replicate` argument says so.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_default_level_none_only_queues_that_ask_are_replicated() {
    let (brokers, _) = ready_cluster(2, &[]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "unset", FieldTable::default()).await;
    declare(&channel(&pc).await, "none", replicate("none")).await;
    declare(&channel(&pc).await, "config", replicate("configuration")).await;
    declare(&channel(&pc).await, "all", replicate("all")).await;
    let ch = confirming(&pc).await;
    for q in ["unset", "none", "config", "all"] {
        publish_confirmed(&ch, q, 0..3).await;
    }
    let b = admin(&brokers[1]).await;
    wait_count(&b, "all", 3).await;
    wait_count(&b, "config", 0).await;
    assert!(!queue_exists(&b, "unset").await);
    assert!(!queue_exists(&b, "none").await);
}

/// Reference `test_replicate_default` (`--ha-replicate configuration`, and the argument
/// overriding it both ways): a queue at level configuration exists on the backup without its
/// messages, and after a failover the new primary has it, empty.
#[tokio::test(flavor = "multi_thread")]
async fn level_configuration_replicates_the_queue_without_its_messages() {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "configuration"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "default", FieldTable::default()).await;
    declare(&channel(&pc).await, "none", replicate("none")).await;
    declare(&channel(&pc).await, "all", replicate("all")).await;
    let ch = confirming(&pc).await;
    for q in ["default", "none", "all"] {
        publish_confirmed(&ch, q, 0..3).await;
    }
    let b = admin(&brokers[1]).await;
    wait_count(&b, "all", 3).await;
    wait_exists(&b, "default", true).await;
    assert_eq!(count(&b, "default").await, Some(0));
    assert!(!queue_exists(&b, "none").await);
    assert_eq!(count(&pc, "default").await, Some(3));
    drop((ch, pc, b));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    assert_eq!(count(&nc, "default").await, Some(0));
    assert_eq!(count(&nc, "all").await, Some(3));
    assert!(!queue_exists(&nc, "none").await);
}

/// Reference `test_replicate_binding`: a binding declared with `qpid.replicate=none` is not
/// replicated (it does not route after a failover), the other bindings are.
#[tokio::test(flavor = "multi_thread")]
async fn a_binding_with_replicate_none_is_not_replicated() {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    ch.exchange_declare(
        "ex".into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "q", FieldTable::default()).await;
    for (key, args) in [
        ("local", replicate("none")),
        ("kept", FieldTable::default()),
    ] {
        ch.queue_bind(
            "q".into(),
            "ex".into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .unwrap();
    }
    // On the primary both route; once the second message is on the backup, so are the
    // bindings (events arrive in order).
    assert!(publish_props(&ch, "ex", "local", b"local-before", Default::default()).await);
    assert!(publish_props(&ch, "ex", "kept", b"kept-before", Default::default()).await);
    wait_count(&admin(&brokers[1]).await, "q", 2).await;
    drop((ch, pc));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    assert!(publish_props(&ch, "ex", "local", b"local-after", Default::default()).await);
    assert!(publish_props(&ch, "ex", "kept", b"kept-after", Default::default()).await);
    assert_eq!(
        drain_bodies(&ch, "q").await,
        ["local-before", "kept-before", "kept-after"]
    );
}

/// Reference `test_invalid_replication`: `qpid.replicate` with an unknown value is refused
/// with 406 on a cluster primary, and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_replication_value_is_refused_by_the_primary() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let r = try_declare(
        &channel(&pc).await,
        "bad",
        Default::default(),
        replicate("XXinvalidXX"),
    )
    .await;
    let text = expect_code(r.map(|_| ()), 406);
    assert!(text.contains("Invalid replication value"), "{text}");
    assert!(!queue_exists(&pc, "bad").await);
    declare(&channel(&pc).await, "marker", FieldTable::default()).await;
    let b = admin(&brokers[1]).await;
    wait_exists(&b, "marker", true).await;
    assert!(!queue_exists(&b, "bad").await);
}

// ---- exclusive and temporary queues --------------------------------------------------------

/// Reference `test_exclusive_queue`: an exclusive (not auto-delete) queue refuses a second
/// connection, yet it and its messages are replicated; its owner's close deletes it on the
/// backup too.
#[tokio::test(flavor = "multi_thread")]
async fn an_exclusive_queue_is_replicated_with_its_messages() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let owner = brokers[0].connect().await;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    try_declare(
        &channel(&owner).await,
        "ex",
        exclusive,
        FieldTable::default(),
    )
    .await
    .expect("declare an exclusive queue");
    let ch = confirming(&owner).await;
    publish_confirmed(&ch, "ex", 0..2).await;
    let other = brokers[0].connect().await;
    let r = channel(&other)
        .await
        .basic_consume(
            "ex".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    expect_code(r.map(|_| ()), 405);
    let b = admin(&brokers[1]).await;
    wait_count(&b, "ex", 2).await;
    // The owner goes: the queue goes, on the backup too.
    owner.close(200, "bye".into()).await.unwrap();
    wait_exists(&b, "ex", false).await;
}

/// Reference `test_auto_delete_exclusive`: exclusive auto-delete (temporary) queues are not
/// replicated; exclusive, auto-delete, and auto-delete with x-expires ones are; closing the
/// auto-delete queue's consumer deletes it on the primary and on the backup.
#[tokio::test(flavor = "multi_thread")]
async fn temporary_queues_are_not_replicated_but_exclusive_and_auto_delete_ones_are() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let opts = |exclusive, auto_delete| QueueDeclareOptions {
        exclusive,
        auto_delete,
        ..Default::default()
    };
    let ch = channel(&pc).await;
    try_declare(&ch, "exad", opts(true, true), FieldTable::default())
        .await
        .unwrap();
    try_declare(&ch, "ex", opts(true, false), FieldTable::default())
        .await
        .unwrap();
    try_declare(&ch, "ad", opts(false, true), FieldTable::default())
        .await
        .unwrap();
    try_declare(
        &ch,
        "time",
        opts(false, true),
        table(&[("x-expires", AMQPValue::LongInt(60_000))]),
    )
    .await
    .unwrap();
    let consumer_ch = channel(&pc).await;
    let consumer = consumer_ch
        .basic_consume(
            "ad".into(),
            "ad-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    declare(&ch, "marker", FieldTable::default()).await;
    let b = admin(&brokers[1]).await;
    wait_exists(&b, "marker", true).await;
    for q in ["ex", "ad", "time"] {
        assert!(queue_exists(&b, q).await, "{q} is not on the backup");
    }
    assert!(!queue_exists(&b, "exad").await, "exad is on the backup");
    // Cancelling the only consumer auto-deletes "ad": the backup's copy does not hold it.
    consumer_ch
        .basic_cancel("ad-consumer".into(), Default::default())
        .await
        .unwrap();
    drop(consumer);
    wait_exists(&pc, "ad", false).await;
    wait_exists(&b, "ad", false).await;
}

// ---- reconciliation after a backup was away ---------------------------------------------

/// Freezes the only backup, `brokers[1]`, and waits until the primary `brokers[0]` has dropped
/// it from its members (its heartbeats stopped), so that it reconnects and reconciles when
/// continued.
async fn freeze_until_dropped(brokers: &[TestBroker]) {
    brokers[1].signal("STOP");
    let primary = addr(&brokers[0]);
    let ok = eventually(FOLLOW, || async { backup_statuses(&primary).is_empty() }).await;
    assert!(
        ok,
        "the primary still lists its backup: {:?}",
        backup_statuses(&primary)
    );
}

/// Reference `test_delete_missing_response`: a queue, an exchange and a binding deleted on the
/// primary while a backup is away (SIGSTOP) are deleted on the backup when it comes back.
#[tokio::test(flavor = "multi_thread")]
async fn objects_deleted_while_a_backup_was_away_are_deleted_when_it_comes_back() {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    for e in ["e-gone", "e-kept"] {
        ch.exchange_declare(
            e.into(),
            lapin::ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    declare(&ch, "q-gone", FieldTable::default()).await;
    declare(&ch, "q-kept", FieldTable::default()).await;
    ch.queue_bind(
        "q-kept".into(),
        "e-kept".into(),
        "unbound".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_confirmed(&ch, "q-gone", 0..2).await;
    publish_confirmed(&ch, "q-kept", 0..2).await;
    let b = admin(&brokers[1]).await;
    wait_count(&b, "q-kept", 2).await;
    wait_count(&b, "q-gone", 2).await;
    drop(b);
    freeze_until_dropped(&brokers).await;
    ch.queue_delete("q-gone".into(), Default::default())
        .await
        .unwrap();
    ch.exchange_delete("e-gone".into(), Default::default())
        .await
        .unwrap();
    ch.queue_unbind(
        "q-kept".into(),
        "e-kept".into(),
        "unbound".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    brokers[1].signal("CONT");
    wait_status(&brokers[1], "ready").await;
    let b = admin(&brokers[1]).await;
    wait_exists(&b, "q-gone", false).await;
    assert_eq!(count(&b, "q-kept").await, Some(2));
    let bc = channel(&b).await;
    let r = bc
        .exchange_declare(
            "e-gone".into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    expect_code(r, 404);
    drop((b, ch, pc));
    // The unbind reached it too: after failover the key routes nowhere.
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    assert!(publish_props(&ch, "e-kept", "unbound", b"x", Default::default()).await);
    assert_eq!(count(&nc, "q-kept").await, Some(2));
}

/// Reference `test_missed_recreate`: a queue and an exchange deleted and re-created (same
/// names) on the primary while a backup is away are replaced on the backup: the new queue's
/// messages only, the new exchange without the old one's bindings (checked after failover).
#[tokio::test(flavor = "multi_thread")]
async fn objects_recreated_while_a_backup_was_away_are_replaced_when_it_comes_back() {
    let (mut brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let pc = brokers[0].connect().await;
    let ch = confirming(&pc).await;
    let xx = |ch: lapin::Channel| async move {
        ch.exchange_declare(
            "xx".into(),
            lapin::ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    };
    xx(ch.clone()).await;
    declare(&ch, "qq", FieldTable::default()).await;
    declare(&ch, "sink", FieldTable::default()).await;
    ch.queue_bind(
        "sink".into(),
        "xx".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_confirmed(&ch, "qq", 0..3).await;
    assert!(publish_props(&ch, "xx", "k", b"routed", Default::default()).await);
    let b = admin(&brokers[1]).await;
    wait_count(&b, "qq", 3).await;
    wait_count(&b, "sink", 1).await;
    drop(b);
    freeze_until_dropped(&brokers).await;
    ch.queue_delete("qq".into(), Default::default())
        .await
        .unwrap();
    ch.exchange_delete("xx".into(), Default::default())
        .await
        .unwrap();
    declare(&ch, "qq", FieldTable::default()).await;
    xx(ch.clone()).await;
    assert!(publish_props(&ch, "", "qq", b"foo", Default::default()).await);
    brokers[1].signal("CONT");
    wait_status(&brokers[1], "ready").await;
    let b = admin(&brokers[1]).await;
    wait_count(&b, "qq", 1).await;
    drop((b, ch, pc));
    failover(&mut brokers, 0, 1).await;
    let nc = brokers[1].connect().await;
    let ch = confirming(&nc).await;
    assert_eq!(drain_bodies(&ch, "qq").await, ["foo"]);
    // The re-created xx has no binding: nothing more reaches sink.
    assert!(publish_props(&ch, "xx", "k", b"after", Default::default()).await);
    assert_eq!(drain_bodies(&ch, "sink").await, ["routed"]);
}

// ---- authentication ----------------------------------------------------------------------

/// Reference `test_auth`: members with `--auth yes` replicate with the HA user given by
/// `--ha-username`/`--ha-password` (tags admin and ha); a member whose HA user lacks the `ha`
/// tag cannot follow the primary.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_members_replicate_as_the_ha_user_and_a_user_without_the_ha_tag_cannot() {
    let ports = [free_port(), free_port(), free_port()];
    let url = loopback_url(&ports);
    let dirs: Vec<_> = (0..3)
        .map(|i| integration_tests::TempDir::new(&format!("cat-auth-{i}")))
        .collect();
    for d in &dirs {
        integration_tests::add_user(d.path(), "hauser", "admin,ha", "hapw");
        integration_tests::add_user(d.path(), "notha", "admin", "nopw");
        integration_tests::add_user(d.path(), "app", "", "apppw");
    }
    let start = |i: usize, user: &str, pw: &str| {
        TestBroker::builder()
            .port(ports[i])
            .auth(true)
            .data_dir(dirs[i].path())
            .args(["--ha-cluster", "yes", "--ha-brokers-url", &url])
            .args(["--ha-replicate", "all"])
            .args(["--ha-username", user, "--ha-password", pw])
            .args(["--link-maintenance-interval", "0.1s"])
            .args(["--link-heartbeat-interval", "1s"])
            .start()
    };
    let brokers = [
        start(0, "hauser", "hapw"),
        start(1, "hauser", "hapw"),
        start(2, "notha", "nopw"),
    ];
    let cred = |i: usize| format!("hauser/hapw@127.0.0.1:{}", ports[i]);
    promote_at(&cred(0));
    wait_status_at(&cred(1), "ready").await;
    let app = brokers[0]
        .try_connect_url(&brokers[0].url_for("app", "apppw"), Default::default())
        .await
        .expect("the application user connects");
    declare(&channel(&app).await, "secure", FieldTable::default()).await;
    publish_confirmed(&confirming(&app).await, "secure", 0..3).await;
    let admin_props = lapin::ConnectionProperties::default()
        .with_client_property("qpid.ha-admin".into(), "1".into());
    let b = brokers[1]
        .try_connect_url(&brokers[1].url_for("hauser", "hapw"), admin_props)
        .await
        .expect("an admin on the backup");
    wait_count(&b, "secure", 3).await;
    // The member whose HA user lacks the ha tag: it never becomes ready.
    let third = cred(2);
    let ok = eventually(Duration::from_secs(3), || async {
        status_at(&third) == "ready"
    })
    .await;
    assert!(!ok, "a member without the ha tag became ready");
    // What happens: the primary refuses its configuration subscription with 403 (logged on
    // the primary; the refused member itself logs nothing about it), so it stays joining and
    // the primary lists only the good backup.
    assert_eq!(status_at(&third), "joining");
    let log = brokers[0].log();
    assert!(
        log.contains("closing with 403 replication requires a user with the 'ha' tag"),
        "{log}"
    );
    assert_eq!(backup_statuses(&cred(0)), ["ready"]);
}

// ---- a stalled backup ----------------------------------------------------------------------

/// Reference `test_stalled_backup`: a frozen (SIGSTOP) ready backup stops holding the
/// primary's confirms after `--ha-ack-timeout`, and is no longer counted ready; the primary
/// still serves sends and receives. Continued, it is ready again and holds all messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_backup_releases_confirms_after_the_ack_timeout_and_is_ready_again_later() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all", "--ha-ack-timeout", "1s"]).await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "st", FieldTable::default()).await;
    wait_status(&brokers[1], "ready").await;
    let ch = confirming(&pc).await;
    publish_confirmed(&ch, "st", 0..5).await;
    brokers[1].signal("STOP");
    let started = Instant::now();
    integration_tests::within_for(
        Duration::from_secs(10),
        "confirms released after the ack timeout",
        publish_confirmed(&ch, "st", 5..20),
    )
    .await;
    let waited = started.elapsed();
    // Receiving works too.
    let m = get(&ch, "st", false).await.expect("a message");
    m.ack(BasicAckOptions::default()).await.unwrap();
    let primary = addr(&brokers[0]);
    let ok = eventually(FOLLOW, || async {
        !backup_statuses(&primary).iter().any(|s| s == "ready")
    })
    .await;
    let seen = backup_statuses(&primary);
    brokers[1].signal("CONT");
    assert!(ok, "the stalled backup is still counted ready: {seen:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "confirmed after {waited:?}: not held by the stalled backup"
    );
    wait_status(&brokers[1], "ready").await;
    let ok = eventually(FOLLOW, || async { backup_statuses(&primary) == ["ready"] }).await;
    assert!(ok, "{:?}", backup_statuses(&primary));
    wait_count(&admin(&brokers[1]).await, "st", 19).await;
}

// ---- repeated failover with numbered publisher and consumer ------------------------------

/// Reference `test_failover_send_receive` (short): three failovers among three members while a
/// publisher numbers its messages (one in flight, confirms) and a consumer acknowledges them.
/// Each time the primary is killed (-9), a ready backup is promoted, the clients find the new
/// primary by trying every member (backups refuse them with 530), and the killed member
/// rejoins as a backup on its port. Asserted: every confirmed number was received; numbers
/// arrive without gaps (each is at most one above the highest seen so far); a number received
/// again is either flagged redelivered (it was inherited from the old primary, unacked) or one
/// the publisher sent twice because its confirm was lost.
#[tokio::test(flavor = "multi_thread")]
async fn three_failovers_lose_no_confirmed_message_and_leave_no_gap() {
    let extra = ["--ha-replicate", "all"];
    let (mut brokers, url) = ready_cluster(3, &extra).await;
    let ports: Vec<u16> = brokers.iter().map(TestBroker::port).collect();
    declare(
        &channel(&brokers[0].connect().await).await,
        "fsr",
        FieldTable::default(),
    )
    .await;
    for b in &brokers[1..] {
        wait_status(b, "ready").await;
    }
    let state = Arc::new(Mutex::new(Numbered::default()));
    let total = 1200;
    let publisher = tokio::spawn(numbered_publisher(
        ports.clone(),
        "fsr",
        state.clone(),
        Some(total),
    ));
    let consumer = tokio::spawn(numbered_consumer(ports.clone(), "fsr", state.clone()));
    let mut primary = 0;
    for round in 0..3 {
        // Let traffic flow on this primary.
        let from = state.lock().unwrap().confirmed.unwrap_or(0);
        let ok = eventually(FOLLOW, || async {
            state.lock().unwrap().confirmed.unwrap_or(0) >= from + 100
        })
        .await;
        assert!(ok, "round {round}: no progress on the primary");
        let next = (primary + 1) % 3;
        failover(&mut brokers, primary, next).await;
        // The dead member comes back as a backup on its port.
        let port = brokers[primary].port();
        brokers[primary] = member(port, &url, &extra);
        wait_status(&brokers[next], "active").await;
        wait_status(&brokers[primary], "ready").await;
        primary = next;
    }
    within_for_long(publisher).await;
    let ok = eventually(FOLLOW, || async {
        let s = state.lock().unwrap();
        s.received.iter().any(|(n, _)| *n == total - 1)
    })
    .await;
    state.lock().unwrap().stop = true;
    within_for_long(consumer).await;
    assert!(ok, "the last message never arrived");
    let s = state.lock().unwrap();
    assert_eq!(s.confirmed, Some(total - 1));
    let mut highest: Option<u32> = None;
    let mut seen = BTreeSet::new();
    for (n, redelivered) in &s.received {
        let limit = highest.map_or(0, |h| h + 1);
        assert!(*n <= limit, "gap: {n} after highest {highest:?}");
        if !seen.insert(*n) {
            assert!(
                *redelivered || s.republished.contains(n),
                "{n} received twice, neither redelivered nor republished"
            );
        }
        highest = Some(highest.map_or(*n, |h| h.max(*n)));
    }
    eprintln!(
        "received {} deliveries of {total} numbers; {} redelivered; republished {:?}",
        s.received.len(),
        s.received.iter().filter(|(_, r)| *r).count(),
        s.republished
    );
    let missing: Vec<u32> = (0..total).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "confirmed but never received: {missing:?}"
    );
}

async fn within_for_long(task: tokio::task::JoinHandle<()>) {
    integration_tests::within_for(Duration::from_secs(60), "a client task", task)
        .await
        .expect("the client task panicked");
}

// ---- clients given [backup, primary] ------------------------------------------------------

/// Reference `test_failover_python` (client side): a client given [backup, primary] tries the
/// backup first, is refused with 530 naming the primary, and ends on the primary; a client
/// given only the backup can follow the address the refusal names.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_given_backup_then_primary_ends_on_the_primary() {
    let (brokers, _) = ready_cluster(2, &["--ha-replicate", "all"]).await;
    let list = [brokers[1].amqp_url(), brokers[0].amqp_url()];
    let mut refusals = Vec::new();
    let mut conn = None;
    for url in &list {
        match brokers[0].try_connect_url(url, Default::default()).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => refusals.push(e),
        }
    }
    let conn = conn.expect("the primary accepts the client");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let text = refusals[0].to_string();
    assert_eq!(amqp_code(&refusals[0]), Some(530), "{text}");
    assert!(text.contains(&addr(&brokers[0])), "{text}");
    // It is the primary: it takes publishes and the backup gets them.
    declare(&channel(&conn).await, "landed", FieldTable::default()).await;
    publish_confirmed(&confirming(&conn).await, "landed", 0..1).await;
    wait_count(&admin(&brokers[1]).await, "landed", 1).await;
    // Following the address named in the refusal.
    let named = text
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != ':'))
        .find(|w| w.starts_with("127.0.0.1:"))
        .expect("an address in the refusal")
        .to_string();
    let c = brokers[0]
        .try_connect_url(
            &format!("amqp://guest:guest@{named}/%2f"),
            Default::default(),
        )
        .await
        .expect("the named address is the primary");
    assert_eq!(count(&c, "landed").await, Some(1));
}
