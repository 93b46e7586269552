//! The hand-written codec for the message path.
//!
//! Parsing borrows from the frame payload and allocates nothing; writing appends to a reused
//! `Vec<u8>`. Content properties are kept as the raw bytes the publisher sent (flags word plus
//! property list), forwarded verbatim to consumers, and walked only far enough to learn what
//! routing and queueing need (`delivery_mode`, `priority`, `expiration`, the raw `headers` table).
//! amq-protocol is the oracle for all of this in the tests.

use super::frame::write_frame_header;
use super::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD, basic_method, class,
};

/// Why a hot-path payload could not be read. The connection answers with 502 (syntax error) or
/// 501 (frame error) as the spec says for malformed method payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended before a field did.
    #[error("payload too short for field {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A short string was not UTF-8.
    #[error("field {field} is not valid UTF-8")]
    NotUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes were left after the last field.
    #[error("{extra} unexpected bytes after the last field")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A field's value is not well formed.
    #[error("field {field} is malformed")]
    Malformed {
        /// The field being read.
        field: &'static str,
    },
    /// The content header is not for the basic class, or uses continuation flags.
    #[error("content header for class {class_id} with flags {flags:#06x} is not supported")]
    BadContentHeader {
        /// The class id in the header.
        class_id: u16,
        /// The property flags word.
        flags: u16,
    },
}

/// A checked cursor over peer bytes: every read checks what is left.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    /// An octet.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    /// A big-endian short.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian long.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian long long.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A short string (octet length prefix), as UTF-8.
    pub fn short_str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.u8(field)? as usize;
        let b = self.take(n, field)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8 { field })
    }

    /// A long string or field table (u32 length prefix), raw.
    pub fn long_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }

    /// Fails if anything is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                extra: self.bytes.len(),
            })
        }
    }
}

/// The class and method ids at the front of a method payload, and the arguments after them.
pub fn method_ids(payload: &[u8]) -> Result<(u16, u16, &[u8]), DecodeError> {
    let mut r = Reader::new(payload);
    let class_id = r.u16("class-id")?;
    let method_id = r.u16("method-id")?;
    Ok((class_id, method_id, r.rest()))
}

/// basic.publish arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Exchange name ("" for the default exchange).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Return the message if no queue takes it.
    pub mandatory: bool,
    /// Deprecated; RabbitMQ refuses it and so do we.
    pub immediate: bool,
}

/// Parses basic.publish arguments (after the class and method ids).
pub fn parse_publish(args: &[u8]) -> Result<Publish<'_>, DecodeError> {
    let mut r = Reader::new(args);
    r.u16("reserved-1")?;
    let exchange = r.short_str("exchange")?;
    let routing_key = r.short_str("routing-key")?;
    let bits = r.u8("bits")?;
    r.finish()?;
    Ok(Publish {
        exchange,
        routing_key,
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    })
}

/// basic.ack (from a consumer), basic.nack and basic.reject, in one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    /// The delivery tag.
    pub delivery_tag: u64,
    /// All tags up to and including this one.
    pub multiple: bool,
    /// Put the message back on its queue (nack and reject only).
    pub requeue: bool,
}

/// The three settle methods: the delivery tag, then one octet of bits whose meaning differs.
fn parse_settle(args: &[u8], multiple_bit: u8, requeue_bit: u8) -> Result<Settle, DecodeError> {
    let mut r = Reader::new(args);
    let delivery_tag = r.u64("delivery-tag")?;
    let bits = r.u8("bits")?;
    r.finish()?;
    Ok(Settle {
        delivery_tag,
        multiple: bits & multiple_bit != 0,
        requeue: bits & requeue_bit != 0,
    })
}

/// Parses basic.ack arguments (bit 0: multiple).
pub fn parse_ack(args: &[u8]) -> Result<Settle, DecodeError> {
    parse_settle(args, 1, 0)
}

