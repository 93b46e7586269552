//! `qpid-ha`: Qpid's HA tool, thin over `mgmt-client` (usage and behaviour in
//! docs/user-guide.md, "qpid-ha"). Parsing is in `args`, reading `qpidd.conf` in `conf`; this
//! file connects, runs the operation and prints.

mod args;
mod conf;
mod rows;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use mgmt_client::{
    BrokerAddress, Client, ConnectOptions, Detach, Error, HaBrokerInfo, Promote, QueryHaBroker,
    Replicate,
};
use serde_json::{Value, json};

use args::{Action, Parsed};

/// The schema version of `query --json`.
const JSON_VERSION: u64 = 1;
/// What `status` prints, and `query` shows, for a broker without HA.
const NO_HA_STATUS: &str = "standalone";
/// `query`'s line for a broker without HA.
const HA_DISABLED: &str = "disabled (start qpidd with ha-queue-replication=yes or ha-cluster=yes)";
/// `replicate` and `detach` on a broker without HA.
const REPLICATION_DISABLED: &str =
    "queue replication is disabled on this broker: start it with ha-queue-replication=yes";
/// The share of the tool's timeout the broker gets to answer `replicate`, so that it answers
/// (with a warning if the original is still silent) before the tool gives up.
const REPLICATE_TIMEOUT_SHARE: f64 = 0.8;

/// How a command ended.
enum Failure {
    /// Print `<kind>: <message>` on stderr, exit 1.
    Error(String, String),
    /// Exit with this status, printing nothing (`--expect`, `--is-primary`).
    Status(u8),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Error(e.kind().to_string(), e.to_string())
    }
}

