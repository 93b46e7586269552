//! Sending the agent's messages: responses to a request's `reply_to` through the default
//! exchange, and events to `qmf.default.topic`, with the QMF headers.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{AMQPProperties, gen_properties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::broker::Broker;
use crate::message::Message;

use super::error::MgmtError;

/// The content type of every management message.
pub const CONTENT_TYPE: &str = "application/json";

/// Where and how to answer one request.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The queue to answer to.
    pub queue: String,
    /// The request's correlation id.
    pub correlation_id: Option<ShortString>,
}

/// The common header fields of an agent message.
fn headers(broker: &Broker, opcode: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("qmf.opcode".into(), AMQPValue::LongString(opcode.into()));
    h.insert(
        "qmf.agent".into(),
        AMQPValue::LongString(LongString::from(broker.mgmt.agent_name())),
    );
    h
}

fn encode(properties: &AMQPProperties) -> Option<Vec<u8>> {
    let ctx = gen_properties(properties)(WriteContext::from(Vec::new())).ok()?;
    Some(ctx.into_inner().0)
}

/// Publishes `body` through the broker: `exchange` "" with key `routing_key`, or a topic.
fn publish(
    broker: &Broker,
    exchange: &str,
    routing_key: &str,
    properties: AMQPProperties,
    body: &Value,
) {
    let Some(raw) = encode(&properties) else {
        tracing::error!(target: "Management", "cannot encode the properties of a management message");
        return;
    };
    let bytes = body.to_string().into_bytes();
    let message = match Message::new(exchange, routing_key, &raw, &bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(target: "Management", "cannot build a management message: {e}");
            return;
        }
    };
    let mut targets = Vec::new();
    if broker
        .route(exchange, routing_key, &message, &mut targets)
        .is_err()
        || targets.is_empty()
    {
        tracing::debug!(target: "Management", "management message to '{exchange}'/'{routing_key}' went nowhere");
        return;
    }
    let now = broker.now_ms();
    for q in targets {
        q.enqueue(message.clone(), now);
    }
}

impl ReplyTo {
    /// Sends one response message.
    pub fn send(&self, broker: &Broker, opcode: &str, body: &Value, partial: bool) {
        let mut h = headers(broker, opcode);
        if partial {
            h.insert("partial".into(), AMQPValue::Boolean(true));
        }
        let mut p = AMQPProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_headers(h);
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(c.clone());
        }
        publish(broker, "", &self.queue, p, body);
    }

    /// Sends an `_exception`.
    pub fn exception(&self, broker: &Broker, sequence: u64, e: &MgmtError) {
        let mut body = broker.mgmt.envelope(sequence);
        body["error_code"] = (e.code as u8).into();
        body["error_text"] = e.text.clone().into();
        self.send(broker, "_exception", &body, false);
    }
}

/// Publishes an event body on `qmf.default.topic` with `routing_key`.
pub fn publish_event(broker: &Broker, routing_key: &str, body: &Value) {
    let mut h = headers(broker, "_data_indication");
    h.insert("qmf.content".into(), AMQPValue::LongString("_event".into()));
    h.insert("method".into(), AMQPValue::LongString("indication".into()));
    let p = AMQPProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_headers(h);
    publish(broker, super::EVENT_EXCHANGE, routing_key, p, body);
}
