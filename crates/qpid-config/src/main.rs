//! `qpid-config`: Qpid's configuration tool, a thin command line over `mgmt-client`. It parses
//! arguments, runs management operations and prints; the protocol lives in the client. Exit
//! status 0 on success, 1 on any failure (`Failed: <kind>: <message>` on stderr) and when a
//! listing matches nothing.

mod args;
mod json;
mod text;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mgmt_client::{
    BrokerAddress, Client, ConnectOptions, CreateBinding, CreateExchange, CreateQueue,
    DeleteBinding, DeleteExchange, DeleteQueue, Error, GetLogLevel, HA_BROKER_OBJECT,
    QueryBindings, QueryExchanges, QueryObjects, QueryQueues, QueueInfo, Replicate, SetLogLevel,
    Shutdown,
};
use serde_json::{Map, Value};

use args::{AddCommand, AddCommonOptions, AddQueueOptions, Cli, Command, DelCommand};

/// How a command ended, short of an error.
enum Outcome {
    Done,
    /// A listing whose filter matched nothing: exit 1 without a message.
    NothingMatched,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Failed: Internal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NothingMatched) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("Failed: {}: {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}

fn print_lines(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}

fn print_json(value: &Value) {
    println!("{value:#}");
}

async fn run(cli: Cli) -> Result<Outcome, Error> {
    let global = &cli.global;
    // Validate what can be validated before connecting.
    if let Some(Command::Add(add)) = &cli.command {
        let common = match add {
            AddCommand::Queue { options, .. } => &options.common,
            AddCommand::Exchange { common, .. } => common,
        };
        common_properties(common)?;
    }
    let mut options = ConnectOptions::new(BrokerAddress::parse(&global.broker)?);
    options.timeout = (global.timeout > 0).then(|| Duration::from_secs(global.timeout));
    options.ha_admin = global.ha_admin;
    options.sasl_mechanism = global.sasl_mechanism.clone();
    let mut client = Client::connect(&options).await?;
    let outcome = dispatch(&mut client, cli).await;
    client.close().await;
    outcome
}

async fn dispatch(client: &mut Client, cli: Cli) -> Result<Outcome, Error> {
    let global = &cli.global;
    match cli.command {
        None => overview(client, global.json).await,
        Some(Command::Queues { filter }) => queues(client, global, filter.as_deref()).await,
        Some(Command::Exchanges { filter }) => exchanges(client, global, filter.as_deref()).await,
        Some(Command::Add(AddCommand::Queue { name, options })) => {
            add_queue(client, name, options, global.timeout).await
        }
        Some(Command::Add(AddCommand::Exchange {
            exchange_type,
            name,
            common,
        })) => {
            let properties = common_properties(&common)?;
            let operation = CreateExchange {
                exchange_type,
                name,
                durable: common.durable,
                properties,
            };
            client.run(&operation).await?;
            Ok(Outcome::Done)
        }
        Some(Command::Del(DelCommand::Queue {
            name,
            force,
            force_if_not_empty,
            force_if_used,
        })) => {
            let operation = DeleteQueue {
                name,
                if_empty: !(force || force_if_not_empty),
                if_unused: !(force || force_if_used),
            };
            client.run(&operation).await?;
            Ok(Outcome::Done)
        }
        Some(Command::Del(DelCommand::Exchange { name })) => {
            client.run(&DeleteExchange { name }).await?;
            Ok(Outcome::Done)
        }
        Some(Command::Bind {
            exchange,
            queue,
            key,
            match_arguments,
        }) => bind(client, exchange, queue, key, match_arguments).await,
        Some(Command::Unbind {
            exchange,
            queue,
            key,
        }) => {
            let operation = DeleteBinding {
                exchange,
                queue,
                key: key.unwrap_or_default(),
            };
            client.run(&operation).await?;
            Ok(Outcome::Done)
        }
        Some(Command::List {
            object_type,
            show_property,
        }) => list(client, global.json, object_type, show_property).await,
        Some(Command::Log { level: None }) => {
            let level = client.run(&GetLogLevel).await?;
            if global.json {
                print_json(&json::log_level(&level));
            } else {
                println!("Log level: {level}");
            }
            Ok(Outcome::Done)
        }
        Some(Command::Log { level: Some(level) }) => {
            client.run(&SetLogLevel { level }).await?;
            Ok(Outcome::Done)
        }
        Some(Command::Shutdown) => match client.run(&Shutdown).await {
            // The broker may close the connection before or after its answer arrives.
            Ok(()) | Err(Error::Connection(_)) => Ok(Outcome::Done),
            Err(e) => Err(e),
        },
    }
}

async fn overview(client: &mut Client, as_json: bool) -> Result<Outcome, Error> {
    let exchanges = client.run(&QueryExchanges).await?;
    let queues = queues_but_own(client).await?;
    if as_json {
        print_json(&json::overview(&exchanges, &queues));
    } else {
        print_lines(&text::overview(&exchanges, &queues));
    }
    Ok(Outcome::Done)
}

/// Listings leave out the reply queue this very call made: it is an artefact of asking.
async fn queues_but_own(client: &mut Client) -> Result<Vec<QueueInfo>, Error> {
    let mut queues = client.run(&QueryQueues).await?;
    queues.retain(|q| q.name != client.reply_queue());
    Ok(queues)
}

fn matches(name: &str, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| name.contains(f))
}

