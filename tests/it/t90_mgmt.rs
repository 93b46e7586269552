//! The management protocol (`docs/management-protocol.md`) against a real broker with lapin:
//! queries by class and by object id, create/delete/purge with Qpid's argument names and
//! `strict`, events with their sequence numbers, permissions, malformed requests, log level and
//! shutdown.

use amq_protocol::types::{AMQPValue, LongString};
use integration_tests::{
    REPLY_DEADLINE, TempDir, TestBroker, add_user, channel, consume, declare, drain, next_delivery,
    send, table,
};
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};

const BROKER_OID: &str = "org.apache.qpid.broker:broker:amqp-broker";
const EVENTS_KEY: &str = "agent.ind.event.org_apache_qpid_broker.#";

/// One response message.
#[derive(Debug)]
struct Response {
    opcode: String,
    partial: bool,
    correlation_id: Option<String>,
    body: Value,
}

/// A management client made of one channel and an exclusive reply queue.
struct Agent {
    ch: Channel,
    reply: String,
    replies: Consumer,
    next: u64,
}

fn header_str(h: &FieldTable, key: &str) -> Option<String> {
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

impl Agent {
    async fn open(conn: &Connection) -> Agent {
        let ch = channel(conn).await;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the reply queue");
        let reply = q.name().as_str().to_string();
        let replies = consume(&ch, &reply, true).await;
        Agent {
            ch,
            reply,
            replies,
            next: 0,
        }
    }

    fn properties(&mut self, opcode: &str) -> BasicProperties {
        self.next += 1;
        BasicProperties::default()
            .with_reply_to(ShortString::from(self.reply.as_str()))
            .with_correlation_id(ShortString::from(format!("c{}", self.next)))
            .with_content_type("application/json".into())
            .with_headers(table(&[(
                "qmf.opcode",
                AMQPValue::LongString(LongString::from(opcode)),
            )]))
    }

    async fn publish(&self, props: BasicProperties, body: &[u8]) {
        self.ch
            .basic_publish(
                "qmf.default.direct".into(),
                "broker".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish a request");
    }

    async fn receive(&mut self) -> Response {
        let d = next_delivery(&mut self.replies).await;
        let p = &d.properties;
        let headers = p.headers().clone().unwrap_or_default();
        Response {
            opcode: header_str(&headers, "qmf.opcode").unwrap_or_default(),
            partial: matches!(
                headers.inner().get("partial"),
                Some(AMQPValue::Boolean(true))
            ),
            correlation_id: p.correlation_id().as_ref().map(|c| c.as_str().to_string()),
            body: serde_json::from_slice(&d.data).expect("a JSON response"),
        }
    }

    /// Sends `body` with `opcode` and returns every response message until the last.
    async fn request(&mut self, opcode: &str, body: &Value) -> Vec<Response> {
        let props = self.properties(opcode);
        let cid = format!("c{}", self.next);
        self.publish(props, body.to_string().as_bytes()).await;
        let mut all = Vec::new();
        loop {
            let r = self.receive().await;
            assert_eq!(r.correlation_id.as_deref(), Some(cid.as_str()), "{r:?}");
            let more = r.partial;
            all.push(r);
            if !more {
                return all;
            }
        }
    }

    async fn method(&mut self, name: &str, args: Value) -> Result<Value, (u64, String)> {
        self.method_on(BROKER_OID, name, args).await
    }

    async fn method_on(
        &mut self,
        oid: &str,
        name: &str,
        args: Value,
    ) -> Result<Value, (u64, String)> {
        let body = json!({"version": 1, "_object_id": {"_object_name": oid},
                          "_method_name": name, "_arguments": args});
        let mut r = self.request("_method_request", &body).await;
        let r = r.pop().expect("a response");
        exception_or(r, "_method_response").map(|b| b["_arguments"].clone())
    }

    /// Objects of a query and the answer's sequence.
    async fn query(&mut self, what: Value) -> (Vec<Value>, u64) {
        let mut body = what;
        body["version"] = 1.into();
        let rs = self.request("_query_request", &body).await;
        let sequence = rs[0].body["sequence"].as_u64().expect("a sequence");
        let mut objects = Vec::new();
        for r in rs {
            assert_eq!(r.opcode, "_query_response", "{:?}", r.body);
            assert_eq!(r.body["sequence"].as_u64(), Some(sequence));
            objects.extend(
                r.body["objects"]
                    .as_array()
                    .expect("objects")
                    .iter()
                    .cloned(),
            );
        }
        (objects, sequence)
    }

    async fn class(&mut self, class: &str) -> Vec<Value> {
        self.query(json!({"_what": "OBJECT", "_schema_id": {"_class_name": class}}))
            .await
            .0
    }

    async fn object(&mut self, oid: &str) -> Vec<Value> {
        self.query(json!({"_what": "OBJECT", "_object_id": {"_object_name": oid}}))
            .await
            .0
    }

    /// Sends a raw request and expects an `_exception`; returns its code and text.
    async fn expect_exception(&mut self, props: BasicProperties, body: &[u8]) -> (u64, String) {
        self.publish(props, body).await;
        let r = self.receive().await;
        exception_or(r, "_exception").map_or_else(|e| e, |b| panic!("not an exception: {b}"))
    }
}

fn exception_or(r: Response, expected: &str) -> Result<Value, (u64, String)> {
    assert_eq!(r.body["version"], 1, "{:?}", r.body);
    if r.opcode == "_exception" {
        let code = r.body["error_code"].as_u64().expect("error_code");
        let text = r.body["error_text"]
            .as_str()
            .expect("error_text")
            .to_string();
        return Err((code, text));
    }
    assert_eq!(r.opcode, expected, "{:?}", r.body);
    Ok(r.body)
}

fn named<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .map(|o| &o["_values"])
        .find(|v| v["name"] == name)
}

#[tokio::test]
async fn queries_by_class_and_object_id_use_qpid_property_names() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(
        &ch,
        "q1",
        table(&[("x-max-length", AMQPValue::LongLongInt(5))]),
    )
    .await;
    ch.queue_bind(
        "q1".into(),
        "amq.direct".into(),
        "k1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    send(&ch, "q1", b"hello").await;
    let mut agent = Agent::open(&conn).await;

    let queues = agent.class("queue").await;
    let q = named(&queues, "q1").expect("q1 listed");
    assert_eq!(q["msgDepth"], 1);
    assert_eq!(q["byteDepth"], 5);
    assert_eq!(q["msgTotalEnqueues"], 1);
    assert_eq!(q["msgTotalDequeues"], 0);
    assert_eq!(q["durable"], false);
    assert_eq!(q["autoDelete"], false);
    assert_eq!(q["exclusive"], false);
    assert_eq!(q["consumerCount"], 0);
    assert_eq!(q["bindingCount"], 2);
    assert_eq!(q["arguments"]["x-max-length"], 5);

    let by_id = agent.object("org.apache.qpid.broker:queue:q1").await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(
        by_id[0]["_object_id"]["_object_name"],
        "org.apache.qpid.broker:queue:q1"
    );
    assert!(
        agent
            .object("org.apache.qpid.broker:queue:none")
            .await
            .is_empty()
    );

    let exchanges = agent.class("exchange").await;
    let e = named(&exchanges, "amq.direct").expect("amq.direct");
    assert_eq!(e["type"], "direct");
    assert_eq!(e["bindingCount"], 1);
    assert!(named(&exchanges, "qmf.default.direct").is_some());
    assert!(named(&exchanges, "qmf.default.topic").is_some());

    let bindings = agent.class("binding").await;
    let b = bindings
        .iter()
        .find(|b| b["_values"]["bindingKey"] == "k1")
        .expect("the binding");
    assert_eq!(
        b["_object_id"]["_object_name"],
        "org.apache.qpid.broker:binding:amq.direct/q1/k1"
    );
    assert_eq!(
        b["_values"]["queueRef"]["_object_name"],
        "org.apache.qpid.broker:queue:q1"
    );

    let brokers = agent.object(BROKER_OID).await;
    let v = &brokers[0]["_values"];
    assert_eq!(v["name"], "amqp-broker");
    assert!(v["queues"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["connections"], 1);
    assert!(v["uptime"].as_u64().unwrap() > 0);
    assert!(v["version"].is_string());

    let conns = agent.class("connection").await;
    assert_eq!(conns.len(), 1);
    assert!(
        conns[0]["_values"]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let subs = agent.class("subscription").await;
    let s = subs
        .iter()
        .find(|s| {
            s["_values"]["queueRef"]["_object_name"]
                .as_str()
                .unwrap()
                .ends_with(&agent.reply)
        })
        .expect("the reply consumer is a subscription");
    assert_eq!(s["_values"]["browsing"], false);
    assert_eq!(s["_values"]["acknowledged"], false);
}

#[tokio::test]
async fn unknown_class_is_a_not_found_exception() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    let props = agent.properties("_query_request");
    let body = json!({"version": 1, "_schema_id": {"_class_name": "nosuch"}});
    let (code, text) = agent
        .expect_exception(props, body.to_string().as_bytes())
        .await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("nosuch"), "{text}");
}

#[tokio::test]
async fn large_listings_come_in_partial_pages() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    for i in 0..1500 {
        declare(&ch, &format!("page-{i:04}"), FieldTable::default()).await;
    }
    let mut agent = Agent::open(&conn).await;
    let body = json!({"version": 1, "_schema_id": {"_class_name": "queue"}});
    let rs = agent.request("_query_request", &body).await;
    assert_eq!(rs.len(), 2);
    assert!(rs[0].partial && !rs[1].partial);
    let total: usize = rs
        .iter()
        .map(|r| r.body["objects"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, 1501);
}

#[tokio::test]
async fn create_and_delete_queues_exchanges_and_bindings() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    agent
        .method(
            "create",
            json!({"type": "queue", "name": "mq", "strict": true,
                   "properties": {"durable": true, "qpid.max_count": 10, "alternate-exchange": "amq.fanout"}}),
        )
        .await
        .expect("create queue");
    let q = agent.object("org.apache.qpid.broker:queue:mq").await;
    let v = &q[0]["_values"];
    assert_eq!(v["durable"], true);
    assert_eq!(v["arguments"]["qpid.max_count"], 10);
    assert_eq!(v["altExchange"], "amq.fanout");

    let again = agent
        .method("create", json!({"type": "queue", "name": "mq"}))
        .await;
    assert_eq!(again.unwrap_err().0, 5);
    let strict = agent
        .method(
            "create",
            json!({"type": "queue", "name": "s", "strict": true, "properties": {"bogus": 1}}),
        )
        .await
        .unwrap_err();
    assert_eq!(strict.0, 3);
    let long = agent
        .method("create", json!({"type": "queue", "name": "n".repeat(256)}))
        .await
        .unwrap_err();
    assert_eq!(long.0, 3, "{}", long.1);
    assert!(strict.1.contains("bogus"), "{}", strict.1);
    agent
        .method(
            "create",
            json!({"type": "queue", "name": "lax", "strict": false, "properties": {"bogus": 1}}),
        )
        .await
        .expect("not strict: unknown properties are arguments");

    agent
        .method(
            "create",
            json!({"type": "exchange", "name": "mx", "properties": {"exchange-type": "topic"}, "strict": true}),
        )
        .await
        .expect("create exchange");
    agent
        .method(
            "create",
            json!({"type": "binding", "name": "mx/mq/a.#", "strict": true}),
        )
        .await
        .expect("create binding");
    let b = agent
        .object("org.apache.qpid.broker:binding:mx/mq/a.#")
        .await;
    assert_eq!(b.len(), 1);
    let ch = channel(&conn).await;
    integration_tests::publish(&ch, "mx", "a.b", b"routed", BasicProperties::default())
        .await
        .unwrap();
    assert_eq!(drain(&ch, "mq").await, vec![b"routed".to_vec()]);

    agent
        .method("delete", json!({"type": "binding", "name": "mx/mq/a.#"}))
        .await
        .expect("delete binding");
    assert!(
        agent
            .object("org.apache.qpid.broker:binding:mx/mq/a.#")
            .await
            .is_empty()
    );
    assert_eq!(
        agent
            .method("delete", json!({"type": "binding", "name": "mx/mq/a.#"}))
            .await
            .unwrap_err()
            .0,
        1
    );
    agent
        .method("delete", json!({"type": "exchange", "name": "mx"}))
        .await
        .expect("delete exchange");
    assert_eq!(
        agent
            .method(
                "delete",
                json!({"type": "exchange", "name": "qmf.default.direct"})
            )
            .await
            .unwrap_err()
            .0,
        2
    );

    send(&ch, "mq", b"x").await;
    let not_empty = agent
        .method(
            "delete",
            json!({"type": "queue", "name": "mq", "options": {"if_empty": true}}),
        )
        .await
        .unwrap_err();
    assert_eq!(not_empty.0, 5, "{}", not_empty.1);
    agent
        .method("delete", json!({"type": "queue", "name": "mq"}))
        .await
        .expect("delete queue");
    assert_eq!(
        agent
            .method("delete", json!({"type": "queue", "name": "mq"}))
            .await
            .unwrap_err()
            .0,
        1
    );
}

