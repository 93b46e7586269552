//! A minimal, fast AMQP 0-9-1 client for broker-to-broker links.
//!
//! The replica broker connects to the original broker as a client and consumes from a
//! replicating subscription. Messages are replicated byte for byte, so this client keeps the raw
//! property bytes of every delivery; it speaks broker-core's own codec
//! (`broker_core::protocol`) over a tokio `TcpStream`, with one read buffer in which frames are
//! split in place and one write buffer, both reused: the steady state allocates nothing per
//! message.
//!
//! Only channel 1 is ever opened. Control methods (handshake, qos, consume, close) go through
//! amq-protocol's generated types; the message path (deliver, content, ack, publish) is
//! hand-written.

use std::fmt;
use std::time::Duration;

use amq_protocol::auth::{Credentials, SASLMechanism};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use broker_core::protocol::control::{parse_method, write_method};
use broker_core::protocol::frame::{split_frame, write_frame_header, write_heartbeat};
use broker_core::protocol::hot::{
    DecodeError, Reader, method_ids, parse_content_header, write_ack, write_content,
};
use broker_core::protocol::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_OVERHEAD,
    PROTOCOL_HEADER, basic_method, class, reply,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The largest frame we accept or propose; also the limit before tune.
pub const MAX_FRAME: u32 = 131_072;
/// The largest message body we accept in a content header.
pub const MAX_BODY: u64 = 512 * 1024 * 1024;
/// The channel the link uses.
const CHANNEL: u16 = 1;
/// How long `close` waits for close-ok.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A reused body buffer larger than this is given back after the delivery that grew it.
const BODY_KEEP: usize = 16 * 1024 * 1024;

/// Settings of one link connection.
#[derive(Clone)]
pub struct LinkSettings {
    /// Host name or address of the original broker.
    pub host: String,
    /// AMQP port.
    pub port: u16,
    /// User name (PLAIN, AMQPLAIN).
    pub username: String,
    /// Password (PLAIN, AMQPLAIN). Never printed by `Debug`.
    pub password: String,
    /// "PLAIN" (default when empty), "AMQPLAIN" or "ANONYMOUS".
    pub mechanism: String,
    /// Heartbeat interval we propose (whole seconds, rounded up). Negotiated as RabbitMQ
    /// clients do: the smaller of the two values when both are non-zero, else the non-zero one
    /// (heartbeats are off only when both sides say 0). We send a heartbeat frame when we have
    /// sent nothing for this long, and fail with [`LinkError::HeartbeatTimeout`] if nothing at
    /// all was received for twice this interval.
    pub heartbeat: Duration,
    /// Bound on connect + handshake, and on each awaited reply (qos-ok, consume-ok, ...).
    pub timeout: Duration,
    /// Client properties sent in start-ok (product name, ...).
    pub client_properties: FieldTable,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            host: "localhost".into(),
            port: 5672,
            username: "guest".into(),
            password: "guest".into(),
            mechanism: String::new(),
            heartbeat: Duration::ZERO,
            timeout: Duration::from_secs(10),
            client_properties: FieldTable::default(),
        }
    }
}

impl fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("mechanism", &self.mechanism)
            .field("heartbeat", &self.heartbeat)
            .field("timeout", &self.timeout)
            .field("client_properties", &self.client_properties)
            .finish()
    }
}

/// Why a link failed. Every error but the `Closed` ones leaves the connection unusable; after a
/// `ChannelClosed` the connection is still open but the link's channel is not.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed: connection refused, reset, end of stream.
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing arrived in time; the text says what we waited for.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Nothing at all arrived for two heartbeat intervals.
    #[error("missed heartbeats: nothing received from the peer for two heartbeat intervals")]
    HeartbeatTimeout,
    /// The peer closed the connection (connection.close), e.g. 403 on bad credentials, 320 on
    /// shutdown.
    #[error("connection closed by the peer: {code} {text}")]
    ConnectionClosed {
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
    /// The peer closed our channel (channel.close), e.g. 404 no queue, 406, 403.
    #[error("channel closed by the peer: {code} {text}")]
    ChannelClosed {
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
    /// The peer sent something we cannot parse, or that is not allowed here.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl LinkError {
    /// The AMQP reply code of the two `Closed` variants.
    pub fn code(&self) -> Option<u16> {
        match self {
            LinkError::ConnectionClosed { code, .. } | LinkError::ChannelClosed { code, .. } => {
                Some(*code)
            }
            _ => None,
        }
    }
}

fn protocol(e: impl fmt::Display) -> LinkError {
    LinkError::Protocol(e.to_string())
}

/// One incoming thing on the subscription channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A complete basic.deliver with its content.
    Deliver {
        /// The delivery tag, to ack.
        delivery_tag: u64,
        /// The redelivered flag.
        redelivered: bool,
        /// The exchange the message was published to.
        exchange: &'a str,
        /// The routing key it was published with.
        routing_key: &'a str,
        /// The property flags word and property list, exactly as received.
        raw_properties: &'a [u8],
        /// The whole body.
        body: &'a [u8],
    },
    /// basic.cancel from the server (the queue was deleted).
    Cancelled {
        /// The cancelled consumer's tag.
        consumer_tag: String,
    },
}

/// basic.deliver arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deliver<'a> {
    consumer_tag: &'a str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &'a str,
    routing_key: &'a str,
}

/// Parses basic.deliver arguments (after the class and method ids).
fn parse_deliver(args: &[u8]) -> Result<Deliver<'_>, DecodeError> {
    let mut r = Reader::new(args);
    let consumer_tag = r.short_str("consumer-tag")?;
    let delivery_tag = r.u64("delivery-tag")?;
    let redelivered = r.u8("redelivered")? & 1 != 0;
    let exchange = r.short_str("exchange")?;
    let routing_key = r.short_str("routing-key")?;
    r.finish()?;
    Ok(Deliver {
        consumer_tag,
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
    })
}

/// Where a delivery that did not arrive in one piece stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AsmState {
    Idle,
    /// basic.deliver seen, content header awaited.
    Header,
    /// Content header seen, this many body bytes still awaited.
    Body(u64),
}

