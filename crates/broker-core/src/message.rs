//! A message as the broker holds it: one allocation with the exchange name, routing key, raw
//! content properties and body, shared by every queue it was routed to.
//!
//! The properties stay in the bytes the publisher sent and go out to consumers unchanged, so
//! properties and headers reach consumers byte for byte. What the broker needs (persistence,
//! priority, expiration) is decoded once, when the content header arrives.

use std::sync::Arc;

use crate::protocol::hot::{self, DecodeError, PropertySummary};

/// A published message. Cloning is a reference-count increment.
#[derive(Clone)]
pub struct Message(Arc<MessageInner>);

struct MessageInner {
    /// exchange | routing key | raw properties | body, one allocation.
    data: Box<[u8]>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    persistent: bool,
    priority: u8,
    /// Per-message TTL from the expiration property, if it parsed as a non-negative integer.
    expiration_ms: Option<u64>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("body_len", &self.body().len())
            .finish()
    }
}

/// A message being received frame by frame: the buffer is allocated once, at its final size,
/// when the content header arrives (after the size was checked against `--max-message-size`).
#[derive(Debug)]
pub struct MessageBuilder {
    data: Vec<u8>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    body_size: usize,
    summary_persistent: bool,
    summary_priority: u8,
    summary_expiration_ms: Option<u64>,
}

impl MessageBuilder {
    /// Starts a message; `body_size` must already have been checked against the limit.
    pub fn new(
        exchange: &str,
        routing_key: &str,
        raw_properties: &[u8],
        summary: &PropertySummary<'_>,
        body_size: usize,
    ) -> MessageBuilder {
        debug_assert!(exchange.len() <= 255 && routing_key.len() <= 255);
        let mut data = Vec::with_capacity(
            exchange.len() + routing_key.len() + raw_properties.len() + body_size,
        );
        data.extend_from_slice(exchange.as_bytes());
        data.extend_from_slice(routing_key.as_bytes());
        data.extend_from_slice(raw_properties);
        MessageBuilder {
            data,
            exchange_len: exchange.len() as u8,
            routing_key_len: routing_key.len() as u8,
            properties_len: raw_properties.len() as u32,
            body_size,
            summary_persistent: summary.delivery_mode == Some(2),
            summary_priority: summary.priority.unwrap_or(0),
            summary_expiration_ms: summary.expiration.and_then(parse_expiration),
        }
    }

    /// Bytes of body still expected.
    pub fn body_remaining(&self) -> usize {
        self.header_len() + self.body_size - self.data.len()
    }

    fn header_len(&self) -> usize {
        self.exchange_len as usize + self.routing_key_len as usize + self.properties_len as usize
    }

    /// Appends a body frame's payload. Returns false if it would exceed the announced size.
    pub fn push_body(&mut self, chunk: &[u8]) -> bool {
        if chunk.len() > self.body_remaining() {
            return false;
        }
        self.data.extend_from_slice(chunk);
        true
    }

    /// True once the whole body has arrived.
    pub fn is_complete(&self) -> bool {
        self.body_remaining() == 0
    }

    /// The finished message.
    pub fn finish(self) -> Message {
        debug_assert!(self.is_complete());
        Message(Arc::new(MessageInner {
            data: self.data.into_boxed_slice(),
            exchange_len: self.exchange_len,
            routing_key_len: self.routing_key_len,
            properties_len: self.properties_len,
            persistent: self.summary_persistent,
            priority: self.summary_priority,
            expiration_ms: self.summary_expiration_ms,
        }))
    }
}

/// The expiration property holds a TTL in milliseconds as a decimal string (RabbitMQ's rule).
/// Anything else is refused at publish time by the caller; here it simply means "none".
pub fn parse_expiration(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Message {
    /// Builds a whole message at once (dead-lettering, tests).
    pub fn new(
        exchange: &str,
        routing_key: &str,
        raw_properties: &[u8],
        body: &[u8],
    ) -> Result<Message, DecodeError> {
        let summary = hot::summarize_properties(raw_properties)?;
        let mut b =
            MessageBuilder::new(exchange, routing_key, raw_properties, &summary, body.len());
        b.push_body(body);
        Ok(b.finish())
    }

    /// The message as one buffer, exchange | routing key | raw properties | body, with the
    /// lengths of the first three (the store's enqueue record holds exactly this).
    pub fn layout(&self) -> (u8, u8, u32, &[u8]) {
        let m = &self.0;
        (m.exchange_len, m.routing_key_len, m.properties_len, &m.data)
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        let end = self.0.exchange_len as usize;
        // Built from &str slices, so the bytes are UTF-8.
        std::str::from_utf8(&self.0.data[..end]).unwrap_or("")
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        let start = self.0.exchange_len as usize;
        let end = start + self.0.routing_key_len as usize;
        std::str::from_utf8(&self.0.data[start..end]).unwrap_or("")
    }

    /// The content properties as published: the flags word and the property list.
    pub fn raw_properties(&self) -> &[u8] {
        let start = self.0.exchange_len as usize + self.0.routing_key_len as usize;
        &self.0.data[start..start + self.0.properties_len as usize]
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        let start = self.0.exchange_len as usize
            + self.0.routing_key_len as usize
            + self.0.properties_len as usize;
        &self.0.data[start..]
    }

    /// The decoded property summary (headers table, user id...), walked again on demand.
    pub fn summary(&self) -> PropertySummary<'_> {
        // The properties were validated when the message was built.
        hot::summarize_properties(self.raw_properties()).unwrap_or_default()
    }

    /// delivery-mode 2.
    pub fn persistent(&self) -> bool {
        self.0.persistent
    }

    /// The priority property (0 if absent).
    pub fn priority(&self) -> u8 {
        self.0.priority
    }

    /// The per-message TTL, if any.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.0.expiration_ms
    }

    /// Bytes this message accounts for in queue byte limits (the body, as RabbitMQ counts).
    pub fn body_size(&self) -> u64 {
        self.body().len() as u64
    }

    /// Bytes of memory this message holds, for the memory watermark: its buffer plus a fixed
    /// overhead for the allocation and bookkeeping.
    pub fn memory_size(&self) -> u64 {
        self.0.data.len() as u64 + MESSAGE_OVERHEAD_BYTES
    }

    /// True if both handles are the same message.
    pub fn ptr_eq(&self, other: &Message) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The fixed cost per message counted against the memory watermark.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 96;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_as_built() {
        let props = [0x10, 0x00, 2]; // delivery-mode 2
        let m = Message::new("ex", "rk", &props, b"hello").unwrap();
        assert_eq!(
            (m.exchange(), m.routing_key(), m.body()),
            ("ex", "rk", &b"hello"[..])
        );
        assert_eq!(m.raw_properties(), &props);
        assert!(m.persistent());
    }

    #[test]
    fn builder_refuses_more_body_than_announced() {
        let s = PropertySummary::default();
        let mut b = MessageBuilder::new("", "q", &[0, 0], &s, 4);
        assert!(b.push_body(b"ab"));
        assert!(!b.is_complete());
        assert!(!b.push_body(b"abc"));
        assert!(b.push_body(b"cd"));
        assert!(b.is_complete());
        assert_eq!(b.finish().body(), b"abcd");
    }

    #[test]
    fn expiration_is_a_decimal_string() {
        assert_eq!(parse_expiration("1500"), Some(1500));
        assert_eq!(parse_expiration("-1"), None);
        assert_eq!(parse_expiration("1.5"), None);
        assert_eq!(parse_expiration(""), None);
    }
}