#[tokio::test]
async fn purge_on_the_broker_and_on_the_queue_object() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "pq", FieldTable::default()).await;
    for _ in 0..3 {
        send(&ch, "pq", b"m").await;
    }
    let mut agent = Agent::open(&conn).await;
    let out = agent
        .method("purge", json!({"type": "queue", "name": "pq"}))
        .await
        .unwrap();
    assert_eq!(out["messages"], 3);
    send(&ch, "pq", b"m").await;
    let out = agent
        .method_on("org.apache.qpid.broker:queue:pq", "purge", json!({}))
        .await
        .unwrap();
    assert_eq!(out["messages"], 1);
    let missing = agent
        .method("purge", json!({"type": "queue", "name": "none"}))
        .await;
    assert_eq!(missing.unwrap_err().0, 1);
}

#[tokio::test]
async fn events_carry_increasing_sequences_that_queries_report() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "events", FieldTable::default()).await;
    ch.queue_bind(
        "events".into(),
        "qmf.default.topic".into(),
        EVENTS_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut events = consume(&ch, "events", true).await;
    let mut agent = Agent::open(&conn).await;
    let (_, before) = agent
        .query(json!({"_schema_id": {"_class_name": "queue"}}))
        .await;

    let work = channel(&conn).await;
    declare(&work, "eq", FieldTable::default()).await;
    work.queue_bind(
        "eq".into(),
        "amq.topic".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut c = consume(&work, "eq", false).await;
    work.basic_cancel(c.tag().as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = &mut c;
    work.queue_delete("eq".into(), Default::default())
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut last = before;
    while seen.len() < 5 {
        let d = next_delivery(&mut events).await;
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        let name = body["_schema_id"]["_class_name"]
            .as_str()
            .unwrap()
            .to_string();
        let values = &body["_values"];
        if values["qName"] != "eq" {
            continue; // the reply queue's own subscribe and the like
        }
        let seq = body["sequence"].as_u64().unwrap();
        assert!(seq > last, "sequence {seq} after {last}");
        last = seq;
        assert!(
            d.routing_key.as_str().starts_with(&format!(
                "agent.ind.event.org_apache_qpid_broker.{name}.info.apache_org.qpidd."
            )),
            "{}",
            d.routing_key
        );
        seen.push(name);
    }
    assert_eq!(
        seen,
        [
            "queueDeclare",
            "bind",
            "subscribe",
            "unsubscribe",
            "queueDelete"
        ]
    );
    let (_, after) = agent
        .query(json!({"_schema_id": {"_class_name": "queue"}}))
        .await;
    assert!(
        after >= last,
        "query sequence {after} older than event {last}"
    );
}

#[tokio::test]
async fn only_admins_may_manage() {
    let dir = TempDir::new("mgmt-users");
    add_user(dir.path(), "plain", "", "pw");
    let broker = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .start();
    let conn = broker
        .try_connect_url(
            &broker.url_for("plain", "pw"),
            ConnectionProperties::default(),
        )
        .await
        .expect("plain user logs in");
    let mut agent = Agent::open(&conn).await;
    let props = agent.properties("_method_request");
    let body = json!({"version": 1, "_object_id": {"_object_name": BROKER_OID},
                      "_method_name": "create", "_arguments": {"type": "queue", "name": "nope"}});
    let (code, text) = agent
        .expect_exception(props, body.to_string().as_bytes())
        .await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("admin"), "{text}");

    let guest = broker.connect().await;
    let mut admin = Agent::open(&guest).await;
    assert!(
        admin
            .class("queue")
            .await
            .iter()
            .all(|q| q["_values"]["name"] != "nope")
    );
    admin
        .method("create", json!({"type": "queue", "name": "yes"}))
        .await
        .expect("guest is admin");
}

#[tokio::test]
async fn malformed_requests_get_exceptions_and_the_broker_keeps_serving() {
    let mut broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    let broker_call = |method: &str, args: Value| {
        json!({"version": 1, "_object_id": {"_object_name": BROKER_OID},
               "_method_name": method, "_arguments": args})
        .to_string()
        .into_bytes()
    };
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str)> = vec![
        (
            "bad JSON",
            agent.properties("_method_request"),
            b"{not json".to_vec(),
            "not valid JSON",
        ),
        (
            "no version",
            agent.properties("_query_request"),
            b"{}".to_vec(),
            "version",
        ),
        (
            "newer version",
            agent.properties("_query_request"),
            br#"{"version": 2}"#.to_vec(),
            "unsupported version",
        ),
        (
            "unknown method",
            agent.properties("_method_request"),
            broker_call("frobnicate", json!({})),
            "unknown method",
        ),
        (
            "missing argument",
            agent.properties("_method_request"),
            broker_call("create", json!({"type": "queue"})),
            "missing 'name'",
        ),
        (
            "wrong type",
            agent.properties("_method_request"),
            broker_call("create", json!({"type": "queue", "name": 7})),
            "must be a string",
        ),
        (
            "unknown opcode",
            agent.properties("_frobnicate"),
            b"{\"version\":1}".to_vec(),
            "qmf.opcode",
        ),
        (
            "oversize",
            agent.properties("_query_request"),
            vec![b' '; (1 << 20) + 1],
            "larger than the limit",
        ),
    ];
    for (what, props, body, expected) in cases {
        let (code, text) = agent.expect_exception(props, &body).await;
        assert_eq!(code, 3, "{what}: {text}");
        assert!(text.contains(expected), "{what}: {text}");
    }
    let text_plain = agent
        .properties("_query_request")
        .with_content_type("text/plain".into());
    let (code, text) = agent.expect_exception(text_plain, b"{\"version\":1}").await;
    assert_eq!(code, 3);
    assert!(text.contains("content_type"), "{text}");
    let no_opcode =
        BasicProperties::default().with_reply_to(ShortString::from(agent.reply.as_str()));
    let (code, _) = agent.expect_exception(no_opcode, b"{\"version\":1}").await;
    assert_eq!(code, 3);
    // Without reply_to: dropped and logged, and the next request is answered.
    agent.publish(BasicProperties::default(), b"{}").await;
    assert!(!agent.class("broker").await.is_empty());
    broker.assert_alive();
    // The log reaches us through a pipe and a reader thread: give it a moment.
    assert!(
        integration_tests::wait_until(REPLY_DEADLINE, || broker.log().contains("without reply_to")),
        "{}",
        broker.log()
    );
}