async fn queues(
    client: &mut Client,
    global: &args::GlobalOptions,
    filter: Option<&str>,
) -> Result<Outcome, Error> {
    let all = queues_but_own(client).await?;
    let chosen: Vec<_> = all.iter().filter(|q| matches(&q.name, filter)).collect();
    if chosen.is_empty() {
        return Ok(Outcome::NothingMatched);
    }
    let bindings = if global.recursive {
        Some(client.run(&QueryBindings).await?)
    } else {
        None
    };
    match (global.json, &bindings) {
        (true, _) => print_json(&json::queues(&chosen, bindings.as_deref())),
        (false, Some(b)) => print_lines(&text::queue_bindings(&chosen, b, global.ignore_default)),
        (false, None) => print_lines(&text::queue_list(&chosen)),
    }
    Ok(Outcome::Done)
}

async fn exchanges(
    client: &mut Client,
    global: &args::GlobalOptions,
    filter: Option<&str>,
) -> Result<Outcome, Error> {
    let all = client.run(&QueryExchanges).await?;
    let chosen: Vec<_> = all
        .iter()
        .filter(|e| matches(&e.name, filter) && !(global.ignore_default && e.name.is_empty()))
        .collect();
    if chosen.is_empty() {
        return Ok(Outcome::NothingMatched);
    }
    if !global.recursive {
        match global.json {
            true => print_json(&json::exchanges(&chosen, None)),
            false => print_lines(&text::exchange_list(&chosen)),
        }
        return Ok(Outcome::Done);
    }
    let bindings = client.run(&QueryBindings).await?;
    if global.json {
        print_json(&json::exchanges(&chosen, Some(&bindings)));
    } else {
        let queues = queues_but_own(client).await?;
        print_lines(&text::exchange_bindings(&chosen, &bindings, &queues));
    }
    Ok(Outcome::Done)
}

/// `--argument NAME=VALUE`: an integer value is sent as an integer, as Qpid's `int()` does.
fn parse_argument(text: &str) -> Result<(String, Value), Error> {
    let (name, value) = text.split_once('=').ok_or_else(|| {
        Error::InvalidRequest(format!("Invalid argument '{text}', expected NAME=VALUE"))
    })?;
    let value = match value.trim().parse::<i64>() {
        Ok(number) => Value::from(number),
        Err(_) => Value::from(value),
    };
    Ok((name.to_string(), value))
}

/// The properties `add queue` and `add exchange` share, validated.
fn common_properties(common: &AddCommonOptions) -> Result<Map<String, Value>, Error> {
    let mut properties = Map::new();
    for argument in &common.arguments {
        let (name, value) = parse_argument(argument)?;
        properties.insert(name, value);
    }
    if let Some(alternate) = &common.alternate_exchange {
        properties.insert("alternate-exchange".into(), alternate.clone().into());
    }
    if let Some(level) = &common.replicate {
        if !["none", "configuration", "all"].contains(&level.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "Invalid replication level '{level}', should be one of: none, configuration, all"
            )));
        }
        properties.insert("qpid.replicate".into(), level.clone().into());
    }
    Ok(properties)
}

/// The `timeout` the `replicate` method gets: 80% of the tool's own, so the broker answers
/// (with a warning if the original is still silent) before the tool gives up; the broker's
/// default when the tool waits forever (`--timeout 0`).
fn replicate_timeout(tool_timeout: u64) -> Option<f64> {
    (tool_timeout > 0).then_some(tool_timeout as f64 * 0.8)
}

