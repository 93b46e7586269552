//! The basic class: publish and consume with every property and header type intact, large and
//! empty bodies, qos prefetch (per consumer and global), get / get-empty, ack (multiple), nack
//! and reject with and without requeue, recover, cancel (client and server initiated),
//! mandatory returns, exclusive consumers and consumer-tag reuse.

use std::time::Duration;

use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray};
use integration_tests::confirming;
use integration_tests::{
    REPLY_DEADLINE, TestBroker, assert_no_delivery, channel, consume, declare, expect_code, get,
    message_count, next_delivery, publish, send, table, within,
};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRecoverOptions, BasicRejectOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;

/// How long a negative check ("nothing more arrives") listens.
const QUIET: Duration = Duration::from_millis(300);

fn every_property() -> BasicProperties {
    let headers = table(&[
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(8)),
        ("i16", AMQPValue::ShortInt(-1600)),
        ("u16", AMQPValue::ShortUInt(1600)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(320_000)),
        ("i64", AMQPValue::LongLongInt(-6_400_000_000)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        // No ShortString value: amq-protocol encodes it with the invalid type octet '_'.
        ("long", AMQPValue::LongString("long string é".into())),
        (
            "array",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("two".into()),
            ])),
        ),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        (
            "table",
            AMQPValue::FieldTable(table(&[("nested", AMQPValue::Boolean(false))])),
        ),
        ("bytes", AMQPValue::ByteArray(vec![0u8, 1, 255].into())),
        ("void", AMQPValue::Void),
    ]);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-42".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("integration-tests".into())
        .with_cluster_id("cluster-7".into())
}

#[tokio::test]
async fn every_property_and_header_type_arrives_exactly_as_published() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "props", FieldTable::default()).await;
    let sent = every_property();
    publish(&ch, "", "props", b"{\"a\":1}", sent.clone())
        .await
        .unwrap();
    let mut consumer = consume(&ch, "props", true).await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.data, b"{\"a\":1}");
    assert_eq!(delivery.properties, sent);
    assert_eq!(delivery.routing_key.as_str(), "props");
    assert_eq!(delivery.exchange.as_str(), "");
    assert!(!delivery.redelivered);
}

#[tokio::test]
async fn basic_get_returns_the_properties_exactly_as_published() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "props-get", FieldTable::default()).await;
    let sent = every_property();
    publish(&ch, "", "props-get", b"x", sent.clone())
        .await
        .unwrap();
    let m = get(&ch, "props-get", true).await.expect("a message");
    assert_eq!(m.delivery.properties, sent);
}

#[tokio::test]
async fn message_without_properties_arrives_without_properties() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "bare", FieldTable::default()).await;
    send(&ch, "bare", b"").await;
    let m = get(&ch, "bare", true).await.expect("a message");
    assert_eq!(m.delivery.properties, BasicProperties::default());
    assert!(m.delivery.data.is_empty(), "an empty body stays empty");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn message_larger_than_frame_max_arrives_intact() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "big", FieldTable::default()).await;
    let body = pattern(3 * 131_072 + 17);
    send(&ch, "big", &body).await;
    let mut consumer = consume(&ch, "big", true).await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.data.len(), body.len());
    assert!(delivery.data == body, "the body changed on the way");
}

#[tokio::test]
async fn large_message_with_a_small_frame_max_arrives_intact() {
    // 8192 is the smallest frame_max lapin accepts (amq-protocol's FRAME_MIN_SIZE).
    let broker = TestBroker::builder().args(["--frame-max", "8192"]).start();
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().frame_max(), 8192);
    let ch = confirming(&conn).await;
    declare(&ch, "many-frames", FieldTable::default()).await;
    let body = pattern(100_000);
    send(&ch, "many-frames", &body).await;
    let m = get(&ch, "many-frames", true).await.expect("a message");
    assert!(m.delivery.data == body, "the body changed on the way");
}

