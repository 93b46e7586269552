//! The `--json` forms of the listings (schema in docs/user-guide.md). Every document is an
//! object with `"version": 1`; readers must ignore fields they do not know.

use mgmt_client::{BindingInfo, ExchangeInfo, ManagedObject, QueueInfo};
use serde_json::{Map, Value, json};

/// The schema version of every `--json` document.
pub const JSON_VERSION: u64 = 1;

fn binding(b: &BindingInfo) -> Value {
    json!({"exchange": b.exchange, "queue": b.queue, "key": b.key, "arguments": b.arguments})
}

pub fn overview(exchanges: &[ExchangeInfo], queues: &[QueueInfo]) -> Value {
    let mut by_type = Map::new();
    for exchange in exchanges {
        let entry = by_type
            .entry(exchange.exchange_type.clone())
            .or_insert(json!(0));
        *entry = json!(entry.as_u64().unwrap_or(0) + 1);
    }
    let durable = queues.iter().filter(|q| q.durable).count();
    json!({"version": JSON_VERSION,
           "exchanges": {"total": exchanges.len(), "byType": by_type},
           "queues": {"total": queues.len(), "durable": durable,
                      "nonDurable": queues.len() - durable}})
}

/// `queues`; with `bindings`, each queue carries the bindings to it.
pub fn queues(queues: &[&QueueInfo], bindings: Option<&[BindingInfo]>) -> Value {
    let list: Vec<Value> = queues
        .iter()
        .map(|q| {
            let mut value = json!({"name": q.name, "durable": q.durable,
                "autoDelete": q.auto_delete, "exclusive": q.exclusive,
                "arguments": q.arguments, "altExchange": q.alternate_exchange,
                "msgDepth": q.message_depth, "byteDepth": q.byte_depth,
                "consumerCount": q.consumer_count, "bindingCount": q.binding_count});
            if let Some(bindings) = bindings {
                value["bindings"] = bindings
                    .iter()
                    .filter(|b| b.queue == q.name)
                    .map(binding)
                    .collect();
            }
            value
        })
        .collect();
    json!({"version": JSON_VERSION, "queues": list})
}

/// `exchanges`; with `bindings`, each exchange carries its bindings.
pub fn exchanges(exchanges: &[&ExchangeInfo], bindings: Option<&[BindingInfo]>) -> Value {
    let list: Vec<Value> = exchanges
        .iter()
        .map(|e| {
            let mut value = json!({"name": e.name, "type": e.exchange_type,
                "durable": e.durable, "autoDelete": e.auto_delete, "arguments": e.arguments,
                "altExchange": e.alternate_exchange, "bindingCount": e.binding_count});
            if let Some(bindings) = bindings {
                value["bindings"] = bindings
                    .iter()
                    .filter(|b| b.exchange == e.name)
                    .map(binding)
                    .collect();
            }
            value
        })
        .collect();
    json!({"version": JSON_VERSION, "exchanges": list})
}

/// `list TYPE`: each object's chosen properties, as the broker reported them.
pub fn objects(object_type: &str, columns: &[String], objects: &[ManagedObject]) -> Value {
    let list: Vec<Value> = objects
        .iter()
        .map(|o| {
            let chosen: Map<String, Value> = columns
                .iter()
                .filter_map(|c| o.values.get(c).map(|v| (c.clone(), v.clone())))
                .collect();
            Value::Object(chosen)
        })
        .collect();
    json!({"version": JSON_VERSION, "type": object_type, "objects": list})
}

pub fn log_level(level: &str) -> Value {
    json!({"version": JSON_VERSION, "level": level})
}
