//! Raw AMQP 0-9-1 connections for the hot paths: the handshake (protocol header, then
//! connection.start-ok / tune-ok / open and channel.open, all built with amq-protocol's
//! `gen_frame`), a buffered [`FrameReader`] that splits frames in place, and helpers for the
//! few non-hot methods (basic.qos, basic.consume, confirm.select) and a polite close.

use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::frames::{FRAME_HEARTBEAT, FRAME_METHOD, RawFrame, split_frame};

/// The frame_max we ask for (and use when the server says 0, "no limit").
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// Where and how to connect, from an `amqp://user:pass@host:port/vhost` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl Target {
    /// Parses the URI (amq-protocol's parser, except the host: it turns IP addresses into
    /// "localhost", so the host is taken from the URI text).
    pub fn parse(uri: &str) -> anyhow::Result<Target> {
        let parsed: AMQPUri = uri.parse().map_err(|e| anyhow::anyhow!("bad --uri: {e}"))?;
        let after_scheme = uri.split_once("://").map_or(uri, |(_, r)| r);
        let authority = after_scheme.split(['/', '?']).next().unwrap_or("");
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if let Some(v6) = hostport.strip_prefix('[') {
            v6.split(']').next().unwrap_or("").to_string()
        } else {
            hostport.split(':').next().unwrap_or("").to_string()
        };
        Ok(Target {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
            port: parsed.authority.port,
            vhost: parsed.vhost,
            user: parsed.authority.userinfo.username,
            password: parsed.authority.userinfo.password,
        })
    }
}

/// A read half with a large buffer; frames are split in place and borrowed from it.
#[derive(Debug)]
pub struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    frame_max: u32,
}

impl<R> FrameReader<R> {
    /// Swaps in another inner reader, keeping the bytes already buffered (and not yet taken
    /// as frames); returns the old inner reader and the new frame reader.
    pub fn with_inner<S>(self, r: S) -> (R, FrameReader<S>) {
        let FrameReader {
            r: old,
            buf,
            start,
            end,
            frame_max,
        } = self;
        (
            old,
            FrameReader {
                r,
                buf,
                start,
                end,
                frame_max,
            },
        )
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `r` that accepts frames of up to `frame_max` bytes.
    pub fn new(r: R, frame_max: u32) -> Self {
        let mut me = FrameReader {
            r,
            buf: Vec::new(),
            start: 0,
            end: 0,
            frame_max: 0,
        };
        me.set_frame_max(frame_max);
        me
    }

    /// Changes the largest frame accepted (after tune), growing the buffer to hold two.
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
        let want = (2 * frame_max as usize).max(256 * 1024);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }

    /// Reads more bytes from the socket; `Ok(0)` means end of stream.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.frame_max as usize + 8 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next complete frame in the buffer, if any.
    #[inline]
    pub fn next_frame(&mut self) -> anyhow::Result<Option<RawFrame<'_>>> {
        match split_frame(&self.buf[self.start..self.end], self.frame_max)? {
            None => Ok(None),
            Some((f, n)) => {
                self.start += n;
                Ok(Some(f))
            }
        }
    }
}

/// A handshaken connection with channel 1 open.
#[derive(Debug)]
pub struct RawConn {
    /// Frames from the broker.
    pub reader: FrameReader<OwnedReadHalf>,
    /// Bytes to the broker.
    pub writer: OwnedWriteHalf,
    /// Negotiated frame_max.
    pub frame_max: u32,
}

/// The channel every raw connection uses.
pub const CHANNEL: u16 = 1;

