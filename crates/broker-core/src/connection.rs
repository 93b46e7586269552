//! One AMQP connection as a state machine: the handshake (header, start/start-ok with SASL,
//! tune/tune-ok, open), frame dispatch to channels, and closing. It takes frames and writes its
//! answers to the connection's `Outbound`; the tokio layer in `server` does the socket I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::auth::{self, Principal};
use crate::broker::Broker;
use crate::channel::{Channel, ChannelContext};
use crate::delivery::{ChannelLink, Outbound};
use crate::error::AmqpError;
use crate::fields;
use crate::protocol::control::{ControlDecodeError, parse_method, write_method};
use crate::protocol::frame::Frame;
use crate::protocol::hot::{self, method_ids};
use crate::protocol::{
    FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE, PROTOCOL_HEADER,
    basic_method, class, is_known_method,
};

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// connection.start sent, waiting for start-ok.
    AwaitStartOk,
    /// connection.tune sent, waiting for tune-ok.
    AwaitTuneOk,
    /// Waiting for connection.open.
    AwaitOpen,
    /// Open.
    Open,
    /// We sent connection.close and wait for close-ok; everything else is dropped.
    Closing,
}

/// What the I/O layer should do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// Flush what is queued and close the socket.
    Terminate,
}

/// A connection.
#[derive(Debug)]
pub struct Connection {
    broker: Arc<Broker>,
    /// Its id.
    pub id: u64,
    peer: SocketAddr,
    out: Arc<Outbound>,
    phase: Phase,
    /// The frame_max in force (the server's before tune-ok).
    pub frame_max: u32,
    channel_max: u16,
    /// The negotiated heartbeat interval, seconds (0 = none).
    pub heartbeat_s: u16,
    channels: HashMap<u16, Channel>,
    principal: Option<Principal>,
    cancel_notify: bool,
    /// The client handles connection.blocked.
    pub blocked_capable: bool,
    admin_requested: bool,
    counted_ordinary: bool,
    /// Has published at least once (memory alarms block only publishers).
    pub has_published: bool,
}

impl Connection {
    /// A connection whose peer sent a protocol header; `header` decides whether we go on.
    pub fn new(broker: Arc<Broker>, peer: SocketAddr, out: Arc<Outbound>) -> Connection {
        let id = broker.next_connection_id();
        let frame_max = broker.config.frame_max;
        let channel_max = broker.config.channel_max;
        Connection {
            broker,
            id,
            peer,
            out,
            phase: Phase::AwaitStartOk,
            frame_max,
            channel_max,
            heartbeat_s: 0,
            channels: HashMap::new(),
            principal: None,
            cancel_notify: false,
            blocked_capable: false,
            admin_requested: false,
            counted_ordinary: false,
            has_published: false,
        }
    }

    /// The current phase.
    /// An administrator (`qpid.ha-admin` and the `admin` tag).
    pub fn is_admin(&self) -> bool {
        self.admin_requested && self.principal.as_ref().is_some_and(|p| p.admin)
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The authenticated user, once start-ok has been accepted.
    pub fn user(&self) -> Option<&str> {
        self.principal.as_ref().map(|p| p.user.as_str())
    }

    /// Handles the 8-byte protocol header. A header other than AMQP 0-9-1 is answered with ours
    /// and the connection ends (spec section 4.2.2).
    pub fn protocol_header(&mut self, header: &[u8]) -> Next {
        if header != PROTOCOL_HEADER {
            tracing::info!(target: "Protocol", "connection {} from {}: unsupported protocol header {:?}", self.id, self.peer, header);
            self.out.write(|o| o.extend_from_slice(&PROTOCOL_HEADER));
            return Next::Terminate;
        }
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: self.server_properties(),
            mechanisms: LongString::from(auth::mechanisms(self.broker.config.auth)),
            locales: LongString::from("en_US"),
        };
        self.send0(connection::AMQPMethod::Start(start));
        Next::Continue
    }

    fn server_properties(&self) -> FieldTable {
        let mut caps = FieldTable::default();
        for c in [
            "publisher_confirms",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
            "per_consumer_qos",
        ] {
            caps.insert(c.into(), AMQPValue::Boolean(true));
        }
        let mut p = FieldTable::default();
        p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        p.insert(
            "product".into(),
            AMQPValue::LongString("qpidd (qpid-rs)".into()),
        );
        p.insert(
            "version".into(),
            AMQPValue::LongString(self.broker.config.version.as_str().into()),
        );
        p.insert("platform".into(), AMQPValue::LongString("Rust".into()));
        p.insert(
            "information".into(),
            AMQPValue::LongString("AMQP 0-9-1 broker with Qpid-style HA".into()),
        );
        p
    }

