//! Publisher confirms (confirm.select, an ack for every publish, nacks on reject-publish,
//! multiple acks counted right) and transactions (tx.select / commit / rollback for publishes
//! and acks, and the refusal to mix the two modes).

use std::time::Duration;

use amq_protocol::types::AMQPValue;
use integration_tests::confirming;
use integration_tests::{
    TestBroker, channel, consume, declare, drain, expect_code, get, message_count, next_delivery,
    publish, send, table, within,
};
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

async fn transactional(conn: &Connection) -> Channel {
    let ch = channel(conn).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");
    ch
}

#[tokio::test]
async fn every_one_of_many_publishes_is_acked() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "many", FieldTable::default()).await;
    let mut confirms = Vec::new();
    for i in 0..2000u32 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "many".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        let c = within("a confirm", confirm).await.expect("confirm");
        assert!(c.is_ack(), "publish {i} was not acked: {c:?}");
    }
    assert_eq!(message_count(&conn, "many").await.unwrap(), 2000);
}

#[tokio::test]
async fn persistent_publishes_are_acked_too() {
    let broker = TestBroker::builder().temp_data_dir().start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    within(
        "queue.declare",
        ch.queue_declare(
            "durable-q".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare durable");
    for i in 0..50u32 {
        let c = publish(
            &ch,
            "",
            "durable-q",
            &i.to_be_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
        assert!(c.is_ack(), "{c:?}");
    }
}

#[tokio::test]
async fn wait_for_confirms_reports_no_returns_for_routed_messages() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "w", FieldTable::default()).await;
    for _ in 0..100 {
        ch.basic_publish(
            "".into(),
            "w".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    let returned = within("wait_for_confirms", ch.wait_for_confirms())
        .await
        .expect("all confirmed");
    assert!(returned.is_empty());
}

#[tokio::test]
async fn reject_publish_overflow_nacks_only_the_publishes_that_did_not_fit() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(
        &ch,
        "small",
        table(&[
            ("x-max-length", AMQPValue::LongLongInt(3)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    )
    .await;
    let mut confirms = Vec::new();
    for i in 0..6u8 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "small".into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    let mut outcome = Vec::new();
    for confirm in confirms {
        outcome.push(
            within("a confirm", confirm)
                .await
                .expect("confirm")
                .is_ack(),
        );
    }
    assert_eq!(outcome, [true, true, true, false, false, false]);
    assert_eq!(drain(&ch, "small").await, [vec![0], vec![1], vec![2]]);
}

#[tokio::test]
async fn confirm_select_on_a_transactional_channel_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = transactional(&conn).await;
    let result = within("confirm.select", ch.confirm_select(Default::default())).await;
    expect_code(result, 406);
}

#[tokio::test]
async fn tx_select_on_a_confirming_channel_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let result = within("tx.select", ch.tx_select()).await;
    expect_code(result, 406);
}

#[tokio::test]
async fn committed_publishes_arrive_and_uncommitted_ones_do_not() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = transactional(&conn).await;
    declare(&ch, "txq", FieldTable::default()).await;
    send(&ch, "txq", b"one").await;
    send(&ch, "txq", b"two").await;
    assert_eq!(
        message_count(&conn, "txq").await.unwrap(),
        0,
        "nothing is enqueued before the commit"
    );
    within("tx.commit", ch.tx_commit()).await.expect("commit");
    assert_eq!(message_count(&conn, "txq").await.unwrap(), 2);
}

#[tokio::test]
async fn rolled_back_publishes_never_arrive() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = transactional(&conn).await;
    declare(&ch, "rb", FieldTable::default()).await;
    let reader = channel(&conn).await;
    let mut consumer = consume(&reader, "rb", true).await;
    send(&ch, "rb", b"discarded").await;
    within("tx.rollback", ch.tx_rollback())
        .await
        .expect("rollback");
    send(&ch, "rb", b"kept").await;
    within("tx.commit", ch.tx_commit()).await.expect("commit");
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"kept", "the rolled back message never arrives");
    integration_tests::assert_no_delivery(&mut consumer, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn acks_in_a_rolled_back_transaction_leave_the_messages_unacked() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let publisher = confirming(&conn).await;
    declare(&publisher, "txack", FieldTable::default()).await;
    send(&publisher, "txack", b"a").await;
    send(&publisher, "txack", b"b").await;
    let ch = transactional(&conn).await;
    let first = get(&ch, "txack", false).await.expect("a");
    let second = get(&ch, "txack", false).await.expect("b");
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack a");
    second
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack b");
    within("tx.rollback", ch.tx_rollback())
        .await
        .expect("rollback");
    // Both are still unacked: closing the channel requeues them.
    ch.close(200, "".into()).await.expect("close");
    let left: Vec<_> = drain(&publisher, "txack").await;
    assert_eq!(left, [b"a".to_vec(), b"b".to_vec()]);
}

#[tokio::test]
async fn acks_in_a_committed_transaction_remove_the_messages() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let publisher = confirming(&conn).await;
    declare(&publisher, "txack2", FieldTable::default()).await;
    send(&publisher, "txack2", b"a").await;
    let ch = transactional(&conn).await;
    let m = get(&ch, "txack2", false).await.expect("a");
    m.delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    within("tx.commit", ch.tx_commit()).await.expect("commit");
    ch.close(200, "".into()).await.expect("close");
    assert_eq!(message_count(&conn, "txack2").await.unwrap(), 0);
}

#[tokio::test]
async fn commit_without_select_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within("tx.commit", ch.tx_commit()).await;
    expect_code(result, 406);
}
