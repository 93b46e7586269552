//! Named limits, each at its boundary (N works, N+1 is refused): --max-connections (and the
//! admin reserve), --channel-max, --frame-max, --max-message-size, --max-unacked-per-channel,
//! --max-queues, --max-exchanges, --max-consumers-per-channel, --memory-high-watermark
//! (connection.blocked / unblocked) and --default-queue-limit.

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, channel as channel_methods, connection};
use amq_protocol::types::{FieldTable, LongString};
use futures_lite::StreamExt;
use integration_tests::confirming;
use integration_tests::{
    RawClient, TestBroker, amqp_code, assert_no_delivery, channel, consume, declare, expect_code,
    method_frame, next_delivery, publish, send, try_declare, within,
};
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::{BasicProperties, ConnectionProperties, Event, ExchangeKind};

#[tokio::test]
async fn max_connections_accepts_n_and_refuses_n_plus_one() {
    let broker = TestBroker::builder()
        .args(["--max-connections", "2"])
        .start();
    let first = broker.connect().await;
    let second = broker.connect().await;
    let err = broker
        .try_connect_url(&broker.amqp_url(), ConnectionProperties::default())
        .await
        .expect_err("the third connection must be refused");
    assert_eq!(amqp_code(&err), Some(530), "{err:?}");
    assert!(first.status().connected() && second.status().connected());
    first.close(200, "make room".into()).await.expect("close");
    // The slot is freed once the broker has processed the close: poll for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let admitted = loop {
        match broker
            .try_connect_url(&broker.amqp_url(), ConnectionProperties::default())
            .await
        {
            Ok(conn) => break Some(conn),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(_) => break None,
        }
    };
    assert!(admitted.is_some(), "a closed connection frees its slot");
}

#[tokio::test]
async fn admin_connection_is_accepted_beyond_max_connections() {
    let broker = TestBroker::builder()
        .args(["--max-connections", "1"])
        .start();
    let _ordinary = broker.connect().await;
    let refused = broker
        .try_connect_url(&broker.amqp_url(), ConnectionProperties::default())
        .await;
    assert!(refused.is_err(), "the broker is full for ordinary clients");
    let admin = broker
        .try_connect_url(
            &broker.amqp_url(),
            ConnectionProperties::default()
                .with_client_property("qpid.ha-admin".into(), LongString::from("true")),
        )
        .await
        .expect("an admin connection (qpid.ha-admin) is let in");
    let ch = channel(&admin).await;
    declare(&ch, "admin-works", FieldTable::default()).await;
}

#[test]
fn admin_connection_with_a_boolean_qpid_ha_admin_is_accepted_beyond_max_connections() {
    let broker = TestBroker::builder()
        .args(["--max-connections", "1"])
        .start();
    let (_ordinary, _) = RawClient::open(broker.port());
    let mut props = FieldTable::default();
    props.insert(
        "qpid.ha-admin".into(),
        amq_protocol::types::AMQPValue::Boolean(true),
    );
    let mut admin = RawClient::connect(broker.port());
    admin.handshake_to_open(props);
    admin.open_channel(1);
}

#[tokio::test]
async fn channel_max_is_negotiated_and_every_channel_up_to_it_opens() {
    let broker = TestBroker::builder().args(["--channel-max", "3"]).start();
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().channel_max(), 3);
    let mut channels = Vec::new();
    for _ in 0..3 {
        channels.push(channel(&conn).await);
    }
    assert_eq!(
        channels.iter().map(|c| c.id()).max(),
        Some(3),
        "channel 3 is the last one allowed"
    );
}

#[test]
fn opening_a_channel_above_channel_max_closes_the_connection_with_530() {
    let broker = TestBroker::builder().args(["--channel-max", "3"]).start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(3);
    client.send(&method_frame(
        4,
        AMQPClass::Channel(channel_methods::AMQPMethod::Open(channel_methods::Open {})),
    ));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 530, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (20, 10), "{close:?}");
}

