//! The durable store (`docs/design/store.md`), with real `qpidd` processes restarted on the same
//! data dir: durable exchanges, queues (with their arguments) and bindings, and persistent
//! messages on durable queues survive a clean restart (SIGTERM) and a kill -9, while transient
//! objects and messages do not; every kind of dequeue (ack, reject, purge, limit) stays done;
//! transactions, dead-lettering, priority, last-value and TTL queues behave across a restart;
//! the journal files follow the documented framing, a new segment begins at every start and
//! `config.jnl` is compacted into snapshots; a torn tail is dropped with a warning, damage
//! elsewhere and newer format versions refuse the start (unless `--store-skip-damaged yes`); and
//! consumed segments are deleted while the broker runs, also for several queues over many small
//! segments with clean and kill -9 restarts (a seeded model test); sparse segments are compacted,
//! and a kill during or after compaction loses and revives nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amq_protocol::types::AMQPValue;
use integration_tests::{
    REPLY_DEADLINE, TempDir, TestBroker, amqp_code, channel, eventually, expect_code, get,
    message_count, queue_exists, run_qpidd, table, try_declare, wait_until, within, within_for,
};
use integration_tests::{SplitMix, confirming, declare_durable, persistent, publish};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

/// How long a clean stop may take (the writer's last round is synced first).
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a broker may take to answer something that needs many round trips or big bodies.
const SLOW: Duration = Duration::from_secs(60);

// ---- brokers ------------------------------------------------------------------------------

/// How a broker is brought down before a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Down {
    /// SIGTERM: a clean shutdown, which must exit with status 0.
    Clean,
    /// SIGKILL: a crash.
    Kill,
}

/// A broker with its data (and so its store) in `dir`, plus `extra` arguments.
fn broker_on(dir: &Path, extra: &[&str]) -> TestBroker {
    TestBroker::builder()
        .data_dir(dir)
        .args(extra.iter().copied())
        .start()
}

/// Brings `broker` down as `how` says and waits for the process to be gone (so the data-dir
/// lock is free for the next start).
fn bring_down(mut broker: TestBroker, how: Down) {
    match how {
        Down::Clean => broker.stop(),
        Down::Kill => broker.signal("KILL"),
    }
    let status = broker.wait_exit(EXIT_DEADLINE);
    if how == Down::Clean {
        assert!(
            status.success(),
            "a SIGTERM stop must exit with status 0, got {status:?}; log:\n{}",
            broker.log()
        );
    }
}

/// Runs `qpidd` on `dir` expecting it to refuse to start: returns (exit code, stderr).
fn refused_start(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--port".into(),
        "0".into(),
        "--auth".into(),
        "no".into(),
        "--data-dir".into(),
        dir.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    let run = run_qpidd(&args, &[], None, Duration::from_secs(15));
    (run.status.code(), format!("{}{}", run.stderr, run.stdout))
}

// ---- clients ------------------------------------------------------------------------------

fn long(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declares an exchange, panicking on failure.
async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    args: FieldTable,
) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name:?}: {e:?}"));
}

/// Whether exchange `name` exists (a passive declare on a throw-away channel).
async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = channel(conn).await;
    let r = within(
        "passive exchange.declare",
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match r {
        Ok(()) => {
            let _ = ch.close(200, "".into()).await;
            true
        }
        Err(e) if amqp_code(&e) == Some(404) => false,
        Err(e) => panic!("passive declare of exchange {name:?}: {e:?}"),
    }
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
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
    .unwrap_or_else(|e| panic!("bind {queue:?} to {exchange:?} with {key:?}: {e:?}"));
}

/// Publishes and asserts the broker confirmed (acked) the message.
async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
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
    .expect("basic.publish");
    let answer = within_for(SLOW, "the publish confirm", confirm)
        .await
        .expect("the publish confirm");
    assert!(
        answer.is_ack(),
        "the broker must ack the publish: {answer:?}"
    );
}

/// Publishes every `(routing key, body, properties)` to the default exchange without waiting
/// in between, then asserts every one was confirmed with an ack.
async fn publish_pipelined(ch: &Channel, messages: Vec<(String, Vec<u8>, BasicProperties)>) {
    let mut confirms = Vec::with_capacity(messages.len());
    for (key, body, props) in messages {
        let confirm = within_for(
            SLOW,
            "basic.publish",
            ch.basic_publish(
                "".into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            ),
        )
        .await
        .expect("basic.publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let answer = within_for(SLOW, "a publish confirm", confirm)
            .await
            .expect("a publish confirm");
        assert!(
            answer.is_ack(),
            "the broker must ack every publish: {answer:?}"
        );
    }
}

fn transient() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(1)
}

/// Everything in `queue`, taken with basic.get (no-ack), as deliveries.
async fn take_all(ch: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        out.push(m.delivery);
    }
    out
}

/// Connects to `broker` and takes (and acks) every message of `queue`: their bodies.
async fn drain_bodies(broker: &TestBroker, queue: &str) -> Vec<String> {
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    bodies_of(&take_all(&ch, queue).await)
}

fn bodies_of(deliveries: &[lapin::message::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect()
}

async fn count(conn: &Connection, queue: &str) -> u32 {
    message_count(conn, queue)
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue:?}: {e:?}"))
}

/// A deterministic, non-repeating-looking body of `len` bytes.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

// ---- store files --------------------------------------------------------------------------

const HEADER: usize = 24;

fn store_dir(data: &Path) -> PathBuf {
    data.join("store")
}

fn config_file(data: &Path) -> PathBuf {
    store_dir(data).join("config.jnl")
}

/// The message segments `msg-<16 hex>.jnl`, oldest first, with their numbers.
fn segments(data: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(store_dir(data)) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(hex) = name
            .strip_prefix("msg-")
            .and_then(|r| r.strip_suffix(".jnl"))
            && hex.len() == 16
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    out
}

/// The total size of the message segments.
fn segments_size(data: &Path) -> u64 {
    segments(data)
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// The newest segment holding a record (the writer creates the next segment, header only,
/// ahead of need: that one is newer).
fn newest_segment(data: &Path) -> PathBuf {
    newest_segment_with(data, 1)
}

/// The newest segment holding at least `n` records.
fn newest_segment_with(data: &Path, n: usize) -> PathBuf {
    segments(data)
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| records(&read(p)).len() >= n)
        .unwrap_or_else(|| panic!("no segment with {n} records in {}", data.display()))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// One framed record of a journal file.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// Offset of its length field in the file.
    offset: usize,
    /// `L`: type + payload.
    len: usize,
}

impl Record {
    fn kind(&self, file: &[u8]) -> u8 {
        file[self.offset + 4]
    }
    fn payload<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        &file[self.offset + 5..self.offset + 4 + self.len]
    }
    fn end(&self) -> usize {
        self.offset + 8 + self.len
    }
    fn crc_ok(&self, file: &[u8]) -> bool {
        crc32(&file[self.offset..self.offset + 4 + self.len])
            == u32_at(file, self.offset + 4 + self.len)
    }
}

/// The complete records after the header, in order (stopping at anything incomplete).
fn records(file: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = HEADER;
    while at + 8 <= file.len() {
        let len = u32_at(file, at) as usize;
        if len == 0 || at + 8 + len > file.len() {
            break;
        }
        out.push(Record { offset: at, len });
        at += 8 + len;
    }
    out
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The file name of `path`, as the broker's messages should name it.
fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The log lines at level `warning` that mention `what`.
fn warnings_about(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" warning ") && l.contains(what))
        .map(str::to_string)
        .collect()
}

/// The broker's log once a line holding every string of `needles` has appeared in it (the log
/// is copied from the broker's stderr by a thread, so a line written before the port line may
/// show a moment later), or the log as it is after `REPLY_DEADLINE`.
fn log_with(broker: &TestBroker, needles: &[&str]) -> String {
    let has = |log: &str| log.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    wait_until(REPLY_DEADLINE, || has(&broker.log()));
    broker.log()
}

/// Whether `text` mentions `offset` in decimal or hex.
fn mentions_offset(text: &str, offset: usize) -> bool {
    text.contains(&offset.to_string())
        || text.contains(&format!("{offset:#x}"))
        || text.contains(&format!("{offset:x}"))
}

// ---- 1. configuration ---------------------------------------------------------------------

