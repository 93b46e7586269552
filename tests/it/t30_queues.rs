//! Queues: declare (server-named, passive, exclusive, auto-delete), redeclare mismatches, bind
//! and unbind, purge, delete (if-empty, if-unused), and the queue arguments: TTLs and
//! dead-lettering with `x-death`, `x-expires`, length and byte limits with each overflow
//! policy, priorities, Qpid's ring and last-value queues, and refused or unknown arguments.

use std::time::Duration;

use amq_protocol::types::AMQPValue;
use integration_tests::confirming;
use integration_tests::{
    REPLY_DEADLINE, TestBroker, assert_x_death, channel, consume, declare, drain, eventually,
    expect_code, get, message_count, publish, queue_exists, send, table, try_declare, within,
};
use lapin::options::{
    BasicCancelOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

fn long(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn strings(bodies: Vec<Vec<u8>>) -> Vec<String> {
    bodies
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect()
}

async fn refused_declare(
    conn: &Connection,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> u16 {
    let ch = channel(conn).await;
    let err = try_declare(&ch, name, options, args)
        .await
        .expect_err("the declare must be refused");
    integration_tests::amqp_code(&err).unwrap_or_else(|| panic!("not an AMQP error: {err:?}"))
}

#[tokio::test]
async fn server_named_queue_starts_with_amq_gen() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = try_declare(
        &ch,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    assert!(q.name().as_str().starts_with("amq.gen-"), "{}", q.name());
    let q2 = declare(&ch, "", FieldTable::default()).await;
    assert_ne!(q.name(), q2.name(), "server names are unique");
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_is_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "missing",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 404);
    assert!(conn.status().connected());
}

#[tokio::test]
async fn passive_declare_reports_message_and_consumer_counts() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "counted", FieldTable::default()).await;
    for _ in 0..3 {
        send(&ch, "counted", b"x").await;
    }
    assert_eq!(message_count(&conn, "counted").await.unwrap(), 3);
}

