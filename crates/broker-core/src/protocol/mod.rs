//! The AMQP 0-9-1 wire codec: no I/O, no panics on peer input.
//!
//! * `frame`: splits frames off a read buffer, checking `frame_max` on the 7-byte header before
//!   anything is buffered, and the frame-end octet.
//! * `hot`: the hand-written, allocation-free codec for the publish/deliver path (basic.publish,
//!   content header, body, ack/nack/reject in; basic.deliver, get-ok, return, content header,
//!   body, confirms out). It is checked byte for byte against amq-protocol in the tests.
//! * `control`: everything else goes through amq-protocol's generated method types.
//!
//! What this module is not: it keeps no connection state and never touches a socket.

pub mod control;
pub mod frame;
pub mod hot;
#[cfg(test)]
mod oracle_tests;

/// Frame type octets (AMQP 0-9-1 section 4.2.3).
pub const FRAME_METHOD: u8 = 1;
/// Content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes of framing around a payload: 7 bytes of header and the frame-end octet.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest `frame_max` a peer may negotiate (spec section 4.2.1).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// The protocol header a 0-9-1 client sends first, and that we answer a bad header with.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// Class ids.
pub mod class {
    /// connection
    pub const CONNECTION: u16 = 10;
    /// channel
    pub const CHANNEL: u16 = 20;
    /// exchange
    pub const EXCHANGE: u16 = 40;
    /// queue
    pub const QUEUE: u16 = 50;
    /// basic
    pub const BASIC: u16 = 60;
    /// confirm
    pub const CONFIRM: u16 = 85;
    /// tx
    pub const TX: u16 = 90;
}

/// Method ids of the basic class that the hot path handles by hand.
pub mod basic_method {
    /// basic.publish
    pub const PUBLISH: u16 = 40;
    /// basic.return
    pub const RETURN: u16 = 50;
    /// basic.deliver
    pub const DELIVER: u16 = 60;
    /// basic.get-ok
    pub const GET_OK: u16 = 71;
    /// basic.ack
    pub const ACK: u16 = 80;
    /// basic.reject
    pub const REJECT: u16 = 90;
    /// basic.nack
    pub const NACK: u16 = 120;
}

/// Reply codes (AMQP 0-9-1 section 1.9 constants).
pub mod reply {
    /// Success.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Soft: a mandatory message could not be routed.
    pub const NO_ROUTE: u16 = 312;
    /// Hard: an operator closed the connection (broker shutdown).
    pub const CONNECTION_FORCED: u16 = 320;
    /// Hard: the virtual host path is invalid.
    pub const INVALID_PATH: u16 = 402;
    /// Soft: access refused.
    pub const ACCESS_REFUSED: u16 = 403;
    /// Soft: the entity does not exist.
    pub const NOT_FOUND: u16 = 404;
    /// Soft: the entity is locked by another connection (exclusive).
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Soft: a precondition failed (redeclare with other properties, if-unused, if-empty).
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Hard: malformed frame.
    pub const FRAME_ERROR: u16 = 501;
    /// Hard: a field had a bad value.
    pub const SYNTAX_ERROR: u16 = 502;
    /// Hard: a method that is not allowed now.
    pub const COMMAND_INVALID: u16 = 503;
    /// Hard: a method on a channel that is not open, or a bad channel state.
    pub const CHANNEL_ERROR: u16 = 504;
    /// Hard: a frame arrived that the state does not allow (a body with no header).
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Hard: the server ran out of a resource (channels, connections).
    pub const RESOURCE_ERROR: u16 = 506;
    /// Hard: the operation is not allowed (vhost, credentials at open).
    pub const NOT_ALLOWED: u16 = 530;
    /// Hard: the method is not implemented.
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// Hard: an internal error.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// True if `(class_id, method_id)` names a method of AMQP 0-9-1 (with RabbitMQ's extensions).
/// A payload that fails to parse is a syntax error (502) for a known method and "not
/// implemented" (540) for an unknown one.
pub fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method_id)
}