#[tokio::test]
async fn log_level_can_be_read_and_set() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    let level = agent.method("getLogLevel", json!({})).await.unwrap();
    assert_eq!(level["level"], "notice+");
    agent
        .method("setLogLevel", json!({"level": "debug+:Management,notice+"}))
        .await
        .unwrap();
    let level = agent.method("getLogLevel", json!({})).await.unwrap();
    assert_eq!(level["level"], "debug+:Management,notice+");
    let bad = agent
        .method("setLogLevel", json!({"level": "loud+"}))
        .await
        .unwrap_err();
    assert_eq!(bad.0, 3, "{}", bad.1);
}

#[tokio::test]
async fn shutdown_method_stops_the_broker_with_status_zero() {
    let mut broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    agent
        .method("shutdown", json!({}))
        .await
        .expect("shutdown answered");
    let status = broker.wait_exit(REPLY_DEADLINE * 2);
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn binding_names_escape_slashes_in_exchange_and_queue_names() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    let create = |kind: &str, name: &str, props: Value| json!({"type": kind, "name": name, "properties": props, "strict": true});
    agent
        .method(
            "create",
            create("exchange", "a/b", json!({"exchange-type": "direct"})),
        )
        .await
        .unwrap();
    agent
        .method("create", create("queue", "q/x", json!({})))
        .await
        .unwrap();
    agent
        .method("create", create("binding", "a\\/b/q\\/x/k/1", json!({})))
        .await
        .expect("bind with escaped names");
    let b = agent.class("binding").await;
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0]["_object_id"]["_object_name"],
        "org.apache.qpid.broker:binding:a\\/b/q\\/x/k/1"
    );
    assert_eq!(b[0]["_values"]["bindingKey"], "k/1");
    assert_eq!(
        b[0]["_values"]["exchangeRef"]["_object_name"],
        "org.apache.qpid.broker:exchange:a/b"
    );
    let bad = agent
        .method("create", create("binding", "noseparator", json!({})))
        .await
        .unwrap_err();
    assert_eq!(bad.0, 3, "{}", bad.1);
}

