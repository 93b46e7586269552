//! The broker's settings and named limits, as typed values with documented defaults.
//!
//! `qpidd` fills this from its command line, `QPID_*` environment variables and config file;
//! tests fill it directly. Every limit a peer can grow has a field here.

use std::time::Duration;

/// Everything the broker needs to know about how to run.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Require SASL credentials (`--auth yes`). With `false` every connection is trusted and
    /// has both the `admin` and `ha` tags, as in Qpid.
    pub auth: bool,
    /// `--max-connections`: ordinary client connections accepted at once (0 = no limit).
    pub max_connections: usize,
    /// Connections accepted beyond `max_connections` for administration (`qpid.ha-admin`
    /// with the `admin` tag) and HA links, so a full broker can still be managed.
    pub reserved_admin_connections: usize,
    /// `--channel-max`: the highest channel number a connection may open.
    pub channel_max: u16,
    /// `--frame-max`: the largest frame, framing included, in bytes.
    pub frame_max: u32,
    /// `--max-message-size`: the largest message body, in bytes.
    pub max_message_size: u64,
    /// `--max-unacked-per-channel`: deliveries awaiting acknowledgement on one channel. When a
    /// channel reaches it, deliveries to that channel pause until it acks (like a prefetch).
    pub max_unacked_per_channel: u32,
    /// `--heartbeat`: the heartbeat interval the broker proposes in connection.tune, seconds
    /// (0 = none).
    pub heartbeat_s: u16,
    /// `--memory-high-watermark`, resolved to bytes of message memory. Above it, publishing
    /// connections get `connection.blocked` and are not read until memory falls below it.
    pub memory_high_watermark_bytes: u64,
    /// `--default-queue-limit`: a byte limit (policy reject) for queues declared without one
    /// (0 = none, as RabbitMQ; Qpid's default is 100 MB).
    pub default_queue_limit_bytes: u64,
    /// `--max-queues`: queues that may exist at once (0 = no limit).
    pub max_queues: usize,
    /// `--max-exchanges`: exchanges that may exist at once, predeclared ones included
    /// (0 = no limit).
    pub max_exchanges: usize,
    /// `--max-consumers-per-channel`: consumers one channel may hold (0 = no limit).
    pub max_consumers_per_channel: usize,
    /// How long a peer has to finish the handshake (Qpid's `--max-negotiate-time`).
    pub max_negotiate_time: Duration,
    /// How often expired messages and unused `x-expires` queues are swept.
    pub queue_purge_interval: Duration,
    /// The product version announced in connection.start.
    pub version: String,
    /// The HA settings (`--ha-*`).
    pub ha: HaConfig,
    /// The system id kept in the data directory (`None`: a new one for this run).
    pub system_id: Option<uuid::Uuid>,
}

/// `--ha-replicate`: the replication level for queues and exchanges declared without
/// `qpid.replicate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicateLevel {
    /// `none` (the default).
    #[default]
    None,
    /// `configuration`.
    Configuration,
    /// `all`.
    All,
}

impl ReplicateLevel {
    /// Qpid's name for the level.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicateLevel::None => "none",
            ReplicateLevel::Configuration => "configuration",
            ReplicateLevel::All => "all",
        }
    }
}

/// The HA settings, as Qpid's HA module takes them (reference section 1.3). The HA object of
/// the management agent exists only when `cluster` or `queue_replication` is set.
#[derive(Clone, PartialEq)]
pub struct HaConfig {
    /// `--ha-cluster`: join an active/passive cluster.
    pub cluster: bool,
    /// `--ha-queue-replication`: allow replication of single queues outside a cluster.
    pub queue_replication: bool,
    /// `--ha-brokers-url`: every broker of the cluster ("" = unset).
    pub brokers_url: String,
    /// `--ha-public-url`: the URL advertised to clients ("" = unset).
    pub public_url: String,
    /// `--ha-replicate`.
    pub replicate: ReplicateLevel,
    /// `--ha-username`: for connections between HA brokers.
    pub username: String,
    /// `--ha-password`: never shown by `Debug`.
    pub password: String,
    /// `--ha-mechanism`.
    pub mechanism: String,
    /// `--ha-backup-timeout`.
    pub backup_timeout: Duration,
    /// `--ha-flow-messages` (0 = no limit).
    pub flow_messages: u32,
    /// `--ha-flow-bytes` (0 = no limit).
    pub flow_bytes: u64,
    /// `--ha-max-config-backlog`: the bytes of configuration events a backup may leave unread
    /// (beyond the socket's buffers) before the primary drops its link; the backup reconnects
    /// and reconciles.
    pub max_config_backlog: u64,
    /// `--ha-min-backups`: while fewer backups are ready, confirms of publishes to queues at
    /// level `all` wait, and are nacks after `backup_timeout`.
    pub min_backups: u32,
    /// `--link-maintenance-interval`: how soon a replica retries its link (doubling after
    /// failures, capped at [`LINK_RETRY_MAX`], reset on success).
    pub link_maintenance_interval: Duration,
    /// `--link-heartbeat-interval`: the heartbeat of links to other brokers.
    pub link_heartbeat_interval: Duration,
    /// `--ha-ack-timeout`: how long a ready replica may leave its oldest event unacknowledged
    /// before it stops holding confirms (`None` = the link heartbeat interval).
    pub ack_timeout: Option<Duration>,
}

