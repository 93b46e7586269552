//! Qpid's `qpid-ha` command line, parsed by hand because Qpid's rules are not clap's: the
//! command is any word of argv, options may come before or after it, `--cluster-manager`
//! anywhere enables `promote`, and the usage and error texts are Qpid's (optparse style).

use std::path::PathBuf;

/// The commands, in the order the usage lists them.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("ping", "", "Check if the broker is alive and responding."),
    ("status", "", "Print HA status."),
    ("promote", "", "Promote the broker from backup to primary."),
    (
        "replicate",
        "<remote-broker> <queue>",
        "Set up replication from <queue> on <remote-broker> to <queue> on the current broker.",
    ),
    (
        "detach",
        "<queue>",
        "Stop replicating <queue> on the current broker. The queue keeps its messages and becomes an ordinary queue.",
    ),
    ("query", "", "Print HA configuration and status."),
];

/// Qpid's warning for `promote` without `--cluster-manager` (QPID-6035), verbatim.
pub const PROMOTE_WARNING: &str = "'promote' should only be called by the cluster manager.\nIncorrect use of 'promote' will cause cluster malfunction.\nTo call from a cluster manager use 'promote --cluster-manager'. ";

const CONNECTION_OPTIONS: &str = "  Broker connection options:
    -b <address>, --broker=<address>
                        Address of qpidd broker with syntax:
                        [username/password@] hostname | ip-address [:<port>]
                        (Default localhost)
    --timeout=<seconds>
                        Give up if the broker does not respond within the
                        timeout. 0 means wait forever (Default 10.0)
    --sasl-mechanism=<mech>
                        SASL mechanism for authentication (PLAIN, AMQPLAIN,
                        ANONYMOUS, EXTERNAL; default PLAIN)
    --config=<path/to/qpidd.conf>
                        Read default connection configuration from the
                        qpidd.conf broker configuration file. Defaults are
                        overridden by command-line options.
";

/// Options every command takes.
#[derive(Debug, Default, Clone)]
pub struct Common {
    pub broker: Option<String>,
    pub timeout: Option<f64>,
    pub config: Option<PathBuf>,
    pub sasl_mechanism: Option<String>,
}

/// A parsed command line.
#[derive(Debug, Default)]
pub struct Parsed {
    pub command: String,
    pub cluster_manager: bool,
    pub common: Common,
    /// Positional arguments after the command word.
    pub args: Vec<String>,
    pub expect: Option<String>,
    pub is_primary: bool,
    pub all: bool,
    pub json: bool,
    /// `promote --force`: promote a joining member even if a reachable member has a newer epoch.
    pub force: bool,
}

/// What to do.
#[derive(Debug)]
pub enum Action {
    /// Run a command.
    Run(Box<Parsed>),
    /// Print to stdout and exit 0.
    Help(String),
    /// Print `stdout`, then `Exception: <message>` on stderr, exit 1.
    Fail { stdout: String, message: String },
    /// Print to stderr and exit 2 (optparse's error).
    OptionError(String),
}

/// The top-level usage (`print_usage`).
pub fn usage(cluster_manager: bool) -> String {
    let mut out = String::from("usage: qpid-ha <command> [<arguments>]\n\nCommands are:\n\n");
    for (name, _, help) in COMMANDS {
        if *name == "promote" && !cluster_manager {
            continue;
        }
        let help = command_help(name, help, cluster_manager);
        let first = help.split('.').next().unwrap_or_default();
        out.push_str(&format!("  {name:<12} {first}.\n"));
    }
    out.push_str("\nFor help with a command type: qpid-ha <command> --help\n");
    out
}

fn command_help(name: &str, help: &str, cluster_manager: bool) -> String {
    if name == "promote" && cluster_manager {
        format!("[Cluster manager only] {help}")
    } else {
        help.to_string()
    }
}

fn command_options(name: &str) -> &'static str {
    match name {
        "status" => {
            "  --expect=<status>     Don't print status. Return 0 if it matches <status>, 1
                        otherwise
  --is-primary          Don't print status. Return 0 if the broker is primary,
                        1 otherwise
  --all                 Print status for all brokers in the cluster
"
        }
        "promote" => {
            "  --force               Promote a joining broker even if another reachable member
                        has a newer epoch (its data may be more recent)
"
        }
        "query" => {
            "  --all                 Print configuration and status for all brokers in the
                        cluster
  --json                Print a JSON document (schema in docs/user-guide.md)
"
        }
        _ => "",
    }
}

