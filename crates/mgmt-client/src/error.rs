//! The client's one error type: the agent's `_exception` codes (docs/management-protocol.md
//! section 2) as variants, plus what can go wrong before or around a request.

/// What a management call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Code 1: the object, class or queue named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Code 2: the principal lacks the `admin` tag, or the object may not be deleted.
    #[error("{0}")]
    AccessDenied(String),
    /// Code 3: the agent refused the request as malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// Code 4: Qpid has it, this broker does not.
    #[error("{0}")]
    NotImplemented(String),
    /// Code 5: already exists, not empty, in use, a limit reached.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Code 6: the queue is exclusive to another connection.
    #[error("{0}")]
    ResourceLocked(String),
    /// Code 7, an unknown code, or an answer the client cannot read.
    #[error("{0}")]
    Internal(String),
    /// The broker did not answer within the call's timeout.
    #[error("{0}")]
    Timeout(String),
    /// The connection could not be made or was lost.
    #[error("{0}")]
    Connection(String),
    /// The broker refused the credentials.
    #[error("{0}")]
    Auth(String),
    /// A broker address that cannot be parsed.
    #[error("{0}")]
    InvalidAddress(String),
}

impl Error {
    /// The variant's name, as `qpid-config` prints it (`Failed: <kind>: <message>`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "NotFound",
            Error::AccessDenied(_) => "AccessDenied",
            Error::InvalidRequest(_) => "InvalidRequest",
            Error::NotImplemented(_) => "NotImplemented",
            Error::PreconditionFailed(_) => "PreconditionFailed",
            Error::ResourceLocked(_) => "ResourceLocked",
            Error::Internal(_) => "Internal",
            Error::Timeout(_) => "Timeout",
            Error::Connection(_) => "Connection",
            Error::Auth(_) => "Auth",
            Error::InvalidAddress(_) => "InvalidAddress",
        }
    }

    /// The error an `_exception` with `code` and `text` stands for.
    pub fn from_exception(code: u64, text: String) -> Error {
        match code {
            1 => Error::NotFound(text),
            2 => Error::AccessDenied(text),
            3 => Error::InvalidRequest(text),
            4 => Error::NotImplemented(text),
            5 => Error::PreconditionFailed(text),
            6 => Error::ResourceLocked(text),
            _ => Error::Internal(text),
        }
    }

    /// A lapin error met while connecting or talking; `what` says when.
    pub fn from_lapin(error: &lapin::Error, what: &str) -> Error {
        match error.kind() {
            lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403 => {
                Error::Auth(format!("{what}: {}", e.get_message()))
            }
            lapin::ErrorKind::ProtocolError(e) => {
                Error::Connection(format!("{what}: {} {}", e.get_id(), e.get_message()))
            }
            lapin::ErrorKind::IOError(e) => Error::Connection(format!("{what}: {e}")),
            _ => Error::Connection(format!("{what}: {error}")),
        }
    }
}