    fn send0(&self, m: connection::AMQPMethod) {
        self.out
            .write(|o| write_method(o, 0, AMQPClass::Connection(m)));
    }

    /// Handles one frame.
    pub fn frame(&mut self, frame: Frame<'_>) -> Next {
        if self.phase == Phase::Closing {
            return self.frame_while_closing(frame);
        }
        let ids = if frame.frame_type == FRAME_METHOD {
            method_ids(frame.payload).ok()
        } else {
            None
        };
        let (class_id, method_id) = ids.map_or((0, 0), |(c, m, _)| (c, m));
        match self.dispatch(frame) {
            Ok(next) => next,
            Err(Failure::Connection(e)) => self.close_connection(e, class_id, method_id),
            Err(Failure::Channel(ch, e)) => {
                self.close_channel(ch, e, class_id, method_id);
                Next::Continue
            }
        }
    }

    fn frame_while_closing(&mut self, frame: Frame<'_>) -> Next {
        if frame.frame_type != FRAME_METHOD || frame.channel != 0 {
            return Next::Continue;
        }
        match method_ids(frame.payload) {
            Ok((class::CONNECTION, 51, _)) => Next::Terminate,
            Ok((class::CONNECTION, 50, _)) => {
                self.send0(connection::AMQPMethod::CloseOk(connection::CloseOk {}));
                Next::Terminate
            }
            _ => Next::Continue,
        }
    }

    fn dispatch(&mut self, frame: Frame<'_>) -> Result<Next, Failure> {
        match frame.frame_type {
            FRAME_HEARTBEAT if frame.channel == 0 => Ok(Next::Continue),
            FRAME_HEARTBEAT => Err(hard(AmqpError::frame_error(
                "heartbeat frame on a channel other than 0",
            ))),
            FRAME_METHOD if frame.channel == 0 => self.connection_method(frame.payload),
            _ if self.phase != Phase::Open => Err(hard(AmqpError::command_invalid(
                "channel frames are not allowed before connection.open",
            ))),
            FRAME_METHOD => self
                .channel_method(frame.channel, frame.payload)
                .map(|()| Next::Continue),
            FRAME_HEADER => self
                .content_header(frame.channel, frame.payload)
                .map(|()| Next::Continue),
            FRAME_BODY => self
                .content_body(frame.channel, frame.payload)
                .map(|()| Next::Continue),
            _ => Err(hard(AmqpError::frame_error(format!(
                "unexpected frame type {}",
                frame.frame_type
            )))),
        }
    }

    // ---- channel 0 --------------------------------------------------------------------------

