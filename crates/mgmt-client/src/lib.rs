//! The management-protocol client (`docs/management-protocol.md`) shared by `qpid-config` and
//! `qpid-ha`: broker addresses, one connection with a reply queue, one type per operation, and
//! the agent's exceptions as a typed `Error`. It owns the protocol; it prints nothing.

mod address;
mod client;
mod error;
mod operations;

pub use address::{BrokerAddress, DEFAULT_PORT};
pub use client::{
    BROKER_OBJECT, Client, ConnectOptions, DEFAULT_TIMEOUT, PROTOCOL_VERSION, Request,
};
pub use error::Error;
pub use operations::*;