#[tokio::test]
async fn messages_arrive_in_publish_order() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "order", FieldTable::default()).await;
    let mut consumer = consume(&ch, "order", false).await;
    for i in 0..200 {
        ch.basic_publish(
            "".into(),
            "order".into(),
            BasicPublishOptions::default(),
            format!("{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    for i in 0..200u64 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, format!("{i}").as_bytes());
        assert_eq!(d.delivery_tag, i + 1, "delivery tags count from 1");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_and_an_ack_releases_the_next() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "qos", FieldTable::default()).await;
    for i in 0..5 {
        send(&ch, "qos", format!("m{i}").as_bytes()).await;
    }
    ch.basic_qos(2, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consume(&ch, "qos", false).await;
    let first = next_delivery(&mut consumer).await;
    let _second = next_delivery(&mut consumer).await;
    assert_no_delivery(&mut consumer, QUIET).await;
    first.ack(BasicAckOptions::default()).await.expect("ack");
    let third = next_delivery(&mut consumer).await;
    assert_eq!(third.data, b"m2");
    assert_no_delivery(&mut consumer, QUIET).await;
}

#[tokio::test]
async fn global_qos_is_shared_by_the_consumers_of_a_channel() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    for q in ["g1", "g2"] {
        declare(&ch, q, FieldTable::default()).await;
        for i in 0..3 {
            send(&ch, q, format!("{q}-{i}").as_bytes()).await;
        }
    }
    ch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .expect("global qos");
    let c1 = consume(&ch, "g1", false).await;
    let c2 = consume(&ch, "g2", false).await;
    let (mut c1, mut c2) = (c1, c2);
    let mut received = 0;
    let end = tokio::time::Instant::now() + QUIET * 2;
    loop {
        use futures_lite::StreamExt;
        let next = tokio::select! {
            d = c1.next() => d,
            d = c2.next() => d,
            _ = tokio::time::sleep_until(end) => break,
        };
        next.expect("delivery").expect("no error");
        received += 1;
    }
    assert_eq!(received, 3, "a global prefetch of 3 caps the whole channel");
}

#[tokio::test]
async fn prefetch_applies_to_each_consumer_without_global() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    for q in ["p1", "p2"] {
        declare(&ch, q, FieldTable::default()).await;
        for i in 0..3 {
            send(&ch, q, format!("{q}-{i}").as_bytes()).await;
        }
    }
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c1 = consume(&ch, "p1", false).await;
    let mut c2 = consume(&ch, "p2", false).await;
    next_delivery(&mut c1).await;
    next_delivery(&mut c2).await;
    assert_no_delivery(&mut c1, QUIET).await;
    assert_no_delivery(&mut c2, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn get_returns_messages_with_the_remaining_count_then_get_empty() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "g", FieldTable::default()).await;
    send(&ch, "g", b"one").await;
    send(&ch, "g", b"two").await;
    let m = get(&ch, "g", false).await.expect("first");
    assert_eq!(m.delivery.data, b"one");
    assert_eq!(m.message_count, 1, "one message left after this one");
    m.delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let m = get(&ch, "g", true).await.expect("second");
    assert_eq!(m.delivery.data, b"two");
    assert_eq!(m.message_count, 0);
    assert!(get(&ch, "g", true).await.is_none(), "get-empty");
}

#[tokio::test]
async fn get_of_a_missing_queue_is_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within(
        "basic.get",
        ch.basic_get("missing".into(), Default::default()),
    )
    .await;
    expect_code(result, 404);
}

#[tokio::test]
async fn ack_multiple_acknowledges_everything_up_to_the_tag() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "am", FieldTable::default()).await;
    for i in 0..5 {
        send(&ch, "am", format!("{i}").as_bytes()).await;
    }
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "am", false).await;
    let mut last = None;
    for _ in 0..5 {
        last = Some(next_delivery(&mut consumer).await);
    }
    let last = last.unwrap();
    assert_eq!(last.delivery_tag, 5);
    consumer_ch
        .basic_ack(4, BasicAckOptions { multiple: true })
        .await
        .expect("ack multiple up to 4");
    // Closing the channel requeues what is still unacknowledged: only message 5.
    consumer_ch.close(200, "done".into()).await.expect("close");
    assert_eq!(message_count(&conn, "am").await.unwrap(), 1);
    let m = get(&ch, "am", true).await.expect("the unacked one");
    assert_eq!(m.delivery.data, b"4");
    assert!(m.delivery.redelivered);
}

#[tokio::test]
async fn unacked_messages_are_requeued_as_redelivered_when_the_channel_closes() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "rq", FieldTable::default()).await;
    send(&ch, "rq", b"x").await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "rq", false).await;
    let d = next_delivery(&mut consumer).await;
    assert!(!d.redelivered);
    consumer_ch.close(200, "bye".into()).await.expect("close");
    let m = get(&ch, "rq", true).await.expect("requeued");
    assert!(m.delivery.redelivered);
}

#[tokio::test]
async fn nack_with_requeue_redelivers_with_the_redelivered_flag() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "nq", FieldTable::default()).await;
    send(&ch, "nq", b"again").await;
    let mut consumer = consume(&ch, "nq", false).await;
    let d = next_delivery(&mut consumer).await;
    assert!(!d.redelivered);
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .expect("nack");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(again.data, b"again");
    assert!(again.redelivered);
    again.ack(BasicAckOptions::default()).await.expect("ack");
}