/// A command's usage line.
pub fn command_usage(name: &str, cluster_manager: bool) -> String {
    let (_, arg_names, help) = COMMANDS
        .iter()
        .find(|c| c.0 == name)
        .copied()
        .unwrap_or((name, "", ""));
    let args = if arg_names.is_empty() {
        String::new()
    } else {
        format!(" {arg_names}")
    };
    format!(
        "Usage: {name} [options]{args}\n\n{}\n",
        command_help(name, help, cluster_manager)
    )
}

/// A command's full help (optparse's `print_help`).
pub fn command_help_text(name: &str, cluster_manager: bool) -> String {
    format!(
        "{}\nOptions:\n  -h, --help            show this help message and exit\n{}\n{CONNECTION_OPTIONS}",
        command_usage(name, cluster_manager),
        command_options(name)
    )
}

fn takes_value(option: &str) -> bool {
    matches!(
        option,
        "-b" | "--broker"
            | "--timeout"
            | "--config"
            | "--sasl-mechanism"
            | "--sasl-service-name"
            | "--ssl-certificate"
            | "--ssl-key"
            | "--expect"
    )
}

fn known_flag(option: &str) -> bool {
    matches!(
        option,
        "--is-primary" | "--all" | "--json" | "--force" | "-h" | "--help"
    )
}

