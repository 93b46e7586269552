//! `qpidd`'s options: one declarative table that serves the command line, `QPID_*` environment
//! variables and the config file, so the three sources cannot disagree.
//!
//! Precedence is Qpid's: **command line > environment > config file > default**. For every option
//! the highest source that sets it wins as a whole (a repeatable option such as `--log-enable`
//! takes all its values from that one source).
//!
//! Everything here is pure: [`load`] takes the arguments, the environment pairs and a file
//! reader, so it is tested without processes.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker_core::config::defaults;
use broker_core::{BrokerConfig, HaConfig};

use crate::logging::LogRule;

/// The config file read when neither `--config` nor `QPID_CONFIG` names one; skipped silently
/// when missing.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/qpid/qpidd.conf";

/// The product name printed by `--version`.
pub const PRODUCT: &str = "qpid-rs";

/// What kind of value an option takes, and how it is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `yes|no|true|false|on|off|1|0`; a bare `--flag` on the command line means yes.
    Bool,
    /// An unsigned integer within `min..=max`.
    Uint { min: u64, max: u64 },
    /// Bytes, plain or with a `K`, `M`, `G` or `T` suffix (binary: `K` = 1024), within
    /// `min..=max`.
    Size { min: u64, max: u64 },
    /// Seconds with an optional fraction, or a number with unit `s`, `ms`, `us` or `ns`.
    /// `nonzero` refuses 0.
    Duration { nonzero: bool },
    /// Free text.
    Text,
    /// One of a fixed list of words.
    Choice(&'static [&'static str]),
    /// Free text, repeatable: each occurrence adds a value.
    List,
    /// A fraction of physical memory (`0.4`) or an absolute size (`200M`).
    Watermark,
}

/// Where an option may be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Command line, environment and config file.
    Anywhere,
    /// Command line and environment, not the config file (`config` itself).
    NotInFile,
    /// Command line only (actions such as `--help`, `--quit`, `--user-add`).
    CommandLine,
}

/// The headings of `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    General,
    Logging,
    Daemon,
    Limits,
    Ha,
    Users,
}

impl Group {
    fn title(self) -> &'static str {
        match self {
            Group::General => "Options",
            Group::Logging => "Logging options",
            Group::Daemon => "Daemon options",
            Group::Limits => "Limits",
            Group::Ha => "HA options (accepted now, used by the HA module)",
            Group::Users => "User management (acts on the users file in the data dir, then exits)",
        }
    }
}

/// One row of the option table.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The long name: `--NAME` on the command line, `NAME=` in the file, `QPID_NAME` in the
    /// environment.
    pub name: &'static str,
    /// The one-letter form, if any.
    pub short: Option<char>,
    /// The value it takes.
    pub kind: Kind,
    /// The placeholder shown in `--help`.
    pub value_name: &'static str,
    /// The default as written in `--help`, parsed like any value. Empty: none.
    pub default: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// The `--help` heading.
    pub group: Group,
    /// Where it may be set.
    pub scope: Scope,
}

const fn opt(
    name: &'static str,
    short: Option<char>,
    kind: Kind,
    value_name: &'static str,
    default: &'static str,
    group: Group,
    help: &'static str,
) -> Spec {
    Spec {
        name,
        short,
        kind,
        value_name,
        default,
        help,
        group,
        scope: Scope::Anywhere,
    }
}

const fn cli(
    name: &'static str,
    short: Option<char>,
    kind: Kind,
    value_name: &'static str,
    group: Group,
    help: &'static str,
) -> Spec {
    Spec {
        name,
        short,
        kind,
        value_name,
        default: "",
        help,
        group,
        scope: Scope::CommandLine,
    }
}

const U16: u64 = u16::MAX as u64;
const U32: u64 = u32::MAX as u64;
/// The largest count limit (fits `usize` on every target).
const USIZE: u64 = u32::MAX as u64;
const BOOL: Kind = Kind::Bool;
const TEXT: Kind = Kind::Text;
const LIST: Kind = Kind::List;
const fn uint(min: u64, max: u64) -> Kind {
    Kind::Uint { min, max }
}
const fn size(min: u64, max: u64) -> Kind {
    Kind::Size { min, max }
}
const DUR: Kind = Kind::Duration { nonzero: false };
const DUR_NZ: Kind = Kind::Duration { nonzero: true };

const GEN: Group = Group::General;
const LOG: Group = Group::Logging;
const DMN: Group = Group::Daemon;
const LIM: Group = Group::Limits;
const HA: Group = Group::Ha;
const USR: Group = Group::Users;