fn exception(message: impl Into<String>) -> Failure {
    Failure::Error("Exception".into(), message.into())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args::parse(&argv) {
        Action::Run(parsed) => parsed,
        Action::Help(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Action::Fail { stdout, message } => {
            print!("{stdout}");
            let _ = std::io::stdout().flush();
            eprintln!("Exception: {message}");
            return ExitCode::FAILURE;
        }
        Action::OptionError(text) => {
            eprint!("{text}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Exception: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&parsed)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Status(code)) => ExitCode::from(code),
        Err(Failure::Error(kind, message)) => {
            let _ = std::io::stdout().flush();
            eprintln!("{kind}: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The connection settings of one broker: `-b` (or `address`), then `--config` defaults.
fn connect_options(parsed: &Parsed, address: Option<&str>) -> Result<ConnectOptions, Failure> {
    let common = &parsed.common;
    let text = address
        .or(common.broker.as_deref())
        .unwrap_or("localhost")
        .to_string();
    let mut broker = BrokerAddress::parse(&text)?;
    let mut mechanism = common.sasl_mechanism.clone();
    let mut timeout = common.timeout;
    if let Some(path) = &common.config {
        let defaults = conf::read(path).map_err(exception)?;
        conf::apply(&defaults, &text, &mut broker, &mut mechanism).map_err(exception)?;
        if timeout.is_none() {
            timeout = conf::timeout(&defaults).map_err(exception)?;
        }
    }
    let mut options = ConnectOptions::new(broker);
    let timeout = timeout.unwrap_or(10.0);
    options.timeout = (timeout > 0.0).then(|| Duration::from_secs_f64(timeout));
    options.ha_admin = true;
    options.sasl_mechanism = mechanism;
    options.client_name = "qpid-ha".into();
    Ok(options)
}

async fn run(parsed: &Parsed) -> Result<(), Failure> {
    let options = connect_options(parsed, None)?;
    match parsed.command.as_str() {
        "ping" => Ok(Client::ping(&options).await?),
        "promote" if !parsed.cluster_manager => Err(exception(args::PROMOTE_WARNING)),
        _ => {
            let mut client = Client::connect(&options).await?;
            let replicate_timeout = options
                .timeout
                .map(|t| t.as_secs_f64() * REPLICATE_TIMEOUT_SHARE);
            let result = command(parsed, &mut client, replicate_timeout).await;
            client.close().await;
            result
        }
    }
}

/// Runs a command that needs a management connection. `replicate_timeout` is the `timeout`
/// given to the broker's `replicate` (its default when `None`: the tool waits forever).
async fn command(
    parsed: &Parsed,
    client: &mut Client,
    replicate_timeout: Option<f64>,
) -> Result<(), Failure> {
    let ha = client.run(&QueryHaBroker).await?;
    match parsed.command.as_str() {
        "status" => status(parsed, ha.as_ref()).await,
        "query" => query(parsed, ha.as_ref()).await,
        "promote" => match ha {
            None => Err(Failure::Error(
                "PreconditionFailed".into(),
                "not a cluster member: promote needs a broker started with ha-cluster=yes; nothing was changed".into(),
            )),
            Some(_) => Ok(client
                .run(&Promote {
                    force: parsed.force,
                })
                .await?),
        },
        "replicate" | "detach" if ha.is_none() => Err(Failure::Error(
            "PreconditionFailed".into(),
            REPLICATION_DISABLED.into(),
        )),
        "replicate" => {
            let warning = client
                .run(&Replicate {
                    broker: parsed.args[0].clone(),
                    queue: parsed.args[1].clone(),
                    timeout: replicate_timeout,
                })
                .await?;
            if let Some(warning) = warning {
                // The original did not answer in time; the broker keeps trying.
                eprintln!("Warning: {warning}");
            }
            Ok(())
        }
        "detach" => Ok(client
            .run(&Detach {
                queue: parsed.args[0].clone(),
            })
            .await?),
        other => Err(exception(format!("No valid command: {other}"))),
    }
}

fn status_of(ha: Option<&HaBrokerInfo>) -> &str {
    ha.map_or(NO_HA_STATUS, |h| h.status.as_str())
}

/// The addresses of `brokersUrl` for `--all`, as Qpid splits them, with the credentials of
/// `-b` prefixed; empty when there is no URL.
fn all_addresses(parsed: &Parsed, ha: Option<&HaBrokerInfo>) -> Vec<String> {
    let Some(url) = ha.map(|h| h.brokers_url.trim()).filter(|u| !u.is_empty()) else {
        return Vec::new();
    };
    let url = url
        .strip_prefix("amqp:")
        .or_else(|| url.strip_prefix("amqps:"))
        .unwrap_or(url)
        .replace("tcp:", "");
    let credentials = parsed
        .common
        .broker
        .as_deref()
        .and_then(|b| b.rsplit_once('@'))
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    url.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| format!("{credentials}{a}"))
        .collect()
}

/// Connects to `address` and reads its HA object.
async fn remote_ha(parsed: &Parsed, address: &str) -> Result<Option<HaBrokerInfo>, Failure> {
    let options = connect_options(parsed, Some(address))?;
    let mut client = Client::connect(&options).await?;
    let result = client.run(&QueryHaBroker).await;
    client.close().await;
    Ok(result?)
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Error(kind, message) => format!("{kind}: {message}"),
        Failure::Status(code) => format!("exit status {code}"),
    }
}

async fn status(parsed: &Parsed, ha: Option<&HaBrokerInfo>) -> Result<(), Failure> {
    let status = status_of(ha);
    if parsed.is_primary {
        return if matches!(status, "active" | "recovering") {
            Ok(())
        } else {
            Err(Failure::Status(1))
        };
    }
    if let Some(expect) = &parsed.expect {
        return if expect == status {
            Ok(())
        } else {
            Err(Failure::Status(1))
        };
    }
    let addresses = all_addresses(parsed, ha);
    if !parsed.all || addresses.is_empty() {
        println!("{status}");
        return Ok(());
    }
    for address in addresses {
        match remote_ha(parsed, &address).await {
            Ok(remote) => println!("{address} {}", status_of(remote.as_ref())),
            Err(f) => println!("{address} {}", failure_text(&f)),
        }
    }
    Ok(())
}

fn query_lines(ha: Option<&HaBrokerInfo>) -> String {
    let line = |label: &str, value: &str| format!("{label:<20} {value}\n");
    match ha {
        Some(h) => [
            line("Status:", &h.status),
            line("Broker ID:", &h.system_id),
            line("Brokers URL:", &h.brokers_url),
            line("Public URL:", &h.public_url),
            line("Replicate: ", &h.replicate_default),
            rows::member_table(&h.members),
            rows::replica_table(&h.replicas),
            rows::subscription_table(&h.subscriptions),
            rows::store_table(h.epoch, &h.store),
        ]
        .concat(),
        None => [line("Status:", NO_HA_STATUS), line("HA:", HA_DISABLED)].concat(),
    }
}

fn query_json(address: &str, ha: Option<&HaBrokerInfo>) -> Value {
    match ha {
        Some(h) => json!({"address": address, "ha": true, "status": h.status,
            "brokerId": h.system_id, "brokersUrl": h.brokers_url, "publicUrl": h.public_url,
            "replicate": h.replicate_default, "members": h.members, "replicas": h.replicas,
            "subscriptions": h.subscriptions, "epoch": h.epoch, "store": h.store, "error": null}),
        None => json!({"address": address, "ha": false, "status": NO_HA_STATUS,
            "brokerId": null, "brokersUrl": null, "publicUrl": null, "replicate": null,
            "members": [], "replicas": [], "subscriptions": [], "epoch": null, "store": [],
            "error": null}),
    }
}

async fn query(parsed: &Parsed, ha: Option<&HaBrokerInfo>) -> Result<(), Failure> {
    let local = parsed.common.broker.as_deref().unwrap_or("localhost");
    let local = local.rsplit_once('@').map_or(local, |(_, a)| a);
    let addresses = all_addresses(parsed, ha);
    if !parsed.all || addresses.is_empty() {
        if parsed.json {
            let doc = json!({"version": JSON_VERSION, "brokers": [query_json(local, ha)]});
            println!("{doc:#}");
        } else {
            print!("{}", query_lines(ha));
        }
        return Ok(());
    }
    let mut brokers = Vec::new();
    for address in addresses {
        let shown = address
            .rsplit_once('@')
            .map_or(address.as_str(), |(_, a)| a);
        match remote_ha(parsed, &address).await {
            Ok(remote) if parsed.json => brokers.push(query_json(shown, remote.as_ref())),
            Ok(remote) => print!(
                "{:<20} {shown}\n{}\n",
                "Address:",
                query_lines(remote.as_ref())
            ),
            Err(f) if parsed.json => {
                let (kind, message) = match &f {
                    Failure::Error(k, m) => (k.clone(), m.clone()),
                    Failure::Status(c) => ("Exception".into(), format!("exit status {c}")),
                };
                brokers.push(json!({"address": shown, "ha": null, "status": null,
                    "brokerId": null, "brokersUrl": null, "publicUrl": null, "replicate": null,
                    "members": null, "replicas": null, "subscriptions": null,
                    "error": {"kind": kind, "message": message}}));
            }
            Err(f) => println!("{shown} {}\n", failure_text(&f)),
        }
    }
    if parsed.json {
        println!("{:#}", json!({"version": JSON_VERSION, "brokers": brokers}));
    }
    Ok(())
}