/// Parses basic.nack arguments (bit 0: multiple, bit 1: requeue).
pub fn parse_nack(args: &[u8]) -> Result<Settle, DecodeError> {
    parse_settle(args, 1, 2)
}

/// Parses basic.reject arguments (bit 0: requeue).
pub fn parse_reject(args: &[u8]) -> Result<Settle, DecodeError> {
    parse_settle(args, 0, 1)
}

/// Property flag bits of the basic class, in wire order.
pub mod flag {
    /// content-type (shortstr)
    pub const CONTENT_TYPE: u16 = 1 << 15;
    /// content-encoding (shortstr)
    pub const CONTENT_ENCODING: u16 = 1 << 14;
    /// headers (table)
    pub const HEADERS: u16 = 1 << 13;
    /// delivery-mode (octet)
    pub const DELIVERY_MODE: u16 = 1 << 12;
    /// priority (octet)
    pub const PRIORITY: u16 = 1 << 11;
    /// correlation-id (shortstr)
    pub const CORRELATION_ID: u16 = 1 << 10;
    /// reply-to (shortstr)
    pub const REPLY_TO: u16 = 1 << 9;
    /// expiration (shortstr)
    pub const EXPIRATION: u16 = 1 << 8;
    /// message-id (shortstr)
    pub const MESSAGE_ID: u16 = 1 << 7;
    /// timestamp (long long)
    pub const TIMESTAMP: u16 = 1 << 6;
    /// type (shortstr)
    pub const TYPE: u16 = 1 << 5;
    /// user-id (shortstr)
    pub const USER_ID: u16 = 1 << 4;
    /// app-id (shortstr)
    pub const APP_ID: u16 = 1 << 3;
    /// cluster-id (shortstr)
    pub const CLUSTER_ID: u16 = 1 << 2;
}

/// A basic content header, with the properties kept raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentHeader<'a> {
    /// Total body size announced.
    pub body_size: u64,
    /// The property flags word and the property list, exactly as received.
    pub raw_properties: &'a [u8],
    /// The properties the broker itself needs.
    pub summary: PropertySummary<'a>,
}

/// The few properties the broker looks at, decoded from the raw property bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PropertySummary<'a> {
    /// delivery-mode (2 = persistent).
    pub delivery_mode: Option<u8>,
    /// priority.
    pub priority: Option<u8>,
    /// expiration, a per-message TTL in milliseconds as a decimal string.
    pub expiration: Option<&'a str>,
    /// The headers field table, without its length prefix.
    pub headers: Option<&'a [u8]>,
    /// user-id.
    pub user_id: Option<&'a str>,
}

/// Parses a content header frame payload for the basic class.
pub fn parse_content_header(payload: &[u8]) -> Result<ContentHeader<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let class_id = r.u16("class-id")?;
    r.u16("weight")?;
    let body_size = r.u64("body-size")?;
    let raw_properties = r.rest();
    let flags = Reader::new(raw_properties).u16("property-flags")?;
    if class_id != class::BASIC || flags & 1 != 0 {
        return Err(DecodeError::BadContentHeader { class_id, flags });
    }
    let summary = summarize_properties(raw_properties)?;
    Ok(ContentHeader {
        body_size,
        raw_properties,
        summary,
    })
}

