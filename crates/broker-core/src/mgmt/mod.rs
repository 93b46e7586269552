//! The management agent: QMF2 requests over AMQP 0-9-1 with JSON bodies, as specified in
//! `docs/management-protocol.md`.
//!
//! A message published to [`REQUEST_EXCHANGE`] with routing key [`AGENT_ROUTING_KEY`] is handed
//! to [`handle`] (by the publishing channel, on the reader's thread) instead of being routed.
//! `handle` checks the envelope (reply queue, permission, size, content type, opcode, JSON,
//! version), then `query` answers `_query_request`s and `methods` carries out
//! `_method_request`s. Configuration changes anywhere in the broker call
//! [`crate::broker::Broker::emit_event`] (`events`), which numbers them with the per-broker
//! sequence that every response carries too.
//!
//! * `error`: `MgmtError` and its `_exception` codes.
//! * `ha`: the HA object (`org.apache.qpid.ha:habroker:ha-broker`) and its methods.
//! * `json`: AMQP values to JSON and back, typed field access.
//! * `names`: object ids and binding-name escaping.
//! * `reply`: building and publishing the agent's messages.
//! * `state`: `Management`, the agent's per-broker state (sequence, connections, log control,
//!   the shutdown request).

pub mod error;
pub mod events;
pub mod ha;
pub mod json;
pub mod methods;
pub mod names;
pub mod query;
pub mod reply;
pub mod state;

use std::sync::Arc;

use amq_protocol::protocol::basic::{AMQPProperties, parse_properties};
use serde_json::Value;

use crate::broker::Broker;
use crate::fields;
use crate::message::Message;

pub use error::{ErrorCode, MgmtError};
pub use events::Event;
pub use state::{ConnectionInfo, LogControl, LogControlError, Management};

use reply::ReplyTo;

/// The exchange requests are published to.
pub const REQUEST_EXCHANGE: &str = "qmf.default.direct";
/// The exchange events are published on.
pub const EVENT_EXCHANGE: &str = "qmf.default.topic";
/// The routing key that addresses the broker's agent.
pub const AGENT_ROUTING_KEY: &str = "broker";
/// The largest request body the agent parses.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The most objects in one `_query_response` message.
pub const QUERY_PAGE_OBJECTS: usize = 1000;
/// The protocol's major version.
pub const PROTOCOL_VERSION: u64 = 1;

/// Who sent a request.
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    /// The publishing connection.
    pub connection_id: u64,
    /// Its principal has the `admin` tag.
    pub admin: bool,
}

/// True if a message published to `exchange` with `routing_key` is a management request.
pub fn is_request(exchange: &str, routing_key: &str) -> bool {
    routing_key == AGENT_ROUTING_KEY && exchange == REQUEST_EXCHANGE
}

/// What a successful request leaves to do once its answer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Nothing.
    Nothing,
    /// Stop the broker.
    Shutdown,
}

/// Handles one request message. Never fails: every problem is an `_exception` to `reply_to`,
/// or, without `reply_to`, a log line.
pub fn handle(broker: &Arc<Broker>, requester: Requester, message: &Message) {
    let Ok((_, props)) = parse_properties(message.raw_properties()) else {
        tracing::warn!(target: "Management", "connection {}: management request with unreadable properties dropped", requester.connection_id);
        return;
    };
    let Some(queue) = props.reply_to().as_ref().map(|r| r.as_str().to_string()) else {
        tracing::warn!(target: "Management", "connection {}: management request without reply_to dropped", requester.connection_id);
        return;
    };
    let reply = ReplyTo {
        queue,
        correlation_id: props.correlation_id().clone(),
    };
    // Read before looking at any state: the answer reflects every event up to this number.
    let sequence = broker.mgmt.sequence();
    match serve(broker, requester, &props, message.body(), &reply, sequence) {
        Ok(After::Nothing) => {}
        Ok(After::Shutdown) => broker.mgmt.request_shutdown(),
        Err(e) => {
            tracing::debug!(target: "Management", "connection {}: management request failed: {e}", requester.connection_id);
            reply.exception(broker, sequence, &e);
        }
    }
}

fn serve(
    broker: &Arc<Broker>,
    requester: Requester,
    props: &AMQPProperties,
    body: &[u8],
    reply: &ReplyTo,
    sequence: u64,
) -> Result<After, MgmtError> {
    if !requester.admin {
        return Err(MgmtError::new(
            ErrorCode::AccessDenied,
            "management requires a user with the 'admin' tag",
        ));
    }
    let opcode = check_envelope(props, body)?;
    let request = parse_body(body)?;
    match opcode.as_str() {
        "_query_request" => {
            query::answer(broker, &request, reply, sequence)?;
            Ok(After::Nothing)
        }
        "_method_request" => methods::call(broker, requester, &request, reply, sequence),
        other => Err(MgmtError::invalid(format!(
            "unknown qmf.opcode '{other}' (expected _method_request or _query_request)"
        ))),
    }
}

/// Checks size and content type; returns the opcode.
fn check_envelope(props: &AMQPProperties, body: &[u8]) -> Result<String, MgmtError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(MgmtError::invalid(format!(
            "request body of {} bytes is larger than the limit of {MAX_REQUEST_BYTES} bytes",
            body.len()
        )));
    }
    if let Some(ct) = props.content_type()
        && ct.as_str() != reply::CONTENT_TYPE
    {
        return Err(MgmtError::invalid(format!(
            "content_type '{}' is not {}",
            ct.as_str(),
            reply::CONTENT_TYPE
        )));
    }
    props
        .headers()
        .as_ref()
        .and_then(|h| fields::get(h, "qmf.opcode"))
        .and_then(fields::as_str)
        .map(str::to_string)
        .ok_or_else(|| MgmtError::invalid("header 'qmf.opcode' is missing or not a string"))
}

/// Parses the JSON body and checks its version.
fn parse_body(body: &[u8]) -> Result<Value, MgmtError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| MgmtError::invalid(format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(MgmtError::invalid("request body must be a JSON object"));
    }
    match v.get("version").map(Value::as_u64) {
        None => Err(MgmtError::invalid("request body has no 'version'")),
        Some(Some(n)) if (1..=PROTOCOL_VERSION).contains(&n) => Ok(v),
        Some(Some(n)) if n > PROTOCOL_VERSION => Err(MgmtError::invalid(format!(
            "unsupported version {n}: this broker speaks version {PROTOCOL_VERSION}"
        ))),
        Some(_) => Err(MgmtError::invalid("'version' must be a positive integer")),
    }
}
