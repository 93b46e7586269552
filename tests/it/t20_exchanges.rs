//! Exchanges: routing by direct, fanout, topic (`*`, `#`) and headers (`x-match` all/any);
//! declare (passive, redeclare mismatches), delete if-unused, the predeclared exchanges, the
//! reserved `amq.` prefix, internal exchanges, and publishing to a missing exchange.

use amq_protocol::types::AMQPValue;
use integration_tests::confirming;
use integration_tests::{TestBroker, channel, declare, drain, expect_code, publish, table, within};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e:?}"));
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e:?}"));
}

async fn put(ch: &Channel, exchange: &str, key: &str, body: &str) {
    publish(
        ch,
        exchange,
        key,
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await
    .expect("publish");
}

async fn put_with_headers(ch: &Channel, exchange: &str, body: &str, headers: FieldTable) {
    publish(
        ch,
        exchange,
        "",
        body.as_bytes(),
        BasicProperties::default().with_headers(headers),
    )
    .await
    .expect("publish");
}

/// Bodies in `queue`, as strings, after a confirm barrier on `ch` (so every publish has been
/// routed before we look).
async fn bodies(ch: &Channel, queue: &str) -> Vec<String> {
    drain(ch, queue)
        .await
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect()
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_exchange(&ch, "dx", ExchangeKind::Direct).await;
    declare(&ch, "dq1", FieldTable::default()).await;
    declare(&ch, "dq2", FieldTable::default()).await;
    bind(&ch, "dq1", "dx", "red", FieldTable::default()).await;
    bind(&ch, "dq2", "dx", "blue", FieldTable::default()).await;
    put(&ch, "dx", "red", "r").await;
    put(&ch, "dx", "blue", "b").await;
    put(&ch, "dx", "green", "g").await;
    assert_eq!(bodies(&ch, "dq1").await, ["r"]);
    assert_eq!(bodies(&ch, "dq2").await, ["b"]);
}

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "by-name", FieldTable::default()).await;
    put(&ch, "", "by-name", "x").await;
    put(&ch, "", "no-such-queue", "y").await;
    assert_eq!(bodies(&ch, "by-name").await, ["x"]);
}

#[tokio::test]
async fn fanout_exchange_copies_to_every_bound_queue_ignoring_the_key() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_exchange(&ch, "fx", ExchangeKind::Fanout).await;
    for q in ["fq1", "fq2", "fq3"] {
        declare(&ch, q, FieldTable::default()).await;
        bind(&ch, q, "fx", "whatever", FieldTable::default()).await;
    }
    put(&ch, "fx", "any-key", "m").await;
    for q in ["fq1", "fq2", "fq3"] {
        assert_eq!(bodies(&ch, q).await, ["m"], "queue {q}");
    }
}

#[tokio::test]
async fn topic_exchange_matches_star_as_one_word_and_hash_as_zero_or_more() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_exchange(&ch, "tx", ExchangeKind::Topic).await;
    declare(&ch, "star", FieldTable::default()).await;
    declare(&ch, "hash", FieldTable::default()).await;
    declare(&ch, "all", FieldTable::default()).await;
    bind(&ch, "star", "tx", "stock.*.nyse", FieldTable::default()).await;
    bind(&ch, "hash", "tx", "stock.#", FieldTable::default()).await;
    bind(&ch, "all", "tx", "#", FieldTable::default()).await;
    for key in [
        "stock.ibm.nyse",
        "stock.nyse",
        "stock",
        "stock.a.b.nyse",
        "bond.ibm.nyse",
        "",
    ] {
        put(&ch, "tx", key, key).await;
    }
    assert_eq!(bodies(&ch, "star").await, ["stock.ibm.nyse"]);
    assert_eq!(
        bodies(&ch, "hash").await,
        ["stock.ibm.nyse", "stock.nyse", "stock", "stock.a.b.nyse"]
    );
    assert_eq!(
        bodies(&ch, "all").await,
        [
            "stock.ibm.nyse",
            "stock.nyse",
            "stock",
            "stock.a.b.nyse",
            "bond.ibm.nyse",
            ""
        ]
    );
}

#[tokio::test]
async fn topic_hash_in_the_middle_matches_zero_or_more_words() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "mid", FieldTable::default()).await;
    bind(&ch, "mid", "amq.topic", "a.#.z", FieldTable::default()).await;
    for key in ["a.z", "a.b.z", "a.b.c.z", "a.b", "b.z", "a.zz"] {
        put(&ch, "amq.topic", key, key).await;
    }
    assert_eq!(bodies(&ch, "mid").await, ["a.z", "a.b.z", "a.b.c.z"]);
}

