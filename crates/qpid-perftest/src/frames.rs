//! Hand-written AMQP 0-9-1 frames for the hot paths.
//!
//! - [`PublishTemplate`]: one message's basic.publish + content header + body frames, encoded
//!   once; each send copies it into the write batch and patches only the body's [`Stamp`].
//! - [`encode_ack`]: basic.ack (consumer acks, `multiple` set for batches).
//! - [`split_frame`]: the frame splitter used by every reader (header, `frame_max`, end octet),
//!   returning the payload as a borrowed slice.
//! - [`parse_deliver`], [`parse_ack_nack`], [`content_body_size`]: the few fields the consumer
//!   and the confirm reader need, read in place.
//!
//! amq-protocol is the oracle for all of this in the tests below.

use anyhow::{Context, bail};

/// Frame type octets.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Frame header (type, channel, size) plus end octet.
pub const FRAME_OVERHEAD: usize = 8;

/// Basic class id.
pub const CLASS_BASIC: u16 = 60;
/// (class, method) of basic.deliver.
pub const BASIC_DELIVER: (u16, u16) = (60, 60);
/// (class, method) of basic.ack.
pub const BASIC_ACK: (u16, u16) = (60, 80);
/// (class, method) of basic.nack.
pub const BASIC_NACK: (u16, u16) = (60, 120);

/// Bytes of the stamp at the front of every body.
pub const STAMP_LEN: usize = 16;

/// What every message body starts with: its (scheduled) send time and its identity.
///
/// Layout, big-endian: `sent_ns` u64 (monotonic nanos since the run's shared base instant),
/// `run` u16 (random per run, so messages left in a queue by another run are recognised as
/// foreign), `producer` u16, `seq` u32 (0, 1, 2, ... per producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send (or scheduled send) time, nanos since the run's base.
    pub sent_ns: u64,
    /// The run's tag.
    pub run: u16,
    /// Producer id.
    pub producer: u16,
    /// Per-producer sequence number.
    pub seq: u32,
}

impl Stamp {
    /// Writes the stamp into the first [`STAMP_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.sent_ns.to_be_bytes());
        out[8..10].copy_from_slice(&self.run.to_be_bytes());
        out[10..12].copy_from_slice(&self.producer.to_be_bytes());
        out[12..16].copy_from_slice(&self.seq.to_be_bytes());
    }

    /// Reads a stamp from the front of a body, if it is long enough.
    pub fn decode(b: &[u8]) -> Option<Stamp> {
        if b.len() < STAMP_LEN {
            return None;
        }
        Some(Stamp {
            sent_ns: u64::from_be_bytes(b[0..8].try_into().ok()?),
            run: u16::from_be_bytes([b[8], b[9]]),
            producer: u16::from_be_bytes([b[10], b[11]]),
            seq: u32::from_be_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// One message's frames, pre-encoded, with the offsets of the fields patched per send.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    stamp_at: usize,
}

impl PublishTemplate {
    /// Encodes basic.publish(exchange, routing_key) + header + body frames for a body of
    /// `body_size` bytes (at least [`STAMP_LEN`]), split into body frames of at most
    /// `frame_max` bytes. `persistent` sets delivery-mode 2; otherwise no property is set.
    pub fn new(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        body_size: usize,
        persistent: bool,
        frame_max: u32,
        stamp: Stamp,
    ) -> anyhow::Result<Self> {
        if body_size < STAMP_LEN {
            bail!("message size must be at least {STAMP_LEN} bytes (the stamp), got {body_size}");
        }
        if exchange.len() > 255 || routing_key.len() > 255 {
            bail!("exchange and routing key must be at most 255 bytes");
        }
        let max_payload = (frame_max as usize)
            .saturating_sub(FRAME_OVERHEAD)
            .max(STAMP_LEN);
        let mut b = Vec::with_capacity(64 + exchange.len() + routing_key.len() + body_size);
        // basic.publish
        let mut p = Vec::with_capacity(16 + exchange.len() + routing_key.len());
        p.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        p.extend_from_slice(&40u16.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes()); // reserved-1 (ticket)
        p.push(exchange.len() as u8);
        p.extend_from_slice(exchange.as_bytes());
        p.push(routing_key.len() as u8);
        p.extend_from_slice(routing_key.as_bytes());
        p.push(0); // mandatory = immediate = false
        push_frame(&mut b, FRAME_METHOD, channel, &p);
        // content header
        let mut h = Vec::with_capacity(15);
        h.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes()); // weight
        h.extend_from_slice(&(body_size as u64).to_be_bytes());
        if persistent {
            h.extend_from_slice(&0x1000u16.to_be_bytes()); // delivery-mode present
            h.push(2);
        } else {
            h.extend_from_slice(&0u16.to_be_bytes());
        }
        push_frame(&mut b, FRAME_HEADER, channel, &h);
        // body frames: the stamp, then a filler pattern
        let body: Vec<u8> = (0..body_size).map(|i| (i % 251) as u8).collect();
        let mut stamp_at = 0;
        for (i, chunk) in body.chunks(max_payload).enumerate() {
            if i == 0 {
                stamp_at = b.len() + 7;
            }
            push_frame(&mut b, FRAME_BODY, channel, chunk);
        }
        stamp.encode(&mut b[stamp_at..stamp_at + STAMP_LEN]);
        Ok(PublishTemplate { bytes: b, stamp_at })
    }

    /// Encoded length of one message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one message to `out` with its send time and sequence number patched in.
    #[inline]
    pub fn append(&self, out: &mut Vec<u8>, sent_ns: u64, seq: u32) {
        let at = out.len() + self.stamp_at;
        out.extend_from_slice(&self.bytes);
        out[at..at + 8].copy_from_slice(&sent_ns.to_be_bytes());
        out[at + 12..at + 16].copy_from_slice(&seq.to_be_bytes());
    }
}

fn push_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// Appends basic.ack(delivery_tag, multiple) on `channel` to `out`.
pub fn encode_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    out.push(FRAME_METHOD);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&80u16.to_be_bytes());
    out.extend_from_slice(&delivery_tag.to_be_bytes());
    out.push(multiple as u8);
    out.push(FRAME_END);
}