    fn connection_method(&mut self, payload: &[u8]) -> Result<Next, Failure> {
        let method = match parse_control(payload)? {
            AMQPClass::Connection(m) => m,
            other => {
                return Err(hard(AmqpError::command_invalid(format!(
                    "method {}.{} is not allowed on channel 0",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ))));
            }
        };
        match (self.phase, method) {
            (Phase::AwaitStartOk, connection::AMQPMethod::StartOk(s)) => self.start_ok(s),
            (Phase::AwaitTuneOk, connection::AMQPMethod::TuneOk(t)) => self.tune_ok(t),
            (Phase::AwaitOpen, connection::AMQPMethod::Open(o)) => self.open(o),
            (_, connection::AMQPMethod::Close(c)) => {
                tracing::debug!(target: "Network", "connection {} closed by peer: {} {}", self.id, c.reply_code, c.reply_text.as_str());
                self.shutdown_channels();
                self.send0(connection::AMQPMethod::CloseOk(connection::CloseOk {}));
                Ok(Next::Terminate)
            }
            (_, connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_)) => {
                Ok(Next::Continue)
            }
            (phase, m) => Err(hard(AmqpError::command_invalid(format!(
                "connection method {} is not allowed now ({phase:?})",
                AMQPClass::Connection(m).get_amqp_method_id()
            )))),
        }
    }

    fn start_ok(&mut self, s: connection::StartOk) -> Result<Next, Failure> {
        let caps = fields::get(&s.client_properties, "capabilities").and_then(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        });
        let cap = |name: &str| {
            caps.as_ref()
                .and_then(|t| fields::get(t, name))
                .and_then(fields::as_bool)
                == Some(true)
        };
        self.cancel_notify = cap("consumer_cancel_notify");
        self.blocked_capable = cap("connection.blocked");
        self.admin_requested =
            fields::get(&s.client_properties, "qpid.ha-admin").is_some_and(|v| {
                fields::as_bool(v).unwrap_or(false)
                    || fields::as_str(v).is_some_and(|s| s != "0" && s != "false")
            });
        let principal = auth::authenticate(
            &self.broker.users,
            self.broker.config.auth,
            s.mechanism.as_str(),
            s.response.as_bytes(),
            self.peer,
        )
        .map_err(|e| {
            tracing::warn!(target: "Security", "connection {} from {}: authentication failed with mechanism {}: {e}", self.id, self.peer, s.mechanism.as_str());
            hard(AmqpError::access_refused(format!(
                "Login was refused using authentication mechanism {}: {e}",
                s.mechanism.as_str()
            )))
        })?;
        tracing::debug!(target: "Security", "connection {} from {} authenticated as '{}'", self.id, self.peer, principal.user);
        self.broker.mgmt.connection_opened(
            self.id,
            crate::mgmt::ConnectionInfo {
                address: self.peer.to_string(),
                auth_identity: principal.user.clone(),
                client_properties: s.client_properties.clone(),
            },
        );
        self.principal = Some(principal);
        self.phase = Phase::AwaitTuneOk;
        self.send0(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: self.channel_max,
            frame_max: self.frame_max,
            heartbeat: self.broker.config.heartbeat_s,
        }));
        Ok(Next::Continue)
    }

    fn tune_ok(&mut self, t: connection::TuneOk) -> Result<Next, Failure> {
        let server_frame_max = self.broker.config.frame_max;
        let frame_max = if t.frame_max == 0 {
            server_frame_max
        } else {
            t.frame_max
        };
        if frame_max > server_frame_max || frame_max < FRAME_MIN_SIZE {
            return Err(hard(AmqpError::not_allowed(format!(
                "frame_max {} is outside {FRAME_MIN_SIZE}..={server_frame_max}",
                t.frame_max
            ))));
        }
        let channel_max = if t.channel_max == 0 {
            self.channel_max
        } else {
            t.channel_max
        };
        if channel_max > self.channel_max {
            return Err(hard(AmqpError::not_allowed(format!(
                "channel_max {} is above the server's {}",
                t.channel_max, self.channel_max
            ))));
        }
        self.frame_max = frame_max;
        self.channel_max = channel_max;
        self.heartbeat_s = t.heartbeat;
        self.phase = Phase::AwaitOpen;
        Ok(Next::Continue)
    }

    fn open(&mut self, o: connection::Open) -> Result<Next, Failure> {
        if o.virtual_host.as_str() != "/" {
            return Err(hard(AmqpError::not_allowed(format!(
                "vhost '{}' not found: this broker has only the vhost '/'",
                o.virtual_host.as_str()
            ))));
        }
        let admin = self.admin_requested && self.principal.as_ref().is_some_and(|p| p.admin);
        let status = self.broker.ha_status();
        if !admin && !status.is_primary() {
            tracing::debug!(target: "HA", "connection {} from {}: refused, this broker is a backup ({})", self.id, self.peer, status.as_str());
            return Err(hard(AmqpError::not_allowed(format!(
                "this broker is an HA backup ({}), not the primary: connect to {}",
                status.as_str(),
                self.broker.redirect_text()
            ))));
        }
        if !admin {
            let max = self.broker.config.max_connections;
            let now = self
                .broker
                .connections_ordinary
                .fetch_add(1, Ordering::AcqRel)
                + 1;
            self.counted_ordinary = true;
            if max != 0 && now > max {
                return Err(hard(AmqpError::not_allowed(format!(
                    "connection limit ({max}, --max-connections) reached"
                ))));
            }
        }
        self.phase = Phase::Open;
        self.send0(connection::AMQPMethod::OpenOk(connection::OpenOk {}));
        tracing::debug!(target: "Network", "connection {} from {} open (user '{}'{})", self.id, self.peer, self.user().unwrap_or(""), if admin { ", admin" } else { "" });
        Ok(Next::Continue)
    }

    // ---- channels ---------------------------------------------------------------------------

    fn channel_method(&mut self, ch: u16, payload: &[u8]) -> Result<(), Failure> {
        let (class_id, method_id, args) =
            method_ids(payload).map_err(|e| hard(AmqpError::frame_error(e.to_string())))?;
        if (class_id, method_id) == (class::CHANNEL, 10) {
            return self.open_channel(ch);
        }
        if (class_id, method_id) == (class::BASIC, basic_method::PUBLISH) {
            self.has_published = true;
        }
        let Some(channel) = self.channels.get_mut(&ch) else {
            return Err(hard(AmqpError::channel_error(format!(
                "expected 'channel.open' on channel {ch}"
            ))));
        };
        if channel.closing {
            if (class_id, method_id) == (class::CHANNEL, 41) {
                self.channels.remove(&ch);
            } else if (class_id, method_id) == (class::CHANNEL, 40) {
                self.out.write(|o| {
                    write_method(
                        o,
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                });
                self.channels.remove(&ch);
            }
            return Ok(());
        }
        if channel.expects_content() {
            return Err(hard(AmqpError::unexpected_frame(format!(
                "method {class_id}.{method_id} on channel {ch} while content was expected"
            ))));
        }
        let ctx = channel_context(&self.broker, self.id, &self.principal, self.peer);
        let soft = |e: AmqpError| {
            if e.is_hard() {
                hard(e)
            } else {
                Failure::Channel(ch, e)
            }
        };
        let syntax = |e: hot::DecodeError| hard(AmqpError::syntax_error(e.to_string()));
        match (class_id, method_id) {
            (class::BASIC, basic_method::PUBLISH) => channel
                .publish(&ctx, hot::parse_publish(args).map_err(syntax)?)
                .map_err(soft),
            (class::BASIC, basic_method::ACK) => channel
                .settle(&ctx, hot::parse_ack(args).map_err(syntax)?, false)
                .map_err(soft),
            (class::BASIC, basic_method::NACK) => channel
                .settle(&ctx, hot::parse_nack(args).map_err(syntax)?, true)
                .map_err(soft),
            (class::BASIC, basic_method::REJECT) => channel
                .settle(&ctx, hot::parse_reject(args).map_err(syntax)?, true)
                .map_err(soft),
            (class::CHANNEL, 40) => {
                channel.shutdown(&self.broker);
                self.channels.remove(&ch);
                self.out.write(|o| {
                    write_method(
                        o,
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                });
                Ok(())
            }
            (class::CHANNEL, 41) => Ok(()),
            _ => {
                let method = parse_control(payload)?;
                channel.handle_method(&ctx, method).map_err(soft)
            }
        }
    }

    fn open_channel(&mut self, ch: u16) -> Result<(), Failure> {
        if ch > self.channel_max {
            return Err(hard(AmqpError::not_allowed(format!(
                "channel {ch} is above the negotiated channel_max {}",
                self.channel_max
            ))));
        }
        if self.channels.contains_key(&ch) {
            return Err(hard(AmqpError::channel_error(format!(
                "second 'channel.open' seen on channel {ch}"
            ))));
        }
        let link = Arc::new(ChannelLink::new(
            ch,
            self.id,
            self.out.clone(),
            self.frame_max,
            self.cancel_notify,
            self.broker.config.max_unacked_per_channel,
        ));
        self.channels.insert(ch, Channel::new(link));
        self.out.write(|o| {
            write_method(
                o,
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            )
        });
        Ok(())
    }

    fn content_header(&mut self, ch: u16, payload: &[u8]) -> Result<(), Failure> {
        let ctx = channel_context(&self.broker, self.id, &self.principal, self.peer);
        let Some(channel) = self.channels.get_mut(&ch) else {
            return Err(hard(AmqpError::channel_error(format!(
                "content header on channel {ch}, which is not open"
            ))));
        };
        if channel.closing {
            return Ok(());
        }
        let header = hot::parse_content_header(payload)
            .map_err(|e| hard(AmqpError::frame_error(e.to_string())))?;
        match channel.content_header(&ctx, header) {
            Ok(true) => Ok(()),
            Ok(false) => Err(hard(AmqpError::unexpected_frame(format!(
                "content header on channel {ch} without a basic.publish before it"
            )))),
            Err(e) => Err(Failure::Channel(ch, e)),
        }
    }

    fn content_body(&mut self, ch: u16, payload: &[u8]) -> Result<(), Failure> {
        let ctx = channel_context(&self.broker, self.id, &self.principal, self.peer);
        let Some(channel) = self.channels.get_mut(&ch) else {
            return Err(hard(AmqpError::channel_error(format!(
                "content body on channel {ch}, which is not open"
            ))));
        };
        if channel.closing {
            return Ok(());
        }
        match channel.content_body(&ctx, payload) {
            Ok(true) => Ok(()),
            Ok(false) => Err(hard(AmqpError::unexpected_frame(format!(
                "content body on channel {ch} without a content header, or longer than announced"
            )))),
            Err(e) => Err(Failure::Channel(ch, e)),
        }
    }

    /// Called after each batch of frames read in one go: writes the coalesced confirms.
    pub fn end_of_batch(&mut self) {
        for c in self.channels.values_mut() {
            c.flush_confirms();
        }
    }

    fn close_channel(&mut self, ch: u16, e: AmqpError, class_id: u16, method_id: u16) {
        tracing::info!(target: "Protocol", "connection {} channel {ch}: closing with {} {}", self.id, e.code, e.text);
        if let Some(c) = self.channels.get_mut(&ch) {
            c.flush_confirms();
            c.shutdown(&self.broker);
            c.closing = true;
        }
        let close = channel::Close {
            reply_code: e.code,
            reply_text: ShortString::try_new(e.wire_text())
                .unwrap_or_else(|_| ShortString::from("")),
            class_id,
            method_id,
        };
        self.out
            .write(|o| write_method(o, ch, AMQPClass::Channel(channel::AMQPMethod::Close(close))));
    }

    /// Sends connection.close and waits for close-ok (the I/O layer applies a timeout).
    pub fn close_connection(&mut self, e: AmqpError, class_id: u16, method_id: u16) -> Next {
        if self.phase == Phase::Closing {
            return Next::Continue;
        }
        if e.code == crate::protocol::reply::CONNECTION_FORCED {
            tracing::debug!(target: "Network", "connection {} from {}: closing with {} {}", self.id, self.peer, e.code, e.text);
        } else {
            tracing::warn!(target: "Protocol", "connection {} from {}: closing with {} {}", self.id, self.peer, e.code, e.text);
        }
        self.end_of_batch();
        self.shutdown_channels();
        let close = connection::Close {
            reply_code: e.code,
            reply_text: ShortString::try_new(e.wire_text())
                .unwrap_or_else(|_| ShortString::from("")),
            class_id,
            method_id,
        };
        self.send0(connection::AMQPMethod::Close(close));
        self.phase = Phase::Closing;
        Next::Continue
    }

    /// A frame the splitter refused (too large, bad end octet): 501 and close.
    pub fn frame_error(&mut self, text: String) -> Next {
        self.close_connection(AmqpError::frame_error(text), 0, 0)
    }

    /// connection.blocked / unblocked, for clients that understand them.
    pub fn send_blocked(&self, blocked: bool) {
        if !self.blocked_capable {
            return;
        }
        if blocked {
            self.send0(connection::AMQPMethod::Blocked(connection::Blocked {
                reason: ShortString::from("low on memory"),
            }));
        } else {
            self.send0(connection::AMQPMethod::Unblocked(connection::Unblocked {}));
        }
    }

    fn shutdown_channels(&mut self) {
        for c in self.channels.values_mut() {
            if !c.closing {
                c.shutdown(&self.broker);
            }
        }
        self.channels.clear();
    }

    /// The socket is gone: release everything the connection held.
    pub fn teardown(&mut self) {
        self.shutdown_channels();
        self.broker.connection_closed(self.id);
        if self.counted_ordinary {
            self.broker
                .connections_ordinary
                .fetch_sub(1, Ordering::AcqRel);
            self.counted_ordinary = false;
        }
    }
}

fn channel_context<'a>(
    broker: &'a Arc<Broker>,
    id: u64,
    principal: &'a Option<Principal>,
    peer: SocketAddr,
) -> ChannelContext<'a> {
    let checked_user = if broker.config.auth {
        principal.as_ref().map(|p| p.user.as_str())
    } else {
        None
    };
    ChannelContext {
        broker,
        connection_id: id,
        checked_user,
        admin: principal.as_ref().is_some_and(|p| p.admin),
        ha: principal.as_ref().is_some_and(|p| p.ha),
        peer,
    }
}

/// A failure while handling a frame: which scope it closes.
#[derive(Debug)]
enum Failure {
    Connection(AmqpError),
    Channel(u16, AmqpError),
}

fn hard(e: AmqpError) -> Failure {
    Failure::Connection(e)
}

/// Parses a control method, telling an unknown method (540) from a malformed one (502).
fn parse_control(payload: &[u8]) -> Result<AMQPClass, Failure> {
    parse_method(payload).map_err(|e| {
        let (class_id, method_id) = method_ids(payload).map_or((0, 0), |(c, m, _)| (c, m));
        if !is_known_method(class_id, method_id) {
            return hard(AmqpError::not_implemented(format!(
                "unknown method {class_id}.{method_id}"
            )));
        }
        match e {
            ControlDecodeError::Malformed => hard(AmqpError::syntax_error(format!(
                "malformed arguments for method {class_id}.{method_id}"
            ))),
            ControlDecodeError::Decode(d) => hard(AmqpError::syntax_error(format!(
                "method {class_id}.{method_id}: {d}"
            ))),
        }
    })
}