#[tokio::test]
async fn frame_max_asked_above_the_broker_limit_is_clamped_by_negotiation() {
    let broker = TestBroker::builder().args(["--frame-max", "8192"]).start();
    let url = format!("{}?frame_max=131072", broker.amqp_url());
    let conn = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    assert_eq!(conn.configuration().frame_max(), 8192);
    // A body larger than frame_max is split by lapin and put back together by the broker.
    let ch = confirming(&conn).await;
    declare(&ch, "fm", FieldTable::default()).await;
    let body = vec![7u8; 20_000];
    send(&ch, "fm", &body).await;
    let m = integration_tests::get(&ch, "fm", true)
        .await
        .expect("message");
    assert_eq!(m.delivery.data, body);
}

#[test]
fn tune_ok_with_a_frame_max_above_the_broker_limit_is_refused() {
    let broker = TestBroker::builder().args(["--frame-max", "8192"]).start();
    let mut client = RawClient::connect(broker.port());
    let _ = client.negotiate_to_tune(FieldTable::default());
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 10,
            frame_max: 8193,
            heartbeat: 0,
        })),
    ));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 530, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (10, 31), "{close:?}");
}

#[tokio::test]
async fn message_at_max_message_size_is_accepted_and_one_byte_more_is_406() {
    let broker = TestBroker::builder()
        .args(["--max-message-size", "1000"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "sized", FieldTable::default()).await;
    let at_limit = publish(&ch, "", "sized", &[1u8; 1000], BasicProperties::default())
        .await
        .expect("a message of exactly --max-message-size is accepted");
    assert!(at_limit.is_ack());
    let over = publish(&ch, "", "sized", &[1u8; 1001], BasicProperties::default()).await;
    expect_code(over, 406);
    assert!(
        integration_tests::eventually(integration_tests::REPLY_DEADLINE, || {
            let closed = !ch.status().connected();
            async move { closed }
        })
        .await,
        "the channel is closed"
    );
    assert!(conn.status().connected(), "406 is a channel error only");
    let ch2 = channel(&conn).await;
    let m = integration_tests::get(&ch2, "sized", true)
        .await
        .expect("the message at the limit");
    assert_eq!(m.delivery.data.len(), 1000);
    assert!(integration_tests::get(&ch2, "sized", true).await.is_none());
}

#[tokio::test]
async fn max_unacked_per_channel_pauses_deliveries_until_an_ack() {
    let broker = TestBroker::builder()
        .args(["--max-unacked-per-channel", "3"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "unacked", FieldTable::default()).await;
    for i in 0..5 {
        send(&ch, "unacked", format!("m{i}").as_bytes()).await;
    }
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "unacked", false).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_delivery(&mut consumer).await);
    }
    assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
    got[0].ack(BasicAckOptions::default()).await.expect("ack");
    let fourth = next_delivery(&mut consumer).await;
    assert_eq!(fourth.data, b"m3");
    assert_no_delivery(&mut consumer, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn max_queues_accepts_n_and_refuses_n_plus_one() {
    let broker = TestBroker::builder().args(["--max-queues", "3"]).start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    for i in 0..3 {
        declare(&ch, &format!("q{i}"), FieldTable::default()).await;
    }
    let ch2 = channel(&conn).await;
    let result = try_declare(&ch2, "q3", Default::default(), FieldTable::default()).await;
    expect_code(result, 406);
    // Redeclaring an existing queue at the limit is not a new queue.
    let ch3 = channel(&conn).await;
    declare(&ch3, "q0", FieldTable::default()).await;
}

#[tokio::test]
async fn max_exchanges_counts_the_predeclared_ones() {
    // The predeclared exchanges are "", amq.direct, amq.fanout, amq.topic, amq.headers,
    // amq.match, plus whatever management adds; find how many by filling up.
    let broker = TestBroker::builder()
        .args(["--max-exchanges", "12"])
        .start();
    let conn = broker.connect().await;
    let mut created = 0;
    loop {
        let ch = channel(&conn).await;
        let result = within(
            "exchange.declare",
            ch.exchange_declare(
                format!("x{created}").as_str().into(),
                ExchangeKind::Direct,
                Default::default(),
                FieldTable::default(),
            ),
        )
        .await;
        match result {
            Ok(()) => created += 1,
            Err(e) => {
                assert_eq!(amqp_code(&e), Some(406), "{e:?}");
                break;
            }
        }
        assert!(created <= 12, "--max-exchanges 12 is not enforced");
    }
    assert!(
        (1..=6).contains(&created),
        "with 6 or more predeclared exchanges only a few fit under 12, created {created}"
    );
}

#[tokio::test]
async fn max_consumers_per_channel_accepts_n_and_refuses_n_plus_one() {
    let broker = TestBroker::builder()
        .args(["--max-consumers-per-channel", "2"])
        .start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "mc", FieldTable::default()).await;
    let _a = consume(&ch, "mc", false).await;
    let _b = consume(&ch, "mc", false).await;
    let result = within(
        "basic.consume",
        ch.basic_consume(
            "mc".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 406);
    // Another channel has its own allowance.
    let other = channel(&conn).await;
    let _c = consume(&other, "mc", false).await;
}

#[tokio::test]
async fn memory_high_watermark_blocks_publishers_and_unblocks_when_memory_is_freed() {
    let broker = TestBroker::builder()
        .args(["--memory-high-watermark", "100000"])
        .start();
    let conn = broker.connect().await;
    let mut events = conn.events_listener();
    let ch = channel(&conn).await;
    declare(&ch, "hog", FieldTable::default()).await;
    // lapin holds publishes back while the connection is blocked, so publish from a task.
    let publisher = tokio::spawn(async move {
        let body = vec![0u8; 10_000];
        for _ in 0..15 {
            ch.basic_publish(
                "".into(),
                "hog".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        }
    });
    let blocked = within("connection.blocked", async {
        loop {
            match events.next().await {
                Some(Event::ConnectionBlocked(reason)) => return reason,
                Some(_) => continue,
                None => panic!("the event stream ended"),
            }
        }
    })
    .await;
    assert!(!blocked.is_empty(), "connection.blocked carries a reason");
    assert!(conn.status().blocked());
    // Free the memory from another connection (the blocked one is not read).
    let other = broker.connect().await;
    let och = channel(&other).await;
    within(
        "queue.purge",
        och.queue_purge("hog".into(), Default::default()),
    )
    .await
    .expect("purge");
    within("connection.unblocked", async {
        loop {
            match events.next().await {
                Some(Event::ConnectionUnblocked) => return,
                Some(_) => continue,
                None => panic!("the event stream ended"),
            }
        }
    })
    .await;
    // Purge again until the rest of the publishes get through (each purge frees memory).
    let done = integration_tests::eventually(integration_tests::REPLY_DEADLINE, || {
        let finished = publisher.is_finished();
        let purge = och.queue_purge("hog".into(), Default::default());
        async move {
            let _ = purge.await;
            finished
        }
    })
    .await;
    assert!(done, "the publisher finishes once unblocked");
}

#[tokio::test]
async fn publisher_below_the_memory_high_watermark_is_not_blocked() {
    let broker = TestBroker::builder()
        .args(["--memory-high-watermark", "1000000"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "light", FieldTable::default()).await;
    for _ in 0..10 {
        send(&ch, "light", &[0u8; 10_000]).await;
    }
    assert!(!conn.status().blocked());
}

#[tokio::test]
async fn default_queue_limit_applies_to_queues_declared_without_one() {
    let broker = TestBroker::builder()
        .args(["--default-queue-limit", "1000"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "limited", FieldTable::default()).await;
    for i in 0..5 {
        let c = publish(&ch, "", "limited", &[0u8; 200], BasicProperties::default())
            .await
            .expect("publish");
        assert!(c.is_ack(), "message {i} fits in 1000 bytes");
    }
    let over = publish(&ch, "", "limited", &[0u8; 1], BasicProperties::default())
        .await
        .expect("publish");
    assert!(
        over.is_nack(),
        "the byte beyond the default limit is refused, got {over:?}"
    );
}

#[tokio::test]
async fn explicit_queue_limit_overrides_the_default_queue_limit() {
    let broker = TestBroker::builder()
        .args(["--default-queue-limit", "100"])
        .start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "own-limit",
        integration_tests::table(&[(
            "x-max-length-bytes",
            amq_protocol::types::AMQPValue::LongLongInt(10_000),
        )]),
    )
    .await;
    for _ in 0..5 {
        let c = publish(
            &ch,
            "",
            "own-limit",
            &[0u8; 200],
            BasicProperties::default(),
        )
        .await
        .expect("publish");
        assert!(c.is_ack(), "the queue's own 10000-byte limit applies");
    }
}