/// A delivery assembled across frames and reads, in reused buffers.
#[derive(Debug)]
struct Assembly {
    state: AsmState,
    delivery_tag: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
    properties: Vec<u8>,
    body: Vec<u8>,
}

impl Assembly {
    fn new() -> Self {
        Assembly {
            state: AsmState::Idle,
            delivery_tag: 0,
            redelivered: false,
            exchange: String::new(),
            routing_key: String::new(),
            properties: Vec::new(),
            body: Vec::new(),
        }
    }

    fn start(&mut self, d: &Deliver<'_>) {
        self.state = AsmState::Header;
        self.delivery_tag = d.delivery_tag;
        self.redelivered = d.redelivered;
        self.exchange.clear();
        self.exchange.push_str(d.exchange);
        self.routing_key.clear();
        self.routing_key.push_str(d.routing_key);
        self.properties.clear();
        self.body.clear();
    }

    fn finish(&mut self, f: &mut impl FnMut(Incoming<'_>)) {
        f(Incoming::Deliver {
            delivery_tag: self.delivery_tag,
            redelivered: self.redelivered,
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            raw_properties: &self.properties,
            body: &self.body,
        });
        self.state = AsmState::Idle;
        if self.body.capacity() > BODY_KEEP {
            self.body = Vec::new();
        }
    }
}

/// What woke a wait for input.
enum Woke {
    Data,
    Tick,
}

/// A link connection: one AMQP 0-9-1 client connection with channel 1 open.
pub struct Link {
    stream: TcpStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    frame_max: u32,
    heartbeat: Duration,
    timeout: Duration,
    last_sent: Instant,
    last_recv: Instant,
    asm: Assembly,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.stream.peer_addr().ok())
            .field("frame_max", &self.frame_max)
            .field("heartbeat", &self.heartbeat)
            .field("buffered_in", &(self.rend - self.rstart))
            .field("buffered_out", &self.wbuf.len())
            .finish()
    }
}