/// Every option `qpidd` knows, in `--help` order.
#[rustfmt::skip]
pub const OPTIONS: &[Spec] = &[
    cli("help", Some('h'), BOOL, "", GEN, "Print this help and exit"),
    cli("version", Some('v'), BOOL, "", GEN, "Print the version and exit"),
    Spec {
        name: "config", short: None, kind: TEXT, value_name: "FILE", default: DEFAULT_CONFIG_FILE,
        help: "Read name=value lines from FILE (a missing default file is skipped)",
        group: GEN, scope: Scope::NotInFile,
    },
    opt("port", Some('p'), uint(0, U16), "PORT", "5672", GEN,
        "Listen on PORT; 0 picks a free port. The bound port is printed alone on stdout"),
    opt("interface", None, LIST, "ADDR", "", GEN,
        "Listen on this address or host name (repeatable; default: 0.0.0.0 and [::])"),
    opt("data-dir", None, TEXT, "DIR", "$HOME/.qpidd", GEN,
        "Directory for persistent data and the lock file `lock`; created if missing"),
    opt("no-data-dir", None, BOOL, "", "no", GEN, "Use no data directory (nothing is kept)"),
    opt("auth", None, BOOL, "yes|no", "yes", GEN,
        "Require authentication; with no, every connection is trusted (tags admin and ha)"),
    opt("store-segment-size", None, size(65536, 1 << 40), "BYTES", "16MiB", GEN,
        "Size of the message journal's segment files under <data-dir>/store (disk is reclaimed a segment at a time)"),
    opt("store-skip-damaged", None, BOOL, "yes|no", "no", GEN,
        "Start even if the store has a damaged record (logged; what follows it in that file is lost)"),
    opt("worker-threads", None, uint(0, 1024), "N", "0", GEN,
        "Threads serving connections (0 = one per CPU)"),

    opt("log-enable", None, LIST, "RULE", "notice+", LOG,
        "Enable logging: LEVEL[+-][:PATTERN], e.g. info+, debug+:Broker (repeatable)"),
    opt("log-disable", None, LIST, "RULE", "", LOG,
        "Disable logging matching RULE, same form as --log-enable (repeatable)"),
    opt("log-to-stderr", None, BOOL, "yes|no", "yes", LOG, "Send log lines to stderr"),
    opt("log-to-file", None, TEXT, "FILE", "", LOG,
        "Append log lines to FILE; SIGHUP reopens it (for logrotate)"),

    opt("daemon", Some('d'), BOOL, "", "no", DMN,
        "Run in the background; prints the port once the broker listens"),
    opt("pid-dir", None, TEXT, "DIR", "the --data-dir value", DMN,
        "Directory of the default pidfile"),
    opt("pidfile", None, TEXT, "FILE", "<pid-dir>/qpidd.<port>.pid", DMN,
        "Pidfile written by --daemon (in the foreground only when given); read by --check, --quit"),
    opt("wait", Some('w'), DUR_NZ, "DURATION", "600s", DMN,
        "How long --daemon waits for the broker to start and --quit for it to stop"),
    cli("check", Some('c'), BOOL, "", DMN,
        "Print the pid of the running broker and exit 0, or exit 1 if none runs"),
    cli("quit", Some('q'), BOOL, "", DMN,
        "Stop the running broker (SIGTERM) and wait for it to exit"),

    opt("max-connections", None, uint(0, USIZE), "N", "500", LIM,
        "Client connections accepted at once (0 = no limit)"),
    opt("reserved-admin-connections", None, uint(0, USIZE), "N", "10", LIM,
        "Connections accepted beyond --max-connections for administration and HA links"),
    opt("channel-max", None, uint(1, U16), "N", "2047", LIM,
        "Highest channel number a connection may open"),
    opt("frame-max", None, size(4096, U32), "BYTES", "131072", LIM,
        "Largest frame in bytes, framing included (at least 4096)"),
    opt("max-message-size", None, size(1, u64::MAX), "BYTES", "128M", LIM,
        "Largest message body"),
    opt("max-unacked-per-channel", None, uint(1, U32), "N", "65536", LIM,
        "Deliveries awaiting acknowledgement on one channel before deliveries to it pause"),
    opt("heartbeat", None, DUR, "DURATION", "60s", LIM,
        "Heartbeat interval proposed to clients, whole seconds (0 = none)"),
    opt("memory-high-watermark", None, Kind::Watermark, "FRACTION|BYTES", "0.4", LIM,
        "Message memory above which publishers are blocked: a fraction of RAM or a size"),
    opt("default-queue-limit", None, size(0, u64::MAX), "BYTES", "0", LIM,
        "Byte limit for queues declared without one (0 = none)"),
    opt("max-queues", None, uint(0, USIZE), "N", "100000", LIM,
        "Queues that may exist at once (0 = no limit)"),
    opt("max-exchanges", None, uint(0, USIZE), "N", "10000", LIM,
        "Exchanges that may exist at once, predeclared ones included (0 = no limit)"),
    opt("max-consumers-per-channel", None, uint(0, USIZE), "N", "1000", LIM,
        "Consumers one channel may hold (0 = no limit)"),
    opt("max-negotiate-time", None, DUR_NZ, "DURATION", "10s", LIM,
        "Time a peer has to finish the connection handshake"),
    opt("queue-purge-interval", None, DUR_NZ, "DURATION", "0.5s", LIM,
        "How often expired messages and unused x-expires queues are swept"),

    opt("ha-cluster", None, BOOL, "yes|no", "no", HA, "Join a HA active/passive cluster"),
    opt("ha-queue-replication", None, BOOL, "yes|no", "no", HA,
        "Enable replication of specific queues without joining a cluster"),
    opt("ha-brokers-url", None, TEXT, "URL", "", HA,
        "URL with the address of each broker in the cluster"),
    opt("ha-public-url", None, TEXT, "URL", "", HA,
        "URL advertised to clients to connect to the cluster"),
    opt("ha-replicate", None, Kind::Choice(&["none", "configuration", "all"]), "LEVEL", "none", HA,
        "Replication level for queues and exchanges without qpid.replicate"),
    opt("ha-username", None, TEXT, "USER", "", HA, "Username for connections between HA brokers"),
    opt("ha-password", None, TEXT, "PASS", "", HA, "Password for connections between HA brokers"),
    opt("ha-mechanism", None, TEXT, "MECH", "", HA,
        "Authentication mechanism for connections between HA brokers"),
    opt("ha-backup-timeout", None, DUR, "DURATION", "10s", HA,
        "Maximum time to wait for an expected backup to connect and become ready"),
    opt("ha-flow-messages", None, uint(0, U32), "N", "1000", HA,
        "Flow control message count limit for replication (0 = no limit)"),
    opt("ha-min-backups", None, uint(0, 1000), "N", "0", HA,
        "While fewer than N backups are ready, confirms of publishes to replicated queues wait, then are nacks after --ha-backup-timeout"),
    opt("ha-flow-bytes", None, size(0, u64::MAX), "BYTES", "0", HA,
        "Flow control byte limit for replication (0 = no limit)"),
    opt("ha-max-config-backlog", None, size(65536, u64::MAX), "BYTES", "16MiB", HA,
        "Configuration events a backup may leave unread before the primary drops its link (it reconnects and reconciles)"),
    opt("link-maintenance-interval", None, DUR_NZ, "DURATION", "0.5s", HA,
        "How soon a broken link is retried (doubling after failures, at most 4s)"),
    opt("link-heartbeat-interval", None, DUR_NZ, "DURATION", "5s", HA,
        "Heartbeat interval for links between brokers"),
    opt("ha-ack-timeout", None, DUR, "DURATION", "0", HA,
        "How long a ready replica may leave a replication event unacknowledged before it stops holding confirms (0 = the link heartbeat interval)"),

    cli("user-add", None, TEXT, "NAME", USR,
        "Add or replace user NAME; the password is read from stdin"),
    cli("user-tags", None, TEXT, "TAGS", USR, "Comma-separated tags for --user-add (admin, ha)"),
    cli("user-del", None, TEXT, "NAME", USR, "Delete user NAME"),
    cli("user-list", None, BOOL, "", USR, "List users and their tags"),
];

/// Finds an option by its long name.
pub fn spec(name: &str) -> Option<&'static Spec> {
    OPTIONS.iter().find(|s| s.name == name)
}

// ---------------------------------------------------------------------------------------------
// Errors and origins

/// A problem with the options, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionsError(pub String);

impl fmt::Display for OptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionsError {}

fn err<T>(msg: impl Into<String>) -> Result<T, OptionsError> {
    Err(OptionsError(msg.into()))
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The command line.
    CommandLine,
    /// The environment variable of this name.
    Env(String),
    /// The config file, at this 1-based line.
    File(PathBuf, usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::CommandLine => f.write_str("command line"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File(path, line) => write!(f, "{}, line {line}", path.display()),
        }
    }
}

/// One value of one option, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub origin: Origin,
}

/// The values one source gives, by option name.
pub type Settings = BTreeMap<&'static str, Vec<Setting>>;

fn add(settings: &mut Settings, spec: &'static Spec, value: String, origin: Origin) {
    settings
        .entry(spec.name)
        .or_default()
        .push(Setting { value, origin });
}

fn option_label(spec: &Spec, origin: &Origin) -> String {
    match origin {
        Origin::CommandLine | Origin::Default => format!("--{}", spec.name),
        _ => spec.name.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Value parsers (pure, shared by every source)

/// Parses a Qpid boolean: yes/no, true/false, on/off, 1/0, in any case.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Some(true),
        "no" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Splits "12.5ms" into (12.5, "ms"); refuses signs, exponents, NaN and empty numbers.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some((value, unit.trim()))
}

/// Parses a duration: seconds with an optional fraction (`0.5`), or with a unit `s`, `ms`,
/// `us` or `ns` (`500ms`, `2s`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (value, unit) = split_number(text)?;
    let seconds = match unit.to_ascii_lowercase().as_str() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Parses a size in bytes: plain (`1048576`) or with a binary suffix `K`, `M`, `G`, `T`
/// (optionally followed by `B` or `iB`, any case): `64K`, `200M`, `1.5GiB`.
pub fn parse_size(text: &str) -> Option<u64> {
    let (value, unit) = split_number(text)?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    let bytes = value * (1u64 << shift) as f64;
    // Whole bytes only, and within u64 (2^64 itself is out of range).
    (bytes.fract() == 0.0 && bytes < 18_446_744_073_709_551_616.0).then_some(bytes as u64)
}

/// `--memory-high-watermark`: a fraction of physical memory or an absolute size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Watermark {
    /// A fraction in (0, 1] of physical memory.
    Fraction(f64),
    /// Bytes.
    Bytes(u64),
}