const HA_OID: &str = "org.apache.qpid.ha:habroker:ha-broker";

#[tokio::test]
async fn the_ha_object_exists_only_with_ha_options() {
    let plain = TestBroker::start();
    let conn = plain.connect().await;
    let mut agent = Agent::open(&conn).await;
    assert!(agent.class("habroker").await.is_empty());
    assert!(agent.object(HA_OID).await.is_empty());
    let (code, text) = agent
        .method_on(HA_OID, "promote", json!({}))
        .await
        .expect_err("no HA object");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.ends_with("start it with ha-queue-replication=yes or ha-cluster=yes"),
        "{text}"
    );

    let broker = TestBroker::builder()
        .args([
            "--ha-queue-replication",
            "yes",
            "--ha-brokers-url",
            "amqp:tcp:h1:1,tcp:h2:2",
        ])
        .start();
    let conn = broker.connect().await;
    let mut agent = Agent::open(&conn).await;
    let by_class = agent
        .query(json!({"_what": "OBJECT",
            "_schema_id": {"_package_name": "org.apache.qpid.ha", "_class_name": "habroker"}}))
        .await
        .0;
    assert_eq!(by_class, agent.object(HA_OID).await);
    assert_eq!(by_class.len(), 1, "{by_class:?}");
    let ha = &by_class[0];
    assert_eq!(ha["_object_id"]["_object_name"], HA_OID);
    assert_eq!(
        ha["_schema_id"],
        json!({"_package_name": "org.apache.qpid.ha", "_class_name": "habroker"})
    );
    let broker_object = agent.object(BROKER_OID).await;
    let values = &ha["_values"];
    assert_eq!(
        values,
        &json!({"name": "ha-broker", "status": "standalone",
            "brokersUrl": "amqp:tcp:h1:1,tcp:h2:2", "publicUrl": "", "replicateDefault": "none",
            "systemId": broker_object[0]["_values"]["systemId"],
            "replicas": [], "subscriptions": [], "members": [], "epoch": 0, "store": []})
    );
    // The broker package does not name the HA object.
    assert!(
        agent
            .object("org.apache.qpid.broker:habroker:ha-broker")
            .await
            .is_empty()
    );

    let (code, text) = agent
        .method_on(HA_OID, "promote", json!({}))
        .await
        .expect_err("not a cluster member");
    assert_eq!(
        (code, text.contains("not a cluster member")),
        (5, true),
        "{text}"
    );
    let (code, text) = agent
        .method_on(HA_OID, "replicate", json!({"queue": "q"}))
        .await
        .expect_err("broker missing");
    assert_eq!(code, 3, "{text}");
    let (code, text) = agent
        .method_on(HA_OID, "replicate", json!({"broker": "h1", "queue": "q"}))
        .await
        .expect_err("no queue");
    assert_eq!((code, text.as_str()), (1, "no queue 'q'"));
    let (code, _) = agent
        .method_on(HA_OID, "setBrokersUrl", json!({"url": "x"}))
        .await
        .expect_err("not implemented");
    assert_eq!(code, 4);
    let (code, _) = agent
        .method_on(HA_OID, "frob", json!({}))
        .await
        .expect_err("unknown");
    assert_eq!(code, 3);
    // With ha-cluster: joining, and promote is not there yet.
    let cluster = TestBroker::builder().args(["--ha-cluster", "yes"]).start();
    // A joining member lets in administrators only.
    let conn = cluster
        .connect_with(
            lapin::ConnectionProperties::default()
                .with_client_property("qpid.ha-admin".into(), "1".into()),
        )
        .await;
    let mut agent = Agent::open(&conn).await;
    assert_eq!(
        agent.object(HA_OID).await[0]["_values"]["status"],
        "joining"
    );
    agent
        .method_on(HA_OID, "promote", json!({}))
        .await
        .expect("a lone member may be promoted");
    assert_eq!(agent.object(HA_OID).await[0]["_values"]["status"], "active");
}