impl Link {
    /// Connects (TCP_NODELAY), sends the protocol header, authenticates with the chosen
    /// mechanism (which the server must offer), tunes (frame_max = min(server's, 131072),
    /// channel_max 1, heartbeat negotiated as RabbitMQ clients do), opens vhost "/" and
    /// channel 1. Everything within `settings.timeout`.
    ///
    /// A connection.close during the handshake gives [`LinkError::ConnectionClosed`] (we answer
    /// close-ok); end of stream right after start-ok (some brokers' answer to bad credentials)
    /// gives [`LinkError::Io`] saying so.
    pub async fn connect(settings: &LinkSettings) -> Result<Link, LinkError> {
        let deadline = Instant::now() + settings.timeout;
        let stream = tokio::time::timeout_at(
            deadline,
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await
        .map_err(|_| LinkError::Timeout("TCP connect"))??;
        stream.set_nodelay(true)?;
        let now = Instant::now();
        let mut link = Link {
            stream,
            rbuf: vec![0; 2 * MAX_FRAME as usize + 2 * FRAME_OVERHEAD],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(64 * 1024),
            frame_max: MAX_FRAME,
            heartbeat: Duration::ZERO,
            timeout: settings.timeout,
            last_sent: now,
            last_recv: now,
            asm: Assembly::new(),
        };
        link.handshake(settings, deadline).await?;
        Ok(link)
    }

    async fn handshake(&mut self, s: &LinkSettings, deadline: Instant) -> Result<(), LinkError> {
        self.wbuf.extend_from_slice(&PROTOCOL_HEADER);
        self.flush_until(deadline, "sending the protocol header")
            .await?;
        let start = match self.next_method("connection.start", deadline).await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => start,
            (ch, other) => return Err(unexpected("connection.start", ch, &other)),
        };
        let mechanism = match s.mechanism.as_str() {
            "" | "PLAIN" => SASLMechanism::Plain,
            "AMQPLAIN" => SASLMechanism::AMQPlain,
            "ANONYMOUS" => SASLMechanism::Anonymous,
            other => {
                return Err(LinkError::Protocol(format!(
                    "unsupported SASL mechanism {other:?} (PLAIN, AMQPLAIN or ANONYMOUS)"
                )));
            }
        };
        let name = mechanism.name();
        let offered = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
        if !offered.split_whitespace().any(|m| m == name) {
            return Err(LinkError::Protocol(format!(
                "the server does not offer SASL mechanism {name} (offered: {offered})"
            )));
        }
        let credentials = Credentials::new(
            LongString::from(s.username.as_str()),
            LongString::from(s.password.as_str()),
        );
        let start_ok = connection::StartOk {
            client_properties: s.client_properties.clone(),
            mechanism: ShortString::from(name),
            response: credentials.sasl_auth_string(mechanism),
            locale: "en_US".into(),
        };
        write_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
        );
        self.flush_until(deadline, "sending connection.start-ok")
            .await?;
        let tune = match self.next_method("connection.tune", deadline).await {
            Ok((0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune)))) => tune,
            Ok((ch, other)) => return Err(unexpected("connection.tune", ch, &other)),
            Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(LinkError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the socket after start-ok (bad credentials?)",
                )));
            }
            Err(e) => return Err(e),
        };
        let frame_max = match tune.frame_max {
            0 => MAX_FRAME,
            n => n.min(MAX_FRAME),
        };
        if frame_max as usize <= FRAME_OVERHEAD {
            return Err(LinkError::Protocol(format!(
                "the server's frame_max {frame_max} is too small"
            )));
        }
        let ours = u16::try_from(s.heartbeat.as_secs() + u64::from(s.heartbeat.subsec_nanos() > 0))
            .unwrap_or(u16::MAX);
        let heartbeat = match (ours, tune.heartbeat) {
            (0, theirs) => theirs,
            (ours, 0) => ours,
            (ours, theirs) => ours.min(theirs),
        };
        write_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max,
                heartbeat,
            })),
        );
        self.frame_max = frame_max;
        self.heartbeat = Duration::from_secs(u64::from(heartbeat));
        write_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        );
        self.flush_until(deadline, "sending connection.open")
            .await?;
        match self.next_method("connection.open-ok", deadline).await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            (ch, other) => return Err(unexpected("connection.open-ok", ch, &other)),
        }
        write_method(
            &mut self.wbuf,
            CHANNEL,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        );
        self.flush_until(deadline, "sending channel.open").await?;
        match self.next_method("channel.open-ok", deadline).await? {
            (CHANNEL, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => Ok(()),
            (ch, other) => Err(unexpected("channel.open-ok", ch, &other)),
        }
    }

    /// Sends basic.qos(prefetch_size 0, `prefetch_count`, global false) and waits for qos-ok.
    ///
    /// Call it before [`Link::consume`]: a delivery arriving while a reply is awaited is a
    /// protocol error here.
    pub async fn qos(&mut self, prefetch_count: u16) -> Result<(), LinkError> {
        write_method(
            &mut self.wbuf,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count,
                global: false,
            })),
        );
        let deadline = Instant::now() + self.timeout;
        self.flush_until(deadline, "sending basic.qos").await?;
        loop {
            match self.next_method("basic.qos-ok", deadline).await? {
                (CHANNEL, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))) => return Ok(()),
                (ch, other) => ignore(ch, &other),
            }
        }
    }

    /// Sends basic.consume(queue, consumer_tag, no_local false, no_ack false, exclusive false,
    /// nowait false, arguments) and waits for consume-ok. A channel.close in reply gives
    /// [`LinkError::ChannelClosed`] (answered with channel.close-ok).
    pub async fn consume(
        &mut self,
        queue: &str,
        consumer_tag: &str,
        arguments: FieldTable,
    ) -> Result<(), LinkError> {
        let short = |s: &str, what: &str| {
            ShortString::try_new(s)
                .map_err(|_| LinkError::Protocol(format!("{what} longer than 255 bytes")))
        };
        let consume = basic::Consume {
            queue: short(queue, "queue name")?,
            consumer_tag: short(consumer_tag, "consumer tag")?,
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments,
        };
        write_method(
            &mut self.wbuf,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
        );
        let deadline = Instant::now() + self.timeout;
        self.flush_until(deadline, "sending basic.consume").await?;
        loop {
            match self.next_method("basic.consume-ok", deadline).await? {
                (CHANNEL, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))) => return Ok(()),
                (ch, other) => ignore(ch, &other),
            }
        }
    }

    /// Buffers a basic.publish with its content: the raw property bytes (flags word and
    /// property list) as given, the body split by frame_max. Not sent until [`Link::flush`].
    ///
    /// # Panics
    ///
    /// If `exchange` or `routing_key` is longer than 255 bytes (AMQP short strings).
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        raw_properties: &[u8],
        body: &[u8],
    ) {
        assert!(
            exchange.len() <= 255 && routing_key.len() <= 255,
            "exchange and routing key must be at most 255 bytes"
        );
        let out = &mut self.wbuf;
        let size = 4 + 2 + 1 + exchange.len() + 1 + routing_key.len() + 1;
        write_frame_header(out, FRAME_METHOD, CHANNEL, size as u32);
        out.extend_from_slice(&class::BASIC.to_be_bytes());
        out.extend_from_slice(&basic_method::PUBLISH.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.push(exchange.len() as u8);
        out.extend_from_slice(exchange.as_bytes());
        out.push(routing_key.len() as u8);
        out.extend_from_slice(routing_key.as_bytes());
        out.push(0);
        out.push(FRAME_END);
        write_content(out, CHANNEL, raw_properties, body, self.frame_max);
    }

    /// Buffers a basic.ack. Not sent until [`Link::flush`].
    pub fn ack(&mut self, delivery_tag: u64, multiple: bool) {
        write_ack(&mut self.wbuf, CHANNEL, delivery_tag, multiple);
    }

    /// True if a whole frame is already buffered (the next `next_batch` will not wait).
    pub fn has_buffered_frame(&self) -> bool {
        !matches!(
            split_frame(&self.rbuf[self.rstart..self.rend], self.frame_max),
            Ok(None)
        )
    }

    /// Waits until the socket may have something to read (cancel-safe: nothing is read).
    pub async fn readable(&self) -> Result<(), LinkError> {
        self.stream.readable().await?;
        Ok(())
    }

    /// When a heartbeat should next be sent, if the link has heartbeats.
    pub fn heartbeat_at(&self) -> Option<Instant> {
        (!self.heartbeat.is_zero()).then(|| self.last_sent + self.heartbeat)
    }

    /// Sends a heartbeat if one is due (and fails if the peer has been silent for two
    /// intervals), for a caller that waits on something else than the link.
    pub async fn keep_alive(&mut self) -> Result<(), LinkError> {
        if self.heartbeat.is_zero() {
            return Ok(());
        }
        self.heartbeat_due().await
    }

    /// Reads what the socket has without waiting; false if it had nothing after all.
    pub fn try_fill(&mut self) -> Result<bool, LinkError> {
        self.make_room();
        match self.stream.try_read(&mut self.rbuf[self.rend..]) {
            Ok(n) => self.got(n).map(|()| true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes everything buffered.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        let deadline = Instant::now() + self.write_bound();
        self.flush_until(deadline, "the peer to take our writes")
            .await
    }

    /// Waits for input, then handles every complete frame in the read buffer, calling `f` for
    /// each complete delivery or cancel, in order, and returns how many there were.
    ///
    /// Frames already buffered are handled without waiting. With heartbeats on, the wait also
    /// ends after at most one heartbeat interval: a heartbeat is sent if due, the receive
    /// deadline is checked ([`LinkError::HeartbeatTimeout`]), and `Ok(0)` is returned.
    /// Heartbeat frames are consumed silently. A connection.close or channel.close from the
    /// peer is answered with close-ok and returned as the matching error. Other methods on the
    /// channel (a late consume-ok, ...) are ignored. Replies the client owes (close-ok,
    /// cancel-ok, flow-ok) are flushed together with anything else buffered.
    ///
    /// Not cancel-safe while it writes a heartbeat or a reply.
    pub async fn next_batch(
        &mut self,
        mut f: impl FnMut(Incoming<'_>),
    ) -> Result<usize, LinkError> {
        let ready = !matches!(
            split_frame(&self.rbuf[self.rstart..self.rend], self.frame_max),
            Ok(None)
        );
        if !ready {
            match self.wait_input().await? {
                Woke::Data => {}
                Woke::Tick => return Ok(0),
            }
        }
        let mut count = 0;
        let result = process(
            &self.rbuf[self.rstart..self.rend],
            self.frame_max,
            &mut self.asm,
            &mut self.wbuf,
            &mut f,
            &mut count,
        );
        match result {
            Ok(consumed) => {
                self.rstart += consumed;
                if self.rstart == self.rend {
                    self.rstart = 0;
                    self.rend = 0;
                }
                if !self.wbuf.is_empty() {
                    self.flush().await?;
                }
                Ok(count)
            }
            Err(e) => {
                if matches!(
                    e,
                    LinkError::ConnectionClosed { .. } | LinkError::ChannelClosed { .. }
                ) && !self.wbuf.is_empty()
                {
                    let _ = self.flush().await;
                }
                Err(e)
            }
        }
    }

    /// The negotiated frame_max.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Sends connection.close(200) and waits briefly (at most 1 s) for close-ok; errors are
    /// ignored.
    pub async fn close(mut self) {
        write_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: reply::REPLY_SUCCESS,
                reply_text: "OK".into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        let deadline = Instant::now() + CLOSE_WAIT.min(self.timeout);
        if self
            .flush_until(deadline, "connection.close")
            .await
            .is_err()
        {
            return;
        }
        loop {
            match split_frame(&self.rbuf[self.rstart..self.rend], self.frame_max) {
                Err(_) => return,
                Ok(Some((frame, n))) => {
                    let ids = if frame.frame_type == FRAME_METHOD && frame.channel == 0 {
                        method_ids(frame.payload).ok().map(|(c, m, _)| (c, m))
                    } else {
                        None
                    };
                    self.rstart += n;
                    match ids {
                        // close-ok: done.
                        Some((10, 51)) => return,
                        // The peer closed at the same time: answer and stop.
                        Some((10, 50)) => {
                            write_connection_close_ok(&mut self.wbuf);
                            let _ = self.flush_until(deadline, "connection.close-ok").await;
                            return;
                        }
                        _ => {}
                    }
                }
                Ok(None) => {
                    if self.fill(deadline, "connection.close-ok").await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// How long a write may block: the peer may be slow, but not gone.
    fn write_bound(&self) -> Duration {
        self.timeout.max(2 * self.heartbeat)
    }

    async fn flush_until(
        &mut self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), LinkError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        tokio::time::timeout_at(deadline, self.stream.write_all(&self.wbuf))
            .await
            .map_err(|_| LinkError::Timeout(what))??;
        self.wbuf.clear();
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Makes room at the end of the read buffer for at least one whole frame.
    fn make_room(&mut self) {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rbuf.len() - self.rend < self.frame_max as usize + FRAME_OVERHEAD {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
    }

    /// Reads at least one byte before `deadline`.
    async fn fill(&mut self, deadline: Instant, what: &'static str) -> Result<(), LinkError> {
        self.make_room();
        let n = tokio::time::timeout_at(deadline, self.stream.read(&mut self.rbuf[self.rend..]))
            .await
            .map_err(|_| LinkError::Timeout(what))??;
        self.got(n)
    }

    fn got(&mut self, n: usize) -> Result<(), LinkError> {
        if n == 0 {
            return Err(LinkError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the socket",
            )));
        }
        self.rend += n;
        self.last_recv = Instant::now();
        Ok(())
    }

    /// Waits for bytes, or for the next heartbeat moment (sending one if due and checking the
    /// receive deadline).
    async fn wait_input(&mut self) -> Result<Woke, LinkError> {
        self.make_room();
        if self.heartbeat.is_zero() {
            let n = self.stream.read(&mut self.rbuf[self.rend..]).await?;
            self.got(n)?;
            return Ok(Woke::Data);
        }
        self.heartbeat_due().await?;
        let wake = (self.last_sent + self.heartbeat).min(self.last_recv + 2 * self.heartbeat);
        match tokio::time::timeout_at(wake, self.stream.read(&mut self.rbuf[self.rend..])).await {
            Ok(n) => {
                self.got(n?)?;
                Ok(Woke::Data)
            }
            Err(_) => {
                self.heartbeat_due().await?;
                Ok(Woke::Tick)
            }
        }
    }

    /// Fails if nothing was received for two intervals; sends a heartbeat if we have been quiet
    /// for one.
    async fn heartbeat_due(&mut self) -> Result<(), LinkError> {
        let now = Instant::now();
        if now >= self.last_recv + 2 * self.heartbeat {
            return Err(LinkError::HeartbeatTimeout);
        }
        if now >= self.last_sent + self.heartbeat {
            write_heartbeat(&mut self.wbuf);
            self.flush().await?;
        }
        Ok(())
    }

    /// The next method frame, for the control exchanges. Heartbeats are skipped; a
    /// connection.close or a channel.close on our channel is answered and returned as an
    /// error; content frames are a protocol error.
    async fn next_method(
        &mut self,
        what: &'static str,
        deadline: Instant,
    ) -> Result<(u16, AMQPClass), LinkError> {
        loop {
            let buf = &self.rbuf[self.rstart..self.rend];
            let split = match split_frame(buf, self.frame_max) {
                Ok(split) => split,
                Err(_) if buf.starts_with(b"AMQP") => {
                    return Err(LinkError::Protocol(format!(
                        "the server refused AMQP 0-9-1 and answered with protocol header {:?}",
                        &buf[..buf.len().min(8)]
                    )));
                }
                Err(e) => return Err(protocol(e)),
            };
            let Some((frame, n)) = split else {
                self.fill(deadline, what).await?;
                continue;
            };
            let (channel, frame_type) = (frame.channel, frame.frame_type);
            let method = match frame_type {
                FRAME_HEARTBEAT => None,
                FRAME_METHOD => Some(parse_method(frame.payload).map_err(protocol)?),
                _ => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected content frame on channel {channel} while waiting for {what}"
                    )));
                }
            };
            self.rstart += n;
            let Some(method) = method else { continue };
            match method {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                    write_connection_close_ok(&mut self.wbuf);
                    let _ = self.flush_until(deadline, "connection.close-ok").await;
                    return Err(LinkError::ConnectionClosed {
                        code: c.reply_code,
                        text: c.reply_text.to_string(),
                    });
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(c)) if channel == CHANNEL => {
                    write_channel_close_ok(&mut self.wbuf);
                    let _ = self.flush_until(deadline, "channel.close-ok").await;
                    return Err(LinkError::ChannelClosed {
                        code: c.reply_code,
                        text: c.reply_text.to_string(),
                    });
                }
                method => return Ok((channel, method)),
            }
        }
    }
}

fn unexpected(what: &str, channel: u16, got: &AMQPClass) -> LinkError {
    LinkError::Protocol(format!("expected {what}, got {got:?} on channel {channel}"))
}

fn ignore(channel: u16, method: &AMQPClass) {
    tracing::debug!(channel, ?method, "link: ignoring an unexpected method");
}

fn write_connection_close_ok(out: &mut Vec<u8>) {
    write_method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    );
}