#[tokio::test]
async fn headers_exchange_x_match_all_needs_every_header_and_any_needs_one() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_exchange(&ch, "hx", ExchangeKind::Headers).await;
    declare(&ch, "h-all", FieldTable::default()).await;
    declare(&ch, "h-any", FieldTable::default()).await;
    let s = |v: &str| AMQPValue::LongString(v.into());
    bind(
        &ch,
        "h-all",
        "hx",
        "",
        table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    bind(
        &ch,
        "h-any",
        "hx",
        "",
        table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    put_with_headers(
        &ch,
        "hx",
        "both",
        table(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;
    put_with_headers(&ch, "hx", "format-only", table(&[("format", s("pdf"))])).await;
    put_with_headers(&ch, "hx", "wrong-value", table(&[("format", s("zip"))])).await;
    put_with_headers(&ch, "hx", "none", FieldTable::default()).await;
    assert_eq!(bodies(&ch, "h-all").await, ["both"]);
    assert_eq!(bodies(&ch, "h-any").await, ["both", "format-only"]);
}

#[tokio::test]
async fn predeclared_exchanges_exist() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        let ch = channel(&conn).await;
        within(
            "passive exchange.declare",
            ch.exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{name} must exist: {e:?}"));
    }
}

#[tokio::test]
async fn amq_match_routes_like_a_headers_exchange() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare(&ch, "m", FieldTable::default()).await;
    let s = |v: &str| AMQPValue::LongString(v.into());
    bind(
        &ch,
        "m",
        "amq.match",
        "",
        table(&[("x-match", s("all")), ("k", s("v"))]),
    )
    .await;
    put_with_headers(&ch, "amq.match", "yes", table(&[("k", s("v"))])).await;
    put_with_headers(&ch, "amq.match", "no", table(&[("k", s("w"))])).await;
    assert_eq!(bodies(&ch, "m").await, ["yes"]);
}

#[tokio::test]
async fn passive_declare_of_a_missing_exchange_is_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within(
        "passive exchange.declare",
        ch.exchange_declare(
            "no-such-exchange".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 404);
    assert!(conn.status().connected(), "404 is a channel error only");
}

#[tokio::test]
async fn redeclare_with_another_type_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    declare_exchange(&channel(&conn).await, "typed", ExchangeKind::Direct).await;
    let ch = channel(&conn).await;
    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            "typed".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 406);
}

#[tokio::test]
async fn redeclare_with_another_durable_flag_is_406() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    declare_exchange(&channel(&conn).await, "dur", ExchangeKind::Direct).await;
    let ch = channel(&conn).await;
    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            "dur".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 406);
}

#[tokio::test]
async fn identical_redeclare_is_accepted() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "same", ExchangeKind::Topic).await;
    declare_exchange(&ch, "same", ExchangeKind::Topic).await;
}

#[tokio::test]
async fn delete_if_unused_is_406_while_a_queue_is_bound_and_works_after_unbind() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "used", ExchangeKind::Direct).await;
    declare(&ch, "uq", FieldTable::default()).await;
    bind(&ch, "uq", "used", "k", FieldTable::default()).await;
    let ch2 = channel(&conn).await;
    let result = within(
        "exchange.delete",
        ch2.exchange_delete(
            "used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    expect_code(result, 406);
    within(
        "queue.unbind",
        ch.queue_unbind(
            "uq".into(),
            "used".into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    within(
        "exchange.delete",
        ch.exchange_delete(
            "used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("delete if-unused once unbound");
}

#[tokio::test]
async fn deleted_exchange_is_gone() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "gone", ExchangeKind::Fanout).await;
    within(
        "exchange.delete",
        ch.exchange_delete("gone".into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("delete");
    let result = within(
        "passive exchange.declare",
        ch.exchange_declare(
            "gone".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 404);
}

#[tokio::test]
async fn declaring_an_exchange_with_the_reserved_amq_prefix_is_403() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            "amq.foo".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 403);
}

#[tokio::test]
async fn publishing_to_an_internal_exchange_is_403() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    within(
        "exchange.declare",
        ch.exchange_declare(
            "inside".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare internal");
    ch.confirm_select(Default::default())
        .await
        .expect("confirm.select");
    let result = publish(&ch, "inside", "", b"x", BasicProperties::default()).await;
    expect_code(result, 403);
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_closes_the_channel_with_404() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirm.select");
    let result = publish(
        &ch,
        "no-such-exchange",
        "k",
        b"x",
        BasicProperties::default(),
    )
    .await;
    expect_code(result, 404);
    assert!(
        integration_tests::eventually(integration_tests::REPLY_DEADLINE, || {
            let closed = !ch.status().connected();
            async move { closed }
        })
        .await,
        "the channel must be closed"
    );
    assert!(conn.status().connected(), "404 is a channel error only");
    let ch2 = channel(&conn).await;
    declare(&ch2, "after", FieldTable::default()).await;
}

#[tokio::test]
async fn exchange_to_exchange_binding_is_refused_with_540_and_the_broker_serves_on() {
    // exchange.bind is a RabbitMQ extension this broker does not implement: it must say so
    // with 540 NOT_IMPLEMENTED (a connection error), naming exchange.bind (40.30).
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "src", ExchangeKind::Fanout).await;
    let result = within(
        "exchange.bind",
        ch.exchange_bind(
            "amq.fanout".into(),
            "src".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    expect_code(result, 540);
    integration_tests::assert_serves_fresh_client(&broker).await;
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_its_last_binding_is_removed() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    within(
        "exchange.declare",
        ch.exchange_declare(
            "ad-x".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare auto-delete exchange");
    declare(&ch, "ad-xq", FieldTable::default()).await;
    bind(&ch, "ad-xq", "ad-x", "k", FieldTable::default()).await;
    within(
        "queue.unbind",
        ch.queue_unbind(
            "ad-xq".into(),
            "ad-x".into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    let exists = || async {
        let ch = channel(&conn).await;
        within(
            "passive exchange.declare",
            ch.exchange_declare(
                "ad-x".into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .is_ok()
    };
    assert!(
        integration_tests::eventually(integration_tests::REPLY_DEADLINE, || async {
            !exists().await
        })
        .await,
        "the auto-delete exchange must go with its last binding"
    );
}
