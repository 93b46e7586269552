//! The control methods (everything but the message path), through amq-protocol's generated
//! types. Speed does not matter here; correctness and coverage of the spec do.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, parse_class};

use super::hot::DecodeError;

/// Parses a whole method payload (class id, method id, arguments) into amq-protocol's type.
/// Trailing bytes are refused: `parse_class` itself does not check them.
pub fn parse_method(payload: &[u8]) -> Result<AMQPClass, ControlDecodeError> {
    match parse_class(payload) {
        Ok((rest, _)) if !rest.is_empty() => {
            Err(ControlDecodeError::Decode(DecodeError::TrailingBytes {
                extra: rest.len(),
            }))
        }
        Ok((_, class)) => Ok(class),
        Err(_) => Err(ControlDecodeError::Malformed),
    }
}

/// Why a control method could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlDecodeError {
    /// amq-protocol could not parse the arguments (unknown method, short or bad field).
    #[error("malformed or unknown method arguments")]
    Malformed,
    /// Our own checks failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Appends a method frame for `method` on `channel`.
///
/// amq-protocol's generator writes into a `Vec<u8>` taken by value, so the buffer is moved in
/// and back out; nothing is copied.
pub fn write_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    let buf = std::mem::take(out);
    match gen_frame(&frame)(WriteContext::from(buf)) {
        Ok(ctx) => *out = ctx.into_inner().0,
        // Generation into a Vec only fails on values we built wrongly (a short string over
        // 255 bytes is already refused by the ShortString constructor): a programmer error.
        Err(e) => panic!("failed to encode {frame:?}: {e:?}"),
    }
}