impl Watermark {
    /// Parses `0.4` (fraction, at most 1.0) or a size: one with a suffix (`200M`) or a plain
    /// integer above 1 (`500000000`).
    pub fn parse(text: &str) -> Option<Watermark> {
        let (value, unit) = split_number(text)?;
        if unit.is_empty() && value > 0.0 && value <= 1.0 {
            return Some(Watermark::Fraction(value));
        }
        if !unit.is_empty() || (value.fract() == 0.0 && value > 1.0) {
            return parse_size(text).filter(|b| *b > 0).map(Watermark::Bytes);
        }
        None
    }

    /// The watermark in bytes, given physical memory in bytes if known. A fraction with no
    /// known memory size means no limit.
    pub fn resolve(self, physical_memory: Option<u64>) -> u64 {
        match (self, physical_memory) {
            (Watermark::Bytes(b), _) => b,
            (Watermark::Fraction(f), Some(total)) => (total as f64 * f) as u64,
            (Watermark::Fraction(_), None) => u64::MAX,
        }
    }
}

/// Physical memory from the text of `/proc/meminfo` (`MemTotal: N kB`).
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | Some("KB") | Some("kb") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Checks `value` against `spec`'s kind; the error says what was expected.
fn check_value(spec: &Spec, value: &str) -> Result<(), String> {
    let ok = match spec.kind {
        Kind::Bool => parse_bool(value).is_some(),
        Kind::Uint { min, max } => match value.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => true,
            _ => return Err(format!("expected an integer from {min} to {max}")),
        },
        Kind::Size { min, max } => match parse_size(value) {
            Some(n) if (min..=max).contains(&n) => true,
            Some(_) => {
                return Err(format!(
                    "expected a size from {min} to {max} bytes (suffixes K, M, G, T allowed)"
                ));
            }
            None => false,
        },
        Kind::Duration { nonzero } => match parse_duration(value) {
            Some(d) if nonzero && d.is_zero() => return Err("expected a duration above 0".into()),
            Some(_) => true,
            None => false,
        },
        Kind::Text | Kind::List => true,
        Kind::Choice(words) => words.contains(&value.trim()),
        Kind::Watermark => Watermark::parse(value).is_some(),
    };
    if ok { Ok(()) } else { Err(expected(spec.kind)) }
}

fn expected(kind: Kind) -> String {
    match kind {
        Kind::Bool => "expected yes/no, true/false, on/off or 1/0".into(),
        Kind::Uint { min, max } => format!("expected an integer from {min} to {max}"),
        Kind::Size { .. } => "expected a size in bytes, e.g. 1048576, 64K, 200M or 2G".into(),
        Kind::Duration { .. } => {
            "expected a duration: seconds (0.5) or with a unit s, ms, us, ns (500ms, 2s)".into()
        }
        Kind::Text | Kind::List => "expected text".into(),
        Kind::Choice(words) => format!("expected one of: {}", words.join(", ")),
        Kind::Watermark => {
            "expected a fraction of physical memory from 0 to 1.0 (e.g. 0.4) or a size (e.g. 200M)"
                .into()
        }
    }
}

fn invalid(spec: &Spec, setting: &Setting, why: &str) -> OptionsError {
    let label = option_label(spec, &setting.origin);
    OptionsError(match &setting.origin {
        Origin::CommandLine => format!(
            "invalid value '{}' for option {label}: {why}",
            setting.value
        ),
        origin => format!(
            "invalid value '{}' for option {label} ({origin}): {why}",
            setting.value
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// The three sources

/// Parses the command line (without the program name). Long options: `--name value`,
/// `--name=value`; a boolean takes the next word only when it is a boolean word, so a bare
/// `--flag` means yes. Short options: `-p 5672` or `-p5672`.
pub fn parse_command_line(args: &[String]) -> Result<Settings, OptionsError> {
    let mut settings = Settings::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (spec, inline) = if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            match spec(name) {
                Some(s) => (s, inline),
                None => return err(format!("unknown option '--{name}' (see --help)")),
            }
        } else if let Some(short) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            let mut chars = short.chars();
            let letter = chars.next().unwrap_or('-');
            let rest: String = chars.collect();
            let Some(s) = OPTIONS.iter().find(|s| s.short == Some(letter)) else {
                return err(format!("unknown option '-{letter}' (see --help)"));
            };
            let rest = rest.strip_prefix('=').map(str::to_string).unwrap_or(rest);
            (s, (!rest.is_empty()).then_some(rest))
        } else {
            return err(format!("unexpected argument '{arg}' (see --help)"));
        };
        let value = match (inline, spec.kind) {
            (Some(v), _) => v,
            (None, Kind::Bool) => match args.get(i).filter(|next| parse_bool(next).is_some()) {
                Some(next) => {
                    i += 1;
                    next.clone()
                }
                None => "yes".to_string(),
            },
            (None, _) => match args.get(i) {
                Some(next) if !(next.starts_with('-') && next.len() > 1) => {
                    i += 1;
                    next.clone()
                }
                _ => {
                    return err(format!(
                        "option --{} needs a value ({})",
                        spec.name, spec.value_name
                    ));
                }
            },
        };
        add(&mut settings, spec, value, Origin::CommandLine);
    }
    Ok(settings)
}

/// Whether environment variable `var` (after `QPID_`) names option `name`: case is ignored and
/// `_` matches `-` or `.`.
fn env_matches(var: &str, name: &str) -> bool {
    var.len() == name.len()
        && var
            .chars()
            .zip(name.chars())
            .all(|(v, n)| v.eq_ignore_ascii_case(&n) || (v == '_' && (n == '-' || n == '.')))
}

/// Picks the `QPID_<NAME>` variables that name options. Variables naming no option, or an
/// option that is for the command line only, are ignored (clients use `QPID_*` too).
pub fn parse_env(env: &[(String, String)]) -> Settings {
    let mut settings = Settings::new();
    for (var, value) in env {
        let Some(rest) = var
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("QPID_"))
            .map(|_| &var[5..])
        else {
            continue;
        };
        let found = OPTIONS
            .iter()
            .find(|s| s.scope != Scope::CommandLine && env_matches(rest, s.name));
        if let Some(spec) = found {
            add(&mut settings, spec, value.clone(), Origin::Env(var.clone()));
        }
    }
    settings
}

/// Parses a config file's text: `name=value` lines, `#` comments, blank lines. An unknown
/// name, or one that cannot be set in a file, is an error naming `path` and the line.
pub fn parse_config_file(path: &Path, text: &str) -> Result<Settings, OptionsError> {
    let mut settings = Settings::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}, line {line_no}", path.display());
        let Some((name, value)) = line.split_once('=') else {
            return err(format!("{}: expected name=value, found '{line}'", at()));
        };
        let name = name.trim();
        let spec = match spec(name) {
            Some(s) if s.scope == Scope::Anywhere => s,
            Some(_) => {
                return err(format!(
                    "{}: option '{name}' cannot be set in a config file",
                    at()
                ));
            }
            None => return err(format!("{}: unknown option '{name}'", at())),
        };
        add(
            &mut settings,
            spec,
            value.trim().to_string(),
            Origin::File(path.to_path_buf(), line_no),
        );
    }
    Ok(settings)
}

