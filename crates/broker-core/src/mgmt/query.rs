//! `_query_request`: objects by class or by object id, with Qpid's property names, answered
//! in pages of at most `QUERY_PAGE_OBJECTS` objects (`partial` on all but the last).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::broker::Broker;
use crate::queue::Queue;

use super::QUERY_PAGE_OBJECTS;
use super::error::MgmtError;
use super::ha;
use super::json::{Fields, from_table};
use super::names::{BROKER_NAME, PACKAGE, binding_name, escape, object_ref, parse_object_id};
use super::reply::ReplyTo;

/// The classes a query may name.
pub const CLASSES: &[&str] = &[
    "broker",
    "queue",
    "exchange",
    "binding",
    "connection",
    "subscription",
    "habroker",
];

/// One object of an answer.
#[derive(Debug)]
struct Object {
    package: &'static str,
    class: &'static str,
    name: String,
    values: Value,
}

impl Object {
    fn to_json(&self) -> Value {
        json!({
            "_object_id": { "_object_name": format!("{}:{}:{}", self.package, self.class, self.name) },
            "_schema_id": { "_package_name": self.package, "_class_name": self.class },
            "_values": self.values,
        })
    }
}

/// Answers a query request.
pub fn answer(
    broker: &Broker,
    request: &Value,
    reply: &ReplyTo,
    sequence: u64,
) -> Result<(), MgmtError> {
    let f = Fields::of("query", request)?;
    if let Some(what) = f.opt_str("_what")?
        && what != "OBJECT"
    {
        return Err(MgmtError::invalid(format!(
            "_what '{what}' is not supported (only OBJECT)"
        )));
    }
    let objects = match (f.opt_object("_schema_id")?, f.opt_object("_object_id")?) {
        (Some(schema), None) => by_class(broker, schema)?,
        (None, Some(id)) => by_id(broker, id.str("_object_name")?)?,
        _ => {
            return Err(MgmtError::invalid(
                "a query needs exactly one of '_schema_id' and '_object_id'",
            ));
        }
    };
    send_pages(broker, reply, sequence, &objects);
    Ok(())
}

fn send_pages(broker: &Broker, reply: &ReplyTo, sequence: u64, objects: &[Object]) {
    let pages: Vec<&[Object]> = if objects.is_empty() {
        vec![&[]]
    } else {
        objects.chunks(QUERY_PAGE_OBJECTS).collect()
    };
    let last = pages.len() - 1;
    for (i, page) in pages.into_iter().enumerate() {
        let mut body = broker.mgmt.envelope(sequence);
        body["objects"] = Value::Array(page.iter().map(Object::to_json).collect());
        reply.send(broker, "_query_response", &body, i != last);
    }
}

fn by_class(broker: &Broker, schema: Fields<'_>) -> Result<Vec<Object>, MgmtError> {
    let class = schema.str("_class_name")?;
    if let Some(p) = schema.opt_str("_package_name")?
        && p != PACKAGE
        && !(p == ha::HA_PACKAGE && class == ha::HA_CLASS)
    {
        return Err(MgmtError::not_found(format!("unknown package '{p}'")));
    }
    let class = CLASSES.iter().find(|c| **c == class).ok_or_else(|| {
        MgmtError::not_found(format!(
            "unknown class '{class}' (known: {})",
            CLASSES.join(", ")
        ))
    })?;
    Ok(objects_of(broker, class))
}

fn by_id(broker: &Broker, id: &str) -> Result<Vec<Object>, MgmtError> {
    if id == ha::HA_OBJECT_ID {
        return Ok(objects_of(broker, ha::HA_CLASS));
    }
    let Ok((class, name)) = parse_object_id(id) else {
        return Ok(Vec::new());
    };
    let Some(class) = CLASSES.iter().find(|c| **c == class && **c != ha::HA_CLASS) else {
        return Ok(Vec::new());
    };
    let mut all = match *class {
        "queue" => broker
            .queue(name)
            .map(|q| vec![queue(&q, &binding_counts(broker))])
            .unwrap_or_default(),
        _ => objects_of(broker, class),
    };
    all.retain(|o| o.name == name);
    Ok(all)
}

fn objects_of(broker: &Broker, class: &'static str) -> Vec<Object> {
    match class {
        "broker" => vec![broker_object(broker)],
        "queue" => {
            let counts = binding_counts(broker);
            sorted_queues(broker)
                .iter()
                .map(|q| queue(q, &counts))
                .collect()
        }
        "exchange" => exchanges(broker),
        "binding" => bindings(broker),
        "connection" => connections(broker),
        "habroker" => ha_objects(broker),
        _ => subscriptions(broker),
    }
}