/// Walks raw properties (flags word plus list) and checks that they are well formed.
pub fn summarize_properties(raw: &[u8]) -> Result<PropertySummary<'_>, DecodeError> {
    let mut r = Reader::new(raw);
    let flags = r.u16("property-flags")?;
    let mut s = PropertySummary::default();
    if flags & flag::CONTENT_TYPE != 0 {
        r.short_str("content-type")?;
    }
    if flags & flag::CONTENT_ENCODING != 0 {
        r.short_str("content-encoding")?;
    }
    if flags & flag::HEADERS != 0 {
        let table = r.long_bytes("headers")?;
        check_field_table(table, 0)?;
        s.headers = Some(table);
    }
    if flags & flag::DELIVERY_MODE != 0 {
        s.delivery_mode = Some(r.u8("delivery-mode")?);
    }
    if flags & flag::PRIORITY != 0 {
        s.priority = Some(r.u8("priority")?);
    }
    if flags & flag::CORRELATION_ID != 0 {
        r.short_str("correlation-id")?;
    }
    if flags & flag::REPLY_TO != 0 {
        r.short_str("reply-to")?;
    }
    if flags & flag::EXPIRATION != 0 {
        s.expiration = Some(r.short_str("expiration")?);
    }
    if flags & flag::MESSAGE_ID != 0 {
        r.short_str("message-id")?;
    }
    if flags & flag::TIMESTAMP != 0 {
        r.u64("timestamp")?;
    }
    if flags & flag::TYPE != 0 {
        r.short_str("type")?;
    }
    if flags & flag::USER_ID != 0 {
        s.user_id = Some(r.short_str("user-id")?);
    }
    if flags & flag::APP_ID != 0 {
        r.short_str("app-id")?;
    }
    if flags & flag::CLUSTER_ID != 0 {
        r.short_str("cluster-id")?;
    }
    r.finish()?;
    Ok(s)
}

/// How deeply tables and arrays may nest in a headers table.
pub const FIELD_TABLE_DEPTH_MAX: usize = 32;

/// Checks that `table` (without its length prefix) is a well-formed field table, so that
/// properties forwarded verbatim can be parsed by every consumer. Allocates nothing.
pub fn check_field_table(table: &[u8], depth: usize) -> Result<(), DecodeError> {
    if depth > FIELD_TABLE_DEPTH_MAX {
        return Err(DecodeError::Malformed {
            field: "headers (nested too deeply)",
        });
    }
    let mut r = Reader::new(table);
    while !r.rest().is_empty() {
        r.short_str("headers")?;
        check_field_value(&mut r, depth)?;
    }
    Ok(())
}

fn check_field_value(r: &mut Reader<'_>, depth: usize) -> Result<(), DecodeError> {
    const F: &str = "headers";
    match r.u8(F)? {
        b't' | b'b' | b'B' => r.take(1, F).map(drop),
        b's' | b'U' | b'u' => r.take(2, F).map(drop),
        b'I' | b'i' | b'f' => r.take(4, F).map(drop),
        b'L' | b'l' | b'd' | b'T' => r.take(8, F).map(drop),
        b'D' => r.take(5, F).map(drop),
        b'S' | b'x' => r.long_bytes(F).map(drop),
        b'V' => Ok(()),
        b'F' => check_field_table(r.long_bytes(F)?, depth + 1),
        b'A' => {
            let mut items = Reader::new(r.long_bytes(F)?);
            while !items.rest().is_empty() {
                if depth + 1 > FIELD_TABLE_DEPTH_MAX {
                    return Err(DecodeError::Malformed {
                        field: "headers (nested too deeply)",
                    });
                }
                check_field_value(&mut items, depth + 1)?;
            }
            Ok(())
        }
        _ => Err(DecodeError::Malformed {
            field: "headers (unknown field type)",
        }),
    }
}

/// Writes a method frame whose arguments `args` writes, patching the size afterwards.
#[inline]
fn method_frame(out: &mut Vec<u8>, channel: u16, method_id: u16, args: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    write_frame_header(out, FRAME_METHOD, channel, 0);
    out.extend_from_slice(&class::BASIC.to_be_bytes());
    out.extend_from_slice(&method_id.to_be_bytes());
    args(out);
    let size = (out.len() - start - 7) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Appends a short string. Broker-side values are checked to be at most 255 bytes where they
/// enter the broker; a longer one here is a programmer error.
#[inline]
fn short_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= 255, "short string longer than 255 bytes");
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a basic.deliver method frame.
pub fn write_deliver(
    out: &mut Vec<u8>,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    method_frame(out, channel, basic_method::DELIVER, |out| {
        short_str(out, consumer_tag);
        out.extend_from_slice(&delivery_tag.to_be_bytes());
        out.push(u8::from(redelivered));
        short_str(out, exchange);
        short_str(out, routing_key);
    });
}

