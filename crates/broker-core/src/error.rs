//! Errors that follow the protocol: an `AmqpError` carries a reply code and a text. Codes below
//! 500 (and not 320/402) are soft: they close the channel. The rest are hard: they close the
//! connection. The layer that knows the failing method adds its class and method ids.

use crate::protocol::reply;

/// A protocol-level failure to report to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct AmqpError {
    /// The reply code (`protocol::reply`).
    pub code: u16,
    /// What was wrong, for the peer and the log. At most 255 bytes go on the wire.
    pub text: String,
}

impl AmqpError {
    /// An error with this code and text.
    pub fn new(code: u16, text: impl Into<String>) -> AmqpError {
        AmqpError {
            code,
            text: text.into(),
        }
    }

    /// True if it closes the connection rather than the channel.
    pub fn is_hard(&self) -> bool {
        !matches!(
            self.code,
            reply::ACCESS_REFUSED
                | reply::NOT_FOUND
                | reply::RESOURCE_LOCKED
                | reply::PRECONDITION_FAILED
                | reply::NO_ROUTE
                | 311
                | 313
        )
    }

    /// 404.
    pub fn not_found(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::NOT_FOUND, text)
    }
    /// 403.
    pub fn access_refused(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::ACCESS_REFUSED, text)
    }
    /// 405.
    pub fn resource_locked(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::RESOURCE_LOCKED, text)
    }
    /// 406.
    pub fn precondition_failed(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::PRECONDITION_FAILED, text)
    }
    /// 503.
    pub fn command_invalid(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::COMMAND_INVALID, text)
    }
    /// 530.
    pub fn not_allowed(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::NOT_ALLOWED, text)
    }
    /// 540.
    pub fn not_implemented(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::NOT_IMPLEMENTED, text)
    }
    /// 502.
    pub fn syntax_error(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::SYNTAX_ERROR, text)
    }
    /// 504.
    pub fn channel_error(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::CHANNEL_ERROR, text)
    }
    /// 505.
    pub fn unexpected_frame(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::UNEXPECTED_FRAME, text)
    }
    /// 501.
    pub fn frame_error(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::FRAME_ERROR, text)
    }
    /// 506.
    pub fn resource_error(text: impl Into<String>) -> AmqpError {
        AmqpError::new(reply::RESOURCE_ERROR, text)
    }

    /// The reply text as it goes on the wire: `CODE_NAME - text`, cut to 255 bytes on a
    /// character boundary (the short-string limit).
    pub fn wire_text(&self) -> String {
        let mut s = format!("{} - {}", code_name(self.code), self.text);
        if s.len() > 255 {
            let mut end = 255;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    }
}

/// RabbitMQ-style names of reply codes, used as the prefix of reply texts.
pub fn code_name(code: u16) -> &'static str {
    match code {
        200 => "OK",
        311 => "CONTENT_TOO_LARGE",
        312 => "NO_ROUTE",
        313 => "NO_CONSUMERS",
        320 => "CONNECTION_FORCED",
        402 => "INVALID_PATH",
        403 => "ACCESS_REFUSED",
        404 => "NOT_FOUND",
        405 => "RESOURCE_LOCKED",
        406 => "PRECONDITION_FAILED",
        501 => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        503 => "COMMAND_INVALID",
        504 => "CHANNEL_ERROR",
        505 => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        530 => "NOT_ALLOWED",
        540 => "NOT_IMPLEMENTED",
        541 => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_and_hard_follow_the_spec() {
        for code in [403, 404, 405, 406] {
            assert!(!AmqpError::new(code, "").is_hard(), "{code}");
        }
        for code in [320, 402, 501, 502, 503, 504, 505, 506, 530, 540, 541] {
            assert!(AmqpError::new(code, "").is_hard(), "{code}");
        }
    }

    #[test]
    fn wire_text_is_cut_on_a_char_boundary() {
        let e = AmqpError::not_found("é".repeat(200));
        let t = e.wire_text();
        assert!(t.len() <= 255);
        assert!(t.starts_with("NOT_FOUND - é"));
    }
}