/// Declares the configuration of the topology tests on `broker`: a durable fanout `st.alt`, a
/// durable topic `st.topic` with `alternate-exchange: st.alt`, a durable queue `st.q` with
/// arguments bound to `st.topic` by `a.#` (and `b.*`, then unbound), `st.alt-q` bound to
/// `st.alt`, a durable headers exchange `st.hdr` bound to `st.hq` with arguments (`x-match
/// all`, `color red`), a durable queue `st.gone` deleted again, and the things that must not
/// survive: a non-durable queue, a non-durable exchange, an exclusive durable queue. Returns
/// the connection (which holds the exclusive queue; keep it open until the broker stops).
async fn declare_topology(broker: &TestBroker) -> Connection {
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_exchange(
        &ch,
        "st.alt",
        ExchangeKind::Fanout,
        true,
        FieldTable::default(),
    )
    .await;
    declare_exchange(
        &ch,
        "st.topic",
        ExchangeKind::Topic,
        true,
        table(&[("alternate-exchange", text("st.alt"))]),
    )
    .await;
    declare_durable(&ch, "st.q", queue_args()).await;
    declare_durable(&ch, "st.alt-q", FieldTable::default()).await;
    bind(&ch, "st.q", "st.topic", "a.#").await;
    bind(&ch, "st.q", "st.topic", "b.*").await;
    bind(&ch, "st.alt-q", "st.alt", "").await;
    within(
        "queue.unbind",
        ch.queue_unbind(
            "st.q".into(),
            "st.topic".into(),
            "b.*".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind b.*");
    // A binding with arguments: a durable headers exchange matching `color = red`.
    declare_exchange(
        &ch,
        "st.hdr",
        ExchangeKind::Headers,
        true,
        FieldTable::default(),
    )
    .await;
    declare_durable(&ch, "st.hq", FieldTable::default()).await;
    within(
        "queue.bind",
        ch.queue_bind(
            "st.hq".into(),
            "st.hdr".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", text("all")), ("color", text("red"))]),
        ),
    )
    .await
    .expect("bind with arguments");
    declare_durable(&ch, "st.gone", FieldTable::default()).await;
    within(
        "queue.delete",
        ch.queue_delete("st.gone".into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete st.gone");
    try_declare(
        &ch,
        "st.plain",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare a non-durable queue");
    declare_exchange(
        &ch,
        "st.plain-x",
        ExchangeKind::Direct,
        false,
        FieldTable::default(),
    )
    .await;
    try_declare(
        &ch,
        "st.excl",
        QueueDeclareOptions {
            durable: true,
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare an exclusive durable queue");
    conn
}

fn queue_args() -> FieldTable {
    table(&[("x-max-length", long(3)), ("x-message-ttl", long(600_000))])
}

/// Checks, on a restarted broker, what `declare_topology` left.
async fn check_topology(broker: &TestBroker) {
    let conn = broker.connect().await;
    // The durable objects are there, the others are not.
    assert!(
        exchange_exists(&conn, "st.topic").await,
        "durable topic lost"
    );
    assert!(
        exchange_exists(&conn, "st.alt").await,
        "durable fanout lost"
    );
    assert!(queue_exists(&conn, "st.q").await, "durable queue lost");
    assert!(queue_exists(&conn, "st.alt-q").await, "durable queue lost");
    assert!(
        !queue_exists(&conn, "st.gone").await,
        "a deleted durable queue came back"
    );
    assert!(
        !queue_exists(&conn, "st.plain").await,
        "a non-durable queue survived"
    );
    assert!(
        !queue_exists(&conn, "st.excl").await,
        "an exclusive durable queue survived"
    );
    assert!(
        !exchange_exists(&conn, "st.plain-x").await,
        "a non-durable exchange survived"
    );

    // The queue's arguments: the same redeclare is accepted, a different one is 406.
    let ch = channel(&conn).await;
    try_declare(&ch, "st.q", durable(), queue_args())
        .await
        .expect("a redeclare with the same arguments must be accepted");
    let other = channel(&conn).await;
    expect_code(
        try_declare(
            &other,
            "st.q",
            durable(),
            table(&[("x-max-length", long(5)), ("x-message-ttl", long(600_000))]),
        )
        .await,
        406,
    );

    // The exchange kept its type and arguments: the same redeclare is accepted, another type
    // is 406.
    declare_exchange(
        &ch,
        "st.topic",
        ExchangeKind::Topic,
        true,
        table(&[("alternate-exchange", text("st.alt"))]),
    )
    .await;
    let other = channel(&conn).await;
    expect_code(
        within(
            "exchange.declare",
            other.exchange_declare(
                "st.topic".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                table(&[("alternate-exchange", text("st.alt"))]),
            ),
        )
        .await,
        406,
    );

    // The exchange is still a topic exchange, the binding `a.#` routes, the unbound `b.*` does
    // not (so the message goes to the alternate exchange), and x-max-length 3 still holds.
    let ch = confirming(&conn).await;
    for key in ["a.one", "a.two.three", "b.x"] {
        publish_confirmed(&ch, "st.topic", key, key.as_bytes(), persistent()).await;
    }
    assert_eq!(
        bodies_of(&take_all(&ch, "st.q").await),
        ["a.one", "a.two.three"],
        "st.q must get exactly what `a.#` matches"
    );
    assert_eq!(
        bodies_of(&take_all(&ch, "st.alt-q").await),
        ["b.x"],
        "the unbound key must reach the alternate exchange"
    );
    for i in 0..5 {
        publish_confirmed(
            &ch,
            "st.topic",
            "a.n",
            format!("n{i}").as_bytes(),
            persistent(),
        )
        .await;
    }
    assert_eq!(
        count(&conn, "st.q").await,
        3,
        "x-max-length 3 must still hold"
    );
    // The headers binding kept its arguments.
    for color in ["blue", "red"] {
        let mut h = FieldTable::default();
        h.insert("color".into(), text(color));
        publish_confirmed(
            &ch,
            "st.hdr",
            "",
            color.as_bytes(),
            persistent().with_headers(h),
        )
        .await;
    }
    assert_eq!(
        bodies_of(&take_all(&ch, "st.hq").await),
        ["red"],
        "the headers binding must still match on its arguments"
    );
    let _ = conn.close(200, "".into()).await;
}

async fn topology_survives(how: Down) {
    let dir = TempDir::new("store-topology");
    let broker = broker_on(dir.path(), &[]);
    let conn = declare_topology(&broker).await;
    bring_down(broker, how);
    drop(conn);
    let broker = broker_on(dir.path(), &[]);
    check_topology(&broker).await;
}

/// Durable exchanges (a topic with an alternate exchange, a headers exchange), a durable queue
/// with arguments and bindings (one with arguments) survive a SIGTERM restart; the unbind and
/// the delete stick; a non-durable queue, a non-durable exchange and an exclusive durable queue
/// are gone; the same arguments redeclare fine and different ones (or another exchange type)
/// get 406.
#[tokio::test(flavor = "multi_thread")]
async fn durable_topology_survives_a_clean_restart() {
    topology_survives(Down::Clean).await;
}

/// The same as `durable_topology_survives_a_clean_restart` after a kill -9: configuration is
/// synced before declare-ok/bind-ok.
#[tokio::test(flavor = "multi_thread")]
async fn durable_topology_survives_a_kill() {
    topology_survives(Down::Kill).await;
}

// ---- 2. messages --------------------------------------------------------------------------

/// The properties of persistent message `i` (all kinds of property, headers of several types).
fn rich_properties(i: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("index".into(), AMQPValue::LongInt(i as i32));
    headers.insert("text".into(), text(&format!("héllo {i}")));
    headers.insert("flag".into(), AMQPValue::Boolean(i.is_multiple_of(2)));
    let mut inner = FieldTable::default();
    inner.insert("nested".into(), long(1 << 40));
    headers.insert("table".into(), AMQPValue::FieldTable(inner));
    persistent()
        .with_content_type("application/x-test".into())
        .with_content_encoding("binary".into())
        .with_headers(headers)
        .with_priority(3)
        .with_correlation_id(format!("corr-{i}").into())
        .with_reply_to("replies".into())
        .with_message_id(format!("id-{i}").into())
        .with_timestamp(1_700_000_000 + i as u64)
        .with_type("kind".into())
        .with_app_id("store-test".into())
}

async fn persistent_messages_survive(how: Down) {
    let dir = TempDir::new("store-messages");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.msgs", FieldTable::default()).await;
    bind(&ch, "st.msgs", "amq.direct", "via-direct").await;
    try_declare(
        &ch,
        "st.nd",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare a non-durable queue");
    // Persistent messages alternate between the default exchange and amq.direct, with a
    // transient one after each.
    let mut expected = Vec::new();
    for i in 0..10 {
        let (exchange, key) = if i % 2 == 0 {
            ("", "st.msgs")
        } else {
            ("amq.direct", "via-direct")
        };
        let body = format!("persistent {i}").into_bytes();
        publish_confirmed(&ch, exchange, key, &body, rich_properties(i)).await;
        expected.push((exchange, key, body, rich_properties(i)));
        publish_confirmed(
            &ch,
            "",
            "st.msgs",
            format!("transient {i}").as_bytes(),
            transient(),
        )
        .await;
        publish_confirmed(&ch, "", "st.nd", b"on a non-durable queue", persistent()).await;
    }
    // A transient message with no delivery mode at all (the default is transient).
    publish_confirmed(&ch, "", "st.msgs", b"no mode", BasicProperties::default()).await;
    assert_eq!(count(&conn, "st.msgs").await, 21);
    bring_down(broker, how);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert!(
        !queue_exists(&conn, "st.nd").await,
        "the non-durable queue (and its messages) must be gone"
    );
    let got = take_all(&ch, "st.msgs").await;
    assert_eq!(
        bodies_of(&got),
        (0..10)
            .map(|i| format!("persistent {i}"))
            .collect::<Vec<_>>(),
        "exactly the persistent messages, in order"
    );
    for (d, (exchange, key, body, props)) in got.iter().zip(&expected) {
        assert_eq!(&d.data, body);
        assert_eq!(d.exchange.as_str(), *exchange, "exchange of {body:?}");
        assert_eq!(d.routing_key.as_str(), *key, "routing key of {body:?}");
        assert_eq!(&d.properties, props, "properties of {body:?}");
        assert!(
            d.redelivered,
            "a recovered message must be flagged redelivered"
        );
    }
}

/// Persistent messages (confirmed) on a durable queue survive a SIGTERM restart in order with
/// body, exchange, routing key, headers and properties intact and flagged redelivered;
/// transient messages on the same queue and messages on a non-durable queue do not.
#[tokio::test(flavor = "multi_thread")]
async fn persistent_messages_survive_a_clean_restart() {
    persistent_messages_survive(Down::Clean).await;
}

/// As `persistent_messages_survive_a_clean_restart`, after a kill -9 (confirms mean synced).
#[tokio::test(flavor = "multi_thread")]
async fn persistent_messages_survive_a_kill() {
    persistent_messages_survive(Down::Kill).await;
}

// ---- 3. acked messages --------------------------------------------------------------------

/// 100 persistent messages, 60 consumed and acked, SIGTERM: exactly the other 40 come back, in
/// order (the dequeue records are synced before a clean exit).
#[tokio::test(flavor = "multi_thread")]
async fn acked_messages_never_come_back_after_a_clean_restart() {
    let dir = TempDir::new("store-acked");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.acked", FieldTable::default()).await;
    publish_pipelined(
        &ch,
        (0..100)
            .map(|i| {
                (
                    "st.acked".to_string(),
                    format!("m{i}").into_bytes(),
                    persistent(),
                )
            })
            .collect(),
    )
    .await;
    let consumer_ch = channel(&conn).await;
    for i in 0..60 {
        let m = get(&consumer_ch, "st.acked", false)
            .await
            .expect("a message to consume");
        assert_eq!(m.delivery.data, format!("m{i}").into_bytes());
        within("basic.ack", m.delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    // A synchronous request on the same channel: the broker has processed the acks before it.
    try_declare(
        &consumer_ch,
        "st.acked",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    within("connection.close", conn.close(200, "".into()))
        .await
        .expect("close");
    let watcher = broker.connect().await;
    assert_eq!(
        count(&watcher, "st.acked").await,
        40,
        "60 acked, 40 left (a requeued ack would show here)"
    );
    bring_down(broker, Down::Clean);
    drop(watcher);

    let broker = broker_on(dir.path(), &[]);
    assert_eq!(
        drain_bodies(&broker, "st.acked").await,
        (60..100).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

// ---- 4. volume ----------------------------------------------------------------------------

/// 200 durable queues × 5 persistent messages, and bodies of 1 MiB and 3 MiB (8 and 24 times the
/// default frame-max of 128 KiB), survive a kill -9 byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn many_queues_and_large_messages_survive_a_kill() {
    let dir = TempDir::new("store-volume");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let queues: Vec<String> = (0..200).map(|q| format!("st.many.{q:03}")).collect();
    for q in &queues {
        declare_durable(&ch, q, FieldTable::default()).await;
    }
    let body = |q: usize, m: usize| pattern(100 + (q * 37 + m * 101) % 3000, (q * 5 + m) as u32);
    let mut messages = Vec::new();
    for m in 0..5 {
        for (q, name) in queues.iter().enumerate() {
            messages.push((name.clone(), body(q, m), persistent()));
        }
    }
    publish_pipelined(&ch, messages).await;
    declare_durable(&ch, "st.big", FieldTable::default()).await;
    let big = [
        pattern(1 << 20, 7),
        pattern(3 << 20, 8),
        pattern(1 << 20, 9),
    ];
    for b in &big {
        publish_confirmed(&ch, "", "st.big", b, persistent()).await;
    }
    bring_down(broker, Down::Kill);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    for (q, name) in queues.iter().enumerate() {
        let got = take_all(&ch, name).await;
        assert_eq!(got.len(), 5, "queue {name} must hold its 5 messages");
        for (m, d) in got.iter().enumerate() {
            assert!(
                d.data == body(q, m),
                "queue {name} message {m} differs ({} bytes, expected {})",
                d.data.len(),
                body(q, m).len()
            );
        }
    }
    let got = within_for(SLOW, "the large messages", take_all(&ch, "st.big")).await;
    assert_eq!(got.len(), big.len(), "every large message must come back");
    for (i, (d, b)) in got.iter().zip(&big).enumerate() {
        assert!(
            d.data == *b,
            "large message {i} differs ({} bytes, expected {})",
            d.data.len(),
            b.len()
        );
    }
}

// ---- 5. priorities and TTLs ---------------------------------------------------------------

/// A priority queue (x-max-priority 10) restarted delivers its recovered messages in priority
/// order (FIFO within a priority).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_priority_queue_delivers_in_priority_order() {
    let dir = TempDir::new("store-priority");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let args = table(&[("x-max-priority", long(10))]);
    declare_durable(&ch, "st.prio", args.clone()).await;
    for (i, p) in [1u8, 5, 9, 0, 5, 3, 10].iter().enumerate() {
        publish_confirmed(
            &ch,
            "",
            "st.prio",
            format!("p{p}-{i}").as_bytes(),
            persistent().with_priority(*p),
        )
        .await;
    }
    bring_down(broker, Down::Clean);
    drop(conn);
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    try_declare(&ch, "st.prio", durable(), args)
        .await
        .expect("the priority queue keeps its x-max-priority");
    assert_eq!(
        bodies_of(&take_all(&ch, "st.prio").await),
        ["p10-6", "p9-2", "p5-1", "p5-4", "p3-5", "p1-0", "p0-3"]
    );
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
}

/// Messages whose TTL (queue `x-message-ttl` 1500 ms, or per-message `expiration` 1500) ends
/// while the broker is down are not there after the restart; a queue without TTL, and a message
/// without expiration on the same queue, keep theirs.
#[tokio::test(flavor = "multi_thread")]
async fn messages_that_expire_while_the_broker_is_down_are_dropped() {
    let dir = TempDir::new("store-ttl");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.ttl", table(&[("x-message-ttl", long(1500))])).await;
    declare_durable(&ch, "st.keep", FieldTable::default()).await;
    declare_durable(&ch, "st.exp", FieldTable::default()).await;
    for i in 0..5 {
        let body = format!("m{i}");
        publish_confirmed(&ch, "", "st.ttl", body.as_bytes(), persistent()).await;
        publish_confirmed(&ch, "", "st.keep", body.as_bytes(), persistent()).await;
        publish_confirmed(
            &ch,
            "",
            "st.exp",
            format!("short {i}").as_bytes(),
            persistent().with_expiration("1500".into()),
        )
        .await;
    }
    publish_confirmed(&ch, "", "st.exp", b"no expiration", persistent()).await;
    let last_publish = unix_millis();
    // Still live when the broker stops: what is tested is expiry while it is down.
    assert_eq!(count(&conn, "st.ttl").await, 5, "the TTL ended too early");
    assert_eq!(
        count(&conn, "st.exp").await,
        6,
        "the expiration ended too early"
    );
    bring_down(broker, Down::Clean);
    drop(conn);
    let expired = wait_until(Duration::from_secs(10), || {
        unix_millis() > last_publish + 1500 + 300
    });
    assert!(expired, "the clock did not move");

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_eq!(
        count(&conn, "st.ttl").await,
        0,
        "expired messages came back"
    );
    assert!(take_all(&ch, "st.ttl").await.is_empty());
    assert_eq!(
        bodies_of(&take_all(&ch, "st.keep").await),
        ["m0", "m1", "m2", "m3", "m4"]
    );
    assert_eq!(bodies_of(&take_all(&ch, "st.exp").await), ["no expiration"]);
}

// ---- journal format -----------------------------------------------------------------------

/// The journal files follow section 2: headers (magic, version 1, segment number), records
/// framed with a length and a valid CRC-32 to the end of the file, an enqueue record holding
/// the message as received, and JSON configuration records.
#[tokio::test(flavor = "multi_thread")]
async fn the_journal_files_follow_the_documented_format() {
    let dir = TempDir::new("store-format");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.fmt", FieldTable::default()).await;
    bind(&ch, "st.fmt", "amq.topic", "fmt.#").await;
    publish_confirmed(&ch, "amq.topic", "fmt.one", b"first body", persistent()).await;
    publish_confirmed(&ch, "", "st.fmt", b"second body", persistent()).await;
    // Neither a transient message on the durable queue nor a persistent one on a non-durable
    // queue is written.
    publish_confirmed(&ch, "", "st.fmt", b"transient body", transient()).await;
    try_declare(
        &ch,
        "st.fmt-nd",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare a non-durable queue");
    publish_confirmed(&ch, "", "st.fmt-nd", b"non-durable body", persistent()).await;
    bring_down(broker, Down::Kill);
    drop(conn);

    for (n, path) in segments(dir.path()) {
        let file = read(&path);
        assert!(
            file.len() >= HEADER,
            "{} is shorter than a header",
            path.display()
        );
        assert_eq!(&file[0..8], b"QPIDDMSG", "magic of {}", path.display());
        assert_eq!(u32_at(&file, 8), 1, "version of {}", path.display());
        assert_eq!(u32_at(&file, 12), 0, "reserved of {}", path.display());
        assert_eq!(u64_at(&file, 16), n, "segment number of {}", path.display());
    }
    let seg = newest_segment_with(dir.path(), 2);
    let file = read(&seg);
    let recs = records(&file);
    assert_eq!(
        recs.last().unwrap().end(),
        file.len(),
        "records run to the end"
    );
    assert!(recs.iter().all(|r| r.crc_ok(&file)), "every CRC must check");
    let enqueues: Vec<&[u8]> = recs
        .iter()
        .filter(|r| r.kind(&file) == 1)
        .map(|r| r.payload(&file))
        .collect();
    assert_eq!(
        enqueues.len(),
        2,
        "exactly the two persistent messages on the durable queue are written"
    );
    let mut ids = Vec::new();
    for (p, (exchange, key, body)) in enqueues.iter().zip([
        ("amq.topic", "fmt.one", &b"first body"[..]),
        ("", "st.fmt", &b"second body"[..]),
    ]) {
        ids.push(u64_at(p, 8));
        assert_eq!(u64_at(p, 16), 0, "no TTL: expires 0");
        let (el, kl, pl) = (p[24] as usize, p[25] as usize, u32_at(p, 26) as usize);
        let rest = &p[30..];
        assert_eq!(&rest[..el], exchange.as_bytes());
        assert_eq!(&rest[el..el + kl], key.as_bytes());
        assert!(pl >= 2, "the property flags at least");
        assert_eq!(&rest[el + kl + pl..], body);
    }
    assert_eq!(
        u64_at(enqueues[0], 0),
        u64_at(enqueues[1], 0),
        "one queue key"
    );
    assert!(ids[0] < ids[1], "ids grow within a queue: {ids:?}");

    let cfg = read(&config_file(dir.path()));
    assert_eq!(&cfg[0..8], b"QPIDDCFG");
    assert_eq!(u32_at(&cfg, 8), 1);
    assert_eq!(u64_at(&cfg, 16), 0);
    let recs = records(&cfg);
    assert_eq!(recs.last().map_or(HEADER, Record::end), cfg.len());
    let mut saw_queue = false;
    let mut saw_bind = false;
    for r in &recs {
        assert!(
            r.crc_ok(&cfg),
            "config record at {} has a bad CRC",
            r.offset
        );
        let json: serde_json::Value = serde_json::from_slice(r.payload(&cfg))
            .unwrap_or_else(|e| panic!("config record at {} is not JSON: {e}", r.offset));
        match r.kind(&cfg) {
            16 => {
                assert_ne!(
                    json["name"], "st.fmt-nd",
                    "a non-durable queue is never written"
                );
                if json["name"] != "st.fmt" {
                    continue;
                }
                saw_queue = true;
                assert_eq!(json["durable"], true, "{json}");
                assert_eq!(json["key"].as_u64(), Some(u64_at(enqueues[0], 0)), "{json}");
            }
            20 if json["queue"] == "st.fmt" => {
                saw_bind = true;
                assert_eq!(json["exchange"], "amq.topic", "{json}");
                assert_eq!(json["key"], "fmt.#", "{json}");
            }
            17..=21 => {}
            other => panic!("unknown config record type {other}"),
        }
    }
    assert!(saw_queue && saw_bind, "queue and bind records of st.fmt");
}

// ---- 6. torn tails ------------------------------------------------------------------------

/// Publishes `n` confirmed persistent messages `m0..` to a new durable queue `st.torn` on a
/// broker over `dir` (which also declares a durable queue `st.other`, so that `config.jnl` holds
/// at least two records), then kills it.
async fn confirmed_then_killed(dir: &Path, n: usize) {
    let broker = broker_on(dir, &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.torn", FieldTable::default()).await;
    declare_durable(&ch, "st.other", FieldTable::default()).await;
    for i in 0..n {
        publish_confirmed(&ch, "", "st.torn", format!("m{i}").as_bytes(), persistent()).await;
    }
    bring_down(broker, Down::Kill);
    drop(conn);
}

/// A partial record at the end of the newest segment holding records (a length of 1000 and 10
/// bytes) is dropped with a warning naming the file and offset, the file is truncated there, and
/// every confirmed message is there. The segment the writer created ahead of need (header only)
/// follows it, and a temporary file left by an interrupted creation of the one after is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_partial_record_at_the_tail_is_dropped_with_a_warning() {
    let dir = TempDir::new("store-torn");
    confirmed_then_killed(dir.path(), 20).await;
    let seg = newest_segment(dir.path());
    let all = segments(dir.path());
    let (ahead_n, ahead) = all.last().cloned().expect("segments");
    assert_ne!(
        ahead, seg,
        "the segment created ahead must follow the newest one with records: {all:?}"
    );
    assert_eq!(
        read(&ahead).len(),
        HEADER,
        "{} holds only its header",
        ahead.display()
    );
    let half_created = store_dir(dir.path()).join(format!("msg-{:016x}.jnl.tmp", ahead_n + 1));
    write(&half_created, &[0u8; 10]);
    let mut file = read(&seg);
    let good_len = file.len();
    assert_eq!(
        records(&file).last().map_or(HEADER, Record::end),
        good_len,
        "the segment must end with a whole record before the test tears it"
    );
    file.extend_from_slice(&1000u32.to_le_bytes());
    file.extend_from_slice(&[0xAB; 10]);
    write(&seg, &file);

    let broker = broker_on(dir.path(), &[]);
    let log = log_with(&broker, &[" warning ", &file_name(&seg)]);
    let warned = warnings_about(&log, &file_name(&seg));
    assert!(
        !warned.is_empty(),
        "no warning naming {} in the log:\n{log}",
        file_name(&seg)
    );
    assert!(
        warned.iter().any(|l| mentions_offset(l, good_len)),
        "the warning must name the offset {good_len}: {warned:?}"
    );
    assert_eq!(
        std::fs::metadata(&seg).map(|m| m.len()).ok(),
        Some(good_len as u64),
        "the torn record must be truncated away"
    );
    assert!(
        !half_created.exists(),
        "{} must be removed at the start",
        half_created.display()
    );
    assert_eq!(
        drain_bodies(&broker, "st.torn").await,
        (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

/// A complete last record whose CRC fails is dropped with a warning naming the file; the
/// records before it are kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_last_record_with_a_bad_crc_is_dropped_and_earlier_ones_kept() {
    let dir = TempDir::new("store-badcrc");
    confirmed_then_killed(dir.path(), 20).await;
    let seg = newest_segment(dir.path());
    let mut file = read(&seg);
    let recs = records(&file);
    let last = *recs.last().expect("records in the newest segment");
    assert_eq!(
        last.end(),
        file.len(),
        "the segment must end with a whole record"
    );
    assert!(
        last.crc_ok(&file),
        "the last record must be sound before the test"
    );
    // The last payload byte: the last byte of the body "m19".
    file[last.offset + 4 + last.len - 1] ^= 0x01;
    write(&seg, &file);

    let broker = broker_on(dir.path(), &[]);
    let log = log_with(&broker, &[" warning ", &file_name(&seg)]);
    let warned = warnings_about(&log, &file_name(&seg));
    assert!(
        !warned.is_empty(),
        "no warning naming {} in the log:\n{log}",
        file_name(&seg)
    );
    assert!(
        warned.iter().any(|l| mentions_offset(l, last.offset)),
        "the warning must name the offset {}: {warned:?}",
        last.offset
    );
    assert_eq!(
        std::fs::metadata(&seg).map(|m| m.len()).ok(),
        Some(last.offset as u64),
        "the record with the bad CRC must be truncated away"
    );
    assert_eq!(
        drain_bodies(&broker, "st.torn").await,
        (0..19).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

/// A bad CRC in the last record of an older segment is not a torn tail (only the newest
/// segment can have one): the start is refused with status 1 and an error naming that file.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_last_record_in_an_older_segment_refuses_the_start() {
    let dir = TempDir::new("store-older");
    // Two runs: every start-up begins a new segment, so the first run's records end up in an
    // older segment.
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.older", FieldTable::default()).await;
    for i in 0..5 {
        publish_confirmed(
            &ch,
            "",
            "st.older",
            format!("m{i}").as_bytes(),
            persistent(),
        )
        .await;
    }
    bring_down(broker, Down::Clean);
    drop(conn);
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    for i in 5..10 {
        publish_confirmed(
            &ch,
            "",
            "st.older",
            format!("m{i}").as_bytes(),
            persistent(),
        )
        .await;
    }
    bring_down(broker, Down::Kill);
    drop(conn);

    let newest = newest_segment(dir.path());
    let older = segments(dir.path())
        .into_iter()
        .map(|(_, p)| p)
        .find(|p| *p != newest && !records(&read(p)).is_empty())
        .unwrap_or_else(|| panic!("no older segment with records: {:?}", segments(dir.path())));
    let mut file = read(&older);
    let last = *records(&file).last().unwrap();
    assert_eq!(
        last.end(),
        file.len(),
        "the older segment must end with a whole record"
    );
    file[last.offset + 4 + last.len - 1] ^= 0x01;
    write(&older, &file);

    let (code, out) = refused_start(dir.path(), &[]);
    assert_eq!(
        code,
        Some(1),
        "the start must be refused with status 1:\n{out}"
    );
    let name = file_name(&older);
    assert!(
        out.lines()
            .any(|l| l.contains(&name) && mentions_offset(l, last.offset)),
        "the error must name {name} and the offset {}:\n{out}",
        last.offset
    );
    assert_eq!(
        read(&older),
        file,
        "a refused start must not touch the segment"
    );
}

// ---- 7. damage and versions ---------------------------------------------------------------

/// A bad CRC in the first record of a segment with more records refuses the start (status 1,
/// an error naming the file and offset); `--store-skip-damaged yes` starts, logs the damage,
/// and loses the records after it in that file.
#[tokio::test(flavor = "multi_thread")]
async fn damage_in_the_middle_refuses_the_start_unless_skipped() {
    let dir = TempDir::new("store-damage");
    confirmed_then_killed(dir.path(), 10).await;
    let seg = newest_segment_with(dir.path(), 2);
    let mut file = read(&seg);
    let first = records(&file)[0];
    assert_eq!(first.offset, HEADER);
    // A byte in the middle of its payload (not its length, not its type).
    file[first.offset + 5 + (first.len - 1) / 2] ^= 0xFF;
    write(&seg, &file);

    let (code, out) = refused_start(dir.path(), &[]);
    assert_eq!(
        code,
        Some(1),
        "the start must be refused with status 1:\n{out}"
    );
    let name = file_name(&seg);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(&name)).collect();
    assert!(!lines.is_empty(), "the error must name {name}:\n{out}");
    assert!(
        lines.iter().any(|l| mentions_offset(l, first.offset)),
        "the error must name the offset {}: {lines:?}",
        first.offset
    );
    assert_eq!(
        read(&seg),
        file,
        "a refused start must not touch the segment"
    );

    let broker = broker_on(dir.path(), &["--store-skip-damaged", "yes"]);
    let log = log_with(&broker, &[&name]);
    assert!(
        log.lines().any(|l| l.contains(&name)),
        "the skipped damage must be logged:\n{log}"
    );
    let conn = broker.connect().await;
    assert_eq!(
        count(&conn, "st.torn").await,
        0,
        "the records after the damaged one in that file are lost"
    );
}

/// A `config.jnl` or a segment whose header says format version 2 refuses the start with a
/// message naming the file and both versions; with the versions put back, the broker starts and
/// has lost nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_format_version_refuses_the_start() {
    let dir = TempDir::new("store-version");
    confirmed_then_killed(dir.path(), 3).await;
    let cfg = config_file(dir.path());
    let seg = newest_segment(dir.path());
    for path in [&cfg, &seg] {
        let original = read(path);
        assert_eq!(u32_at(&original, 8), 1, "version of {}", path.display());
        let mut patched = original.clone();
        patched[8..12].copy_from_slice(&2u32.to_le_bytes());
        write(path, &patched);
        let (code, out) = refused_start(dir.path(), &[]);
        assert!(
            code.is_some() && code != Some(0),
            "a newer version must refuse the start, got {code:?}:\n{out}"
        );
        let name = file_name(path);
        assert!(
            out.lines()
                .any(|l| l.contains(&name) && l.contains("version 2") && l.contains("(1)")),
            "the error must name {name}, version 2 and this broker's (1):\n{out}"
        );
        write(path, &original);
    }
    let broker = broker_on(dir.path(), &[]);
    assert_eq!(drain_bodies(&broker, "st.torn").await, ["m0", "m1", "m2"]);
}

// ---- 8. space -----------------------------------------------------------------------------

/// With `--store-segment-size 1MiB`, ~20 MiB of persistent 4 KiB messages take more than 10 MiB
/// of segments; once everything is consumed and acked, the segments are deleted while the broker
/// runs, down to less than 3 MiB within 20 s.
#[tokio::test(flavor = "multi_thread")]
async fn consumed_segments_are_deleted_while_running() {
    let dir = TempDir::new("store-space");
    let mut broker = broker_on(dir.path(), &["--store-segment-size", "1MiB"]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.space", FieldTable::default()).await;
    let total = 5120;
    for batch in 0..(total / 512) {
        publish_pipelined(
            &ch,
            (0..512)
                .map(|i| {
                    (
                        "st.space".to_string(),
                        pattern(4096, (batch * 512 + i) as u32),
                        persistent(),
                    )
                })
                .collect(),
        )
        .await;
    }
    let written = segments_size(dir.path());
    assert!(
        written > 10 << 20,
        "20 MiB of persistent messages must take more than 10 MiB of segments, got {written}"
    );
    assert!(
        segments(dir.path()).len() >= 10,
        "1 MiB segments: {:?}",
        segments(dir.path())
    );

    let consumer_ch = channel(&conn).await;
    within(
        "basic.qos",
        consumer_ch.basic_qos(500, BasicQosOptions::default()),
    )
    .await
    .expect("basic.qos");
    let mut consumer = within(
        "basic.consume",
        consumer_ch.basic_consume(
            "st.space".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");
    for _ in 0..total {
        let d = integration_tests::next_delivery(&mut consumer).await;
        within("basic.ack", d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    let start = Instant::now();
    let emptied = eventually(Duration::from_secs(20), || async {
        count(&conn, "st.space").await == 0 && segments_size(dir.path()) < 3 << 20
    })
    .await;
    assert!(
        emptied,
        "after {:?} the segments still take {} bytes: {:?}",
        start.elapsed(),
        segments_size(dir.path()),
        segments(dir.path())
    );
    broker.assert_alive();
    // What was consumed stays consumed once its segments are gone.
    drop(consumer);
    drop(conn);
    bring_down(broker, Down::Clean);
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    assert_eq!(
        count(&conn, "st.space").await,
        0,
        "consumed messages came back"
    );
}

/// A message left at the head of the journal does not pin what comes after it: with 1 MiB
/// segments, one persistent message on `st.pin` published first and never consumed, then about
/// 20 MiB through `st.flow`, all consumed: the segments after the first are deleted while the
/// broker runs (under 3 MiB remain), and after a kill -9 the pinned message is back and nothing
/// consumed from `st.flow` is (their dequeue records were kept as long as their enqueues were).
#[tokio::test(flavor = "multi_thread")]
async fn a_message_left_at_the_head_does_not_pin_later_segments() {
    let dir = TempDir::new("store-pin");
    let broker = broker_on(dir.path(), &["--store-segment-size", "1MiB"]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.pin", FieldTable::default()).await;
    declare_durable(&ch, "st.flow", FieldTable::default()).await;
    publish_pipelined(
        &ch,
        vec![("st.pin".to_string(), b"pinned".to_vec(), persistent())],
    )
    .await;
    let total = 5120;
    let consumer_ch = channel(&conn).await;
    within(
        "basic.qos",
        consumer_ch.basic_qos(500, BasicQosOptions::default()),
    )
    .await
    .expect("basic.qos");
    let mut consumer = within(
        "basic.consume",
        consumer_ch.basic_consume(
            "st.flow".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume");
    for batch in 0..(total / 512) {
        publish_pipelined(
            &ch,
            (0..512)
                .map(|i| {
                    (
                        "st.flow".to_string(),
                        pattern(4096, (batch * 512 + i) as u32),
                        persistent(),
                    )
                })
                .collect(),
        )
        .await;
        for _ in 0..512 {
            let d = integration_tests::next_delivery(&mut consumer).await;
            within("basic.ack", d.ack(BasicAckOptions::default()))
                .await
                .expect("ack");
        }
    }
    let emptied = eventually(Duration::from_secs(20), || async {
        count(&conn, "st.flow").await == 0 && segments_size(dir.path()) < 3 << 20
    })
    .await;
    assert!(
        emptied,
        "the segments still take {} bytes: {:?}",
        segments_size(dir.path()),
        segments(dir.path())
    );
    assert_eq!(count(&conn, "st.pin").await, 1);
    drop(consumer);
    drop(conn);
    bring_down(broker, Down::Kill);
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    assert_eq!(
        count(&conn, "st.flow").await,
        0,
        "consumed messages came back"
    );
    let pinned = take_all(&channel(&conn).await, "st.pin").await;
    assert_eq!(pinned.len(), 1);
    assert_eq!(pinned[0].data, b"pinned");
}

// ---- more of the spec ---------------------------------------------------------------------

/// Every way a message leaves a durable queue for good sticks across a clean restart: an ack of
/// a message recovered by an earlier restart (its enqueue is in an older segment), a reject
/// without requeue, a purge, and a drop by `x-max-length`.
#[tokio::test(flavor = "multi_thread")]
async fn every_dequeue_sticks_across_clean_restarts() {
    let dir = TempDir::new("store-dequeues");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.acks", FieldTable::default()).await;
    declare_durable(&ch, "st.rejects", FieldTable::default()).await;
    declare_durable(&ch, "st.purged", FieldTable::default()).await;
    declare_durable(&ch, "st.limited", table(&[("x-max-length", long(3))])).await;
    for i in 0..10 {
        let body = format!("m{i}");
        for q in ["st.acks", "st.rejects", "st.purged", "st.limited"] {
            publish_confirmed(&ch, "", q, body.as_bytes(), persistent()).await;
        }
    }
    bring_down(broker, Down::Clean);
    drop(conn);

    // Second run: everything is recovered (from the first run's segment); dequeue some.
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_eq!(count(&conn, "st.acks").await, 10);
    assert_eq!(count(&conn, "st.limited").await, 3);
    for i in 0..4 {
        let m = get(&ch, "st.acks", false)
            .await
            .expect("a recovered message");
        assert_eq!(m.delivery.data, format!("m{i}").into_bytes());
        within("basic.ack", m.delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
        let m = get(&ch, "st.rejects", false)
            .await
            .expect("a recovered message");
        within(
            "basic.reject",
            m.delivery
                .reject(lapin::options::BasicRejectOptions { requeue: false }),
        )
        .await
        .expect("reject");
    }
    within(
        "queue.purge",
        ch.queue_purge("st.purged".into(), Default::default()),
    )
    .await
    .expect("purge");
    let pch = confirming(&conn).await;
    for i in 10..12 {
        publish_confirmed(
            &pch,
            "",
            "st.limited",
            format!("m{i}").as_bytes(),
            persistent(),
        )
        .await;
    }
    // A round trip on the consuming channel: the acks and rejects before it are processed.
    try_declare(
        &ch,
        "st.acks",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    within("connection.close", conn.close(200, "".into()))
        .await
        .expect("close");
    bring_down(broker, Down::Clean);

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let from = |a: usize, b: usize| (a..b).map(|i| format!("m{i}")).collect::<Vec<_>>();
    assert_eq!(bodies_of(&take_all(&ch, "st.acks").await), from(4, 10));
    assert_eq!(bodies_of(&take_all(&ch, "st.rejects").await), from(4, 10));
    assert!(
        take_all(&ch, "st.purged").await.is_empty(),
        "a purge must stick"
    );
    assert_eq!(bodies_of(&take_all(&ch, "st.limited").await), from(9, 12));
}

/// A queue deleted and declared again under the same name is a new queue (a new store key):
/// the old queue's persistent messages, still in the journal, never reach it, after a kill -9.
#[tokio::test(flavor = "multi_thread")]
async fn a_redeclared_queue_never_gets_the_deleted_queues_messages() {
    let dir = TempDir::new("store-rekey");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.again", FieldTable::default()).await;
    publish_confirmed(&ch, "", "st.again", b"old 1", persistent()).await;
    publish_confirmed(&ch, "", "st.again", b"old 2", persistent()).await;
    within(
        "queue.delete",
        ch.queue_delete("st.again".into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete");
    declare_durable(&ch, "st.again", FieldTable::default()).await;
    publish_confirmed(&ch, "", "st.again", b"new", persistent()).await;
    bring_down(broker, Down::Kill);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    assert_eq!(drain_bodies(&broker, "st.again").await, ["new"]);
}

/// A transaction's commit-ok means its persistent messages are on disk: they survive a kill -9
/// right after it, and the messages of a transaction not committed do not appear.
#[tokio::test(flavor = "multi_thread")]
async fn committed_transactions_survive_a_kill() {
    let dir = TempDir::new("store-tx");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_durable(&ch, "st.tx", FieldTable::default()).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");
    for i in 0..5 {
        publish(&ch, "", "st.tx", format!("c{i}").as_bytes(), persistent())
            .await
            .expect("publish");
    }
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    for i in 0..3 {
        publish(&ch, "", "st.tx", format!("u{i}").as_bytes(), persistent())
            .await
            .expect("publish");
    }
    // A round trip: the uncommitted publishes have reached the broker.
    try_declare(
        &ch,
        "st.tx",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    bring_down(broker, Down::Kill);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    assert_eq!(
        drain_bodies(&broker, "st.tx").await,
        ["c0", "c1", "c2", "c3", "c4"]
    );
}

/// A persistent message dead-lettered (rejected without requeue) from one durable queue to
/// another is written for its new queue: after a clean restart it is on the dead-letter queue
/// (with its `x-death` header), not on the original.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_persistent_message_survives_on_its_new_queue() {
    let dir = TempDir::new("store-dlx");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.dlq", FieldTable::default()).await;
    declare_durable(
        &ch,
        "st.src",
        table(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("st.dlq")),
        ]),
    )
    .await;
    publish_confirmed(&ch, "", "st.src", b"doomed", persistent()).await;
    let m = get(&ch, "st.src", false).await.expect("the message");
    within(
        "basic.reject",
        m.delivery
            .reject(lapin::options::BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject");
    let dead_lettered = eventually(REPLY_DEADLINE, || async {
        count(&conn, "st.dlq").await == 1
    })
    .await;
    assert!(dead_lettered, "the reject must dead-letter the message");
    bring_down(broker, Down::Clean);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert!(
        take_all(&ch, "st.src").await.is_empty(),
        "the reject must stick"
    );
    let got = take_all(&ch, "st.dlq").await;
    assert_eq!(bodies_of(&got), ["doomed"]);
    integration_tests::assert_x_death(&got[0].properties, "st.src", "rejected");
}

/// A last-value queue recovered holds only the newest message of each key.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_last_value_queue_keeps_the_last_values() {
    let dir = TempDir::new("store-lvq");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    let args = table(&[("qpid.last_value_queue_key", text("sym"))]);
    declare_durable(&ch, "st.lvq", args).await;
    for (sym, price) in [("A", 1), ("B", 2), ("A", 3), ("C", 4), ("B", 5)] {
        let mut h = FieldTable::default();
        h.insert("sym".into(), text(sym));
        publish_confirmed(
            &ch,
            "",
            "st.lvq",
            format!("{sym}={price}").as_bytes(),
            persistent().with_headers(h),
        )
        .await;
    }
    bring_down(broker, Down::Kill);
    drop(conn);

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut got = bodies_of(&take_all(&ch, "st.lvq").await);
    got.sort();
    assert_eq!(got, ["A=3", "B=5", "C=4"]);
}

/// A torn last record in `config.jnl` (a partial record appended) is dropped with a warning
/// naming the file, and the configuration before it is kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_tail_in_the_configuration_journal_is_dropped() {
    let dir = TempDir::new("store-cfgtorn");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_durable(&ch, "st.cfg1", FieldTable::default()).await;
    declare_durable(&ch, "st.cfg2", FieldTable::default()).await;
    bind(&ch, "st.cfg2", "amq.direct", "k").await;
    bring_down(broker, Down::Kill);
    drop(conn);
    let cfg = config_file(dir.path());
    let mut file = read(&cfg);
    let good_len = file.len();
    file.extend_from_slice(&500u32.to_le_bytes());
    file.extend_from_slice(&[0x10, b'{', b'"']);
    write(&cfg, &file);

    let broker = broker_on(dir.path(), &[]);
    let log = log_with(&broker, &[" warning ", "config.jnl"]);
    let warned = warnings_about(&log, "config.jnl");
    assert!(!warned.is_empty(), "no warning naming config.jnl:\n{log}");
    assert!(
        warned.iter().any(|l| mentions_offset(l, good_len)),
        "the warning must name the offset {good_len}: {warned:?}"
    );
    let conn = broker.connect().await;
    assert!(queue_exists(&conn, "st.cfg1").await);
    assert!(queue_exists(&conn, "st.cfg2").await);
    let ch = confirming(&conn).await;
    publish_confirmed(&ch, "amq.direct", "k", b"routed", persistent()).await;
    assert_eq!(bodies_of(&take_all(&ch, "st.cfg2").await), ["routed"]);
}

/// Rewrites the CRC of the record at `offset` so that only the damage the test means remains.
fn fix_crc(file: &mut [u8], offset: usize) {
    let len = u32_at(file, offset) as usize;
    let crc = crc32(&file[offset..offset + 4 + len]);
    file[offset + 4 + len..offset + 8 + len].copy_from_slice(&crc.to_le_bytes());
}

/// Prepares a store (5 confirmed messages, then a kill -9), applies `damage` to `config.jnl`
/// (`config`) or to the newest segment with at least two records, and asserts the start is
/// refused with status 1, an error naming the file (and `offset`, if given), and the file left
/// as it was.
async fn assert_damage_refuses_the_start(
    what: &str,
    config: bool,
    damage: fn(&mut Vec<u8>),
    offset: Option<usize>,
) {
    let dir = TempDir::new("store-damages");
    confirmed_then_killed(dir.path(), 5).await;
    let path = if config {
        config_file(dir.path())
    } else {
        newest_segment_with(dir.path(), 2)
    };
    let mut file = read(&path);
    assert!(
        records(&file).len() >= 2,
        "{what}: {} must hold at least two records",
        path.display()
    );
    damage(&mut file);
    write(&path, &file);
    let (code, out) = refused_start(dir.path(), &[]);
    assert_eq!(
        code,
        Some(1),
        "{what}: the start must be refused with status 1:\n{out}"
    );
    let name = file_name(&path);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(&name)).collect();
    assert!(
        !lines.is_empty(),
        "{what}: the error must name {name}:\n{out}"
    );
    if let Some(offset) = offset {
        assert!(
            lines.iter().any(|l| mentions_offset(l, offset)),
            "{what}: the error must name the offset {offset}: {lines:?}"
        );
    }
    assert_eq!(
        read(&path),
        file,
        "{what}: a refused start must not touch the file"
    );
}

/// A record of an unknown type (with a valid CRC) first in a segment refuses the start.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_record_type_refuses_the_start() {
    assert_damage_refuses_the_start(
        "an unknown record type",
        false,
        |f| {
            f[HEADER + 4] = 99;
            fix_crc(f, HEADER);
        },
        Some(HEADER),
    )
    .await;
}

/// A first record whose length is above `--max-message-size` + 64 KiB ("a larger L is
/// damage"), followed by more records, refuses the start.
///
/// Ignored: the broker treats it as a torn tail instead. It starts, logs "Store: dropped a torn
/// record at the end of .../msg-0000000000000001.jnl (offset 24: impossible record length
/// 2147483632); its publish was never confirmed", truncates the segment to 24 bytes and
/// recovers 0 of the 5 confirmed messages (store/journal.rs `scan`: any length above the
/// maximum that reaches past the end of the file is "torn", however many valid bytes follow).
#[tokio::test(flavor = "multi_thread")]
async fn an_impossible_record_length_refuses_the_start() {
    assert_damage_refuses_the_start(
        "an impossible length",
        false,
        |f| f[HEADER..HEADER + 4].copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes()),
        Some(HEADER),
    )
    .await;
}

/// A first record whose length is 0 (at least 1 is required), followed by more records,
/// refuses the start.
#[tokio::test(flavor = "multi_thread")]
async fn a_zero_record_length_refuses_the_start() {
    assert_damage_refuses_the_start(
        "a length of 0",
        false,
        |f| f[HEADER..HEADER + 4].copy_from_slice(&0u32.to_le_bytes()),
        Some(HEADER),
    )
    .await;
}

/// A segment whose header has a wrong magic refuses the start.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_segment_header_refuses_the_start() {
    assert_damage_refuses_the_start(
        "a bad segment magic",
        false,
        |f| f[0..8].copy_from_slice(b"QPIDDXXX"),
        None,
    )
    .await;
}

/// A bad CRC in the first of several records of `config.jnl` refuses the start.
#[tokio::test(flavor = "multi_thread")]
async fn damage_in_the_configuration_journal_refuses_the_start() {
    assert_damage_refuses_the_start(
        "a bad CRC in config.jnl's first record",
        true,
        |f| {
            let len = u32_at(f, HEADER) as usize;
            f[HEADER + 4 + len / 2] ^= 0x20;
        },
        Some(HEADER),
    )
    .await;
}

/// A `config.jnl` whose header has a wrong magic refuses the start.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_configuration_header_refuses_the_start() {
    assert_damage_refuses_the_start(
        "a bad config.jnl magic",
        true,
        |f| f[0..8].copy_from_slice(b"QPIDDCFX"),
        None,
    )
    .await;
}

/// Every start-up begins a new segment: after a restart the old segments keep their bytes and
/// new records go to a segment with a higher number.
#[tokio::test(flavor = "multi_thread")]
async fn every_start_begins_a_new_segment() {
    let dir = TempDir::new("store-newseg");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    declare_durable(&ch, "st.seg", FieldTable::default()).await;
    publish_confirmed(&ch, "", "st.seg", b"first run", persistent()).await;
    bring_down(broker, Down::Clean);
    drop(conn);
    let before: Vec<(u64, PathBuf, Vec<u8>)> = segments(dir.path())
        .into_iter()
        .map(|(n, p)| {
            let bytes = read(&p);
            (n, p, bytes)
        })
        .collect();
    let highest_before = before
        .last()
        .map(|s| s.0)
        .expect("a segment after the first run");

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = confirming(&conn).await;
    publish_confirmed(&ch, "", "st.seg", b"second run", persistent()).await;
    bring_down(broker, Down::Kill);
    drop(conn);
    for (_, path, bytes) in &before {
        if path.exists() {
            assert!(
                read(path) == *bytes,
                "{} was written to after the restart",
                path.display()
            );
        }
    }
    let newer: Vec<(u64, PathBuf)> = segments(dir.path())
        .into_iter()
        .filter(|(n, _)| *n > highest_before)
        .collect();
    assert!(
        newer.iter().any(|(_, p)| {
            let file = read(p);
            records(&file)
                .iter()
                .any(|r| r.kind(&file) == 1 && r.payload(&file).ends_with(b"second run"))
        }),
        "the second run's message must be in a segment numbered above {highest_before}: {newer:?}"
    );
    // Recovered queues keep their store key and their ids: the second run's message continues
    // the first run's ids.
    let enqueue_of = |body: &[u8]| -> (u64, u64) {
        for (_, p) in segments(dir.path()) {
            let file = read(&p);
            for r in records(&file) {
                let payload = r.payload(&file);
                if r.kind(&file) == 1 && payload.ends_with(body) {
                    return (u64_at(payload, 0), u64_at(payload, 8));
                }
            }
        }
        panic!("no enqueue record of {body:?}")
    };
    let (first_key, first_id) = enqueue_of(b"first run");
    let (second_key, second_id) = enqueue_of(b"second run");
    assert_eq!(
        first_key, second_key,
        "a recovered queue keeps its store key"
    );
    assert!(
        second_id > first_id,
        "ids continue after a restart: {first_id} then {second_id}"
    );
}

/// The configuration journal is rewritten as a snapshot of the live configuration at start:
/// after queues are declared and deleted, a restart leaves `config.jnl` without delete records
/// and without the deleted queues.
#[tokio::test(flavor = "multi_thread")]
async fn the_configuration_journal_is_a_snapshot_after_a_start() {
    let dir = TempDir::new("store-snapshot");
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    for i in 0..20 {
        let name = format!("st.tmp{i}");
        declare_durable(&ch, &name, FieldTable::default()).await;
        bind(&ch, &name, "amq.direct", &name).await;
        within(
            "queue.delete",
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        .expect("delete");
    }
    declare_durable(&ch, "st.live", FieldTable::default()).await;
    bring_down(broker, Down::Clean);
    drop(conn);
    let journal = read(&config_file(dir.path()));
    assert!(
        records(&journal).iter().any(|r| r.kind(&journal) == 17),
        "before the restart the journal holds the queue-delete records"
    );

    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    assert!(queue_exists(&conn, "st.live").await);
    let snapshot = read(&config_file(dir.path()));
    let recs = records(&snapshot);
    assert_eq!(
        recs.last().map_or(HEADER, Record::end),
        snapshot.len(),
        "the snapshot is whole records"
    );
    let kinds: Vec<u8> = recs.iter().map(|r| r.kind(&snapshot)).collect();
    assert!(
        kinds.iter().all(|k| matches!(k, 16 | 18 | 20)),
        "a snapshot holds only declarations, got types {kinds:?}"
    );
    let queues: Vec<String> = recs
        .iter()
        .filter(|r| r.kind(&snapshot) == 16)
        .map(|r| {
            let json: serde_json::Value =
                serde_json::from_slice(r.payload(&snapshot)).expect("JSON");
            json["name"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(queues, ["st.live"], "only the live queue");
    assert!(
        snapshot.len() < journal.len(),
        "the snapshot ({} bytes) must be smaller than the journal before ({} bytes)",
        snapshot.len(),
        journal.len()
    );
}

/// While running, the configuration journal is rewritten as a snapshot once it has grown past
/// 1 MiB (and twice its last snapshot): declaring and deleting queues with 16 KiB arguments
/// 100 times does not leave a journal of 1.6 MiB, and the live configuration survives a kill.
#[tokio::test(flavor = "multi_thread")]
async fn a_growing_configuration_journal_is_compacted_while_running() {
    let dir = TempDir::new("store-compact");
    let mut broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let padding = "x".repeat(16 * 1024);
    let args = table(&[("x-padding", text(&padding))]);
    declare_durable(&ch, "st.kept", args.clone()).await;
    for i in 0..100 {
        let name = format!("st.churn{i}");
        declare_durable(&ch, &name, args.clone()).await;
        within(
            "queue.delete",
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        .expect("delete");
    }
    let size = || {
        std::fs::metadata(config_file(dir.path()))
            .map(|m| m.len())
            .unwrap_or_else(|e| panic!("config.jnl: {e}"))
    };
    let compacted = wait_until(Duration::from_secs(10), || size() < 1 << 20);
    assert!(
        compacted,
        "config.jnl is {} bytes after 1.6 MiB of declarations of which 16 KiB are live",
        size()
    );
    broker.assert_alive();
    bring_down(broker, Down::Kill);
    drop(conn);
    let broker = broker_on(dir.path(), &[]);
    let conn = broker.connect().await;
    assert!(
        queue_exists(&conn, "st.kept").await,
        "the live queue must survive the compaction"
    );
    let ch = channel(&conn).await;
    try_declare(&ch, "st.kept", durable(), args)
        .await
        .expect("the live queue keeps its arguments through the compaction");
    assert!(!queue_exists(&conn, "st.churn99").await);
    assert!(!queue_exists(&conn, "st.churn0").await);
}

// ---- a model of several queues over many small segments ----------------------------------

/// The body of model message `seq`: its number, then `len` filler bytes.
fn model_body(seq: u64, len: usize) -> Vec<u8> {
    let mut b = format!("sm-{seq}-").into_bytes();
    b.extend(pattern(len, seq as u32));
    b
}

/// The number a model body starts with (for short failure messages).
fn model_seq(body: &[u8]) -> String {
    body.split(|&c| c == b'-')
        .nth(1)
        .map_or_else(|| "?".into(), |s| String::from_utf8_lossy(s).into_owned())
}

/// Four durable queues over 64 KiB segments, sixteen restarts (a third of them kill -9, the rest
/// clean), and a seeded random mix of confirmed publishes (100 B to 3 KiB, up to 20 at a time)
/// and acked basic.gets from the heads (half the time all of a queue). `sm.0` is never consumed
/// and gets one to three messages now and then, so
/// it pins older segments while the others' consumed segments, whose dequeue records those need,
/// must go (the records carried forward), and sparse segments are compacted (in a third of the
/// rounds the test waits until the segments are at most about four times what is queued). At every start
/// each queue holds the model's messages, preceded after a kill by at most the last ones taken
/// since the last confirm (at-least-once: their dequeue records may not have been written yet),
/// every message taken is the model's next one, and at the end each queue holds exactly the
/// model's messages in order; once all are taken, the segments are reclaimed while the broker
/// runs. The seed is printed; `STORE_MODEL_SEED=<n>` replays it.
#[tokio::test(flavor = "multi_thread")]
async fn many_queues_over_small_segments_hold_exactly_what_was_confirmed_and_not_taken() {
    let seed: u64 = std::env::var("STORE_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        });
    println!("store model seed {seed} (STORE_MODEL_SEED={seed} replays it)");
    let mut rng = SplitMix(seed);
    let mut rand = move |n: u64| rng.range(0, n.max(1));
    let dir = TempDir::new("store-model");
    let queues = ["sm.0", "sm.1", "sm.2", "sm.3"];
    type Model = Vec<std::collections::VecDeque<Vec<u8>>>;
    let mut model: Model = vec![Default::default(); 4];
    // Per queue, what was taken since the last confirmed publish: after a kill, a suffix of it
    // may be back at the head.
    let mut taken: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
    let mut seq = 0u64;
    let args = ["--store-segment-size", "64KiB"];
    // The depths at a start: the model's, or after a kill up to `taken` more.
    async fn check_depths(
        conn: &Connection,
        queues: &[&str],
        model: &mut Model,
        taken: &mut [Vec<Vec<u8>>],
        seed: u64,
        start: usize,
    ) {
        for (i, q) in queues.iter().enumerate() {
            let depth = count(conn, q).await as usize;
            let back = depth.checked_sub(model[i].len()).unwrap_or_else(|| {
                panic!(
                    "seed {seed}, start {start}: {q} holds {depth}, the model {}",
                    model[i].len()
                )
            });
            assert!(
                back <= taken[i].len(),
                "seed {seed}, start {start}: {q} holds {depth}, more than the model's {} and the {} taken since the last confirm",
                model[i].len(),
                taken[i].len()
            );
            for m in taken[i].drain(..).rev().take(back) {
                model[i].push_front(m);
            }
        }
        for t in taken.iter_mut() {
            t.clear();
        }
    }
    let (mut kills, mut compactions) = (0, 0);
    for round in 0..16 {
        let broker = broker_on(dir.path(), &args);
        let conn = broker.connect().await;
        let pch = confirming(&conn).await;
        let ch = channel(&conn).await;
        if round == 0 {
            for q in queues {
                declare_durable(&pch, q, FieldTable::default()).await;
            }
        }
        check_depths(&conn, &queues, &mut model, &mut taken, seed, round).await;
        for _ in 0..50 {
            // sm.0 gets a batch now and then, so most segments hold only messages that are
            // taken later, while older ones stay pinned.
            let i = if rand(10) == 0 {
                0
            } else {
                1 + rand(3) as usize
            };
            if i == 0 || rand(2) == 0 {
                let n = if i == 0 { 1 + rand(3) } else { 1 + rand(20) };
                let batch: Vec<(String, Vec<u8>, BasicProperties)> = (0..n)
                    .map(|_| {
                        seq += 1;
                        let body = model_body(seq, 100 + rand(3_000) as usize);
                        model[i].push_back(body.clone());
                        (queues[i].to_string(), body, persistent())
                    })
                    .collect();
                publish_pipelined(&pch, batch).await;
                // The acks before these publishes were on the same connection: their dequeue
                // records are in the rounds these confirms waited for.
                for t in taken.iter_mut() {
                    t.clear();
                }
            } else {
                // Often all of it, so that what stays queued is mostly sm.0's few messages.
                let len = model[i].len() as u64;
                let take = if rand(2) == 0 { len } else { rand(len + 1) };
                for _ in 0..take {
                    let want = model[i].pop_front().expect("counted");
                    let m = get(&ch, queues[i], false).await.unwrap_or_else(|| {
                        panic!(
                            "seed {seed}, start {round}: {} is empty, sm-{} expected",
                            queues[i],
                            model_seq(&want)
                        )
                    });
                    assert!(
                        m.delivery.data == want,
                        "seed {seed}, start {round}: {} gave sm-{} ({} bytes), sm-{} ({} bytes) expected",
                        queues[i],
                        model_seq(&m.delivery.data),
                        m.delivery.data.len(),
                        model_seq(&want),
                        want.len()
                    );
                    within("basic.ack", m.delivery.ack(BasicAckOptions::default()))
                        .await
                        .expect("ack");
                    taken[i].push(want);
                }
            }
        }
        if rand(3) == 0 {
            // Compaction: once the sparse segments have been sparse for two seconds, their
            // messages are written again and the segments go, so the segments end up at most
            // about four times what is queued (plus the current and next ones).
            let queued: u64 = model.iter().flatten().map(|b| b.len() as u64 + 64).sum();
            let bound = 4 * queued + 6 * 64 * 1024;
            let compacted = eventually(Duration::from_secs(15), || async {
                segments_size(dir.path()) <= bound
            })
            .await;
            assert!(
                compacted,
                "seed {seed}, start {round}: {} bytes of segments for {queued} bytes queued: {:?}",
                segments_size(dir.path()),
                segments(dir.path())
            );
            compactions += 1;
        }
        if rand(3) == 0 {
            kills += 1;
            bring_down(broker, Down::Kill);
        } else {
            // A round trip on the consuming channel: its acks are processed before the stop,
            // and after a clean stop none of them comes back.
            let _ = message_count(&conn, queues[1]).await;
            within("connection.close", conn.close(200, "".into()))
                .await
                .expect("close");
            bring_down(broker, Down::Clean);
            for t in taken.iter_mut() {
                t.clear();
            }
        }
    }
    println!(
        "seed {seed}: {kills} of 16 stops were kill -9, {compactions} rounds waited for compaction; {seq} messages published"
    );
    assert!(
        segments(dir.path()).len() > 10,
        "seed {seed}: the run must have spread over many segments: {:?}",
        segments(dir.path())
    );
    let mut broker = broker_on(dir.path(), &args);
    {
        let conn = broker.connect().await;
        check_depths(&conn, &queues, &mut model, &mut taken, seed, 16).await;
    }
    for (i, q) in queues.iter().enumerate() {
        let got: Vec<Vec<u8>> = {
            let conn = broker.connect().await;
            let ch = channel(&conn).await;
            take_all(&ch, q).await.into_iter().map(|d| d.data).collect()
        };
        let want: Vec<Vec<u8>> = model[i].iter().cloned().collect();
        assert!(
            got == want,
            "seed {seed}: {q} holds {:?}, the model {:?}",
            got.iter().map(|b| model_seq(b)).collect::<Vec<_>>(),
            want.iter().map(|b| model_seq(b)).collect::<Vec<_>>()
        );
    }
    let reclaimed = eventually(Duration::from_secs(20), || async {
        segments_size(dir.path()) < 4 * 64 * 1024
    })
    .await;
    assert!(
        reclaimed,
        "seed {seed}: with every message taken the segments still take {} bytes: {:?}",
        segments_size(dir.path()),
        segments(dir.path())
    );
    broker.assert_alive();
}

/// 40 persistent messages of 2,000 bytes (about 80 KiB) through the durable queue `st.busy`:
/// published with confirms on `pch`, then all taken (no-ack basic.get) on `ch`.
async fn busy_round(pch: &Channel, ch: &Channel) {
    let busy = (0..40)
        .map(|j| ("st.busy".to_string(), pattern(2_000, j), persistent()))
        .collect();
    publish_pipelined(pch, busy).await;
    assert_eq!(take_all(ch, "st.busy").await.len(), 40);
}

/// Compaction (store.md section 4): with 64 KiB segments, a durable queue that gets one
/// persistent message while about 80 KiB go through another queue, thirty times, would keep one
/// segment per message; its messages are written again to the current segment instead, so the
/// segments shrink to a few while the broker runs. After a kill -9 and after a clean restart the
/// queue holds exactly its thirty messages, in order, and the busy queue nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_rarely_used_queue_does_not_keep_a_segment_per_message() {
    let dir = TempDir::new("store-compact");
    let args = ["--store-segment-size", "64KiB"];
    let broker = broker_on(dir.path(), &args);
    let conn = broker.connect().await;
    let pch = confirming(&conn).await;
    let ch = channel(&conn).await;
    declare_durable(&pch, "st.rare", FieldTable::default()).await;
    declare_durable(&pch, "st.busy", FieldTable::default()).await;
    let rare: Vec<String> = (0..30).map(|i| format!("rare-{i}")).collect();
    for body in &rare {
        publish_confirmed(&pch, "", "st.rare", body.as_bytes(), persistent()).await;
        busy_round(&pch, &ch).await;
    }
    let compacted = eventually(Duration::from_secs(20), || async {
        segments_size(dir.path()) < 8 * 64 * 1024
    })
    .await;
    assert!(
        compacted,
        "30 messages on a quiet queue still keep {} bytes of segments: {:?}",
        segments_size(dir.path()),
        segments(dir.path())
    );
    bring_down(broker, Down::Kill);
    drop(conn);
    for _ in 0..2 {
        let broker = broker_on(dir.path(), &args);
        assert_eq!(drain_bodies_kept(&broker, "st.rare").await, rare);
        let conn = broker.connect().await;
        assert_eq!(
            count(&conn, "st.busy").await,
            0,
            "consumed messages came back"
        );
        drop(conn);
        bring_down(broker, Down::Clean);
    }
}

/// The bodies of `queue`, read with basic.get and put back (rejected with requeue), so that
/// they stay queued.
async fn drain_bodies_kept(broker: &TestBroker, queue: &str) -> Vec<String> {
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut got = Vec::new();
    let mut tags = Vec::new();
    while let Some(m) = get(&ch, queue, false).await {
        got.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        tags.push(m.delivery.delivery_tag);
    }
    within(
        "basic.nack",
        ch.basic_nack(
            tags.last().copied().unwrap_or(0),
            lapin::options::BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        ),
    )
    .await
    .expect("nack");
    within("connection.close", conn.close(200, "".into()))
        .await
        .expect("close");
    got
}

/// A kill -9 while compaction runs loses and revives nothing: five times, ten more messages go
/// to a quiet queue between batches of about 80 KiB through a busy one (taken, and a confirmed
/// publish to a third queue after them, so their dequeues are on disk), then the broker is
/// killed at a seeded moment from 1.5 s to 3.5 s later: before, during or after the compaction
/// of those segments (it starts once they have been sparse for 2 s). After each restart the
/// quiet queue holds exactly all its messages so far, in order, and the busy one nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_compaction_loses_and_revives_nothing() {
    let seed: u64 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("compaction kill seed {seed}");
    let mut rng = SplitMix(seed);
    let dir = TempDir::new("store-compact-kill");
    let args = ["--store-segment-size", "64KiB"];
    let mut rare: Vec<String> = Vec::new();
    for round in 0..5u64 {
        let broker = broker_on(dir.path(), &args);
        let conn = broker.connect().await;
        let pch = confirming(&conn).await;
        let ch = channel(&conn).await;
        if round == 0 {
            for q in ["st.rare", "st.busy", "st.mark"] {
                declare_durable(&pch, q, FieldTable::default()).await;
            }
        } else {
            assert_eq!(
                drain_bodies_kept(&broker, "st.rare").await,
                rare,
                "seed {seed}, start {round}"
            );
            assert_eq!(
                count(&conn, "st.busy").await,
                0,
                "seed {seed}, start {round}: consumed messages came back"
            );
        }
        for i in 0..10 {
            let body = format!("rare-{round}-{i}");
            publish_confirmed(&pch, "", "st.rare", body.as_bytes(), persistent()).await;
            rare.push(body);
            busy_round(&pch, &ch).await;
        }
        // The busy queue's dequeues go to disk with this confirm (same connection, in order).
        publish_confirmed(&pch, "", "st.mark", b"mark", persistent()).await;
        let ms = rng.range(1_500, 3_500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        bring_down(broker, Down::Kill);
    }
    let broker = broker_on(dir.path(), &args);
    assert_eq!(
        drain_bodies_kept(&broker, "st.rare").await,
        rare,
        "seed {seed}"
    );
    let conn = broker.connect().await;
    assert_eq!(count(&conn, "st.busy").await, 0, "seed {seed}");
}

/// The segments of all of `data`'s store holding `needle`.
fn segments_holding(data: &Path, needle: &[u8]) -> Vec<u64> {
    segments(data)
        .into_iter()
        // A segment may be deleted between the listing and the read.
        .filter(|(_, p)| {
            std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
        .map(|(n, _)| n)
        .collect()
}

/// A message compacted into a newer segment and consumed there stays consumed while its old
/// segment is kept (here by an unacknowledged message beside it): the newer segment, holding
/// the copy whose dequeue record follows it, is kept as long as the old one, so after a kill -9
/// the old record is never read alone. The unacknowledged message comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_and_consumed_message_stays_consumed_while_its_old_segment_is_kept() {
    let dir = TempDir::new("store-compact-dep");
    let args = ["--store-segment-size", "64KiB"];
    let mut broker = broker_on(dir.path(), &args);
    let conn = broker.connect().await;
    let pch = confirming(&conn).await;
    for q in ["st.hold", "st.moved", "st.busy"] {
        declare_durable(&pch, q, FieldTable::default()).await;
    }
    let moved_body = b"moved-message-0123456789abcdef".to_vec();
    publish_confirmed(&pch, "", "st.hold", b"held-unacked", persistent()).await;
    publish_confirmed(&pch, "", "st.moved", &moved_body, persistent()).await;
    let first = segments_holding(dir.path(), &moved_body);
    assert_eq!(first.len(), 1, "{:?}", segments(dir.path()));
    // Held without an ack, on its own connection, until the kill.
    let hold_conn = broker.connect().await;
    let hold_ch = channel(&hold_conn).await;
    let held = get(&hold_ch, "st.hold", false)
        .await
        .expect("the held message");
    assert_eq!(held.delivery.data, b"held-unacked");
    let ch = channel(&conn).await;
    for _ in 0..4 {
        busy_round(&pch, &ch).await;
    }
    // Compaction writes the message again to a newer segment; the old one stays (the held
    // message is in it).
    let copied = eventually(Duration::from_secs(20), || async {
        segments_holding(dir.path(), &moved_body).len() == 2
    })
    .await;
    assert!(
        copied,
        "the message was not written again: it is in {:?} of {:?}",
        segments_holding(dir.path(), &moved_body),
        segments(dir.path())
    );
    // Consume it, then move on by many segments: the copy's segment has nothing live, and the
    // segment with the dequeue record would go too if nothing kept the copy's.
    let m = get(&ch, "st.moved", false)
        .await
        .expect("the moved message");
    assert_eq!(m.delivery.data, moved_body);
    within("basic.ack", m.delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    for _ in 0..10 {
        busy_round(&pch, &ch).await;
    }
    assert!(
        segments(dir.path()).iter().any(|(n, _)| *n == first[0]),
        "the old segment must still be there (the held message is in it)"
    );
    assert_eq!(
        segments_holding(dir.path(), &moved_body).len(),
        2,
        "the copy's segment must stay while the old one does: {:?}",
        segments(dir.path())
    );
    broker.signal("KILL");
    broker.wait_exit(EXIT_DEADLINE);
    drop((conn, hold_conn));
    let broker = broker_on(dir.path(), &args);
    let conn = broker.connect().await;
    assert_eq!(
        count(&conn, "st.moved").await,
        0,
        "a consumed message came back from its old segment"
    );
    assert_eq!(drain_bodies(&broker, "st.hold").await, vec!["held-unacked"]);
}

/// While an unacknowledged message keeps a compacted segment, the segment holding the copies
/// of its other messages is kept too, and it is not compacted again (each pass would add one
/// more kept segment): a later sparse segment is compacted meanwhile, but the copy is still in
/// exactly two segments. Once the message is acknowledged, the old segments go.
#[tokio::test(flavor = "multi_thread")]
async fn copies_kept_for_a_pinned_segment_are_not_copied_again() {
    let dir = TempDir::new("store-compact-pinned");
    let args = ["--store-segment-size", "64KiB"];
    let broker = broker_on(dir.path(), &args);
    let conn = broker.connect().await;
    let pch = confirming(&conn).await;
    for q in ["st.hold", "st.moved", "st.other", "st.busy"] {
        declare_durable(&pch, q, FieldTable::default()).await;
    }
    let moved_body = b"moved-message-0123456789abcdef".to_vec();
    let other_body = b"other-message-fedcba9876543210".to_vec();
    publish_confirmed(&pch, "", "st.hold", b"held-unacked", persistent()).await;
    publish_confirmed(&pch, "", "st.moved", &moved_body, persistent()).await;
    let hold_conn = broker.connect().await;
    let hold_ch = channel(&hold_conn).await;
    let held = get(&hold_ch, "st.hold", false)
        .await
        .expect("the held message");
    let ch = channel(&conn).await;
    let traffic = || async {
        for _ in 0..4 {
            busy_round(&pch, &ch).await;
        }
    };
    traffic().await;
    let copied = eventually(Duration::from_secs(20), || async {
        segments_holding(dir.path(), &moved_body).len() == 2
    })
    .await;
    assert!(copied, "the moved message was not written again");
    // The copy's segment falls behind; then another sparse segment, compacted in its turn.
    traffic().await;
    publish_confirmed(&pch, "", "st.other", &other_body, persistent()).await;
    let other_first = segments_holding(dir.path(), &other_body);
    assert_eq!(other_first.len(), 1);
    traffic().await;
    // Its copy is in a newer segment (its old one, with nothing else live, then goes).
    let other_copied = eventually(Duration::from_secs(20), || async {
        segments_holding(dir.path(), &other_body)
            .iter()
            .any(|&s| s > other_first[0])
    })
    .await;
    assert!(
        other_copied,
        "the later sparse segment was not compacted: other in {:?}, moved in {:?}, all {:?}",
        segments_holding(dir.path(), &other_body),
        segments_holding(dir.path(), &moved_body),
        segments(dir.path()).iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert_eq!(
        segments_holding(dir.path(), &moved_body).len(),
        2,
        "a copy kept for a pinned segment was copied again: {:?}",
        segments(dir.path())
    );
    // Acknowledged: the pinned segment goes, then the copies' segment is compacted like any.
    within("basic.ack", held.delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    traffic().await;
    let freed = eventually(Duration::from_secs(20), || async {
        segments_holding(dir.path(), &moved_body).len() == 1
            && segments_holding(dir.path(), &other_body).len() == 1
    })
    .await;
    assert!(
        freed,
        "after the ack the old copies stay: moved in {:?}, other in {:?}",
        segments_holding(dir.path(), &moved_body),
        segments_holding(dir.path(), &other_body)
    );
    assert_eq!(drain_bodies(&broker, "st.moved").await.len(), 1);
    assert_eq!(drain_bodies(&broker, "st.other").await.len(), 1);
}