impl RawConn {
    /// Connects, authenticates with PLAIN, opens the vhost and channel 1.
    pub async fn open(target: &Target, name: &str) -> anyhow::Result<RawConn> {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("connecting to {}:{}", target.host, target.port))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut c = RawConn {
            reader: FrameReader::new(r, DEFAULT_FRAME_MAX),
            writer: w,
            frame_max: DEFAULT_FRAME_MAX,
        };
        c.writer.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let start = match c.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(s)) => s,
            other => bail!("expected connection.start, got {other:?}"),
        };
        if !String::from_utf8_lossy(start.mechanisms.as_bytes())
            .split_whitespace()
            .any(|m| m == "PLAIN")
        {
            bail!("broker does not offer SASL PLAIN");
        }
        let mut response = vec![0u8];
        response.extend_from_slice(target.user.as_bytes());
        response.push(0);
        response.extend_from_slice(target.password.as_bytes());
        let mut caps = FieldTable::default();
        for cap in ["publisher_confirms", "consumer_cancel_notify", "basic.nack"] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        props.insert(
            "product".into(),
            AMQPValue::LongString("qpid-perftest".into()),
        );
        props.insert(
            "version".into(),
            AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
        );
        props.insert("connection_name".into(), AMQPValue::LongString(name.into()));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match c.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => bail!("expected connection.tune, got {other:?}"),
        };
        let frame_max = if tune.frame_max == 0 {
            DEFAULT_FRAME_MAX
        } else {
            tune.frame_max
        };
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: if tune.channel_max == 0 {
                    2047
                } else {
                    tune.channel_max
                },
                frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        c.frame_max = frame_max;
        c.reader.set_frame_max(frame_max);
        let open = connection::Open {
            virtual_host: target.vhost.as_str().into(),
        };
        c.send(0, AMQPClass::Connection(connection::AMQPMethod::Open(open)))
            .await?;
        match c.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => bail!("expected connection.open-ok, got {other:?}"),
        }
        c.send(
            CHANNEL,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        match c.next_method(CHANNEL).await? {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => {}
            other => bail!("expected channel.open-ok, got {other:?}"),
        }
        Ok(c)
    }

    /// Sends one method frame built with amq-protocol.
    pub async fn send(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        let bytes = encode_method(channel, method)?;
        self.writer.write_all(&bytes).await?;
        Ok(())
    }

    /// Sends a method and returns the answer on the same channel.
    pub async fn call(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<AMQPClass> {
        self.send(channel, method).await?;
        self.next_method(channel).await
    }

    /// The next method frame, skipping heartbeats. A connection.close or channel.close from
    /// the broker becomes an error carrying its reply code and text.
    pub async fn next_method(&mut self, expect_channel: u16) -> anyhow::Result<AMQPClass> {
        loop {
            if let Some(f) = self.reader.next_frame()? {
                if f.kind == FRAME_HEARTBEAT {
                    continue;
                }
                if f.kind != FRAME_METHOD {
                    bail!("unexpected frame type {} during set-up", f.kind);
                }
                let channel = f.channel;
                let method = parse_method(f.payload)?;
                check_close(&method)?;
                if channel != expect_channel {
                    bail!("method on channel {channel}, expected {expect_channel}: {method:?}");
                }
                return Ok(method);
            }
            if self.reader.fill().await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    /// Closes the connection politely (connection.close, then waits up to `wait` for
    /// close-ok, skipping whatever else is still arriving).
    pub async fn close(mut self, wait: Duration) {
        let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        }));
        if self.send(0, close).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, async move {
            loop {
                while let Ok(Some(f)) = self.reader.next_frame() {
                    if f.kind == FRAME_METHOD
                        && crate::frames::method_ids(f.payload) == Some((10, 51))
                    {
                        return;
                    }
                }
                match self.reader.fill().await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Encodes one method frame with amq-protocol.
pub fn encode_method(channel: u16, method: AMQPClass) -> anyhow::Result<Vec<u8>> {
    let frame = AMQPFrame::Method(channel, method);
    let ctx = gen_frame(&frame)(WriteContext::from(Vec::new()))
        .map_err(|e| anyhow::anyhow!("encoding {frame:?}: {e:?}"))?;
    Ok(ctx.into_inner().0)
}

/// Parses a method payload with amq-protocol.
pub fn parse_method(payload: &[u8]) -> anyhow::Result<AMQPClass> {
    let (_, m) = amq_protocol::protocol::parse_class(payload).map_err(|e| {
        anyhow::anyhow!(
            "unparsable method {:?}: {e:?}",
            crate::frames::method_ids(payload)
        )
    })?;
    Ok(m)
}

/// Turns a broker-initiated close (or consumer cancel) into an error.
pub fn check_close(method: &AMQPClass) -> anyhow::Result<()> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => bail!(
            "broker closed the connection: {} {} (class {} method {})",
            c.reply_code,
            c.reply_text.as_str(),
            c.class_id,
            c.method_id
        ),
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => bail!(
            "broker closed the channel: {} {} (class {} method {})",
            c.reply_code,
            c.reply_text.as_str(),
            c.class_id,
            c.method_id
        ),
        AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Cancel(c)) => {
            bail!("broker cancelled consumer {}", c.consumer_tag.as_str())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uri_hosts_and_vhost() {
        let t = Target::parse("amqp://guest:secret@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 5673,
                vhost: "/".into(),
                user: "guest".into(),
                password: "secret".into()
            }
        );
        let t = Target::parse("amqp://[::1]/vh").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("::1", 5672, "vh")
        );
    }

    #[tokio::test]
    async fn with_inner_keeps_buffered_bytes() {
        let (mut a, b) = tokio::io::duplex(4096);
        let mut r = FrameReader::new(b, 4096);
        let open_ok = AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {}));
        let one = encode_method(1, open_ok.clone()).unwrap();
        let mut two = one.clone();
        two.extend_from_slice(&one);
        a.write_all(&two).await.unwrap();
        assert_eq!(r.fill().await.unwrap(), two.len());
        assert_eq!(
            parse_method(r.next_frame().unwrap().unwrap().payload).unwrap(),
            open_ok
        );
        // Park the reader without an inner, then give it one that has nothing to read.
        let (_b, parked) = r.with_inner(());
        let (_, mut r) = parked.with_inner(tokio::io::empty());
        assert_eq!(
            parse_method(r.next_frame().unwrap().unwrap().payload).unwrap(),
            open_ok
        );
        assert!(r.next_frame().unwrap().is_none());
        assert_eq!(r.fill().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn reader_splits_frames_across_reads() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, 4096);
        let mut bytes = encode_method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        )
        .unwrap();
        bytes.extend(bytes.clone());
        tokio::spawn(async move {
            for chunk in bytes.chunks(5) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut seen = 0;
        while seen < 2 {
            while let Some(f) = r.next_frame().unwrap() {
                assert_eq!(
                    parse_method(f.payload).unwrap(),
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {}))
                );
                seen += 1;
            }
            if seen < 2 {
                assert!(r.fill().await.unwrap() > 0);
            }
        }
    }
}