#[tokio::test]
async fn exclusive_queue_is_refused_to_other_connections_with_405() {
    let broker = TestBroker::start();
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    try_declare(
        &ch,
        "mine",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exclusive");
    let other = broker.connect().await;
    let code = refused_declare(
        &other,
        "mine",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 405, "redeclare from another connection");
    let ch2 = channel(&other).await;
    let result = within(
        "basic.consume",
        ch2.basic_consume(
            "mine".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 405);
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_closes() {
    let broker = TestBroker::start();
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    try_declare(
        &ch,
        "transient-excl",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exclusive");
    let watcher = broker.connect().await;
    assert!(queue_exists(&watcher, "transient-excl").await);
    owner.close(200, "bye".into()).await.expect("close");
    assert!(
        eventually(REPLY_DEADLINE, || queue_exists_not(
            &watcher,
            "transient-excl"
        ))
        .await,
        "the exclusive queue must go with its connection"
    );
}

async fn queue_exists_not(conn: &Connection, queue: &str) -> bool {
    !queue_exists(conn, queue).await
}

#[tokio::test]
async fn auto_delete_queue_is_deleted_when_its_last_consumer_cancels() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    try_declare(
        &ch,
        "ad",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare auto-delete");
    let c1 = consume(&ch, "ad", false).await;
    let c2 = consume(&ch, "ad", false).await;
    ch.basic_cancel(c1.tag(), BasicCancelOptions::default())
        .await
        .expect("cancel first");
    assert!(
        queue_exists(&conn, "ad").await,
        "one consumer is left: the queue stays"
    );
    ch.basic_cancel(c2.tag(), BasicCancelOptions::default())
        .await
        .expect("cancel second");
    assert!(
        eventually(REPLY_DEADLINE, || queue_exists_not(&conn, "ad")).await,
        "the auto-delete queue must go with its last consumer"
    );
}

#[tokio::test]
async fn auto_delete_queue_never_consumed_stays() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    try_declare(
        &ch,
        "ad-idle",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare auto-delete");
    // Longer than a purge sweep (0.5 s default) would take to remove it by mistake.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(queue_exists(&conn, "ad-idle").await);
}

#[tokio::test]
async fn redeclare_with_different_arguments_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    declare(
        &channel(&conn).await,
        "argq",
        table(&[("x-max-length", long(10))]),
    )
    .await;
    let code = refused_declare(
        &conn,
        "argq",
        QueueDeclareOptions::default(),
        table(&[("x-max-length", long(11))]),
    )
    .await;
    assert_eq!(code, 406);
    let code = refused_declare(
        &conn,
        "argq",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 406, "dropping an argument is a difference too");
}

#[tokio::test]
async fn redeclare_with_the_same_arguments_in_another_integer_width_is_accepted() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(
        &ch,
        "widths",
        table(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await;
    declare(&ch, "widths", table(&[("x-max-length", long(10))])).await;
}

#[tokio::test]
async fn redeclare_with_different_durable_or_auto_delete_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    declare(&channel(&conn).await, "flags", FieldTable::default()).await;
    let code = refused_declare(
        &conn,
        "flags",
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 406, "durable differs");
    let code = refused_declare(
        &conn,
        "flags",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 406, "auto-delete differs");
}

#[tokio::test]
async fn purge_returns_the_number_of_messages_removed() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "p", FieldTable::default()).await;
    for _ in 0..5 {
        send(&ch, "p", b"x").await;
    }
    let purged = within(
        "queue.purge",
        ch.queue_purge("p".into(), Default::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 5);
    assert_eq!(message_count(&conn, "p").await.unwrap(), 0);
}

#[tokio::test]
async fn delete_returns_the_message_count_and_removes_the_queue() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "d", FieldTable::default()).await;
    send(&ch, "d", b"x").await;
    send(&ch, "d", b"y").await;
    let count = within(
        "queue.delete",
        ch.queue_delete("d".into(), Default::default()),
    )
    .await
    .expect("delete");
    assert_eq!(count, 2);
    assert!(!queue_exists(&conn, "d").await);
}

#[tokio::test]
async fn delete_if_empty_is_406_while_the_queue_holds_messages() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "full", FieldTable::default()).await;
    send(&ch, "full", b"x").await;
    let ch2 = channel(&conn).await;
    let result = within(
        "queue.delete",
        ch2.queue_delete(
            "full".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;
    expect_code(result, 406);
    assert!(queue_exists(&conn, "full").await);
}

#[tokio::test]
async fn delete_if_unused_is_406_while_the_queue_has_a_consumer() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "used", FieldTable::default()).await;
    let _consumer = consume(&ch, "used", false).await;
    let ch2 = channel(&conn).await;
    let result = within(
        "queue.delete",
        ch2.queue_delete(
            "used".into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    expect_code(result, 406);
    assert!(queue_exists(&conn, "used").await);
}

#[tokio::test]
async fn unbind_stops_routing() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "ub", FieldTable::default()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            "ub".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    publish(&ch, "amq.direct", "k", b"one", BasicProperties::default())
        .await
        .unwrap();
    within(
        "queue.unbind",
        ch.queue_unbind(
            "ub".into(),
            "amq.direct".into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    publish(&ch, "amq.direct", "k", b"two", BasicProperties::default())
        .await
        .unwrap();
    assert_eq!(strings(drain(&ch, "ub").await), ["one"]);
}

#[tokio::test]
async fn binding_a_missing_queue_or_to_a_missing_exchange_is_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within(
        "queue.bind",
        ch.queue_bind(
            "nope".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 404);
    let ch = channel(&conn).await;
    declare(&ch, "exists", FieldTable::default()).await;
    let result = within(
        "queue.bind",
        ch.queue_bind(
            "exists".into(),
            "nope-x".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 404);
}

#[tokio::test]
async fn x_message_ttl_expires_messages() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "ttl", table(&[("x-message-ttl", long(50))])).await;
    send(&ch, "ttl", b"short-lived").await;
    assert!(
        eventually(REPLY_DEADLINE, || count_is(&conn, "ttl", 0)).await,
        "the message must expire"
    );
    assert!(get(&ch, "ttl", true).await.is_none());
}

async fn count_is(conn: &Connection, queue: &str, expected: u32) -> bool {
    message_count(conn, queue).await.ok() == Some(expected)
}

#[tokio::test]
async fn expired_message_is_not_delivered_even_before_a_sweep() {
    // A long sweep interval: expiry must also be checked when a message is about to be
    // delivered, not only by the sweeper.
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "60s"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "ttl-lazy", table(&[("x-message-ttl", long(20))])).await;
    send(&ch, "ttl-lazy", b"stale").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(get(&ch, "ttl-lazy", true).await.is_none());
}

