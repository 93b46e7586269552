//! Events: every configuration change is numbered with the per-broker sequence and, when a
//! queue is bound to `qmf.default.topic`, published there with Qpid's routing key
//! `agent.ind.event.org_apache_qpid_broker.<event>.info.apache_org.qpidd.<broker-id>`.

use std::time::{SystemTime, UNIX_EPOCH};

use amq_protocol::types::FieldTable;
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::delivery::Consumer;
use crate::exchange::Exchange;
use crate::queue::Queue;

use super::json::from_table;
use super::names::{PACKAGE, object_id};
use super::reply::publish_event;

/// A configuration change to report.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A queue was created.
    QueueDeclare(&'a Queue),
    /// A queue was deleted.
    QueueDelete(&'a str),
    /// An exchange was created.
    ExchangeDeclare(&'a Exchange),
    /// An exchange was deleted.
    ExchangeDelete(&'a str),
    /// A binding was added.
    Bind(BindingEvent<'a>),
    /// A binding was removed.
    Unbind(BindingEvent<'a>),
    /// A consumer started.
    Subscribe(SubscriptionEvent<'a>),
    /// A consumer stopped.
    Unsubscribe(SubscriptionEvent<'a>),
}

/// The binding a `bind` or `unbind` event is about.
#[derive(Debug, Clone, Copy)]
pub struct BindingEvent<'a> {
    /// The exchange.
    pub exchange: &'a str,
    /// The queue.
    pub queue: &'a str,
    /// The binding key.
    pub key: &'a str,
    /// The binding arguments.
    pub arguments: &'a FieldTable,
}

/// The consumer a `subscribe` or `unsubscribe` event is about.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionEvent<'a> {
    /// The queue.
    pub queue: &'a str,
    /// The consumer tag.
    pub tag: &'a str,
    /// Exclusive consumer.
    pub exclusive: bool,
    /// The consume arguments.
    pub arguments: &'a FieldTable,
    /// The consumer's connection.
    pub connection_id: u64,
}

impl<'a> SubscriptionEvent<'a> {
    /// The event about consumer `c`.
    pub fn of(c: &'a Consumer) -> SubscriptionEvent<'a> {
        SubscriptionEvent {
            queue: &c.queue.name,
            tag: &c.tag,
            exclusive: c.exclusive,
            arguments: &c.arguments,
            connection_id: c.link.connection_id,
        }
    }
}

impl Event<'_> {
    /// Qpid's event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::QueueDeclare(_) => "queueDeclare",
            Event::QueueDelete(_) => "queueDelete",
            Event::ExchangeDeclare(_) => "exchangeDeclare",
            Event::ExchangeDelete(_) => "exchangeDelete",
            Event::Bind(_) => "bind",
            Event::Unbind(_) => "unbind",
            Event::Subscribe(_) => "subscribe",
            Event::Unsubscribe(_) => "unsubscribe",
        }
    }

    /// The event's `_values`, with Qpid's names.
    pub fn values(&self) -> Value {
        match self {
            Event::QueueDeclare(q) => json!({
                "qName": q.name, "durable": q.durable, "excl": q.exclusive,
                "autoDel": q.auto_delete, "altEx": q.settings.dead_letter_exchange.clone().unwrap_or_default(),
                "args": from_table(&q.arguments), "disp": "created",
            }),
            Event::QueueDelete(name) => json!({ "qName": name }),
            Event::ExchangeDeclare(e) => json!({
                "exName": e.name, "exType": e.kind.name(), "durable": e.durable,
                "autoDel": e.auto_delete, "altEx": e.alternate.clone().unwrap_or_default(),
                "args": from_table(&e.arguments), "disp": "created",
            }),
            Event::ExchangeDelete(name) => json!({ "exName": name }),
            Event::Bind(b) | Event::Unbind(b) => json!({
                "exName": b.exchange, "qName": b.queue, "key": b.key, "args": from_table(b.arguments),
            }),
            Event::Subscribe(s) => json!({
                "qName": s.queue, "dest": s.tag, "excl": s.exclusive, "args": from_table(s.arguments),
                "connection": object_id("connection", &s.connection_id.to_string()),
            }),
            Event::Unsubscribe(s) => json!({
                "qName": s.queue, "dest": s.tag,
                "connection": object_id("connection", &s.connection_id.to_string()),
            }),
        }
    }
}

/// Numbers `event` and publishes it if anyone listens. Call with no registry lock held.
pub fn emit(broker: &Broker, event: Event<'_>) {
    let sequence = broker.mgmt.next_sequence();
    let listened = broker
        .exchange(super::EVENT_EXCHANGE)
        .is_some_and(|e| e.binding_count() > 0);
    if !listened {
        return;
    }
    let mut body = broker.mgmt.envelope(sequence);
    body["_schema_id"] = json!({ "_package_name": PACKAGE, "_class_name": event.name() });
    body["_timestamp"] = now_ns().into();
    body["_severity"] = "info".into();
    body["_values"] = event.values();
    let key = format!(
        "agent.ind.event.org_apache_qpid_broker.{}.info.apache_org.qpidd.{}",
        event.name(),
        broker.mgmt.broker_id()
    );
    publish_event(broker, &key, &body);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