/// Parses argv (without the program name).
pub fn parse(argv: &[String]) -> Action {
    let cluster_manager = argv.iter().any(|a| a == "--cluster-manager");
    let argv: Vec<&String> = argv.iter().filter(|a| *a != "--cluster-manager").collect();
    if let Some(first) = argv.first()
        && matches!(
            first.as_str(),
            "help" | "--help" | "-help" | "-h" | "help-all" | "--help-all"
        )
    {
        let mut text = usage(cluster_manager);
        if first.contains("help-all") {
            for (name, _, _) in COMMANDS {
                if *name == "promote" && !cluster_manager {
                    continue;
                }
                text.push('\n');
                text.push_str(&command_help_text(name, cluster_manager));
            }
        }
        return Action::Help(text);
    }
    // Split options from positionals, then find the command among the positionals.
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    let mut positionals: Vec<String> = Vec::new();
    let mut pending_error: Option<String> = None;
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_str();
        i += 1;
        if arg == "--" {
            positionals.extend(argv[i..].iter().map(|s| s.to_string()));
            break;
        }
        if let Some(long) = arg.strip_prefix("--").filter(|_| arg.len() > 2) {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (arg.to_string(), None),
            };
            if takes_value(&name) {
                let value = match inline {
                    Some(v) => Some(v),
                    None if i < argv.len() => {
                        i += 1;
                        Some(argv[i - 1].to_string())
                    }
                    None => {
                        pending_error.get_or_insert(format!("{name} option requires an argument"));
                        None
                    }
                };
                options.push((name, value));
            } else if known_flag(&name) && inline.is_none() {
                options.push((name, None));
            } else if known_flag(&name) {
                pending_error.get_or_insert(format!("{name} option does not take a value"));
            } else {
                pending_error.get_or_insert(format!("no such option: {name}"));
            }
        } else if arg.starts_with('-') && arg.len() > 1 {
            match arg {
                "-h" => options.push(("--help".into(), None)),
                _ if arg.starts_with("-b") => {
                    let value = if arg.len() > 2 {
                        Some(arg[2..].to_string())
                    } else if i < argv.len() {
                        i += 1;
                        Some(argv[i - 1].to_string())
                    } else {
                        pending_error.get_or_insert("-b option requires an argument".into());
                        None
                    };
                    options.push(("--broker".into(), value));
                }
                _ => {
                    pending_error.get_or_insert(format!("no such option: {arg}"));
                }
            }
        } else {
            positionals.push(arg.to_string());
        }
    }
    let found = positionals
        .iter()
        .position(|p| COMMANDS.iter().any(|c| c.0 == p.as_str()));
    let Some(at) = found else {
        return Action::Fail {
            stdout: usage(cluster_manager),
            message: "No valid command".into(),
        };
    };
    let command = positionals.remove(at);
    let usage_line = command_usage(&command, cluster_manager);
    if let Some(e) = pending_error {
        return Action::OptionError(format!("{usage_line}\nqpid-ha: error: {e}\n"));
    }
    let mut parsed = Parsed {
        command: command.clone(),
        cluster_manager,
        args: positionals,
        ..Parsed::default()
    };
    for (name, value) in options {
        let value = value.unwrap_or_default();
        match name.as_str() {
            "--help" => return Action::Help(command_help_text(&command, cluster_manager)),
            "--broker" => parsed.common.broker = Some(value),
            "--timeout" => match value.trim().parse::<f64>() {
                Ok(t) if t >= 0.0 && t.is_finite() => parsed.common.timeout = Some(t),
                _ => {
                    return Action::OptionError(format!(
                        "{usage_line}\nqpid-ha: error: option --timeout: invalid floating-point value: '{value}'\n"
                    ));
                }
            },
            "--config" => parsed.common.config = Some(PathBuf::from(value)),
            "--sasl-mechanism" => parsed.common.sasl_mechanism = Some(value),
            "--expect" if command == "status" => parsed.expect = Some(value),
            "--is-primary" if command == "status" => parsed.is_primary = true,
            "--all" if command == "status" || command == "query" => parsed.all = true,
            "--json" if command == "query" => parsed.json = true,
            "--force" if command == "promote" => parsed.force = true,
            "--sasl-service-name" | "--ssl-certificate" | "--ssl-key" => {
                return Action::Fail {
                    stdout: String::new(),
                    message: format!(
                        "option {name} is not supported: this broker speaks plain AMQP 0-9-1 without SSL or GSSAPI"
                    ),
                };
            }
            other => {
                return Action::OptionError(format!(
                    "{usage_line}\nqpid-ha: error: no such option: {other}\n"
                ));
            }
        }
    }
    let wanted = COMMANDS
        .iter()
        .find(|c| c.0 == command)
        .map_or(0, |c| c.1.split_whitespace().count());
    if parsed.args.len() != wanted {
        return Action::Fail {
            stdout: command_help_text(&command, cluster_manager),
            message: "Wrong number of arguments".into(),
        };
    }
    Action::Run(Box::new(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn run(words: &[&str]) -> Parsed {
        match parse(&argv(words)) {
            Action::Run(p) => *p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_may_come_anywhere() {
        let p = run(&["-b", "h:1", "replicate", "node1", "q", "--timeout=3"]);
        assert_eq!(p.command, "replicate");
        assert_eq!(p.args, ["node1", "q"]);
        assert_eq!(p.common.broker.as_deref(), Some("h:1"));
        assert_eq!(p.common.timeout, Some(3.0));
        let p = run(&["--expect", "standalone", "-bh:2", "status"]);
        assert_eq!(p.expect.as_deref(), Some("standalone"));
        assert_eq!(p.common.broker.as_deref(), Some("h:2"));
    }

    #[test]
    fn detach_takes_one_queue() {
        let p = run(&["detach", "orders", "-b", "node2:5673"]);
        assert_eq!(p.command, "detach");
        assert_eq!(p.args, ["orders"]);
        assert_eq!(p.common.broker.as_deref(), Some("node2:5673"));
        let p = run(&["--timeout", "2.5", "orders", "detach"]);
        assert_eq!(
            (p.command.as_str(), p.args.as_slice()),
            ("detach", &["orders".to_string()][..])
        );
        assert_eq!(p.common.timeout, Some(2.5));
        for wrong in [&["detach"][..], &["detach", "a", "b"]] {
            match parse(&argv(wrong)) {
                Action::Fail { stdout, message } => {
                    assert_eq!(message, "Wrong number of arguments");
                    assert!(
                        stdout.starts_with("Usage: detach [options] <queue>\n\nStop replicating <queue> on the current broker. The queue keeps"),
                        "{stdout}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            parse(&argv(&["detach", "q", "--json"])),
            Action::OptionError(t) if t.contains("no such option: --json")
        ));
        assert!(
            matches!(parse(&argv(&["-h"])), Action::Help(t) if t.contains("  detach       Stop replicating <queue> on the current broker.\n"))
        );
        assert!(
            matches!(parse(&argv(&["detach", "--help"])), Action::Help(t) if t.starts_with("Usage: detach [options] <queue>\n"))
        );
    }

    #[test]
    fn usage_errors_are_qpids() {
        assert!(
            matches!(parse(&argv(&["frob"])), Action::Fail { message, .. } if message == "No valid command")
        );
        assert!(
            matches!(parse(&argv(&["replicate", "a"])), Action::Fail { message, .. } if message == "Wrong number of arguments")
        );
        assert!(matches!(
            parse(&argv(&["status", "--bogus"])),
            Action::OptionError(_)
        ));
        assert!(matches!(
            parse(&argv(&["query", "--expect=x"])),
            Action::OptionError(_)
        ));
        assert!(matches!(parse(&argv(&["-h"])), Action::Help(t) if !t.contains("promote")));
        assert!(
            matches!(parse(&argv(&["--cluster-manager", "--help"])), Action::Help(t) if t.contains("promote"))
        );
    }
}