/// Appends a basic.get-ok method frame.
pub fn write_get_ok(
    out: &mut Vec<u8>,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    message_count: u32,
) {
    method_frame(out, channel, basic_method::GET_OK, |out| {
        out.extend_from_slice(&delivery_tag.to_be_bytes());
        out.push(u8::from(redelivered));
        short_str(out, exchange);
        short_str(out, routing_key);
        out.extend_from_slice(&message_count.to_be_bytes());
    });
}

/// Appends a basic.return method frame.
pub fn write_return(
    out: &mut Vec<u8>,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
) {
    method_frame(out, channel, basic_method::RETURN, |out| {
        out.extend_from_slice(&reply_code.to_be_bytes());
        short_str(out, reply_text);
        short_str(out, exchange);
        short_str(out, routing_key);
    });
}

/// Appends a basic.ack method frame (a publisher confirm).
pub fn write_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    method_frame(out, channel, basic_method::ACK, |out| {
        out.extend_from_slice(&delivery_tag.to_be_bytes());
        out.push(u8::from(multiple));
    });
}

/// Appends a basic.nack method frame (a negative publisher confirm).
pub fn write_nack(
    out: &mut Vec<u8>,
    channel: u16,
    delivery_tag: u64,
    multiple: bool,
    requeue: bool,
) {
    method_frame(out, channel, basic_method::NACK, |out| {
        out.extend_from_slice(&delivery_tag.to_be_bytes());
        out.push(u8::from(multiple) | (u8::from(requeue) << 1));
    });
}

/// Appends a content header frame and the body frames, each body frame at most `frame_max`
/// bytes long with its framing.
pub fn write_content(
    out: &mut Vec<u8>,
    channel: u16,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let header_size = 12 + raw_properties.len();
    write_frame_header(out, FRAME_HEADER, channel, header_size as u32);
    out.extend_from_slice(&class::BASIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(raw_properties);
    out.push(FRAME_END);
    let chunk = max_body_per_frame(frame_max);
    for part in body.chunks(chunk) {
        write_frame_header(out, FRAME_BODY, channel, part.len() as u32);
        out.extend_from_slice(part);
        out.push(FRAME_END);
    }
}

/// The largest body payload one frame can carry under `frame_max` (0 = no limit).
pub fn max_body_per_frame(frame_max: u32) -> usize {
    if frame_max == 0 {
        u32::MAX as usize
    } else {
        frame_max as usize - FRAME_OVERHEAD
    }
}

/// How many bytes `write_deliver` plus `write_content` append, to reserve once.
pub fn delivery_size_hint(
    consumer_tag: &str,
    exchange: &str,
    routing_key: &str,
    raw_properties: &[u8],
    body_len: usize,
    frame_max: u32,
) -> usize {
    let method =
        8 + 4 + 1 + consumer_tag.len() + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len();
    let header = 8 + 12 + raw_properties.len();
    let frames = body_len.div_ceil(max_body_per_frame(frame_max));
    method + header + body_len + frames * FRAME_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_publish_is_an_error_at_every_cut() {
        let args = [0, 0, 1, b'x', 2, b'r', b'k', 1];
        assert_eq!(
            parse_publish(&args),
            Ok(Publish {
                exchange: "x",
                routing_key: "rk",
                mandatory: true,
                immediate: false
            })
        );
        for cut in 0..args.len() {
            assert!(parse_publish(&args[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = args.to_vec();
        long.push(0);
        assert_eq!(
            parse_publish(&long),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn non_utf8_short_string_is_refused() {
        assert_eq!(
            parse_publish(&[0, 0, 1, 0xFF, 0, 0]),
            Err(DecodeError::NotUtf8 { field: "exchange" })
        );
    }

    #[test]
    fn property_walk_rejects_a_lying_table_length() {
        let raw = [0x20, 0x00, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(
            summarize_properties(&raw),
            Err(DecodeError::Truncated { field: "headers" })
        );
    }
}