#[tokio::test]
async fn per_message_expiration_expires_the_message() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "exp", FieldTable::default()).await;
    publish(
        &ch,
        "",
        "exp",
        b"soon",
        BasicProperties::default().with_expiration("50".into()),
    )
    .await
    .unwrap();
    publish(&ch, "", "exp", b"stays", BasicProperties::default())
        .await
        .unwrap();
    assert!(
        eventually(REPLY_DEADLINE, || count_is(&conn, "exp", 1)).await,
        "the message with expiration 50 must expire"
    );
    assert_eq!(strings(drain(&ch, "exp").await), ["stays"]);
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_with_an_x_death_header() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "dlq", FieldTable::default()).await;
    declare(
        &ch,
        "src",
        table(&[
            ("x-message-ttl", long(50)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dlq")),
        ]),
    )
    .await;
    send(&ch, "src", b"to-die").await;
    assert!(
        eventually(REPLY_DEADLINE, || count_is(&conn, "dlq", 1)).await,
        "the expired message must reach the dead-letter queue"
    );
    let m = get(&ch, "dlq", true).await.expect("the dead letter");
    assert_eq!(m.delivery.data, b"to-die");
    assert_x_death(&m.delivery.properties, "src", "expired");
}

#[tokio::test]
async fn dead_letter_keeps_the_original_routing_key_without_x_dead_letter_routing_key() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "dl-by-key", FieldTable::default()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            "dl-by-key".into(),
            "amq.direct".into(),
            "orig-key".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    declare(
        &ch,
        "orig-key",
        table(&[
            ("x-message-ttl", long(30)),
            ("x-dead-letter-exchange", text("amq.direct")),
        ]),
    )
    .await;
    send(&ch, "orig-key", b"m").await;
    assert!(eventually(REPLY_DEADLINE, || count_is(&conn, "dl-by-key", 1)).await);
}

#[tokio::test]
async fn x_expires_deletes_an_unused_queue() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "expiring", table(&[("x-expires", long(200))])).await;
    assert!(queue_exists(&conn, "expiring").await);
    assert!(
        eventually(REPLY_DEADLINE, || queue_exists_not(&conn, "expiring")).await,
        "an unused queue with x-expires 200 must disappear"
    );
}

#[tokio::test]
async fn x_expires_does_not_delete_a_queue_with_a_consumer() {
    let broker = TestBroker::builder()
        .args(["--queue-purge-interval", "0.05s"])
        .start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "kept", table(&[("x-expires", long(100))])).await;
    let _consumer = consume(&ch, "kept", false).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        queue_exists(&conn, "kept").await,
        "a queue in use does not expire"
    );
}