/// The cap of the link retry backoff.
pub const LINK_RETRY_MAX: Duration = Duration::from_secs(4);

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            cluster: false,
            queue_replication: false,
            brokers_url: String::new(),
            public_url: String::new(),
            replicate: ReplicateLevel::None,
            username: String::new(),
            password: String::new(),
            mechanism: String::new(),
            backup_timeout: Duration::from_secs(10),
            flow_messages: 1000,
            flow_bytes: 0,
            max_config_backlog: 16 << 20,
            min_backups: 0,
            link_maintenance_interval: Duration::from_millis(500),
            link_heartbeat_interval: Duration::from_secs(5),
            ack_timeout: None,
        }
    }
}

impl HaConfig {
    /// True if the HA module is active: `--ha-cluster` or `--ha-queue-replication`.
    pub fn enabled(&self) -> bool {
        self.cluster || self.queue_replication
    }

    /// The effective `--ha-ack-timeout`.
    pub fn effective_ack_timeout(&self) -> Duration {
        self.ack_timeout.unwrap_or(self.link_heartbeat_interval)
    }
}

impl std::fmt::Debug for HaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaConfig")
            .field("cluster", &self.cluster)
            .field("queue_replication", &self.queue_replication)
            .field("brokers_url", &self.brokers_url)
            .field("public_url", &self.public_url)
            .field("replicate", &self.replicate)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .field("mechanism", &self.mechanism)
            .field("backup_timeout", &self.backup_timeout)
            .field("flow_messages", &self.flow_messages)
            .field("flow_bytes", &self.flow_bytes)
            .finish()
    }
}

/// Defaults as documented in `docs/user-guide.md`.
pub mod defaults {
    /// `--max-connections`.
    pub const MAX_CONNECTIONS: usize = 500;
    /// Connections reserved beyond `--max-connections` for administration and HA links.
    pub const RESERVED_ADMIN_CONNECTIONS: usize = 10;
    /// `--channel-max`.
    pub const CHANNEL_MAX: u16 = 2047;
    /// `--frame-max`.
    pub const FRAME_MAX: u32 = 131_072;
    /// `--max-message-size` (128 MiB).
    pub const MAX_MESSAGE_SIZE: u64 = 128 * 1024 * 1024;
    /// `--max-unacked-per-channel`.
    pub const MAX_UNACKED_PER_CHANNEL: u32 = 65_536;
    /// `--heartbeat`, seconds.
    pub const HEARTBEAT_S: u16 = 60;
    /// `--memory-high-watermark` as a fraction of physical memory.
    pub const MEMORY_HIGH_WATERMARK_FRACTION: f64 = 0.4;
    /// `--max-queues`.
    pub const MAX_QUEUES: usize = 100_000;
    /// `--max-exchanges`.
    pub const MAX_EXCHANGES: usize = 10_000;
    /// `--max-consumers-per-channel`.
    pub const MAX_CONSUMERS_PER_CHANNEL: usize = 1_000;
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            auth: true,
            max_connections: defaults::MAX_CONNECTIONS,
            reserved_admin_connections: defaults::RESERVED_ADMIN_CONNECTIONS,
            channel_max: defaults::CHANNEL_MAX,
            frame_max: defaults::FRAME_MAX,
            max_message_size: defaults::MAX_MESSAGE_SIZE,
            max_unacked_per_channel: defaults::MAX_UNACKED_PER_CHANNEL,
            heartbeat_s: defaults::HEARTBEAT_S,
            memory_high_watermark_bytes: u64::MAX,
            default_queue_limit_bytes: 0,
            max_queues: defaults::MAX_QUEUES,
            max_exchanges: defaults::MAX_EXCHANGES,
            max_consumers_per_channel: defaults::MAX_CONSUMERS_PER_CHANNEL,
            max_negotiate_time: Duration::from_secs(10),
            queue_purge_interval: Duration::from_millis(500),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ha: HaConfig::default(),
            system_id: None,
        }
    }
}
