//! `_method_request`: the broker object's methods (`create`, `delete`, `purge`, `echo`,
//! `getLogLevel`, `setLogLevel`, `shutdown`), the queue object's `purge`, and the HA object's
//! methods (in `ha`).

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Map, Value, json};

use crate::broker::{Broker, ExchangeDeclare, QueueDeclare};

use super::error::{ErrorCode, MgmtError};
use super::ha;
use super::json::{Fields, to_amqp, to_table};
use super::names::{BROKER_NAME, parse_binding_name, parse_object_id};
use super::reply::ReplyTo;
use super::state::LogControlError;
use super::{After, Requester};

/// The longest queue or exchange name or binding key (an AMQP short string).
const MAX_NAME_BYTES: usize = 255;

/// Methods Qpid's broker object has that this broker does not.
const NOT_IMPLEMENTED: &[&str] = &[
    "connect",
    "query",
    "queueMoveMessages",
    "queueRedirect",
    "getTimestampConfig",
    "setTimestampConfig",
    "getLogHiresTimestamp",
    "setLogHiresTimestamp",
    "reloadACLFile",
];

/// Queue properties `create` knows besides `x-*` and `qpid.*` arguments.
const QUEUE_PROPERTIES: &[&str] = &[
    "durable",
    "auto-delete",
    "autoDelete",
    "exclusive",
    "alternate-exchange",
];
/// Exchange properties `create` knows besides `qpid.*` arguments.
const EXCHANGE_PROPERTIES: &[&str] = &[
    "exchange-type",
    "type",
    "durable",
    "auto-delete",
    "autoDelete",
    "alternate-exchange",
];

/// Carries out a method request and sends its `_method_response`.
pub fn call(
    broker: &Arc<Broker>,
    requester: Requester,
    request: &Value,
    reply: &ReplyTo,
    sequence: u64,
) -> Result<After, MgmtError> {
    let f = Fields::of("method request", request)?;
    let target = f
        .opt_object("_object_id")?
        .ok_or_else(|| MgmtError::invalid("method request is missing '_object_id'"))?
        .str("_object_name")?;
    let method = f.str("_method_name")?;
    let empty = Value::Object(Map::new());
    let args = Fields::of("_arguments", f.get("_arguments").unwrap_or(&empty))?;
    let (out, after) = if target == ha::HA_OBJECT_ID {
        if !ha::enabled(broker) {
            return Err(MgmtError::not_found(format!(
                "no object '{target}': HA is disabled on this broker; start it with ha-queue-replication=yes or ha-cluster=yes"
            )));
        }
        match ha::call(broker, method, args, reply, sequence)? {
            Some(out) => (out, After::Nothing),
            // Answered later, by the HA module.
            None => return Ok(After::Nothing),
        }
    } else {
        match parse_object_id(target)? {
            ("broker", BROKER_NAME) => broker_method(broker, requester, method, args)?,
            ("queue", name) => (
                queue_method(broker, requester, name, method, args)?,
                After::Nothing,
            ),
            _ => return Err(MgmtError::not_found(format!("no object '{target}'"))),
        }
    };
    let mut body = broker.mgmt.envelope(sequence);
    body["_arguments"] = out;
    reply.send(broker, "_method_response", &body, false);
    Ok(after)
}

fn broker_method(
    broker: &Arc<Broker>,
    requester: Requester,
    method: &str,
    args: Fields<'_>,
) -> Result<(Value, After), MgmtError> {
    if matches!(method, "create" | "delete" | "purge") {
        broker.backup_refusal()?;
    }
    let out = match method {
        "create" => create(broker, requester, args)?,
        "delete" => delete(broker, requester, args)?,
        "purge" => {
            let kind = args.str("type")?;
            if kind != "queue" {
                return Err(MgmtError::invalid(format!(
                    "cannot purge a '{kind}' (only queues)"
                )));
            }
            purge(broker, requester, args.str("name")?)?
        }
        "echo" => json!({ "sequence": args.get("sequence").cloned().unwrap_or(Value::Null),
                          "body": args.get("body").cloned().unwrap_or(Value::Null) }),
        "getLogLevel" => get_log_level(broker)?,
        "setLogLevel" => set_log_level(broker, args.str("level")?)?,
        "shutdown" => {
            tracing::info!(target: "Management", notice = true, "shutdown requested by connection {}", requester.connection_id);
            return Ok((json!({}), After::Shutdown));
        }
        other => return Err(unknown_method(other, "broker")),
    };
    Ok((out, After::Nothing))
}