#[tokio::test]
async fn x_max_length_drop_head_drops_the_oldest() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "cap",
        table(&[("x-max-length", long(3)), ("x-overflow", text("drop-head"))]),
    )
    .await;
    for i in 1..=5 {
        send(&ch, "cap", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(strings(drain(&ch, "cap").await), ["m3", "m4", "m5"]);
}

#[tokio::test]
async fn x_max_length_default_overflow_is_drop_head() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "cap-default", table(&[("x-max-length", long(2))])).await;
    for i in 1..=3 {
        send(&ch, "cap-default", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(strings(drain(&ch, "cap-default").await), ["m2", "m3"]);
}

#[tokio::test]
async fn x_max_length_reject_publish_nacks_the_publisher() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "strict",
        table(&[
            ("x-max-length", long(2)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await;
    for i in 1..=2 {
        let c = publish(
            &ch,
            "",
            "strict",
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
        assert!(c.is_ack(), "message {i} fits");
    }
    let c = publish(&ch, "", "strict", b"m3", BasicProperties::default())
        .await
        .unwrap();
    assert!(c.is_nack(), "the third message must be nacked, got {c:?}");
    assert_eq!(strings(drain(&ch, "strict").await), ["m1", "m2"]);
}

#[tokio::test]
async fn x_max_length_bytes_drops_the_oldest_beyond_the_byte_limit() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "bytes", table(&[("x-max-length-bytes", long(10))])).await;
    for body in ["aaaa", "bbbb", "cccc"] {
        send(&ch, "bytes", body.as_bytes()).await;
    }
    assert_eq!(strings(drain(&ch, "bytes").await), ["bbbb", "cccc"]);
}

#[tokio::test]
async fn x_max_length_bytes_with_reject_publish_nacks_at_the_limit() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "bytes-strict",
        table(&[
            ("x-max-length-bytes", long(8)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await;
    let first = publish(
        &ch,
        "",
        "bytes-strict",
        b"12345678",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert!(first.is_ack(), "exactly at the limit fits");
    let second = publish(&ch, "", "bytes-strict", b"9", BasicProperties::default())
        .await
        .unwrap();
    assert!(
        second.is_nack(),
        "one byte over must be nacked, got {second:?}"
    );
}

#[tokio::test]
async fn x_max_priority_delivers_higher_priority_first() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "prio", table(&[("x-max-priority", long(10))])).await;
    for (body, p) in [("low", 1u8), ("none", 0), ("high", 9), ("mid", 5)] {
        let props = if p == 0 {
            BasicProperties::default()
        } else {
            BasicProperties::default().with_priority(p)
        };
        publish(&ch, "", "prio", body.as_bytes(), props)
            .await
            .unwrap();
    }
    assert_eq!(
        strings(drain(&ch, "prio").await),
        ["high", "mid", "low", "none"]
    );
}

#[tokio::test]
async fn x_max_priority_caps_priorities_above_the_maximum() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "prio-cap", table(&[("x-max-priority", long(3))])).await;
    for (body, p) in [("a-7", 7u8), ("b-3", 3), ("c-9", 9), ("d-2", 2)] {
        publish(
            &ch,
            "",
            "prio-cap",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await
        .unwrap();
    }
    // 7, 3 and 9 all count as 3 (FIFO among them); 2 comes last.
    assert_eq!(
        strings(drain(&ch, "prio-cap").await),
        ["a-7", "b-3", "c-9", "d-2"]
    );
}

#[tokio::test]
async fn qpid_priorities_delivers_higher_priority_first() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "qprio", table(&[("qpid.priorities", long(10))])).await;
    for (body, p) in [("low", 1u8), ("high", 9), ("mid", 5)] {
        publish(
            &ch,
            "",
            "qprio",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await
        .unwrap();
    }
    assert_eq!(strings(drain(&ch, "qprio").await), ["high", "mid", "low"]);
}

#[tokio::test]
async fn qpid_ring_policy_drops_the_oldest() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "ring",
        table(&[
            ("qpid.max_count", long(3)),
            ("qpid.policy_type", text("ring")),
        ]),
    )
    .await;
    for i in 1..=5 {
        send(&ch, "ring", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(strings(drain(&ch, "ring").await), ["m3", "m4", "m5"]);
}

#[tokio::test]
async fn qpid_reject_policy_nacks_beyond_max_count() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "qreject",
        table(&[
            ("qpid.max_count", long(1)),
            ("qpid.policy_type", text("reject")),
        ]),
    )
    .await;
    let first = publish(&ch, "", "qreject", b"1", BasicProperties::default())
        .await
        .unwrap();
    assert!(first.is_ack());
    let second = publish(&ch, "", "qreject", b"2", BasicProperties::default())
        .await
        .unwrap();
    assert!(second.is_nack(), "{second:?}");
}