/// A frame borrowed from a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    /// Frame type octet.
    pub kind: u8,
    /// Channel.
    pub channel: u16,
    /// Payload (between the 7-byte header and the end octet).
    pub payload: &'a [u8],
}

/// Splits one frame off the front of `buf`: `Ok(None)` if more bytes are needed, otherwise the
/// frame and the number of bytes it used. A frame larger than `frame_max` or without the end
/// octet is an error.
pub fn split_frame(buf: &[u8], frame_max: u32) -> anyhow::Result<Option<(RawFrame<'_>, usize)>> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if frame_max != 0 && size + FRAME_OVERHEAD > frame_max as usize {
        bail!(
            "frame of {} bytes exceeds frame_max {frame_max}",
            size + FRAME_OVERHEAD
        );
    }
    let total = size + FRAME_OVERHEAD;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        bail!("bad frame-end octet {:#04x}", buf[total - 1]);
    }
    Ok(Some((
        RawFrame {
            kind: buf[0],
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            payload: &buf[7..total - 1],
        },
        total,
    )))
}

/// The (class, method) ids of a method payload.
pub fn method_ids(payload: &[u8]) -> Option<(u16, u16)> {
    if payload.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

/// basic.deliver's delivery tag and redelivered flag, from a method payload (ids included).
pub fn parse_deliver(payload: &[u8]) -> anyhow::Result<(u64, bool)> {
    let short = |at: usize| -> anyhow::Result<usize> {
        let n = *payload.get(at).context("basic.deliver truncated")? as usize;
        Ok(at + 1 + n)
    };
    let at = short(4)?; // consumer-tag
    let tag_bytes = payload.get(at..at + 8).context("basic.deliver truncated")?;
    let tag = u64::from_be_bytes(tag_bytes.try_into()?);
    let bits = *payload.get(at + 8).context("basic.deliver truncated")?;
    Ok((tag, bits & 1 != 0))
}

/// basic.ack / basic.nack (publisher confirms): delivery tag and `multiple`.
pub fn parse_ack_nack(payload: &[u8]) -> anyhow::Result<(u64, bool)> {
    let tag_bytes = payload.get(4..12).context("basic.ack/nack truncated")?;
    let bits = *payload.get(12).context("basic.ack/nack truncated")?;
    Ok((u64::from_be_bytes(tag_bytes.try_into()?), bits & 1 != 0))
}

/// The body size announced by a content header payload.
pub fn content_body_size(payload: &[u8]) -> anyhow::Result<u64> {
    let b = payload.get(4..12).context("content header truncated")?;
    Ok(u64::from_be_bytes(b.try_into()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};

    fn oracle(frames: &[AMQPFrame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let ctx = gen_frame(f)(WriteContext::from(Vec::new())).unwrap();
            out.extend_from_slice(&ctx.into_inner().0);
        }
        out
    }

    fn publish_frames(size: usize, persistent: bool, frame_max: usize, stamp: Stamp) -> Vec<u8> {
        let mut body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        stamp.encode(&mut body);
        let props = if persistent {
            BasicProperties::default().with_delivery_mode(2)
        } else {
            BasicProperties::default()
        };
        let mut frames = vec![
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "perftest-q".into(),
                    mandatory: false,
                    immediate: false,
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: size as u64,
                    properties: props,
                },
            ),
        ];
        for c in body.chunks(frame_max - 8) {
            frames.push(AMQPFrame::Body(1, c.to_vec()));
        }
        oracle(&frames)
    }

    #[test]
    fn publish_template_matches_amq_protocol() {
        for (size, persistent, frame_max) in [
            (16, false, 131072),
            (16, true, 131072),
            (1024, false, 4096),
            (10_000, true, 4096),
        ] {
            let base = Stamp {
                sent_ns: 0,
                run: 7,
                producer: 3,
                seq: 0,
            };
            let t = PublishTemplate::new(1, "", "perftest-q", size, persistent, frame_max, base)
                .unwrap();
            let mut out = Vec::new();
            t.append(&mut out, 123_456_789, 41);
            t.append(&mut out, 987_654_321, 42);
            let mut want = publish_frames(
                size,
                persistent,
                frame_max as usize,
                Stamp {
                    sent_ns: 123_456_789,
                    seq: 41,
                    ..base
                },
            );
            want.extend(publish_frames(
                size,
                persistent,
                frame_max as usize,
                Stamp {
                    sent_ns: 987_654_321,
                    seq: 42,
                    ..base
                },
            ));
            assert_eq!(
                out, want,
                "size {size} persistent {persistent} frame_max {frame_max}"
            );
            assert_eq!(out.len(), 2 * t.len());
        }
    }

    #[test]
    fn publish_template_rejects_small_body() {
        let s = Stamp {
            sent_ns: 0,
            run: 0,
            producer: 0,
            seq: 0,
        };
        assert!(PublishTemplate::new(1, "", "q", 15, false, 131072, s).is_err());
    }

    #[test]
    fn ack_matches_amq_protocol() {
        for multiple in [false, true] {
            let mut out = Vec::new();
            encode_ack(&mut out, 1, 0x0102_0304_0506_0708, multiple);
            let want = oracle(&[AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 0x0102_0304_0506_0708,
                    multiple,
                })),
            )]);
            assert_eq!(out, want);
            let (rest, frame) = parse_frame(&out[..]).unwrap();
            assert!(rest.is_empty());
            assert!(matches!(frame, AMQPFrame::Method(1, AMQPClass::Basic(_))));
        }
    }

    #[test]
    fn reads_deliver_header_body_and_confirms() {
        let mut body = vec![0u8; 40];
        let stamp = Stamp {
            sent_ns: 5,
            run: 9,
            producer: 2,
            seq: 77,
        };
        stamp.encode(&mut body);
        let bytes = oracle(&[
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: "ctag-1".into(),
                    delivery_tag: 99,
                    redelivered: true,
                    exchange: "".into(),
                    routing_key: "rk".into(),
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 40,
                    properties: BasicProperties::default().with_delivery_mode(2),
                },
            ),
            AMQPFrame::Body(1, body),
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 12,
                    multiple: true,
                    requeue: false,
                })),
            ),
        ]);
        let mut at = 0;
        let (f, n) = split_frame(&bytes[at..], 131072).unwrap().unwrap();
        at += n;
        assert_eq!((f.kind, f.channel), (FRAME_METHOD, 1));
        assert_eq!(method_ids(f.payload), Some(BASIC_DELIVER));
        assert_eq!(parse_deliver(f.payload).unwrap(), (99, true));
        let (f, n) = split_frame(&bytes[at..], 131072).unwrap().unwrap();
        at += n;
        assert_eq!(f.kind, FRAME_HEADER);
        assert_eq!(content_body_size(f.payload).unwrap(), 40);
        let (f, n) = split_frame(&bytes[at..], 131072).unwrap().unwrap();
        at += n;
        assert_eq!(f.kind, FRAME_BODY);
        assert_eq!(Stamp::decode(f.payload), Some(stamp));
        // A partial frame asks for more.
        assert!(split_frame(&bytes[at..at + 10], 131072).unwrap().is_none());
        let (f, n) = split_frame(&bytes[at..], 131072).unwrap().unwrap();
        assert_eq!(at + n, bytes.len());
        assert_eq!(method_ids(f.payload), Some(BASIC_NACK));
        assert_eq!(parse_ack_nack(f.payload).unwrap(), (12, true));
    }

    #[test]
    fn splitter_checks_frame_max_and_end_octet() {
        let mut f = vec![FRAME_BODY, 0, 1, 0, 0, 0, 4, 1, 2, 3, 4, FRAME_END];
        assert!(split_frame(&f, 11).is_err());
        assert!(split_frame(&f, 12).unwrap().is_some());
        f[11] = 0;
        assert!(split_frame(&f, 12).is_err());
    }
}