async fn add_queue(
    client: &mut Client,
    name: String,
    options: AddQueueOptions,
    tool_timeout: u64,
) -> Result<Outcome, Error> {
    let mut properties = common_properties(&options.common)?;
    if let Some(size) = options.max_queue_size {
        properties.insert("qpid.max_size".into(), size.into());
    }
    if let Some(count) = options.max_queue_count {
        properties.insert("qpid.max_count".into(), count.into());
    }
    if let Some(policy) = options.limit_policy.filter(|p| p != "none") {
        properties.insert("qpid.policy_type".into(), policy.into());
    }
    if let Some(key) = options.lvq_key {
        properties.insert("qpid.last_value_queue_key".into(), key.into());
    }
    let operation = CreateQueue {
        name: name.clone(),
        durable: options.common.durable,
        properties,
    };
    client.run(&operation).await?;
    let Some(broker) = options.start_replica else {
        return Ok(Outcome::Done);
    };
    let replicate = Replicate {
        broker: broker.clone(),
        queue: name.clone(),
        timeout: replicate_timeout(tool_timeout),
    };
    let error = match client.run(&replicate).await {
        Ok(None) => return Ok(Outcome::Done),
        Ok(Some(warning)) => {
            // The original did not answer in time; the broker keeps trying.
            eprintln!("Warning: {warning}");
            return Ok(Outcome::Done);
        }
        Err(error) => error,
    };
    // Leave nothing behind: the queue was made only to replicate into.
    let undo = DeleteQueue {
        name: name.clone(),
        if_empty: false,
        if_unused: false,
    };
    let undone = match client.run(&undo).await {
        Ok(()) => format!("queue '{name}' was removed"),
        Err(e) => format!("removing queue '{name}' failed too: {e}"),
    };
    // A broker without HA has no HA object to call.
    let no_ha = matches!(&error, Error::NotFound(text) if text.contains(HA_BROKER_OBJECT));
    let message = if no_ha {
        format!(
            "cannot start replicating queue '{name}' from {broker} (queue replication is not \
             available on this broker: {error}); {undone}"
        )
    } else {
        format!("cannot start replicating queue '{name}' from {broker}: {error}; {undone}")
    };
    Err(match error {
        Error::NotFound(_) if no_ha => Error::NotImplemented(message),
        Error::NotFound(_) => Error::NotFound(message),
        Error::AccessDenied(_) => Error::AccessDenied(message),
        Error::InvalidRequest(_) => Error::InvalidRequest(message),
        Error::NotImplemented(_) => Error::NotImplemented(message),
        Error::PreconditionFailed(_) => Error::PreconditionFailed(message),
        Error::ResourceLocked(_) => Error::ResourceLocked(message),
        Error::Timeout(_) => Error::Timeout(message),
        Error::Connection(_) => Error::Connection(message),
        Error::Auth(_) => Error::Auth(message),
        Error::InvalidAddress(_) => Error::InvalidAddress(message),
        Error::Internal(_) => Error::Internal(message),
    })
}

/// `bind`: for a headers exchange the words after the key are `[all|any] k1=v1 [, k2=v2...]`.
async fn bind(
    client: &mut Client,
    exchange: String,
    queue: String,
    key: Option<String>,
    match_arguments: Vec<String>,
) -> Result<Outcome, Error> {
    let exchanges = client.run(&QueryExchanges).await?;
    let is_headers = exchanges
        .iter()
        .any(|e| e.name == exchange && e.exchange_type == "headers");
    let mut arguments = Map::new();
    if is_headers {
        arguments = headers_arguments(&match_arguments)?;
    } else if !match_arguments.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "unexpected words after the binding key: {}",
            match_arguments.join(" ")
        )));
    }
    let operation = CreateBinding {
        exchange,
        queue,
        key: key.unwrap_or_default(),
        arguments,
    };
    client.run(&operation).await?;
    Ok(Outcome::Done)
}

fn headers_arguments(words: &[String]) -> Result<Map<String, Value>, Error> {
    let mut arguments = Map::new();
    let mut words = words
        .iter()
        .flat_map(|w| w.split(','))
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .peekable();
    let x_match = match words.peek() {
        Some(&("all" | "any")) => words.next().unwrap_or("all"),
        _ => "all",
    };
    arguments.insert("x-match".into(), x_match.into());
    for word in words {
        let (name, value) = word.split_once('=').ok_or_else(|| {
            Error::InvalidRequest(format!("Invalid header match '{word}', expected k=v"))
        })?;
        arguments.insert(name.into(), value.into());
    }
    Ok(arguments)
}

async fn list(
    client: &mut Client,
    as_json: bool,
    object_type: String,
    show_property: Vec<String>,
) -> Result<Outcome, Error> {
    let query = QueryObjects {
        class: object_type.clone(),
    };
    let mut objects = client.run(&query).await?;
    if object_type == "queue" {
        let own = client.reply_queue().to_string();
        objects.retain(|o| o.values.get("name").and_then(Value::as_str) != Some(own.as_str()));
    }
    let columns = if show_property.is_empty() {
        text::default_columns(&object_type, &objects)
    } else {
        for property in &show_property {
            if objects.iter().all(|o| !o.values.contains_key(property)) && !objects.is_empty() {
                eprintln!("Warning: No such property '{property}' for type '{object_type}'");
            }
        }
        show_property
    };
    if as_json {
        print_json(&json::objects(&object_type, &columns, &objects));
    } else {
        print_lines(&text::object_table(&object_type, &columns, &objects));
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicate_gets_most_of_the_tool_timeout() {
        assert_eq!(replicate_timeout(10), Some(8.0));
        assert_eq!(replicate_timeout(2), Some(1.6));
        assert_eq!(replicate_timeout(0), None);
    }

    #[test]
    fn arguments_with_integer_values_are_integers() {
        assert_eq!(parse_argument("a=5").unwrap(), ("a".into(), Value::from(5)));
        assert_eq!(
            parse_argument("a=b=c").unwrap(),
            ("a".into(), Value::from("b=c"))
        );
        assert!(parse_argument("a").is_err());
    }

    #[test]
    fn headers_bindings_take_all_or_any() {
        let words: Vec<String> = ["any", "a=1,", "b=2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let arguments = headers_arguments(&words).unwrap();
        assert_eq!(arguments["x-match"], "any");
        assert_eq!(arguments["a"], "1");
        assert_eq!(arguments["b"], "2");
    }
}