fn write_channel_close_ok(out: &mut Vec<u8>) {
    write_method(
        out,
        CHANNEL,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    );
}

/// Handles every complete frame in `buf`; returns how many bytes were consumed.
fn process(
    buf: &[u8],
    frame_max: u32,
    asm: &mut Assembly,
    wbuf: &mut Vec<u8>,
    f: &mut impl FnMut(Incoming<'_>),
    count: &mut usize,
) -> Result<usize, LinkError> {
    let mut pos = 0;
    while let Some((frame, n)) = split_frame(&buf[pos..], frame_max).map_err(protocol)? {
        match frame.frame_type {
            FRAME_HEARTBEAT => {}
            FRAME_METHOD => {
                let (class_id, method_id, args) = method_ids(frame.payload).map_err(protocol)?;
                if frame.channel == CHANNEL
                    && class_id == class::BASIC
                    && method_id == basic_method::DELIVER
                {
                    if asm.state != AsmState::Idle {
                        return Err(LinkError::Protocol(
                            "basic.deliver before the previous delivery's content ended".into(),
                        ));
                    }
                    let d = parse_deliver(args).map_err(protocol)?;
                    if let Some(rest) = contiguous(&buf[pos + n..], frame_max, &d, f) {
                        *count += 1;
                        pos += n + rest;
                        continue;
                    }
                    asm.start(&d);
                } else {
                    if frame.channel == CHANNEL && asm.state != AsmState::Idle {
                        return Err(LinkError::Protocol(format!(
                            "method {class_id}.{method_id} in the middle of a delivery's content"
                        )));
                    }
                    other_method(frame.channel, frame.payload, wbuf, f, count)?;
                }
            }
            FRAME_HEADER => {
                if frame.channel != CHANNEL || asm.state != AsmState::Header {
                    return Err(LinkError::Protocol(format!(
                        "unexpected content header on channel {}",
                        frame.channel
                    )));
                }
                let header = parse_content_header(frame.payload).map_err(protocol)?;
                check_body_size(header.body_size)?;
                asm.properties.extend_from_slice(header.raw_properties);
                if header.body_size == 0 {
                    asm.finish(f);
                    *count += 1;
                } else {
                    // Bounded by MAX_BODY; grows further only as the body really arrives.
                    asm.body
                        .reserve(header.body_size.min(4 * u64::from(MAX_FRAME)) as usize);
                    asm.state = AsmState::Body(header.body_size);
                }
            }
            FRAME_BODY => {
                let AsmState::Body(remaining) = asm.state else {
                    return Err(LinkError::Protocol(format!(
                        "unexpected content body on channel {}",
                        frame.channel
                    )));
                };
                let len = frame.payload.len() as u64;
                if frame.channel != CHANNEL || len > remaining {
                    return Err(LinkError::Protocol(
                        "content body longer than the content header announced".into(),
                    ));
                }
                asm.body.extend_from_slice(frame.payload);
                if len == remaining {
                    asm.finish(f);
                    *count += 1;
                } else {
                    asm.state = AsmState::Body(remaining - len);
                }
            }
            other => {
                return Err(LinkError::Protocol(format!("unknown frame type {other}")));
            }
        }
        pos += n;
    }
    Ok(pos)
}

fn check_body_size(body_size: u64) -> Result<(), LinkError> {
    if body_size > MAX_BODY {
        return Err(LinkError::Protocol(format!(
            "content body of {body_size} bytes exceeds the limit of {MAX_BODY}"
        )));
    }
    Ok(())
}

/// The fast path: when the content header and the whole body (in at most one body frame)
/// follow the deliver frame in `buf`, yields the delivery straight from the buffer and returns
/// how many bytes of `buf` it took. Anything else (more frames, incomplete, malformed) returns
/// `None` and is left to the frame-by-frame path, which reports errors.
fn contiguous(
    buf: &[u8],
    frame_max: u32,
    d: &Deliver<'_>,
    f: &mut impl FnMut(Incoming<'_>),
) -> Option<usize> {
    let (hf, hn) = split_frame(buf, frame_max).ok()??;
    if hf.frame_type != FRAME_HEADER || hf.channel != CHANNEL {
        return None;
    }
    let header = parse_content_header(hf.payload).ok()?;
    let (body, used) = if header.body_size == 0 {
        (&[][..], hn)
    } else {
        let (bf, bn) = split_frame(&buf[hn..], frame_max).ok()??;
        if bf.frame_type != FRAME_BODY
            || bf.channel != CHANNEL
            || bf.payload.len() as u64 != header.body_size
        {
            return None;
        }
        (bf.payload, hn + bn)
    };
    f(Incoming::Deliver {
        delivery_tag: d.delivery_tag,
        redelivered: d.redelivered,
        exchange: d.exchange,
        routing_key: d.routing_key,
        raw_properties: header.raw_properties,
        body,
    });
    Some(used)
}

/// Methods other than basic.deliver, outside the control exchanges.
fn other_method(
    channel: u16,
    payload: &[u8],
    wbuf: &mut Vec<u8>,
    f: &mut impl FnMut(Incoming<'_>),
    count: &mut usize,
) -> Result<(), LinkError> {
    let method = parse_method(payload).map_err(protocol)?;
    match (channel, method) {
        (_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            write_connection_close_ok(wbuf);
            Err(LinkError::ConnectionClosed {
                code: c.reply_code,
                text: c.reply_text.to_string(),
            })
        }
        (CHANNEL, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
            write_channel_close_ok(wbuf);
            Err(LinkError::ChannelClosed {
                code: c.reply_code,
                text: c.reply_text.to_string(),
            })
        }
        (CHANNEL, AMQPClass::Channel(channel::AMQPMethod::Flow(flow))) => {
            write_method(
                wbuf,
                CHANNEL,
                AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                    active: flow.active,
                })),
            );
            Ok(())
        }
        (CHANNEL, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel))) => {
            if !cancel.nowait {
                write_method(
                    wbuf,
                    CHANNEL,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: cancel.consumer_tag.clone(),
                    })),
                );
            }
            f(Incoming::Cancelled {
                consumer_tag: cancel.consumer_tag.into(),
            });
            *count += 1;
            Ok(())
        }
        (channel, method) => {
            ignore(channel, &method);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;
    use broker_core::protocol::hot::{parse_ack, write_deliver};

    #[test]
    fn deliver_round_trips_through_the_parser() {
        let mut out = Vec::new();
        write_deliver(
            &mut out,
            1,
            "ctag-1",
            0x0102_0304_0506_0708,
            true,
            "ex",
            "a.b.c",
        );
        let (frame, n) = split_frame(&out, MAX_FRAME).unwrap().unwrap();
        assert_eq!(
            (frame.frame_type, frame.channel, n),
            (FRAME_METHOD, 1, out.len())
        );
        let (class_id, method_id, args) = method_ids(frame.payload).unwrap();
        assert_eq!((class_id, method_id), (60, 60));
        assert_eq!(
            parse_deliver(args),
            Ok(Deliver {
                consumer_tag: "ctag-1",
                delivery_tag: 0x0102_0304_0506_0708,
                redelivered: true,
                exchange: "ex",
                routing_key: "a.b.c",
            })
        );
        for cut in 0..args.len() {
            assert!(parse_deliver(&args[..cut]).is_err(), "cut at {cut}");
        }
        let mut out = Vec::new();
        write_deliver(&mut out, 1, "", 7, false, "", "");
        let (frame, _) = split_frame(&out, MAX_FRAME).unwrap().unwrap();
        let d = parse_deliver(method_ids(frame.payload).unwrap().2).unwrap();
        assert_eq!((d.delivery_tag, d.redelivered, d.exchange), (7, false, ""));
    }

    /// Feeds deliveries to `process` in pieces of every size, as reads would bring them.
    #[test]
    fn deliveries_are_assembled_across_reads() {
        let body: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        write_deliver(&mut wire, 1, "t", 1, false, "ex", "rk");
        write_content(&mut wire, 1, PROPS, &body, 4096);
        write_deliver(&mut wire, 1, "t", 2, false, "", "q");
        write_content(&mut wire, 1, &[0, 0], b"", 4096);
        wire.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
        write_deliver(&mut wire, 1, "t", 3, true, "", "q");
        write_content(&mut wire, 1, &[0, 0], b"small", 4096);
        let expected = vec![
            Owned::Deliver(1, false, "ex".into(), "rk".into(), PROPS.into(), body),
            Owned::Deliver(2, false, "".into(), "q".into(), vec![0, 0], vec![]),
            Owned::Deliver(
                3,
                true,
                "".into(),
                "q".into(),
                vec![0, 0],
                b"small".to_vec(),
            ),
        ];
        for step in [1, 7, 100, 4096, 5000, wire.len()] {
            let mut asm = Assembly::new();
            let mut wbuf = Vec::new();
            let mut got = Vec::new();
            let mut count = 0;
            let mut buf: Vec<u8> = Vec::new();
            for piece in wire.chunks(step) {
                buf.extend_from_slice(piece);
                let used = process(
                    &buf,
                    4096,
                    &mut asm,
                    &mut wbuf,
                    &mut |i| got.push(owned(i)),
                    &mut count,
                )
                .unwrap();
                buf.drain(..used);
            }
            assert!(buf.is_empty(), "step {step}");
            assert_eq!(count, 3, "step {step}");
            assert_eq!(got, expected, "step {step}");
            assert!(wbuf.is_empty());
        }
    }

    #[test]
    fn oversized_frames_and_bodies_are_refused() {
        let mut asm = Assembly::new();
        let mut wbuf = Vec::new();
        let mut count = 0;
        let mut f = |_: Incoming<'_>| panic!("nothing to yield");
        let big = [FRAME_BODY, 0, 1, 0, 0, 0x10, 0x00];
        assert!(matches!(
            process(&big, 4096, &mut asm, &mut wbuf, &mut f, &mut count),
            Err(LinkError::Protocol(_))
        ));
        let mut wire = Vec::new();
        write_deliver(&mut wire, 1, "t", 1, false, "", "q");
        // A content header announcing 1 GiB.
        write_frame_header(&mut wire, FRAME_HEADER, 1, 14);
        wire.extend_from_slice(&60u16.to_be_bytes());
        wire.extend_from_slice(&0u16.to_be_bytes());
        wire.extend_from_slice(&(1u64 << 30).to_be_bytes());
        wire.extend_from_slice(&[0, 0]);
        wire.push(FRAME_END);
        let err = process(&wire, 4096, &mut asm, &mut wbuf, &mut f, &mut count).unwrap_err();
        assert!(
            matches!(&err, LinkError::Protocol(t) if t.contains("exceeds")),
            "{err:?}"
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let s = LinkSettings {
            password: "s3cret".into(),
            ..LinkSettings::default()
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    /// The server side of a fake broker.
    struct Peer {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    type Frame = (u8, u16, Vec<u8>);

    impl Peer {
        async fn accept(listener: &tokio::net::TcpListener) -> Peer {
            let (stream, _) = listener.accept().await.unwrap();
            let mut peer = Peer {
                stream,
                buf: Vec::new(),
            };
            let mut header = [0u8; 8];
            peer.stream.read_exact(&mut header).await.unwrap();
            assert_eq!(header, PROTOCOL_HEADER);
            peer
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        async fn send_method(&mut self, channel: u16, method: AMQPClass) {
            let mut out = Vec::new();
            write_method(&mut out, channel, method);
            self.send(&out).await;
        }

        /// The next frame, heartbeats included; `None` at end of stream.
        async fn frame(&mut self) -> Option<Frame> {
            loop {
                if let Some((f, n)) = split_frame(&self.buf, 0).unwrap() {
                    let frame = (f.frame_type, f.channel, f.payload.to_vec());
                    self.buf.drain(..n);
                    return Some(frame);
                }
                let mut chunk = [0u8; 65536];
                let n = self.stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn method(&mut self) -> (u16, AMQPClass) {
            loop {
                let (ty, ch, payload) = self.frame().await.expect("a frame");
                if ty == FRAME_HEARTBEAT {
                    continue;
                }
                assert_eq!(ty, FRAME_METHOD);
                return (ch, parse_method(&payload).unwrap());
            }
        }

        async fn start(&mut self, mechanisms: &str) -> connection::StartOk {
            self.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: FieldTable::default(),
                    mechanisms: mechanisms.into(),
                    locales: "en_US".into(),
                })),
            )
            .await;
            match self.method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::StartOk(ok))) => ok,
                other => panic!("expected start-ok, got {other:?}"),
            }
        }

        /// Tune, open and channel open; returns the client's tune-ok.
        async fn rest_of_handshake(&mut self, heartbeat: u16) -> connection::TuneOk {
            self.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                    channel_max: 2047,
                    frame_max: 4096,
                    heartbeat,
                })),
            )
            .await;
            let tune_ok = match self.method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok))) => ok,
                other => panic!("expected tune-ok, got {other:?}"),
            };
            match self.method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::Open(open))) => {
                    assert_eq!(open.virtual_host.as_str(), "/");
                }
                other => panic!("expected open, got {other:?}"),
            }
            self.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
            )
            .await;
            match self.method().await {
                (1, AMQPClass::Channel(channel::AMQPMethod::Open(_))) => {}
                other => panic!("expected channel.open, got {other:?}"),
            }
            self.send_method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            )
            .await;
            tune_ok
        }
    }

    async fn listen() -> (tokio::net::TcpListener, LinkSettings) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = LinkSettings {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
            username: "user".into(),
            password: "pass".into(),
            timeout: Duration::from_secs(3),
            ..LinkSettings::default()
        };
        (listener, settings)
    }

    /// Raw properties: headers {"k": "xyz"} and delivery-mode 2.
    const PROPS: &[u8] = &[
        0x30, 0x00, 0, 0, 0, 10, 1, b'k', b'S', 0, 0, 0, 3, b'x', b'y', b'z', 2,
    ];

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Deliver(u64, bool, String, String, Vec<u8>, Vec<u8>),
        Cancelled(String),
    }

    fn owned(i: Incoming<'_>) -> Owned {
        match i {
            Incoming::Deliver {
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                raw_properties,
                body,
            } => Owned::Deliver(
                delivery_tag,
                redelivered,
                exchange.into(),
                routing_key.into(),
                raw_properties.into(),
                body.into(),
            ),
            Incoming::Cancelled { consumer_tag } => Owned::Cancelled(consumer_tag),
        }
    }

    #[tokio::test]
    async fn consumes_deliveries_and_acks() {
        let (listener, mut settings) = listen().await;
        settings
            .client_properties
            .insert("product".into(), AMQPValue::LongString("replica".into()));
        let big: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        let big2 = big.clone();
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            let ok = p.start("PLAIN AMQPLAIN").await;
            assert_eq!(ok.mechanism.as_str(), "PLAIN");
            assert_eq!(ok.response.as_bytes(), b"\0user\0pass");
            assert!(ok.client_properties.contains_key("product"));
            let tune_ok = p.rest_of_handshake(0).await;
            assert_eq!((tune_ok.frame_max, tune_ok.channel_max), (4096, 1));
            assert_eq!(tune_ok.heartbeat, 0);
            match p.method().await {
                (1, AMQPClass::Basic(basic::AMQPMethod::Qos(q))) => {
                    assert_eq!((q.prefetch_count, q.global), (500, false));
                }
                other => panic!("expected qos, got {other:?}"),
            }
            p.send_method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
            )
            .await;
            match p.method().await {
                (1, AMQPClass::Basic(basic::AMQPMethod::Consume(c))) => {
                    assert_eq!(c.queue.as_str(), "q1");
                    assert_eq!(c.consumer_tag.as_str(), "repl");
                    assert!(!c.no_ack && !c.nowait && !c.exclusive);
                    assert_eq!(
                        c.arguments.inner().get("x-replicate"),
                        Some(&AMQPValue::Boolean(true))
                    );
                }
                other => panic!("expected consume, got {other:?}"),
            }
            // consume-ok and the first delivery in one write.
            let mut out = Vec::new();
            write_method(
                &mut out,
                1,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: "repl".into(),
                })),
            );
            write_deliver(&mut out, 1, "repl", 1, false, "ex", "rk");
            write_content(&mut out, 1, PROPS, b"hello", 4096);
            p.send(&out).await;
            // The second delivery: body over two frames, and over several writes.
            let mut out = Vec::new();
            write_deliver(&mut out, 1, "repl", 2, true, "", "q1");
            write_content(&mut out, 1, &[0, 0], &big2, 4096);
            write_method(
                &mut out,
                1,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: "repl".into(),
                    nowait: false,
                })),
            );
            for part in out.chunks(1500) {
                p.send(part).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            match p.method().await {
                (1, AMQPClass::Basic(basic::AMQPMethod::CancelOk(c))) => {
                    assert_eq!(c.consumer_tag.as_str(), "repl");
                }
                other => panic!("expected cancel-ok, got {other:?}"),
            }
            let (ty, ch, payload) = p.frame().await.unwrap();
            assert_eq!((ty, ch), (FRAME_METHOD, 1));
            let (class_id, method_id, args) = method_ids(&payload).unwrap();
            assert_eq!((class_id, method_id), (60, 80));
            let ack = parse_ack(args).unwrap();
            assert_eq!((ack.delivery_tag, ack.multiple), (2, true));
            // A publish: method, header, body over two frames.
            match p.method().await {
                (1, AMQPClass::Basic(basic::AMQPMethod::Publish(publish))) => {
                    assert_eq!(publish.exchange.as_str(), "ex");
                    assert_eq!(publish.routing_key.as_str(), "rk2");
                }
                other => panic!("expected publish, got {other:?}"),
            }
            let (ty, _, payload) = p.frame().await.unwrap();
            assert_eq!(ty, FRAME_HEADER);
            let header = parse_content_header(&payload).unwrap();
            assert_eq!((header.body_size, header.raw_properties), (6000, PROPS));
            let mut body = Vec::new();
            while body.len() < 6000 {
                let (ty, _, payload) = p.frame().await.unwrap();
                assert_eq!(ty, FRAME_BODY);
                body.extend_from_slice(&payload);
            }
            assert_eq!(body, big2);
            match p.method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    assert_eq!(c.reply_code, 200);
                }
                other => panic!("expected close, got {other:?}"),
            }
            p.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            )
            .await;
        });

        let mut link = Link::connect(&settings).await.unwrap();
        assert_eq!(link.frame_max(), 4096);
        link.qos(500).await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-replicate".into(), AMQPValue::Boolean(true));
        link.consume("q1", "repl", args).await.unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        while got.len() < 3 {
            let n = tokio::time::timeout_at(deadline, link.next_batch(|i| got.push(owned(i))))
                .await
                .expect("deliveries in time")
                .unwrap();
            assert!(n <= 3);
        }
        assert_eq!(
            got,
            vec![
                Owned::Deliver(
                    1,
                    false,
                    "ex".into(),
                    "rk".into(),
                    PROPS.into(),
                    b"hello".into()
                ),
                Owned::Deliver(2, true, "".into(), "q1".into(), vec![0, 0], big.clone()),
                Owned::Cancelled("repl".into()),
            ]
        );
        link.ack(2, true);
        link.flush().await.unwrap();
        link.publish("ex", "rk2", PROPS, &big);
        link.flush().await.unwrap();
        link.close().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn consume_on_a_missing_queue_is_a_channel_close() {
        let (listener, settings) = listen().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.start("PLAIN").await;
            p.rest_of_handshake(0).await;
            match p.method().await {
                (1, AMQPClass::Basic(basic::AMQPMethod::Consume(_))) => {}
                other => panic!("expected consume, got {other:?}"),
            }
            p.send_method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 404,
                    reply_text: "NOT_FOUND - no queue 'q'".into(),
                    class_id: 60,
                    method_id: 20,
                })),
            )
            .await;
            match p.method().await {
                (1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {}
                other => panic!("expected channel.close-ok, got {other:?}"),
            }
        });
        let mut link = Link::connect(&settings).await.unwrap();
        let err = link
            .consume("q", "t", FieldTable::default())
            .await
            .unwrap_err();
        match &err {
            LinkError::ChannelClosed { code: 404, text } => {
                assert_eq!(text, "NOT_FOUND - no queue 'q'");
            }
            other => panic!("expected ChannelClosed 404, got {other:?}"),
        }
        assert_eq!(err.code(), Some(404));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_login_is_a_connection_close() {
        let (listener, settings) = listen().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.start("PLAIN").await;
            p.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 403,
                    reply_text: "ACCESS_REFUSED - Login was refused".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
            match p.method().await {
                (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {}
                other => panic!("expected close-ok, got {other:?}"),
            }
        });
        let err = Link::connect(&settings).await.unwrap_err();
        assert!(
            matches!(&err, LinkError::ConnectionClosed { code: 403, text } if text.contains("ACCESS_REFUSED")),
            "{err:?}"
        );
        assert_eq!(err.code(), Some(403));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_mechanism_not_offered_is_refused() {
        let (listener, mut settings) = listen().await;
        settings.mechanism = "AMQPLAIN".into();
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: FieldTable::default(),
                    mechanisms: "PLAIN EXTERNAL".into(),
                    locales: "en_US".into(),
                })),
            )
            .await;
            p.frame().await
        });
        let err = Link::connect(&settings).await.unwrap_err();
        match &err {
            LinkError::Protocol(text) => {
                assert!(
                    text.contains("AMQPLAIN") && text.contains("PLAIN EXTERNAL"),
                    "{text}"
                );
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert_eq!(err.code(), None);
        assert!(server.await.unwrap().is_none());
    }

    #[tokio::test]
    async fn amqplain_sends_login_and_password() {
        let (listener, mut settings) = listen().await;
        settings.mechanism = "AMQPLAIN".into();
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            let ok = p.start("PLAIN AMQPLAIN").await;
            assert_eq!(ok.mechanism.as_str(), "AMQPLAIN");
            // The table without its length prefix: LOGIN "user", PASSWORD "pass".
            let mut expected = vec![5];
            expected.extend_from_slice(b"LOGINS\0\0\0\x04user");
            expected.push(8);
            expected.extend_from_slice(b"PASSWORDS\0\0\0\x04pass");
            assert_eq!(ok.response.as_bytes(), &expected[..]);
            p.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 320,
                    reply_text: "CONNECTION_FORCED - shutdown".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
        });
        let err = Link::connect(&settings).await.unwrap_err();
        assert_eq!(err.code(), Some(320), "{err:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn silent_server_is_a_heartbeat_timeout() {
        let (listener, mut settings) = listen().await;
        settings.heartbeat = Duration::from_secs(5);
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.start("PLAIN").await;
            let tune_ok = p.rest_of_handshake(1).await;
            assert_eq!(tune_ok.heartbeat, 1);
            // Silent from here on; count the client's heartbeats until it hangs up.
            let mut heartbeats = 0;
            while let Some((ty, ch, _)) = p.frame().await {
                assert_eq!((ty, ch), (FRAME_HEARTBEAT, 0));
                heartbeats += 1;
            }
            heartbeats
        });
        let mut link = Link::connect(&settings).await.unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(4);
        let err = loop {
            match tokio::time::timeout_at(deadline, link.next_batch(|_| panic!("no messages")))
                .await
                .expect("heartbeat timeout in time")
            {
                Ok(n) => assert_eq!(n, 0),
                Err(e) => break e,
            }
        };
        let elapsed = started.elapsed();
        assert!(matches!(err, LinkError::HeartbeatTimeout), "{err:?}");
        assert!(
            elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_millis(3500),
            "{elapsed:?}"
        );
        drop(link);
        assert!(server.await.unwrap() >= 1);
    }
}
