//! One type per management operation. Each knows the request it makes and how to read the
//! answer; `Client::run` sends it. The CLIs build these from their arguments and print what
//! comes back.

use serde_json::{Map, Value, json};

use crate::Error;
use crate::client::{BROKER_OBJECT, Request};

/// The HA module's object (Qpid's `org.apache.qpid.ha:habroker:ha-broker`).
pub const HA_BROKER_OBJECT: &str = "org.apache.qpid.ha:habroker:ha-broker";

/// A management operation: a request and the reading of its answer.
pub trait Operation {
    type Output;
    fn request(&self) -> Request;
    fn parse(&self, answer: Value) -> Result<Self::Output, Error>;
}

fn method(name: &str, arguments: Value) -> Request {
    Request::Method {
        object: BROKER_OBJECT.into(),
        name: name.into(),
        arguments,
    }
}

fn class(name: &str) -> Request {
    Request::QueryClass { class: name.into() }
}

/// One object of a query answer: its id and its property values.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedObject {
    pub object_name: String,
    pub values: Map<String, Value>,
}

fn objects(answer: Value) -> Result<Vec<ManagedObject>, Error> {
    let Value::Array(items) = answer else {
        return Err(Error::Internal("a query answer without objects".into()));
    };
    Ok(items
        .into_iter()
        .map(|mut item| ManagedObject {
            object_name: item["_object_id"]["_object_name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            values: match item["_values"].take() {
                Value::Object(map) => map,
                _ => Map::new(),
            },
        })
        .collect())
}

/// The name inside a reference (`{"_object_name": "org.apache.qpid.broker:queue:q1"}` → `q1`).
pub fn reference_name(reference: &Value) -> String {
    let name = reference["_object_name"].as_str().unwrap_or_default();
    name.splitn(3, ':').nth(2).unwrap_or(name).to_string()
}

/// A string property that may be absent or null.
fn optional_text(values: &Map<String, Value>, key: &str) -> Option<String> {
    values.get(key).and_then(Value::as_str).map(str::to_string)
}

fn text(values: &Map<String, Value>, key: &str) -> String {
    values
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn flag(values: &Map<String, Value>, key: &str) -> bool {
    match values.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64() != Some(0),
        _ => false,
    }
}