fn sorted_queues(broker: &Broker) -> Vec<Arc<Queue>> {
    let mut all = broker.queues();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

fn broker_object(broker: &Broker) -> Object {
    Object {
        package: PACKAGE,
        class: "broker",
        name: BROKER_NAME.to_string(),
        values: json!({
            "name": BROKER_NAME,
            "systemId": broker.mgmt.broker_id().to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime": broker.uptime().as_nanos() as u64,
            "connections": broker.mgmt.connection_count(),
            "queues": broker.queues().len(),
            "exchanges": broker.exchanges().len(),
        }),
    }
}

/// The HA object, if the broker has one.
fn ha_objects(broker: &Broker) -> Vec<Object> {
    if !ha::enabled(broker) {
        return Vec::new();
    }
    vec![Object {
        package: ha::HA_PACKAGE,
        class: ha::HA_CLASS,
        name: ha::HA_NAME.to_string(),
        values: ha::values(broker),
    }]
}

/// Bindings per queue name, counted once per query (the default exchange's adds 1 each).
fn binding_counts(broker: &Broker) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for e in broker.exchanges() {
        for b in e.bindings() {
            *counts.entry(b.queue.name.clone()).or_insert(0) += 1;
        }
    }
    counts
}

fn queue(q: &Queue, counts: &HashMap<String, u64>) -> Object {
    let (depth, bytes, enq, deq, consumers) = {
        let st = q.lock();
        (
            st.message_count(),
            st.ready_bytes(),
            st.enqueued_total,
            st.dequeued_total,
            st.consumer_count(),
        )
    };
    let mut v = json!({
        "name": q.name, "durable": q.durable, "autoDelete": q.auto_delete,
        "exclusive": q.exclusive, "arguments": from_table(&q.arguments),
        "msgDepth": depth, "byteDepth": bytes, "msgTotalEnqueues": enq, "msgTotalDequeues": deq,
        "consumerCount": consumers, "bindingCount": counts.get(&q.name).copied().unwrap_or(0) + 1,
    });
    if let Some(alt) = &q.settings.dead_letter_exchange {
        v["altExchange"] = alt.clone().into();
    }
    Object {
        package: PACKAGE,
        class: "queue",
        name: q.name.clone(),
        values: v,
    }
}

fn exchanges(broker: &Broker) -> Vec<Object> {
    let mut all = broker.exchanges();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all.iter()
        .map(|e| {
            let mut v = json!({
                "name": e.name, "type": e.kind.name(), "durable": e.durable,
                "autoDelete": e.auto_delete, "arguments": from_table(&e.arguments),
                "bindingCount": e.binding_count(),
            });
            if let Some(alt) = &e.alternate {
                v["altExchange"] = alt.clone().into();
            }
            Object {
                package: PACKAGE,
                class: "exchange",
                name: e.name.clone(),
                values: v,
            }
        })
        .collect()
}

fn bindings(broker: &Broker) -> Vec<Object> {
    let mut all = broker.exchanges();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for e in all {
        for b in e.bindings() {
            out.push(Object {
                package: PACKAGE,
                class: "binding",
                name: binding_name(&e.name, &b.queue.name, &b.key),
                values: json!({
                    "exchangeRef": object_ref("exchange", &e.name),
                    "queueRef": object_ref("queue", &b.queue.name),
                    "bindingKey": b.key, "arguments": from_table(&b.arguments),
                }),
            });
        }
    }
    out
}

fn connections(broker: &Broker) -> Vec<Object> {
    broker
        .mgmt
        .connections()
        .into_iter()
        .map(|(id, c)| Object {
            package: PACKAGE,
            class: "connection",
            name: id.to_string(),
            values: json!({
                "id": id, "address": c.address, "authIdentity": c.auth_identity,
                "clientProperties": from_table(&c.client_properties),
            }),
        })
        .collect()
}

fn subscriptions(broker: &Broker) -> Vec<Object> {
    let mut out = Vec::new();
    for q in sorted_queues(broker) {
        let consumers: Vec<_> = q.lock().consumers().to_vec();
        for c in consumers {
            let connection = c.link.connection_id.to_string();
            let mut v = Map::new();
            v.insert("name".into(), c.tag.clone().into());
            v.insert("queueRef".into(), object_ref("queue", &q.name));
            v.insert(
                "connectionRef".into(),
                object_ref("connection", &connection),
            );
            v.insert("browsing".into(), false.into());
            v.insert("acknowledged".into(), (!c.no_ack).into());
            v.insert("exclusive".into(), c.exclusive.into());
            v.insert("arguments".into(), from_table(&c.arguments));
            out.push(Object {
                package: PACKAGE,
                class: "subscription",
                name: format!("{connection}/{}/{}", c.link.channel, escape(&c.tag)),
                values: Value::Object(v),
            });
        }
    }
    out
}