// ---------------------------------------------------------------------------------------------
// Merging

/// The merged, checked values: for each option, the settings of the highest source.
#[derive(Debug, Clone, Default)]
pub struct Values {
    chosen: BTreeMap<&'static str, Vec<Setting>>,
}

impl Values {
    /// Merges the sources (command line first) and checks every value against the table.
    pub fn merge(sources: &[Settings]) -> Result<Values, OptionsError> {
        let mut chosen = BTreeMap::new();
        for spec in OPTIONS {
            let Some(settings) = sources.iter().find_map(|s| s.get(spec.name)) else {
                continue;
            };
            if spec.kind != Kind::List && settings.len() > 1 {
                let places: Vec<String> = settings.iter().map(|s| s.origin.to_string()).collect();
                return err(format!(
                    "option {} given more than once ({})",
                    option_label(spec, &settings[0].origin),
                    places.join("; ")
                ));
            }
            for setting in settings {
                check_value(spec, &setting.value).map_err(|why| invalid(spec, setting, &why))?;
            }
            chosen.insert(spec.name, settings.clone());
        }
        Ok(Values { chosen })
    }

    /// The single value of `name` (its default if unset) and where it came from.
    fn one(&self, name: &str) -> Setting {
        match self.chosen.get(name).and_then(|v| v.first()) {
            Some(s) => s.clone(),
            None => Setting {
                value: spec(name).map(|s| s.default).unwrap_or("").to_string(),
                origin: Origin::Default,
            },
        }
    }

    /// Whether any source set `name`.
    pub fn is_set(&self, name: &str) -> bool {
        self.chosen.contains_key(name)
    }

    fn bool(&self, name: &str) -> bool {
        parse_bool(&self.one(name).value).unwrap_or(false)
    }

    fn uint(&self, name: &str) -> u64 {
        self.one(name).value.trim().parse().unwrap_or(0)
    }

    fn size(&self, name: &str) -> u64 {
        parse_size(&self.one(name).value).unwrap_or(0)
    }

    fn duration(&self, name: &str) -> Duration {
        parse_duration(&self.one(name).value).unwrap_or_default()
    }

    fn text(&self, name: &str) -> String {
        self.one(name).value
    }

    fn opt_text(&self, name: &str) -> Option<String> {
        self.chosen
            .get(name)
            .and_then(|v| v.first())
            .map(|s| s.value.clone())
    }

