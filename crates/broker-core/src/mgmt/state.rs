//! `Management`: the agent's per-broker state. The event sequence, the broker's id, the open
//! connections (for `connection` queries), the log control qpidd provides, and the shutdown
//! request that `server::run` waits on.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;
use serde_json::Value;
use tokio::sync::watch;

use super::PROTOCOL_VERSION;

/// Why a log level could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogControlError {
    /// The level string is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The logger cannot change while the broker runs.
    #[error("{0}")]
    NotImplemented(String),
}

/// The broker's logger, as the daemon provides it.
pub trait LogControl: Send + Sync + Debug {
    /// The current rules, in Qpid's syntax (`info+,debug+:Broker`).
    fn get(&self) -> String;
    /// Replaces the rules.
    fn set(&self, level: &str) -> Result<(), LogControlError>;
}

/// What a `connection` query shows of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The peer's `host:port`.
    pub address: String,
    /// The authenticated user.
    pub auth_identity: String,
    /// The client properties it sent.
    pub client_properties: FieldTable,
}

/// The agent's state, one per broker.
#[derive(Debug)]
pub struct Management {
    broker_id: uuid::Uuid,
    sequence: AtomicU64,
    connections: RwLock<HashMap<u64, ConnectionInfo>>,
    log_control: OnceLock<Arc<dyn LogControl>>,
    shutdown: watch::Sender<bool>,
}

impl Default for Management {
    fn default() -> Management {
        Management {
            broker_id: uuid::Uuid::new_v4(),
            sequence: AtomicU64::new(0),
            connections: RwLock::new(HashMap::new()),
            log_control: OnceLock::new(),
            shutdown: watch::channel(false).0,
        }
    }
}

impl Management {
    /// The agent of a broker whose system id is `broker_id`.
    pub fn with_id(broker_id: uuid::Uuid) -> Management {
        Management {
            broker_id,
            ..Management::default()
        }
    }

    /// The broker's id for this run.
    pub fn broker_id(&self) -> uuid::Uuid {
        self.broker_id
    }

    /// The agent's name (`qmf.agent`): `apache.org:qpidd:<broker-id>`.
    pub fn agent_name(&self) -> String {
        format!("apache.org:qpidd:{}", self.broker_id)
    }

    /// The sequence of the last event.
    pub fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::Acquire)
    }

    /// Takes the next sequence number.
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The fields every agent message body starts with.
    pub fn envelope(&self, sequence: u64) -> Value {
        serde_json::json!({
            "version": PROTOCOL_VERSION,
            "sequence": sequence,
            "broker_id": self.broker_id.to_string(),
        })
    }

    /// A connection logged in.
    pub fn connection_opened(&self, id: u64, info: ConnectionInfo) {
        self.connections.write().insert(id, info);
    }

    /// A connection went away.
    pub fn connection_closed(&self, id: u64) {
        self.connections.write().remove(&id);
    }

    /// How many connections are logged in.
    pub fn connection_count(&self) -> usize {
        self.connections.read().len()
    }

    /// The open connections, by id.
    pub fn connections(&self) -> Vec<(u64, ConnectionInfo)> {
        let mut all: Vec<_> = self
            .connections
            .read()
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// Installs the log control (once; later calls are ignored).
    pub fn set_log_control(&self, control: Arc<dyn LogControl>) {
        let _ = self.log_control.set(control);
    }

    /// The log control, if the daemon installed one.
    pub fn log_control(&self) -> Option<&Arc<dyn LogControl>> {
        self.log_control.get()
    }

    /// Asks the broker to stop (the `shutdown` method).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Completes once a shutdown has been requested.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}