fn queue_method(
    broker: &Broker,
    requester: Requester,
    name: &str,
    method: &str,
    args: Fields<'_>,
) -> Result<Value, MgmtError> {
    if method != "purge" {
        return Err(unknown_method(method, "queue"));
    }
    match args.get("request") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(0) => {}
        Some(_) => {
            return Err(MgmtError::new(
                ErrorCode::NotImplemented,
                "purge with a 'request' count other than 0 (all) is not implemented",
            ));
        }
    }
    purge(broker, requester, name)
}

fn unknown_method(method: &str, class: &str) -> MgmtError {
    if NOT_IMPLEMENTED.contains(&method) {
        MgmtError::new(
            ErrorCode::NotImplemented,
            format!("method '{method}' is not implemented"),
        )
    } else {
        MgmtError::invalid(format!("unknown method '{method}' on the {class} object"))
    }
}

fn purge(broker: &Broker, requester: Requester, name: &str) -> Result<Value, MgmtError> {
    let n = broker.purge(requester.connection_id, name)?;
    Ok(json!({ "messages": n }))
}

// ---- create ---------------------------------------------------------------------------------

fn create(broker: &Broker, requester: Requester, args: Fields<'_>) -> Result<Value, MgmtError> {
    let kind = args.str("type")?;
    let name = args.str("name")?;
    let strict = args.opt_bool("strict")?.unwrap_or(false);
    let empty = Map::new();
    let props = args.opt_object("properties")?.map_or(&empty, |p| p.map());
    match kind {
        "queue" => create_queue(broker, short_name(name)?, props, strict)?,
        "exchange" => create_exchange(broker, short_name(name)?, props, strict)?,
        "binding" => {
            let (exchange, queue, key) = parse_binding_name(name)?;
            short_name(&key)?;
            let arguments = to_table(props)?;
            if !broker.bind(requester.connection_id, &queue, &exchange, &key, &arguments)? {
                return Err(already_exists("binding", name));
            }
        }
        other => return Err(unknown_type(other)),
    }
    Ok(json!({}))
}

/// Names and keys are AMQP short strings: at most 255 bytes.
fn short_name(name: &str) -> Result<&str, MgmtError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(MgmtError::invalid(format!(
            "name of {} bytes is longer than {MAX_NAME_BYTES} bytes",
            name.len()
        )));
    }
    Ok(name)
}

fn unknown_type(kind: &str) -> MgmtError {
    MgmtError::invalid(format!(
        "unknown type '{kind}' (known: queue, exchange, binding)"
    ))
}

fn already_exists(kind: &str, name: &str) -> MgmtError {
    MgmtError::new(
        ErrorCode::PreconditionFailed,
        format!("object already exists: {kind} '{name}'"),
    )
}

/// Checks `strict` and splits the properties into known flags and arguments.
fn split_properties(
    props: &Map<String, Value>,
    known: &[&str],
    strict: bool,
    kind: &str,
) -> Result<FieldTable, MgmtError> {
    let mut arguments = FieldTable::default();
    for (k, v) in props {
        if known.contains(&k.as_str()) {
            continue;
        }
        let recognised = k.starts_with("qpid.") || (kind == "queue" && k.starts_with("x-"));
        if strict && !recognised {
            return Err(MgmtError::invalid(format!(
                "unknown {kind} property '{k}' (strict)"
            )));
        }
        let key = amq_protocol::types::ShortString::try_new(k.as_str())
            .map_err(|_| MgmtError::invalid("property name longer than 255 bytes"))?;
        arguments.insert(key, to_amqp(v)?);
    }
    Ok(arguments)
}

fn flag(p: Fields<'_>, names: &[&str]) -> Result<bool, MgmtError> {
    for n in names {
        if let Some(b) = p.opt_bool(n)? {
            return Ok(b);
        }
    }
    Ok(false)
}