#[tokio::test]
async fn reject_with_requeue_redelivers_with_the_redelivered_flag() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "rj", FieldTable::default()).await;
    send(&ch, "rj", b"again").await;
    let mut consumer = consume(&ch, "rj", false).await;
    let d = next_delivery(&mut consumer).await;
    d.reject(BasicRejectOptions { requeue: true })
        .await
        .expect("reject");
    let again = next_delivery(&mut consumer).await;
    assert!(again.redelivered);
}

#[tokio::test]
async fn nack_multiple_requeues_every_message_up_to_the_tag() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "nm", FieldTable::default()).await;
    for i in 0..3 {
        send(&ch, "nm", format!("{i}").as_bytes()).await;
    }
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "nm", false).await;
    for _ in 0..3 {
        next_delivery(&mut consumer).await;
    }
    consumer_ch
        .basic_nack(
            3,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .expect("nack multiple");
    for i in 0..3 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, format!("{i}").as_bytes(), "requeued in order");
        assert!(d.redelivered);
    }
}

#[tokio::test]
async fn nack_without_requeue_dead_letters_with_reason_rejected() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "dead", FieldTable::default()).await;
    declare(
        &ch,
        "live",
        table(&[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dead".into()),
            ),
        ]),
    )
    .await;
    send(&ch, "live", b"bad").await;
    let mut consumer = consume(&ch, "live", false).await;
    let d = next_delivery(&mut consumer).await;
    d.nack(BasicNackOptions {
        requeue: false,
        multiple: false,
    })
    .await
    .expect("nack");
    let dead_ch = channel(&conn).await;
    let mut dead = consume(&dead_ch, "dead", true).await;
    let letter = next_delivery(&mut dead).await;
    assert_eq!(letter.data, b"bad");
    integration_tests::assert_x_death(&letter.properties, "live", "rejected");
}

#[tokio::test]
async fn reject_without_requeue_and_without_dead_letter_exchange_discards() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "discard", FieldTable::default()).await;
    send(&ch, "discard", b"gone").await;
    let m = get(&ch, "discard", false).await.expect("message");
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    ch.close(200, "".into()).await.expect("close");
    assert_eq!(message_count(&conn, "discard").await.unwrap(), 0);
}

#[tokio::test]
async fn recover_redelivers_unacknowledged_messages() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "rec", FieldTable::default()).await;
    send(&ch, "rec", b"r").await;
    let mut consumer = consume(&ch, "rec", false).await;
    let first = next_delivery(&mut consumer).await;
    assert!(!first.redelivered);
    within(
        "basic.recover",
        ch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await
    .expect("recover");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(again.data, b"r");
    assert!(again.redelivered);
}

#[test]
fn recover_ok_is_sent_before_the_redeliveries() {
    // lapin (like other clients) drops deliveries that arrive before basic.recover-ok, taking
    // them for pre-recover prefetch: the broker must answer recover-ok first, then redeliver.
    use amq_protocol::protocol::{AMQPClass, basic, queue};
    use integration_tests::{RawClient, method_frame};
    let broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&method_frame(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "raw-recover".into(),
            ..Default::default()
        })),
    ));
    let _declare_ok = client.read_method();
    client.send(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "raw-recover".into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    client.send(&integration_tests::encode(
        &amq_protocol::frame::AMQPFrame::Header(
            1,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: 1,
                properties: Default::default(),
            },
        ),
    ));
    client.send(&integration_tests::encode(
        &amq_protocol::frame::AMQPFrame::Body(1, b"r".to_vec()),
    ));
    client.send(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "raw-recover".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        })),
    ));
    let mut saw_first_delivery = false;
    while !saw_first_delivery {
        if let Some(amq_protocol::frame::AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(d)),
        )) = client.read_frame()
        {
            assert!(!d.redelivered);
            saw_first_delivery = true;
        }
    }
    let _header = client.read_frame();
    let _body = client.read_frame();
    client.send(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
    ));
    match client.read_method() {
        (1, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(_))) => {}
        other => panic!("expected basic.recover-ok before any redelivery, got {other:?}"),
    }
    match client.read_method() {
        (1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => assert!(d.redelivered),
        other => panic!("expected the redelivery, got {other:?}"),
    }
}