#[tokio::test]
async fn qpid_max_size_limits_bytes() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "qsize",
        table(&[
            ("qpid.max_size", long(6)),
            ("qpid.policy_type", text("ring")),
        ]),
    )
    .await;
    for body in ["aaa", "bbb", "ccc"] {
        send(&ch, "qsize", body.as_bytes()).await;
    }
    assert_eq!(strings(drain(&ch, "qsize").await), ["bbb", "ccc"]);
}

#[tokio::test]
async fn qpid_last_value_queue_keeps_only_the_last_value_per_key() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "lvq",
        table(&[("qpid.last_value_queue_key", text("sym"))]),
    )
    .await;
    for (key, body) in [
        ("IBM", "ibm-1"),
        ("RHT", "rht-1"),
        ("IBM", "ibm-2"),
        ("IBM", "ibm-3"),
    ] {
        publish(
            &ch,
            "",
            "lvq",
            body.as_bytes(),
            BasicProperties::default().with_headers(table(&[("sym", text(key))])),
        )
        .await
        .unwrap();
    }
    let mut got = strings(drain(&ch, "lvq").await);
    got.sort();
    assert_eq!(got, ["ibm-3", "rht-1"]);
}

#[tokio::test]
async fn both_x_max_length_and_qpid_max_count_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "both",
        QueueDeclareOptions::default(),
        table(&[("x-max-length", long(5)), ("qpid.max_count", long(5))]),
    )
    .await;
    assert_eq!(code, 406);
    assert!(!queue_exists(&conn, "both").await, "nothing was created");
}

#[tokio::test]
async fn both_x_max_length_bytes_and_qpid_max_size_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "both-bytes",
        QueueDeclareOptions::default(),
        table(&[("x-max-length-bytes", long(5)), ("qpid.max_size", long(5))]),
    )
    .await;
    assert_eq!(code, 406);
}

#[tokio::test]
async fn x_queue_type_quorum_is_406_and_classic_is_accepted() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "quorum",
        QueueDeclareOptions::default(),
        table(&[("x-queue-type", text("quorum"))]),
    )
    .await;
    assert_eq!(code, 406);
    declare(
        &channel(&conn).await,
        "classic",
        table(&[("x-queue-type", text("classic"))]),
    )
    .await;
}

#[tokio::test]
async fn message_groups_argument_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "groups",
        QueueDeclareOptions::default(),
        table(&[("qpid.group_header_key", text("grp"))]),
    )
    .await;
    assert_eq!(code, 406);
}

#[tokio::test]
async fn unknown_argument_is_accepted_and_kept_for_redeclare() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "foo", table(&[("x-foo", text("bar"))])).await;
    declare(&ch, "foo", table(&[("x-foo", text("bar"))])).await;
    let code = refused_declare(
        &conn,
        "foo",
        QueueDeclareOptions::default(),
        table(&[("x-foo", text("baz"))]),
    )
    .await;
    assert_eq!(
        code, 406,
        "a kept unknown argument still takes part in the comparison"
    );
}

#[tokio::test]
async fn invalid_argument_value_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "neg-ttl",
        QueueDeclareOptions::default(),
        table(&[("x-message-ttl", long(-1))]),
    )
    .await;
    assert_eq!(code, 406);
    let code = refused_declare(
        &conn,
        "bad-overflow",
        QueueDeclareOptions::default(),
        table(&[("x-overflow", text("sideways"))]),
    )
    .await;
    assert_eq!(code, 406);
}

#[tokio::test]
async fn declaring_a_queue_with_the_reserved_amq_prefix_is_403() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let code = refused_declare(
        &conn,
        "amq.mine",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    assert_eq!(code, 403);
}
