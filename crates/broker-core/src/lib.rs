//! The broker as a library: AMQP 0-9-1 connections, exchanges, queues.
//!
//! # Layout
//! * `protocol`: the wire codec (frame splitting, the hand-written message path, amq-protocol for
//!   control methods). No I/O.
//! * `config`: settings and named limits.
//! * `auth`: users, password hashing, SASL responses.
//! * `server`: the tokio layer: listeners, one reader and one writer task per connection.
//!
//! This crate does no file I/O outside `store/` and no socket I/O outside `server`.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod confirms;
pub mod connection;
pub mod delivery;
pub mod error;
pub mod exchange;
pub mod fields;
pub mod message;
pub mod mgmt;
pub mod protocol;
pub mod queue;
pub mod queue_settings;
pub mod replication;
pub mod server;
pub mod store;

pub use config::{BrokerConfig, HaConfig, ReplicateLevel};
