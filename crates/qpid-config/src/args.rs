//! The command line, as clap-derive structs: Qpid's `qpid-config` usage (options may follow the
//! command, as in the original), minus the options of features this broker lacks (store
//! tuning, message groups, flow thresholds, XML exchanges, ACLs).

use clap::{Args, Parser, Subcommand};

pub const USAGE: &str = "\
qpid-config [OPTIONS]
       qpid-config [OPTIONS] exchanges [filter-string]
       qpid-config [OPTIONS] queues    [filter-string]
       qpid-config [OPTIONS] add exchange <type> <name> [AddExchangeOptions]
       qpid-config [OPTIONS] del exchange <name>
       qpid-config [OPTIONS] add queue <name> [AddQueueOptions]
       qpid-config [OPTIONS] del queue <name> [DelQueueOptions]
       qpid-config [OPTIONS] bind   <exchange-name> <queue-name> [binding-key]
                 <for type header>  [all|any] k1=v1 [, k2=v2...]
       qpid-config [OPTIONS] unbind <exchange-name> <queue-name> [binding-key]
       qpid-config [OPTIONS] list <type> [--show-property <property-name>]
       qpid-config [OPTIONS] log [<logstring>]
       qpid-config [OPTIONS] shutdown";

pub const AFTER_HELP: &str = "\
Examples:
  qpid-config add queue q
  qpid-config add exchange direct d -a localhost:5672
  qpid-config exchanges -b 10.1.1.7:10000
  qpid-config queues -b guest/guest@broker-host:10000

Broker addresses are [user[/password]@]host[:port] or amqp://user:pass@host:port/vhost.

Exchange types: direct, fanout, topic, headers.
Queue limit actions (--limit-policy): none (default, the broker's policy), reject, ring
  (replace the oldest unacquired message with the new one).
Replication levels (--replicate): none, configuration, all.
Log strings: comma separated <level>[+-][:<module>] rules, e.g. 'info+,debug+:Broker'.
Exit status: 0 on success, 1 on failure (with 'Failed: <kind>: <message>' on stderr) and
when a listing matches nothing.";

/// The whole command line.
#[derive(Parser, Debug)]
#[command(name = "qpid-config", override_usage = USAGE, after_help = AFTER_HELP, version)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options valid with every command.
#[derive(Args, Debug)]
pub struct GlobalOptions {
    /// Maximum time to wait for the broker, connection and each request (0: no limit).
    #[arg(
        short = 't',
        long,
        value_name = "SECS",
        default_value_t = 10,
        global = true
    )]
    pub timeout: u64,
    /// Show bindings in queue or exchange list.
    #[arg(short = 'r', long, global = true)]
    pub recursive: bool,
    /// Connect to the broker at this address.
    #[arg(
        short = 'b',
        long = "broker",
        visible_short_alias = 'a',
        visible_alias = "broker-addr",
        value_name = "ADDRESS",
        default_value = "localhost",
        global = true
    )]
    pub broker: String,
    /// SASL mechanism for authentication (PLAIN, AMQPLAIN, ANONYMOUS, EXTERNAL).
    #[arg(long, value_name = "MECH", global = true)]
    pub sasl_mechanism: Option<String>,
    /// Allow connection to a HA backup broker.
    #[arg(long, global = true)]
    pub ha_admin: bool,
    /// Ignore the default exchange in exchange or queue list.
    #[arg(long, global = true)]
    pub ignore_default: bool,
    /// Print listings as JSON (schema in docs/user-guide.md).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List exchanges whose name contains the filter.
    Exchanges { filter: Option<String> },
    /// List queues whose name contains the filter.
    Queues { filter: Option<String> },
    /// Add a queue or an exchange.
    #[command(subcommand)]
    Add(AddCommand),
    /// Delete a queue or an exchange.
    #[command(subcommand)]
    Del(DelCommand),
    /// Bind a queue to an exchange; for a headers exchange: [all|any] k1=v1 [, k2=v2...].
    Bind {
        exchange: String,
        queue: String,
        key: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        match_arguments: Vec<String>,
    },
    /// Remove a binding.
    Unbind {
        exchange: String,
        queue: String,
        key: Option<String>,
    },
    /// List the objects of a type (queue, exchange, binding, connection, subscription, broker).
    List {
        object_type: String,
        /// Show this property (repeatable; default: a few useful ones).
        #[arg(long = "show-property", value_name = "NAME")]
        show_property: Vec<String>,
    },
    /// Show the log level, or set it to LOGSTRING.
    Log { level: Option<String> },
    /// Shut the broker down.
    Shutdown,
}

#[derive(Subcommand, Debug)]
pub enum AddCommand {
    /// add queue <name> [AddQueueOptions]
    Queue {
        name: String,
        #[command(flatten)]
        options: AddQueueOptions,
    },
    /// add exchange <type> <name> [AddExchangeOptions]
    Exchange {
        exchange_type: String,
        name: String,
        #[command(flatten)]
        common: AddCommonOptions,
    },
}

/// Options of `add queue` and `add exchange`.
#[derive(Args, Debug)]
pub struct AddCommonOptions {
    /// The new object is durable.
    #[arg(long)]
    pub durable: bool,
    /// Exchange to which messages are routed when they cannot be delivered.
    #[arg(long, value_name = "AEXNAME")]
    pub alternate_exchange: Option<String>,
    /// Enable automatic replication in a HA cluster: none, configuration or all.
    #[arg(long, value_name = "LEVEL")]
    pub replicate: Option<String>,
    /// Specify a key=value argument (repeatable; an integer value is sent as an integer).
    #[arg(long = "argument", value_name = "NAME=VALUE")]
    pub arguments: Vec<String>,
}

/// Options of `add queue`.
#[derive(Args, Debug)]
pub struct AddQueueOptions {
    #[command(flatten)]
    pub common: AddCommonOptions,
    /// Maximum in-memory queue size as bytes.
    #[arg(long, value_name = "N")]
    pub max_queue_size: Option<u64>,
    /// Maximum in-memory queue size as a number of messages.
    #[arg(long, value_name = "N")]
    pub max_queue_count: Option<u64>,
    /// Action taken when the queue limit is reached.
    #[arg(long, value_name = "POLICY", value_parser = ["none", "reject", "ring"])]
    pub limit_policy: Option<String>,
    /// Last Value Queue key.
    #[arg(long, value_name = "KEY")]
    pub lvq_key: Option<String>,
    /// Start replication from the same-named queue at BROKER.
    #[arg(long, value_name = "BROKER")]
    pub start_replica: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DelCommand {
    /// del queue <name> [DelQueueOptions]
    Queue {
        name: String,
        /// Force delete of queue even if it's currently used or it's not empty.
        #[arg(long)]
        force: bool,
        /// Force delete of queue even if it's not empty.
        #[arg(long)]
        force_if_not_empty: bool,
        /// Force delete of queue even if it's currently used.
        #[arg(long)]
        force_if_used: bool,
    },
    /// del exchange <name>
    Exchange { name: String },
}