#[tokio::test]
async fn ack_of_an_unknown_delivery_tag_closes_the_channel_with_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "x", FieldTable::default()).await;
    ch.basic_ack(99, BasicAckOptions::default())
        .await
        .expect("the ack is sent");
    // The 406 arrives asynchronously; the next synchronous call on the channel sees it.
    let result = within(
        "queue.declare",
        ch.queue_declare("x".into(), Default::default(), FieldTable::default()),
    )
    .await;
    expect_code(result, 406);
    assert!(conn.status().connected());
}

#[tokio::test]
async fn cancel_stops_deliveries_and_leaves_messages_in_the_queue() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "cq", FieldTable::default()).await;
    let consumer = consume(&ch, "cq", true).await;
    within(
        "basic.cancel",
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");
    send(&ch, "cq", b"kept").await;
    assert_eq!(message_count(&conn, "cq").await.unwrap(), 1);
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "doomed", FieldTable::default()).await;
    let mut consumer = consume(&ch, "doomed", false).await;
    let other = channel(&conn).await;
    within(
        "queue.delete",
        other.queue_delete("doomed".into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete");
    use futures_lite::StreamExt;
    let end = within("the consumer's cancellation", consumer.next()).await;
    assert!(
        end.is_none(),
        "a server-initiated basic.cancel ends lapin's consumer stream, got {end:?}"
    );
    assert!(ch.status().connected(), "the channel stays open");
}

#[tokio::test]
async fn mandatory_publish_to_nowhere_is_returned_with_312() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            "amq.direct".into(),
            "nobody-bound".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default().with_message_id("m1".into()),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within("the confirm", confirm).await.expect("confirm");
    assert!(
        confirmation.is_ack(),
        "an unroutable message is still acked"
    );
    let returned = confirmation
        .take_message()
        .expect("the message must come back in basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.data, b"lost");
    assert_eq!(returned.delivery.routing_key.as_str(), "nobody-bound");
    assert_eq!(returned.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(
        returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m1")
    );
}

#[tokio::test]
async fn non_mandatory_publish_to_nowhere_is_dropped_silently() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let confirmation = publish(
        &ch,
        "amq.direct",
        "nobody",
        b"x",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    assert!(confirmation.is_ack());
    assert!(confirmation.take_message().is_none());
}

#[tokio::test]
async fn exclusive_consumer_keeps_others_out_with_403() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "solo", FieldTable::default()).await;
    let _exclusive = within(
        "basic.consume",
        ch.basic_consume(
            "solo".into(),
            "only".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exclusive consume");
    let other = broker.connect().await;
    let och = channel(&other).await;
    let result = within(
        "basic.consume",
        och.basic_consume(
            "solo".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 403);
}

#[tokio::test]
async fn exclusive_consume_on_a_queue_with_consumers_is_403() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "shared", FieldTable::default()).await;
    let _plain = consume(&ch, "shared", false).await;
    let ch2 = channel(&conn).await;
    let result = within(
        "basic.consume",
        ch2.basic_consume(
            "shared".into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 403);
}

#[tokio::test]
async fn reusing_a_consumer_tag_on_a_channel_is_connection_error_530() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "t1", FieldTable::default()).await;
    declare(&ch, "t2", FieldTable::default()).await;
    let _first = within(
        "basic.consume",
        ch.basic_consume(
            "t1".into(),
            "same-tag".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("first consume");
    let result = within(
        "basic.consume",
        ch.basic_consume(
            "t2".into(),
            "same-tag".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 530);
    assert!(
        integration_tests::eventually(REPLY_DEADLINE, || {
            let down = !conn.status().connected();
            async move { down }
        })
        .await,
        "530 is a connection error"
    );
}

#[tokio::test]
async fn consume_from_a_missing_queue_is_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within(
        "basic.consume",
        ch.basic_consume(
            "absent".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 404);
}

#[tokio::test]
async fn messages_are_shared_round_robin_between_two_consumers() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "rr", FieldTable::default()).await;
    let mut a = consume(&ch, "rr", true).await;
    let mut b = consume(&ch, "rr", true).await;
    for i in 0..4 {
        send(&ch, "rr", format!("{i}").as_bytes()).await;
    }
    let a1 = next_delivery(&mut a).await;
    let b1 = next_delivery(&mut b).await;
    let a2 = next_delivery(&mut a).await;
    let b2 = next_delivery(&mut b).await;
    let mut all: Vec<_> = [a1, b1, a2, b2].into_iter().map(|d| d.data).collect();
    all.sort();
    assert_eq!(all, [b"0", b"1", b"2", b"3"]);
}