fn create_queue(
    broker: &Broker,
    name: &str,
    props: &Map<String, Value>,
    strict: bool,
) -> Result<(), MgmtError> {
    if name.is_empty() {
        return Err(MgmtError::invalid("a queue name is required"));
    }
    if broker.queue(name).is_some() {
        return Err(already_exists("queue", name));
    }
    let wrapped = Value::Object(props.clone());
    let p = Fields::of("properties", &wrapped)?;
    let mut arguments = split_properties(props, QUEUE_PROPERTIES, strict, "queue")?;
    if let Some(alt) = p.opt_str("alternate-exchange")? {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(alt)),
        );
    }
    let d = QueueDeclare {
        name: name.to_string(),
        passive: false,
        durable: flag(p, &["durable"])?,
        exclusive: flag(p, &["exclusive"])?,
        auto_delete: flag(p, &["auto-delete", "autoDelete"])?,
        arguments,
    };
    // Connection 0 is no connection: an exclusive queue made here belongs to nobody.
    broker.declare_queue(0, &d)?;
    Ok(())
}

fn create_exchange(
    broker: &Broker,
    name: &str,
    props: &Map<String, Value>,
    strict: bool,
) -> Result<(), MgmtError> {
    if broker.exchange(name).is_some() {
        return Err(already_exists("exchange", name));
    }
    let wrapped = Value::Object(props.clone());
    let p = Fields::of("properties", &wrapped)?;
    let kind = match p.opt_str("exchange-type")? {
        Some(k) => k,
        None => p
            .opt_str("type")?
            .ok_or_else(|| MgmtError::invalid("an exchange needs the property 'exchange-type'"))?,
    };
    let mut arguments = split_properties(props, EXCHANGE_PROPERTIES, strict, "exchange")?;
    if let Some(alt) = p.opt_str("alternate-exchange")? {
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(alt)),
        );
    }
    let d = ExchangeDeclare {
        name: name.to_string(),
        kind: kind.to_string(),
        passive: false,
        durable: flag(p, &["durable"])?,
        auto_delete: flag(p, &["auto-delete", "autoDelete"])?,
        internal: false,
        arguments,
    };
    broker.declare_exchange(&d)?;
    Ok(())
}

// ---- delete ---------------------------------------------------------------------------------

fn delete(broker: &Broker, requester: Requester, args: Fields<'_>) -> Result<Value, MgmtError> {
    let kind = args.str("type")?;
    let name = args.str("name")?;
    let empty = Value::Object(Map::new());
    let options = match args.opt_object("options")? {
        Some(o) => o,
        None => Fields::of("options", &empty)?,
    };
    let if_empty = options.opt_bool("if_empty")?.unwrap_or(false);
    let if_unused = options.opt_bool("if_unused")?.unwrap_or(false);
    match kind {
        "queue" => {
            if broker.queue(name).is_none() {
                return Err(MgmtError::not_found(format!("no queue '{name}'")));
            }
            broker.delete_queue(requester.connection_id, name, if_unused, if_empty)?;
        }
        "exchange" => {
            if broker.exchange(name).is_none() {
                return Err(MgmtError::not_found(format!("no exchange '{name}'")));
            }
            broker.delete_exchange(name, if_unused)?;
        }
        "binding" => {
            let (exchange, queue, key) = parse_binding_name(name)?;
            let all = broker
                .exchange(&exchange)
                .map(|e| e.bindings())
                .unwrap_or_default();
            let Some(b) = all.iter().find(|b| b.queue.name == queue && b.key == key) else {
                return Err(MgmtError::not_found(format!("no binding '{name}'")));
            };
            broker.unbind(
                requester.connection_id,
                &queue,
                &exchange,
                &key,
                &b.arguments,
            )?;
        }
        other => return Err(unknown_type(other)),
    }
    Ok(json!({}))
}

// ---- logging --------------------------------------------------------------------------------

fn get_log_level(broker: &Broker) -> Result<Value, MgmtError> {
    let control = broker.mgmt.log_control().ok_or_else(|| {
        MgmtError::new(ErrorCode::NotImplemented, "this broker has no log control")
    })?;
    Ok(json!({ "level": control.get() }))
}

fn set_log_level(broker: &Broker, level: &str) -> Result<Value, MgmtError> {
    let control = broker.mgmt.log_control().ok_or_else(|| {
        MgmtError::new(ErrorCode::NotImplemented, "this broker has no log control")
    })?;
    control.set(level).map_err(|e| match e {
        LogControlError::Invalid(t) => MgmtError::invalid(t),
        LogControlError::NotImplemented(t) => MgmtError::new(ErrorCode::NotImplemented, t),
    })?;
    Ok(json!({}))
}