    fn list(&self, name: &str) -> Vec<Setting> {
        match self.chosen.get(name) {
            Some(v) => v.clone(),
            None => match spec(name).map(|s| s.default).filter(|d| !d.is_empty()) {
                Some(d) => vec![Setting {
                    value: d.to_string(),
                    origin: Origin::Default,
                }],
                None => Vec::new(),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed options

/// What this run of `qpidd` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the broker (in the foreground, or in the background with `--daemon`).
    Run,
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// `--check`.
    Check,
    /// `--quit`.
    Quit,
    /// `--user-add NAME` (with `--user-tags`).
    UserAdd,
    /// `--user-del NAME`.
    UserDel,
    /// `--user-list`.
    UserList,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LogOptions {
    /// `--log-enable` rules.
    pub enable: Vec<LogRule>,
    /// `--log-disable` rules.
    pub disable: Vec<LogRule>,
    /// `--log-to-stderr`.
    pub to_stderr: bool,
    /// `--log-to-file`.
    pub to_file: Option<PathBuf>,
}

/// `--ha-replicate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicateLevel {
    None,
    Configuration,
    All,
}

/// HA options, carried for the HA module.
#[derive(Debug, Clone, PartialEq)]
pub struct HaOptions {
    pub cluster: bool,
    pub queue_replication: bool,
    pub brokers_url: String,
    pub public_url: String,
    pub replicate: ReplicateLevel,
    pub username: String,
    pub password: String,
    pub mechanism: String,
    pub backup_timeout: Duration,
    pub flow_messages: u32,
    pub flow_bytes: u64,
    /// `--ha-max-config-backlog`.
    pub max_config_backlog: u64,
    /// `--ha-min-backups`.
    pub min_backups: u32,
    pub link_maintenance_interval: Duration,
    pub link_heartbeat_interval: Duration,
    /// `--ha-ack-timeout` (`None`: the link heartbeat interval).
    pub ack_timeout: Option<Duration>,
}

/// The broker's named limits as given (the watermark is resolved later against RAM).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub reserved_admin_connections: usize,
    pub channel_max: u16,
    pub frame_max: u32,
    pub max_message_size: u64,
    pub max_unacked_per_channel: u32,
    pub heartbeat_s: u16,
    pub memory_high_watermark: Watermark,
    pub default_queue_limit: u64,
    pub max_queues: usize,
    pub max_exchanges: usize,
    pub max_consumers_per_channel: usize,
    pub max_negotiate_time: Duration,
    pub queue_purge_interval: Duration,
}

/// Everything `qpidd` was told, typed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub action: Action,
    /// The config file actually read, if any.
    pub config_file: Option<PathBuf>,
    pub port: u16,
    /// `--interface` values; empty means all interfaces.
    pub interfaces: Vec<String>,
    /// `--data-dir`, or `None` with `--no-data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--store-segment-size` and `--store-skip-damaged`.
    pub store: broker_core::store::StoreOptions,
    pub auth: bool,
    /// 0 = one per CPU.
    pub worker_threads: usize,
    pub log: LogOptions,
    pub daemon: bool,
    /// The pidfile: `--pidfile`, else `<pid-dir>/qpidd.<port>.pid`.
    pub pidfile: PathBuf,
    /// Whether `--pidfile` was given (a foreground broker writes a pidfile only then).
    pub pidfile_explicit: bool,
    pub wait: Duration,
    pub limits: Limits,
    pub ha: HaOptions,
    /// `--user-add` or `--user-del` NAME.
    pub user_name: Option<String>,
    /// `--user-tags`, split on commas.
    pub user_tags: Vec<String>,
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Reads the options from all three sources. `read_file` reads the config file (tests pass a
/// closure); `env` holds the process environment (`HOME` gives the default data dir).
pub fn load(
    args: &[String],
    env: &[(String, String)],
    read_file: impl Fn(&Path) -> io::Result<String>,
) -> Result<Options, OptionsError> {
    let cli = parse_command_line(args)?;
    let envs = parse_env(env);
    // --help and --version work whatever values the other options have.
    for (name, action) in [("help", Action::Help), ("version", Action::Version)] {
        let given = cli.get(name).and_then(|v| v.last());
        if given.is_some_and(|s| parse_bool(&s.value) == Some(true)) {
            let mut options = from_values(&Values::default(), env)?;
            options.action = action;
            return Ok(options);
        }
    }
    let explicit = cli
        .get("config")
        .or_else(|| envs.get("config"))
        .and_then(|v| v.first())
        .cloned();
    let mut sources = vec![cli, envs];
    let mut config_file = None;
    match explicit {
        Some(setting) => {
            let path = PathBuf::from(&setting.value);
            let text = read_file(&path).map_err(|e| {
                OptionsError(format!(
                    "cannot read configuration file {}: {e}",
                    path.display()
                ))
            })?;
            sources.push(parse_config_file(&path, &text)?);
            config_file = Some(path);
        }
        None => {
            let path = PathBuf::from(DEFAULT_CONFIG_FILE);
            match read_file(&path) {
                Ok(text) => {
                    sources.push(parse_config_file(&path, &text)?);
                    config_file = Some(path);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return err(format!(
                        "cannot read configuration file {}: {e}",
                        path.display()
                    ));
                }
            }
        }
    }
    let values = Values::merge(&sources)?;
    let mut options = from_values(&values, env)?;
    options.config_file = config_file;
    Ok(options)
}

fn rules(values: &Values, name: &str) -> Result<Vec<LogRule>, OptionsError> {
    let spec = spec(name).ok_or_else(|| OptionsError(format!("no option {name}")))?;
    values
        .list(name)
        .iter()
        .map(|s| {
            s.value
                .parse::<LogRule>()
                .map_err(|why| invalid(spec, s, &why))
        })
        .collect()
}

/// Builds typed options from checked values.
fn from_values(values: &Values, env: &[(String, String)]) -> Result<Options, OptionsError> {
    let action = action(values)?;
    let port = values.uint("port") as u16;
    let data_dir_path = match values.opt_text("data-dir") {
        Some(dir) => PathBuf::from(dir),
        None => match env_value(env, "HOME").filter(|h| !h.is_empty()) {
            Some(home) => Path::new(home).join(".qpidd"),
            None => PathBuf::from("/tmp/.qpidd"),
        },
    };
    let pid_dir = values
        .opt_text("pid-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir_path.clone());
    let pidfile = match values.opt_text("pidfile") {
        Some(p) => PathBuf::from(p),
        None => pid_dir.join(format!("qpidd.{port}.pid")),
    };
    let heartbeat = values.duration("heartbeat");
    if heartbeat.subsec_nanos() != 0 || heartbeat.as_secs() > u64::from(u16::MAX) {
        let setting = values.one("heartbeat");
        let why = "expected a whole number of seconds from 0 to 65535";
        return Err(match spec("heartbeat") {
            Some(spec) => invalid(spec, &setting, why),
            None => OptionsError(why.to_string()),
        });
    }
    let watermark = Watermark::parse(&values.one("memory-high-watermark").value).unwrap_or(
        Watermark::Fraction(defaults::MEMORY_HIGH_WATERMARK_FRACTION),
    );
    let replicate = match values.text("ha-replicate").trim() {
        "configuration" => ReplicateLevel::Configuration,
        "all" => ReplicateLevel::All,
        _ => ReplicateLevel::None,
    };
    let user_name = values
        .opt_text("user-add")
        .or_else(|| values.opt_text("user-del"));
    if user_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return err("a user name must not be empty");
    }
    let user_tags = values
        .opt_text("user-tags")
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(Options {
        action,
        config_file: None,
        port,
        interfaces: values
            .list("interface")
            .into_iter()
            .map(|s| s.value)
            .collect(),
        data_dir: (!values.bool("no-data-dir")).then_some(data_dir_path),
        store: broker_core::store::StoreOptions {
            segment_size: values.size("store-segment-size"),
            skip_damaged: values.bool("store-skip-damaged"),
        },
        auth: values.bool("auth"),
        worker_threads: values.uint("worker-threads") as usize,
        log: LogOptions {
            enable: rules(values, "log-enable")?,
            disable: rules(values, "log-disable")?,
            to_stderr: values.bool("log-to-stderr"),
            to_file: values
                .opt_text("log-to-file")
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
        },
        daemon: values.bool("daemon"),
        pidfile,
        pidfile_explicit: values.is_set("pidfile"),
        wait: values.duration("wait"),
        limits: Limits {
            max_connections: values.uint("max-connections") as usize,
            reserved_admin_connections: values.uint("reserved-admin-connections") as usize,
            channel_max: values.uint("channel-max") as u16,
            frame_max: values.size("frame-max") as u32,
            max_message_size: values.size("max-message-size"),
            max_unacked_per_channel: values.uint("max-unacked-per-channel") as u32,
            heartbeat_s: heartbeat.as_secs() as u16,
            memory_high_watermark: watermark,
            default_queue_limit: values.size("default-queue-limit"),
            max_queues: values.uint("max-queues") as usize,
            max_exchanges: values.uint("max-exchanges") as usize,
            max_consumers_per_channel: values.uint("max-consumers-per-channel") as usize,
            max_negotiate_time: values.duration("max-negotiate-time"),
            queue_purge_interval: values.duration("queue-purge-interval"),
        },
        ha: HaOptions {
            cluster: values.bool("ha-cluster"),
            queue_replication: values.bool("ha-queue-replication"),
            brokers_url: values.text("ha-brokers-url"),
            public_url: values.text("ha-public-url"),
            replicate,
            username: values.text("ha-username"),
            password: values.text("ha-password"),
            mechanism: values.text("ha-mechanism"),
            backup_timeout: values.duration("ha-backup-timeout"),
            flow_messages: values.uint("ha-flow-messages") as u32,
            flow_bytes: values.size("ha-flow-bytes"),
            max_config_backlog: values.size("ha-max-config-backlog"),
            min_backups: values.uint("ha-min-backups") as u32,
            link_maintenance_interval: values.duration("link-maintenance-interval"),
            link_heartbeat_interval: values.duration("link-heartbeat-interval"),
            ack_timeout: Some(values.duration("ha-ack-timeout")).filter(|d| !d.is_zero()),
        },
        user_name,
        user_tags,
    })
}

/// Which action the flags ask for; conflicting actions are an error.
fn action(values: &Values) -> Result<Action, OptionsError> {
    let mut actions = Vec::new();
    for (name, action) in [
        ("check", Action::Check),
        ("quit", Action::Quit),
        ("user-list", Action::UserList),
    ] {
        if values.bool(name) {
            actions.push((name, action));
        }
    }
    for (name, action) in [("user-add", Action::UserAdd), ("user-del", Action::UserDel)] {
        if values.is_set(name) {
            actions.push((name, action));
        }
    }
    if values.is_set("user-tags") && !values.is_set("user-add") {
        return err("option --user-tags is used only with --user-add");
    }
    match actions.as_slice() {
        [] => Ok(Action::Run),
        [(_, action)] => Ok(action.clone()),
        [(a, _), (b, _), ..] => err(format!("options --{a} and --{b} cannot be used together")),
    }
}

impl Options {
    /// The broker's configuration, with the memory watermark resolved against physical memory
    /// (`None` when unknown: a fractional watermark then means no limit).
    pub fn broker_config(&self, physical_memory: Option<u64>) -> BrokerConfig {
        let l = &self.limits;
        BrokerConfig {
            auth: self.auth,
            max_connections: l.max_connections,
            reserved_admin_connections: l.reserved_admin_connections,
            channel_max: l.channel_max,
            frame_max: l.frame_max,
            max_message_size: l.max_message_size,
            max_unacked_per_channel: l.max_unacked_per_channel,
            heartbeat_s: l.heartbeat_s,
            memory_high_watermark_bytes: l.memory_high_watermark.resolve(physical_memory),
            default_queue_limit_bytes: l.default_queue_limit,
            max_queues: l.max_queues,
            max_exchanges: l.max_exchanges,
            max_consumers_per_channel: l.max_consumers_per_channel,
            max_negotiate_time: l.max_negotiate_time,
            queue_purge_interval: l.queue_purge_interval,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ha: self.ha_config(),
            system_id: None,
        }
    }

    /// The HA settings as the broker takes them.
    fn ha_config(&self) -> HaConfig {
        let h = &self.ha;
        HaConfig {
            cluster: h.cluster,
            queue_replication: h.queue_replication,
            brokers_url: url_setting(&h.brokers_url),
            public_url: url_setting(&h.public_url),
            replicate: match h.replicate {
                ReplicateLevel::None => broker_core::ReplicateLevel::None,
                ReplicateLevel::Configuration => broker_core::ReplicateLevel::Configuration,
                ReplicateLevel::All => broker_core::ReplicateLevel::All,
            },
            username: h.username.clone(),
            password: h.password.clone(),
            mechanism: h.mechanism.clone(),
            backup_timeout: h.backup_timeout,
            flow_messages: h.flow_messages,
            flow_bytes: h.flow_bytes,
            max_config_backlog: h.max_config_backlog,
            min_backups: h.min_backups,
            link_maintenance_interval: h.link_maintenance_interval,
            link_heartbeat_interval: h.link_heartbeat_interval,
            ack_timeout: h.ack_timeout,
        }
    }
}

/// A URL option as Qpid keeps it: trimmed, and `none` means unset.
fn url_setting(text: &str) -> String {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        String::new()
    } else {
        text.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Help

/// The `--help` text: usage, every option with its default, and the sources' rules.
pub fn help_text() -> String {
    const INDENT: usize = 38;
    const WIDTH: usize = 100;
    let mut out = String::from("Usage: qpidd [OPTIONS]\n");
    let mut group = None;
    for spec in OPTIONS {
        if group != Some(spec.group) {
            group = Some(spec.group);
            out.push_str(&format!("\n{}:\n", spec.group.title()));
        }
        let short = spec.short.map(|c| format!("-{c}, ")).unwrap_or_default();
        let value = if spec.value_name.is_empty() {
            String::new()
        } else {
            format!(" {}", spec.value_name)
        };
        let left = format!("  {short}--{}{value}", spec.name);
        let mut text = spec.help.to_string();
        if !spec.default.is_empty() && spec.scope != Scope::CommandLine {
            text.push_str(&format!(" (default: {})", spec.default));
        }
        let mut line = if left.len() < INDENT {
            format!("{left:<INDENT$}")
        } else {
            format!("{left}\n{:INDENT$}", "")
        };
        let mut column = INDENT;
        for word in text.split(' ') {
            if column > INDENT && column + 1 + word.len() > WIDTH {
                line.push_str(&format!("\n{:INDENT$}", ""));
                column = INDENT;
            }
            if column > INDENT {
                line.push(' ');
                column += 1;
            }
            line.push_str(word);
            column += word.len();
        }
        out.push_str(&line);
        out.push('\n');
    }
    let only_cli: Vec<String> = OPTIONS
        .iter()
        .filter(|s| s.scope == Scope::CommandLine)
        .map(|s| format!("--{}", s.name))
        .collect();
    out.push_str(&format!(
        "
Options can also be set in the environment as QPID_NAME (case is ignored, _ stands for - or .)
and, except --config, in the config file as NAME=VALUE lines (# starts a comment). The command
line wins over the environment, which wins over the config file.
Command line only: {}.
",
        only_cli.join(", ")
    ));
    out.push_str(
        "Booleans: yes/no, true/false, on/off, 1/0; a bare --flag means yes.
Durations: seconds with an optional fraction (0.5), or with a unit s, ms, us, ns (500ms, 2s).
Sizes: bytes, or with a binary suffix K, M, G, T (64K = 65536, 200M, 1.5G).
Log lines: YYYY-MM-DD HH:MM:SS [Category] level text, times in UTC. Levels: trace, debug,
info, notice, warning, error, critical; notice selects the same events as info, critical the
same as error. RULE = LEVEL[+|-][:PATTERN]: + means that level and above, - that level and
below; PATTERN matches a category (Broker, Network, Security, Protocol, Model) or any part of
a module path.
Signals: SIGTERM and SIGINT shut the broker down cleanly (exit 0); SIGHUP reopens --log-to-file.
",
    );
    out
}

/// The `--version` line.
pub fn version_text() -> String {
    format!("qpidd ({PRODUCT}) version {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn env(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_file(_: &Path) -> io::Result<String> {
        Err(io::Error::new(io::ErrorKind::NotFound, "missing"))
    }

    fn with_file(text: &'static str) -> impl Fn(&Path) -> io::Result<String> {
        move |_| Ok(text.to_string())
    }

    fn load_ok(a: &[&str], e: &[(&str, &str)], file: &'static str) -> Options {
        load(&args(a), &env(e), with_file(file)).expect("options load")
    }

    fn load_err(a: &[&str], e: &[(&str, &str)], file: &'static str) -> String {
        load(&args(a), &env(e), with_file(file))
            .expect_err("an error")
            .to_string()
    }

    #[test]
    fn defaults_parse_and_match_broker_defaults() {
        let o = load(&[], &env(&[("HOME", "/home/q")]), no_file).unwrap();
        assert_eq!(o.action, Action::Run);
        assert_eq!(o.port, 5672);
        assert_eq!(o.data_dir, Some(PathBuf::from("/home/q/.qpidd")));
        assert_eq!(o.pidfile, PathBuf::from("/home/q/.qpidd/qpidd.5672.pid"));
        assert!(!o.pidfile_explicit);
        assert!(o.auth && o.log.to_stderr && !o.daemon);
        assert_eq!(o.log.enable, vec!["notice+".parse::<LogRule>().unwrap()]);
        assert_eq!(o.config_file, None);
        assert_eq!(o.wait, Duration::from_secs(600));
        assert_eq!(o.limits.memory_high_watermark, Watermark::Fraction(0.4));
        let ours = o.broker_config(Some(1000));
        let lib = BrokerConfig::default();
        assert_eq!(ours.memory_high_watermark_bytes, 400);
        let same = |c: &BrokerConfig| {
            (
                c.auth,
                c.max_connections,
                c.reserved_admin_connections,
                c.channel_max,
                c.frame_max,
                c.max_message_size,
                c.max_unacked_per_channel,
                c.heartbeat_s,
                c.default_queue_limit_bytes,
                (c.max_queues, c.max_exchanges, c.max_consumers_per_channel),
                c.max_negotiate_time,
                c.queue_purge_interval,
            )
        };
        assert_eq!(same(&ours), same(&lib));
        // The HA defaults.
        assert_eq!(o.ha.backup_timeout, Duration::from_secs(10));
        assert_eq!(o.ha.flow_messages, 1000);
        // The link defaults, the same in the option table and in the library.
        let lib = broker_core::HaConfig::default();
        assert_eq!(o.ha.link_heartbeat_interval, Duration::from_secs(5));
        assert_eq!(o.ha.link_heartbeat_interval, lib.link_heartbeat_interval);
        assert_eq!(o.ha.link_maintenance_interval, Duration::from_millis(500));
        assert_eq!(
            o.ha.link_maintenance_interval,
            lib.link_maintenance_interval
        );
        assert_eq!(o.ha.ack_timeout, lib.ack_timeout);
        assert_eq!(o.ha.max_config_backlog, lib.max_config_backlog);
    }

    #[test]
    fn every_default_in_the_table_is_valid() {
        for spec in OPTIONS {
            if spec.default.is_empty() || spec.default.contains(['$', '<', ' ']) {
                continue;
            }
            check_value(spec, spec.default).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        }
    }

    #[test]
    fn precedence_is_command_line_then_env_then_file() {
        let file = "port=1111\nmax-queues=7\nheartbeat=5\n";
        let e = [("QPID_PORT", "2222"), ("QPID_MAX_QUEUES", "8")];
        let o = load_ok(&["--port", "3333"], &e, file);
        assert_eq!(o.port, 3333);
        assert_eq!(o.limits.max_queues, 8);
        assert_eq!(o.limits.heartbeat_s, 5);
        let o = load_ok(&[], &e, file);
        assert_eq!(o.port, 2222);
        let o = load_ok(&[], &[], file);
        assert_eq!((o.port, o.limits.max_queues), (1111, 7));
        assert_eq!(o.config_file, Some(PathBuf::from(DEFAULT_CONFIG_FILE)));
    }

    #[test]
    fn repeatable_options_come_whole_from_one_source() {
        let file = "log-enable=debug+:Broker\nlog-enable=info+\ninterface=10.0.0.1\n";
        let o = load_ok(&["--interface", "127.0.0.1", "--interface=::1"], &[], file);
        assert_eq!(o.interfaces, vec!["127.0.0.1", "::1"]);
        assert_eq!(o.log.enable.len(), 2);
        let o = load_ok(&[], &[("QPID_LOG_ENABLE", "trace+")], file);
        assert_eq!(o.log.enable, vec!["trace+".parse::<LogRule>().unwrap()]);
    }

    #[test]
    fn env_names_ignore_case_and_underscore_matches_dash() {
        let o = load_ok(
            &[],
            &[
                ("qpid_ha_cluster", "yes"),
                ("QPID_Ha_Brokers_Url", "a,b"),
                ("QPID_SSL_CERT_DB", "x"),
            ],
            "",
        );
        assert!(o.ha.cluster);
        assert_eq!(o.ha.brokers_url, "a,b");
        // Command-line-only options are not taken from the environment.
        let o = load_ok(&[], &[("QPID_QUIT", "yes")], "");
        assert_eq!(o.action, Action::Run);
        let e = load_err(&[], &[("QPID_PORT", "x")], "");
        assert!(e.contains("environment variable QPID_PORT"), "{e}");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn config_file_errors_name_file_and_line() {
        let e = load_err(&["--config", "/x/q.conf"], &[], "# c\n\nport=1\nbogus=2\n");
        assert_eq!(e, "/x/q.conf, line 4: unknown option 'bogus'");
        let e = load_err(&["--config", "/x/q.conf"], &[], "port 5\n");
        assert!(
            e.starts_with("/x/q.conf, line 1: expected name=value"),
            "{e}"
        );
        let e = load_err(&["--config=/x/q.conf"], &[], "\nheartbeat=soon\n");
        assert!(e.contains("option heartbeat (/x/q.conf, line 2)"), "{e}");
        let e = load_err(&["--config=/x/q.conf"], &[], "config=/other\n");
        assert!(e.contains("cannot be set in a config file"), "{e}");
        let e = load_err(&["--config=/x/q.conf"], &[], "port=1\nport=2\n");
        assert!(e.contains("more than once") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn config_file_missing() {
        // Named explicitly: an error.
        let e = load(&args(&["--config", "/nope.conf"]), &[], no_file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read configuration file /nope.conf"),
            "{e}"
        );
        let e = load(&[], &env(&[("QPID_CONFIG", "/env.conf")]), no_file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/env.conf"), "{e}");
        // The default: skipped silently.
        assert!(load(&[], &[], no_file).unwrap().config_file.is_none());
        // Another error on the default file is reported.
        let denied = |_: &Path| Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        assert!(load(&[], &[], denied).is_err());
    }

    #[test]
    fn config_file_comments_blank_lines_and_spaces() {
        let o = load_ok(
            &[],
            &[],
            "# qpidd.conf\n\n  auth = no  \n# port=9\nha-replicate=all\n",
        );
        assert!(!o.auth);
        assert_eq!(o.port, 5672);
        assert_eq!(o.ha.replicate, ReplicateLevel::All);
    }

    #[test]
    fn booleans() {
        for (word, want) in [
            ("yes", true),
            ("No", false),
            ("TRUE", true),
            ("false", false),
            ("on", true),
            ("off", false),
            ("1", true),
            ("0", false),
        ] {
            assert_eq!(parse_bool(word), Some(want), "{word}");
            let o = load_ok(&["--auth", word], &[], "");
            assert_eq!(o.auth, want, "{word}");
            let o = load_ok(&[&format!("--auth={word}")], &[], "");
            assert_eq!(o.auth, want, "{word}");
        }
        assert_eq!(parse_bool("maybe"), None);
        // A bare flag means yes, and the next option is not eaten.
        let o = load_ok(&["--ha-cluster", "--port", "7"], &[], "auth=no\n");
        assert!(o.ha.cluster);
        assert_eq!(o.port, 7);
        assert!(!o.auth);
        let o = load_ok(&["-d"], &[], "");
        assert!(o.daemon);
        let e = load_err(&["--auth=maybe"], &[], "");
        assert_eq!(
            e,
            "invalid value 'maybe' for option --auth: expected yes/no, true/false, on/off or 1/0"
        );
        let e = load_err(&["--auth", "maybe"], &[], "");
        assert!(e.contains("unexpected argument 'maybe'"), "{e}");
    }

    #[test]
    fn ha_settings_reach_the_broker_config() {
        let o = load_ok(
            &[
                "--ha-queue-replication",
                "--ha-brokers-url",
                " none ",
                "--ha-replicate=all",
            ],
            &[("QPID_HA_PUBLIC_URL", "amqp:tcp:vip:5672")],
            "ha-password=secret\nha-username=hauser\n",
        );
        let ha = o.broker_config(Some(1000)).ha;
        assert!(ha.queue_replication && !ha.cluster && ha.enabled());
        assert_eq!(ha.brokers_url, "");
        assert_eq!(ha.public_url, "amqp:tcp:vip:5672");
        assert_eq!(ha.replicate, broker_core::ReplicateLevel::All);
        assert_eq!(
            (ha.username.as_str(), ha.password.as_str()),
            ("hauser", "secret")
        );
        assert!(!format!("{ha:?}").contains("secret"));
        assert!(!load_ok(&[], &[], "").broker_config(None).ha.enabled());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5 s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("10ns"), Some(Duration::from_nanos(10)));
        assert_eq!(parse_duration(".1"), Some(Duration::from_millis(100)));
        for bad in ["", "s", "-1", "1m", "1e3", "1.2.3", "two", "inf", "NaN"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let o = load_ok(
            &[
                "--link-maintenance-interval",
                "0.1",
                "--ha-backup-timeout=250ms",
            ],
            &[],
            "",
        );
        assert_eq!(o.ha.link_maintenance_interval, Duration::from_millis(100));
        assert_eq!(o.ha.backup_timeout, Duration::from_millis(250));
        let e = load_err(&["--heartbeat", "1.5"], &[], "");
        assert!(
            e.contains("--heartbeat") && e.contains("whole number"),
            "{e}"
        );
        let e = load_err(&["--queue-purge-interval", "0"], &[], "");
        assert!(e.contains("above 0"), "{e}");
        let e = load_err(&["--max-negotiate-time", "soon"], &[], "");
        assert!(
            e.contains("--max-negotiate-time") && e.contains("duration"),
            "{e}"
        );
        let o = load_ok(&["--heartbeat", "0"], &[], "");
        assert_eq!(o.limits.heartbeat_s, 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("200M"), Some(200 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("2GB"), Some(2 << 30));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in ["", "K", "-1", "1X", "0.5", "1.1K", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        let o = load_ok(
            &["--max-message-size", "1M", "--default-queue-limit=100M"],
            &[],
            "",
        );
        assert_eq!(o.limits.max_message_size, 1 << 20);
        assert_eq!(o.limits.default_queue_limit, 100 << 20);
        let o = load_ok(&["--frame-max", "4096"], &[], "");
        assert_eq!(o.limits.frame_max, 4096);
        let e = load_err(&["--frame-max", "4095"], &[], "");
        assert!(e.contains("--frame-max") && e.contains("from 4096"), "{e}");
        let e = load_err(&["--frame-max", "8G"], &[], "");
        assert!(e.contains("--frame-max"), "{e}");
    }

    #[test]
    fn watermark() {
        assert_eq!(Watermark::parse("0.4"), Some(Watermark::Fraction(0.4)));
        assert_eq!(Watermark::parse("1"), Some(Watermark::Fraction(1.0)));
        assert_eq!(Watermark::parse("200M"), Some(Watermark::Bytes(200 << 20)));
        assert_eq!(
            Watermark::parse("5000000"),
            Some(Watermark::Bytes(5_000_000))
        );
        for bad in ["0", "1.5", "-0.2", "x", "0M"] {
            assert_eq!(Watermark::parse(bad), None, "{bad}");
        }
        assert_eq!(Watermark::Fraction(0.5).resolve(Some(1 << 30)), 1 << 29);
        assert_eq!(Watermark::Fraction(0.5).resolve(None), u64::MAX);
        assert_eq!(Watermark::Bytes(7).resolve(Some(1 << 30)), 7);
        let o = load_ok(&["--memory-high-watermark", "200M"], &[], "");
        assert_eq!(
            o.broker_config(Some(1 << 40)).memory_high_watermark_bytes,
            200 << 20
        );
        let e = load_err(&["--memory-high-watermark", "1.5"], &[], "");
        assert!(
            e.contains("--memory-high-watermark") && e.contains("fraction"),
            "{e}"
        );
        let meminfo = "MemTotal:       24534340 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some(24_534_340 * 1024));
        assert_eq!(parse_meminfo("nothing"), None);
    }

    #[test]
    fn bad_values_name_the_option() {
        let e = load_err(&["--port", "70000"], &[], "");
        assert_eq!(
            e,
            "invalid value '70000' for option --port: expected an integer from 0 to 65535"
        );
        let e = load_err(&["-p", "x"], &[], "");
        assert!(e.contains("--port"), "{e}");
        let e = load_err(&["--channel-max", "0"], &[], "");
        assert!(e.contains("--channel-max"), "{e}");
        let e = load_err(&["--ha-replicate", "some"], &[], "");
        assert!(e.contains("none, configuration, all"), "{e}");
        let e = load_err(&["--log-enable", "loud+"], &[], "");
        assert!(e.contains("--log-enable") && e.contains("loud"), "{e}");
        let e = load_err(&["--bogus"], &[], "");
        assert!(e.contains("unknown option '--bogus'"), "{e}");
        let e = load_err(&["-z"], &[], "");
        assert!(e.contains("unknown option '-z'"), "{e}");
        let e = load_err(&["--port"], &[], "");
        assert!(e.contains("needs a value"), "{e}");
        let e = load_err(&["--pidfile", "--daemon"], &[], "");
        assert!(e.contains("--pidfile needs a value"), "{e}");
        let e = load_err(&["--port", "1", "--port", "2"], &[], "");
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn short_options_and_inline_values() {
        let o = load_ok(&["-p5673", "-w", "2s"], &[], "");
        assert_eq!(o.port, 5673);
        assert_eq!(o.wait, Duration::from_secs(2));
        let o = load_ok(&["-p=5674"], &[], "");
        assert_eq!(o.port, 5674);
    }

    #[test]
    fn actions() {
        assert_eq!(
            load_ok(&["-h", "--port", "x"], &[], "").action,
            Action::Help
        );
        assert_eq!(load_ok(&["--version"], &[], "").action, Action::Version);
        assert_eq!(load_ok(&["-c"], &[], "").action, Action::Check);
        assert_eq!(load_ok(&["--quit"], &[], "").action, Action::Quit);
        let o = load_ok(&["--user-add", "bob", "--user-tags", "admin, ha"], &[], "");
        assert_eq!(o.action, Action::UserAdd);
        assert_eq!(o.user_name.as_deref(), Some("bob"));
        assert_eq!(o.user_tags, vec!["admin", "ha"]);
        assert_eq!(
            load_ok(&["--user-del", "bob"], &[], "").action,
            Action::UserDel
        );
        assert_eq!(load_ok(&["--user-list"], &[], "").action, Action::UserList);
        let e = load_err(&["--check", "--quit"], &[], "");
        assert!(e.contains("cannot be used together"), "{e}");
        let e = load_err(&["--user-tags", "admin"], &[], "");
        assert!(e.contains("only with --user-add"), "{e}");
        let e = load_err(&[], &[], "user-list=yes\n");
        assert!(e.contains("cannot be set in a config file"), "{e}");
    }

    #[test]
    fn data_dir_and_pidfile() {
        let o = load_ok(&["--no-data-dir", "--port", "0"], &[("HOME", "/h")], "");
        assert_eq!(o.data_dir, None);
        assert_eq!(o.pidfile, PathBuf::from("/h/.qpidd/qpidd.0.pid"));
        let o = load_ok(&["--data-dir", "/d"], &[], "");
        assert_eq!(o.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(o.pidfile, PathBuf::from("/d/qpidd.5672.pid"));
        let o = load_ok(&["--data-dir", "/d", "--pid-dir", "/run/q"], &[], "");
        assert_eq!(o.pidfile, PathBuf::from("/run/q/qpidd.5672.pid"));
        let o = load_ok(&["--pidfile", "/run/q.pid"], &[], "");
        assert_eq!(o.pidfile, PathBuf::from("/run/q.pid"));
        assert!(o.pidfile_explicit);
        let o = load_ok(&[], &[], "");
        assert_eq!(o.data_dir, Some(PathBuf::from("/tmp/.qpidd")));
    }

    #[test]
    fn help_lists_every_option_with_defaults() {
        let help = help_text();
        assert!(help.starts_with("Usage: qpidd [OPTIONS]\n"));
        for spec in OPTIONS {
            assert!(help.contains(&format!("--{}", spec.name)), "{}", spec.name);
        }
        assert!(help.contains("(default: 5672)"));
        assert!(help.contains("(default: notice+)"));
        assert_eq!(
            version_text(),
            format!("qpidd (qpid-rs) version {}", env!("CARGO_PKG_VERSION"))
        );
    }
}