fn count(values: &Map<String, Value>, key: &str) -> u64 {
    values.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn table(values: &Map<String, Value>, key: &str) -> Map<String, Value> {
    match values.get(key) {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    }
}

fn list(values: &Map<String, Value>, key: &str) -> Vec<Value> {
    match values.get(key) {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// Every object of a class, untyped (`qpid-config list`).
#[derive(Clone, Debug)]
pub struct QueryObjects {
    pub class: String,
}

impl Operation for QueryObjects {
    type Output = Vec<ManagedObject>;
    fn request(&self) -> Request {
        class(&self.class)
    }
    fn parse(&self, answer: Value) -> Result<Self::Output, Error> {
        objects(answer)
    }
}

/// A queue as the agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: Map<String, Value>,
    pub alternate_exchange: Option<String>,
    pub message_depth: u64,
    pub byte_depth: u64,
    pub consumer_count: u64,
    pub binding_count: u64,
}

/// Every queue.
#[derive(Clone, Debug)]
pub struct QueryQueues;

impl Operation for QueryQueues {
    type Output = Vec<QueueInfo>;
    fn request(&self) -> Request {
        class("queue")
    }
    fn parse(&self, answer: Value) -> Result<Self::Output, Error> {
        Ok(objects(answer)?
            .into_iter()
            .map(|o| QueueInfo {
                name: text(&o.values, "name"),
                durable: flag(&o.values, "durable"),
                auto_delete: flag(&o.values, "autoDelete"),
                exclusive: flag(&o.values, "exclusive"),
                arguments: table(&o.values, "arguments"),
                alternate_exchange: optional_text(&o.values, "altExchange"),
                message_depth: count(&o.values, "msgDepth"),
                byte_depth: count(&o.values, "byteDepth"),
                consumer_count: count(&o.values, "consumerCount"),
                binding_count: count(&o.values, "bindingCount"),
            })
            .collect())
    }
}

/// An exchange as the agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeInfo {
    pub name: String,
    pub exchange_type: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: Map<String, Value>,
    pub alternate_exchange: Option<String>,
    pub binding_count: u64,
}

/// Every exchange.
#[derive(Clone, Debug)]
pub struct QueryExchanges;

impl Operation for QueryExchanges {
    type Output = Vec<ExchangeInfo>;
    fn request(&self) -> Request {
        class("exchange")
    }
    fn parse(&self, answer: Value) -> Result<Self::Output, Error> {
        Ok(objects(answer)?
            .into_iter()
            .map(|o| ExchangeInfo {
                name: text(&o.values, "name"),
                exchange_type: text(&o.values, "type"),
                durable: flag(&o.values, "durable"),
                auto_delete: flag(&o.values, "autoDelete"),
                arguments: table(&o.values, "arguments"),
                alternate_exchange: optional_text(&o.values, "altExchange"),
                binding_count: count(&o.values, "bindingCount"),
            })
            .collect())
    }
}

/// A binding as the agent reports it (the default exchange's implicit ones are not listed).
#[derive(Clone, Debug, PartialEq)]
pub struct BindingInfo {
    pub exchange: String,
    pub queue: String,
    pub key: String,
    pub arguments: Map<String, Value>,
}

/// Every binding.
#[derive(Clone, Debug)]
pub struct QueryBindings;

impl Operation for QueryBindings {
    type Output = Vec<BindingInfo>;
    fn request(&self) -> Request {
        class("binding")
    }
    fn parse(&self, answer: Value) -> Result<Self::Output, Error> {
        Ok(objects(answer)?
            .into_iter()
            .map(|o| BindingInfo {
                exchange: reference_name(&o.values["exchangeRef"]),
                queue: reference_name(&o.values["queueRef"]),
                key: text(&o.values, "bindingKey"),
                arguments: table(&o.values, "arguments"),
            })
            .collect())
    }
}

/// `create` a queue, strictly: `properties` are Qpid's names (`qpid.max_count`, ...).
#[derive(Clone, Debug)]
pub struct CreateQueue {
    pub name: String,
    pub durable: bool,
    pub properties: Map<String, Value>,
}

impl Operation for CreateQueue {
    type Output = ();
    fn request(&self) -> Request {
        let mut properties = self.properties.clone();
        if self.durable {
            properties.insert("durable".into(), true.into());
        }
        method(
            "create",
            json!({"type": "queue", "name": self.name, "properties": properties, "strict": true}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// `create` an exchange of `exchange_type`, strictly.
#[derive(Clone, Debug)]
pub struct CreateExchange {
    pub exchange_type: String,
    pub name: String,
    pub durable: bool,
    pub properties: Map<String, Value>,
}

impl Operation for CreateExchange {
    type Output = ();
    fn request(&self) -> Request {
        let mut properties = self.properties.clone();
        properties.insert("exchange-type".into(), self.exchange_type.clone().into());
        if self.durable {
            properties.insert("durable".into(), true.into());
        }
        method(
            "create",
            json!({"type": "exchange", "name": self.name, "properties": properties, "strict": true}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// The binding name of the protocol (section 3.1): `/` and `\` escaped in exchange and queue.
pub fn binding_name(exchange: &str, queue: &str, key: &str) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace('/', "\\/");
    format!("{}/{}/{}", escape(exchange), escape(queue), key)
}

/// `create` a binding; `arguments` are the binding arguments (`x-match` and values for headers).
#[derive(Clone, Debug)]
pub struct CreateBinding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
    pub arguments: Map<String, Value>,
}

impl Operation for CreateBinding {
    type Output = ();
    fn request(&self) -> Request {
        method(
            "create",
            json!({"type": "binding", "name": binding_name(&self.exchange, &self.queue, &self.key),
                   "properties": self.arguments, "strict": true}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// `delete` a queue; `if_empty`/`if_unused` refuse a non-empty or consumed queue.
#[derive(Clone, Debug)]
pub struct DeleteQueue {
    pub name: String,
    pub if_empty: bool,
    pub if_unused: bool,
}

impl Operation for DeleteQueue {
    type Output = ();
    fn request(&self) -> Request {
        method(
            "delete",
            json!({"type": "queue", "name": self.name,
                   "options": {"if_empty": self.if_empty, "if_unused": self.if_unused}}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// `delete` an exchange.
#[derive(Clone, Debug)]
pub struct DeleteExchange {
    pub name: String,
}

impl Operation for DeleteExchange {
    type Output = ();
    fn request(&self) -> Request {
        method(
            "delete",
            json!({"type": "exchange", "name": self.name, "options": {}}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// `delete` a binding.
#[derive(Clone, Debug)]
pub struct DeleteBinding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
}

impl Operation for DeleteBinding {
    type Output = ();
    fn request(&self) -> Request {
        method(
            "delete",
            json!({"type": "binding", "name": binding_name(&self.exchange, &self.queue, &self.key),
                   "options": {}}),
        )
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// The broker's log enable rules (`getLogLevel`).
#[derive(Clone, Debug)]
pub struct GetLogLevel;

impl Operation for GetLogLevel {
    type Output = String;
    fn request(&self) -> Request {
        method("getLogLevel", json!({}))
    }
    fn parse(&self, answer: Value) -> Result<String, Error> {
        answer["level"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Internal("getLogLevel answered without a level".into()))
    }
}

/// Replaces the broker's log enable rules (`setLogLevel`).
#[derive(Clone, Debug)]
pub struct SetLogLevel {
    pub level: String,
}

impl Operation for SetLogLevel {
    type Output = ();
    fn request(&self) -> Request {
        method("setLogLevel", json!({"level": self.level}))
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// Stops the broker (`shutdown`).
#[derive(Clone, Debug)]
pub struct Shutdown;

impl Operation for Shutdown {
    type Output = ();
    fn request(&self) -> Request {
        method("shutdown", json!({}))
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// Starts replicating `queue` (which must exist here) from the same-named queue at `broker`
/// (one address or a comma-separated list): the HA object's `replicate` method. The broker
/// answers once its first attempt succeeded or failed, or after `timeout` seconds (the
/// broker's default, 5, when `None`) with a warning while it keeps trying: the output is that
/// warning.
#[derive(Clone, Debug)]
pub struct Replicate {
    pub broker: String,
    pub queue: String,
    pub timeout: Option<f64>,
}

impl Operation for Replicate {
    type Output = Option<String>;
    fn request(&self) -> Request {
        let mut arguments = json!({"broker": self.broker, "queue": self.queue});
        if let Some(timeout) = self.timeout {
            arguments["timeout"] = json!(timeout);
        }
        Request::Method {
            object: HA_BROKER_OBJECT.into(),
            name: "replicate".into(),
            arguments,
        }
    }
    fn parse(&self, answer: Value) -> Result<Option<String>, Error> {
        Ok(answer
            .get("warning")
            .and_then(Value::as_str)
            .map(str::to_string))
    }
}

/// Stops replicating `queue` on this broker; it keeps its messages and becomes an ordinary
/// queue: the HA object's `detach` method.
#[derive(Clone, Debug)]
pub struct Detach {
    pub queue: String,
}

impl Operation for Detach {
    type Output = ();
    fn request(&self) -> Request {
        Request::Method {
            object: HA_BROKER_OBJECT.into(),
            name: "detach".into(),
            arguments: json!({"queue": self.queue}),
        }
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

/// The HA object's properties (`org.apache.qpid.ha:habroker:ha-broker`).
#[derive(Clone, Debug, PartialEq)]
pub struct HaBrokerInfo {
    pub name: String,
    /// `joining`, `catchup`, `ready`, `recovering`, `active` or `standalone`.
    pub status: String,
    pub brokers_url: String,
    pub public_url: String,
    pub replicate_default: String,
    pub system_id: String,
    /// One JSON object per replica queue on this broker (`queue`, `original`, `state`, `lag`,
    /// ...), as the broker reports them; empty when the broker reports none.
    pub replicas: Vec<Value>,
    /// One JSON object per replicating subscription this broker serves as an original
    /// (`queue`, `replica`, `state`, `lag`, `confirmsHeld`, ...); empty when none.
    pub subscriptions: Vec<Value>,
    /// A cluster member's view of the cluster (`system-id`, `status`, `address`); empty
    /// outside a cluster.
    pub members: Vec<Value>,
    /// The latest promotion this broker knows of (0: none).
    pub epoch: u64,
    /// What the broker's store holds per durable queue (`queue`, `incarnation`, `lastId`,
    /// `messages`); empty without a store.
    pub store: Vec<Value>,
}

/// Reads the HA object; `None` if the broker has none (it runs with neither
/// `ha-queue-replication` nor `ha-cluster`).
#[derive(Clone, Debug)]
pub struct QueryHaBroker;

impl Operation for QueryHaBroker {
    type Output = Option<HaBrokerInfo>;
    fn request(&self) -> Request {
        class("habroker")
    }
    fn parse(&self, answer: Value) -> Result<Self::Output, Error> {
        Ok(objects(answer)?
            .into_iter()
            .find(|o| o.object_name == HA_BROKER_OBJECT)
            .map(|o| {
                let v = &o.values;
                HaBrokerInfo {
                    name: text(v, "name"),
                    status: text(v, "status"),
                    brokers_url: text(v, "brokersUrl"),
                    public_url: text(v, "publicUrl"),
                    replicate_default: text(v, "replicateDefault"),
                    system_id: text(v, "systemId"),
                    replicas: list(v, "replicas"),
                    subscriptions: list(v, "subscriptions"),
                    members: list(v, "members"),
                    epoch: v.get("epoch").and_then(Value::as_u64).unwrap_or(0),
                    store: list(v, "store"),
                }
            }))
    }
}

/// Makes the broker the cluster's primary: the HA object's `promote` method (`force`: even if
/// a reachable member has a newer epoch).
#[derive(Clone, Debug, Default)]
pub struct Promote {
    /// Override the epoch check of a joining member.
    pub force: bool,
}

impl Operation for Promote {
    type Output = ();
    fn request(&self) -> Request {
        Request::Method {
            object: HA_BROKER_OBJECT.into(),
            name: "promote".into(),
            arguments: if self.force {
                json!({ "force": true })
            } else {
                json!({})
            },
        }
    }
    fn parse(&self, _: Value) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_names_escape_slashes() {
        assert_eq!(binding_name("a/b", "q", "x/y"), "a\\/b/q/x/y");
        assert_eq!(binding_name("e", "q\\", ""), "e/q\\\\/");
    }

    #[test]
    fn references_name_their_object() {
        assert_eq!(
            reference_name(&json!({"_object_name": "org.apache.qpid.broker:queue:a:b"})),
            "a:b"
        );
    }

    #[test]
    fn the_ha_object_lists_replicas_and_subscriptions() {
        let replica = json!({"queue": "q", "original": "node1", "state": "ready",
            "lag": {"messages": 1, "bytes": 10, "oldestUnackedMs": 3}});
        let subscription = json!({"queue": "s", "replica": "10.0.0.2:40000", "state": "catchup",
            "lag": {"messages": 0, "bytes": 0, "oldestUnackedMs": 0}, "confirmsHeld": 2});
        let answer = json!([{
            "_object_id": {"_object_name": HA_BROKER_OBJECT},
            "_values": {"name": "ha-broker", "status": "standalone", "systemId": "id",
                "replicas": [replica], "subscriptions": [subscription]}
        }]);
        let info = QueryHaBroker.parse(answer).unwrap().unwrap();
        assert_eq!(info.status, "standalone");
        assert_eq!(info.replicas, [replica]);
        assert_eq!(info.subscriptions, [subscription]);
        // An older broker without the lists: both empty.
        let answer = json!([{"_object_id": {"_object_name": HA_BROKER_OBJECT},
            "_values": {"status": "joining"}}]);
        let info = QueryHaBroker.parse(answer).unwrap().unwrap();
        assert!(info.replicas.is_empty() && info.subscriptions.is_empty());
    }

    #[test]
    fn replicate_sends_its_timeout_and_reads_the_warning() {
        let with = Replicate {
            broker: "node1".into(),
            queue: "q".into(),
            timeout: Some(8.0),
        };
        let Request::Method { arguments, .. } = with.request() else {
            panic!("not a method");
        };
        assert_eq!(
            arguments,
            json!({"broker": "node1", "queue": "q", "timeout": 8.0})
        );
        let without = Replicate {
            timeout: None,
            ..with.clone()
        };
        let Request::Method { arguments, .. } = without.request() else {
            panic!("not a method");
        };
        assert_eq!(arguments, json!({"broker": "node1", "queue": "q"}));
        assert_eq!(with.parse(json!({})).unwrap(), None);
        assert_eq!(
            with.parse(json!({"warning": "no answer yet"}))
                .unwrap()
                .as_deref(),
            Some("no answer yet")
        );
        let Request::Method {
            name, arguments, ..
        } = (Detach { queue: "q".into() }).request()
        else {
            panic!("not a method");
        };
        assert_eq!(
            (name.as_str(), arguments),
            ("detach", json!({"queue": "q"}))
        );
    }
}
