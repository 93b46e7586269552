//! The management protocol's error: an `_exception`'s code and text, and how broker errors map
//! onto it.

use crate::error::AmqpError;
use crate::protocol::reply;

/// The `error_code` of an `_exception` (documented in `docs/management-protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The object, class or queue named does not exist.
    NotFound = 1,
    /// The principal may not do this.
    AccessDenied = 2,
    /// The request is malformed.
    InvalidRequest = 3,
    /// Known in Qpid, not implemented here.
    NotImplemented = 4,
    /// The operation's precondition does not hold.
    PreconditionFailed = 5,
    /// The queue is exclusive to another connection.
    ResourceLocked = 6,
    /// Anything else.
    Internal = 7,
}

/// A failed management request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text} (code {})", *code as u8)]
pub struct MgmtError {
    /// The code.
    pub code: ErrorCode,
    /// What went wrong.
    pub text: String,
}

impl MgmtError {
    /// An error with this code and text.
    pub fn new(code: ErrorCode, text: impl Into<String>) -> MgmtError {
        MgmtError {
            code,
            text: text.into(),
        }
    }

    /// Code 3.
    pub fn invalid(text: impl Into<String>) -> MgmtError {
        MgmtError::new(ErrorCode::InvalidRequest, text)
    }

    /// Code 1.
    pub fn not_found(text: impl Into<String>) -> MgmtError {
        MgmtError::new(ErrorCode::NotFound, text)
    }
}

impl From<AmqpError> for MgmtError {
    fn from(e: AmqpError) -> MgmtError {
        let code = match e.code {
            reply::NOT_FOUND => ErrorCode::NotFound,
            reply::ACCESS_REFUSED => ErrorCode::AccessDenied,
            reply::RESOURCE_LOCKED => ErrorCode::ResourceLocked,
            reply::PRECONDITION_FAILED => ErrorCode::PreconditionFailed,
            reply::NOT_IMPLEMENTED => ErrorCode::NotImplemented,
            reply::COMMAND_INVALID | reply::SYNTAX_ERROR | reply::NOT_ALLOWED => {
                ErrorCode::InvalidRequest
            }
            _ => ErrorCode::Internal,
        };
        MgmtError::new(code, e.text)
    }
}
