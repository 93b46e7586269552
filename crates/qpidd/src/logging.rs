//! Qpid-style logging on top of `tracing`: lines `YYYY-MM-DD HH:MM:SS [Category] level text`
//! (UTC), filtered by `--log-enable`/`--log-disable` rules, written to stderr and/or a file
//! that SIGHUP reopens. Logging never writes to stdout.
//!
//! Levels. Qpid has seven, tracing five. A rule's level selects tracing levels as follows:
//! trace → TRACE, debug → DEBUG, info and notice → INFO, warning → WARN, error and critical →
//! ERROR (so the default `notice+` shows INFO and above). Printed words: TRACE `trace`, DEBUG
//! `debug`, INFO `info`, WARN `warning`, ERROR `error`; an INFO event with the field
//! `notice = true` prints `notice` and an ERROR event with `critical = true` prints `critical`.
//!
//! Category. The event's target: `Broker`, `Network`, ... as given; a module path such as
//! `broker_core::server` becomes its last component capitalised (`Server`).

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use broker_core::mgmt::{LogControl, LogControlError};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::options::LogOptions;

/// Qpid's log levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QpidLevel {
    Trace,
    Debug,
    Info,
    Notice,
    Warning,
    Error,
    Critical,
}

impl QpidLevel {
    /// The level's word in rules.
    pub fn word(self) -> &'static str {
        match self {
            QpidLevel::Trace => "trace",
            QpidLevel::Debug => "debug",
            QpidLevel::Info => "info",
            QpidLevel::Notice => "notice",
            QpidLevel::Warning => "warning",
            QpidLevel::Error => "error",
            QpidLevel::Critical => "critical",
        }
    }

    fn parse(word: &str) -> Option<QpidLevel> {
        Some(match word.to_ascii_lowercase().as_str() {
            "trace" => QpidLevel::Trace,
            "debug" => QpidLevel::Debug,
            "info" => QpidLevel::Info,
            "notice" => QpidLevel::Notice,
            "warning" | "warn" => QpidLevel::Warning,
            "error" => QpidLevel::Error,
            "critical" => QpidLevel::Critical,
            _ => return None,
        })
    }

    /// The tracing level this Qpid level selects.
    pub fn tracing_level(self) -> Level {
        match self {
            QpidLevel::Trace => Level::TRACE,
            QpidLevel::Debug => Level::DEBUG,
            QpidLevel::Info | QpidLevel::Notice => Level::INFO,
            QpidLevel::Warning => Level::WARN,
            QpidLevel::Error | QpidLevel::Critical => Level::ERROR,
        }
    }
}

/// Severity rank of a tracing level: TRACE 0 ... ERROR 4.
fn rank(level: Level) -> u8 {
    match level {
        Level::TRACE => 0,
        Level::DEBUG => 1,
        Level::INFO => 2,
        Level::WARN => 3,
        _ => 4,
    }
}

/// Which levels around the rule's level it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `LEVEL`: that level only.
    Only,
    /// `LEVEL+`: that level and above.
    AndAbove,
    /// `LEVEL-`: that level and below.
    AndBelow,
}

/// A Qpid log rule, `LEVEL[+-][:PATTERN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRule {
    pub level: QpidLevel,
    pub direction: Direction,
    /// Matches a category (case ignored) or any part of the target (module path).
    pub pattern: Option<String>,
}

impl FromStr for LogRule {
    type Err = String;

    fn from_str(text: &str) -> Result<LogRule, String> {
        let text = text.trim();
        let (head, pattern) = match text.split_once(':') {
            Some((h, p)) if !p.is_empty() => (h, Some(p.to_string())),
            Some(_) => return Err("expected LEVEL[+-][:PATTERN], with a pattern after ':'".into()),
            None => (text, None),
        };
        let (word, direction) = if let Some(w) = head.strip_suffix('+') {
            (w, Direction::AndAbove)
        } else if let Some(w) = head.strip_suffix('-') {
            (w, Direction::AndBelow)
        } else {
            (head, Direction::Only)
        };
        let level = QpidLevel::parse(word).ok_or_else(|| {
            format!(
                "unknown log level '{word}': expected LEVEL[+-][:PATTERN] with LEVEL one of \
                 trace, debug, info, notice, warning, error, critical"
            )
        })?;
        Ok(LogRule {
            level,
            direction,
            pattern,
        })
    }
}

impl fmt::Display for LogRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.word())?;
        match self.direction {
            Direction::AndAbove => f.write_str("+")?,
            Direction::AndBelow => f.write_str("-")?,
            Direction::Only => {}
        }
        match &self.pattern {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

impl LogRule {
    /// Whether an event of `level` from `target` falls under this rule.
    pub fn matches(&self, target: &str, level: Level) -> bool {
        let (event, rule) = (rank(level), rank(self.level.tracing_level()));
        let level_ok = match self.direction {
            Direction::Only => event == rule,
            Direction::AndAbove => event >= rule,
            Direction::AndBelow => event <= rule,
        };
        level_ok
            && self.pattern.as_deref().is_none_or(|p| {
                category(target).eq_ignore_ascii_case(p)
                    || target
                        .to_ascii_lowercase()
                        .contains(&p.to_ascii_lowercase())
            })
    }

    /// The most verbose tracing level this rule can let through.
    fn most_verbose(&self) -> Level {
        match self.direction {
            Direction::AndBelow => Level::TRACE,
            _ => self.level.tracing_level(),
        }
    }
}

/// The enable and disable rules together: an event is logged when some enable rule matches and
/// no disable rule does.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub enable: Vec<LogRule>,
    pub disable: Vec<LogRule>,
}

impl LogFilter {
    /// Whether an event of `level` from `target` is logged.
    pub fn enabled(&self, target: &str, level: Level) -> bool {
        self.enable.iter().any(|r| r.matches(target, level))
            && !self.disable.iter().any(|r| r.matches(target, level))
    }

    fn max_level(&self) -> LevelFilter {
        self.enable
            .iter()
            .map(|r| LevelFilter::from_level(r.most_verbose()))
            .max()
            .unwrap_or(LevelFilter::OFF)
    }
}

/// The category shown in brackets for a target.
pub fn category(target: &str) -> String {
    let last = target.rsplit("::").next().unwrap_or(target);
    let mut chars = last.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::from("Broker"),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now() -> String {
    format_utc(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// One formatted log line, newline included.
pub fn format_line(timestamp: &str, target: &str, word: &str, text: &str) -> String {
    format!("{timestamp} [{}] {word} {text}\n", category(target))
}

/// Collects an event's message and fields.
#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
    notice: bool,
    critical: bool,
}

impl Visit for LineVisitor {
    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "notice" => self.notice = value,
            "critical" => self.critical = value,
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// Where log lines go.
#[derive(Debug)]
struct Sinks {
    stderr: AtomicBool,
    file: Mutex<Option<(PathBuf, File)>>,
}

impl Sinks {
    fn write(&self, line: &str) {
        if self.stderr.load(Ordering::Relaxed) {
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
        if let Some((_, file)) = self
            .file
            .lock()
            .ok()
            .as_deref_mut()
            .and_then(Option::as_mut)
        {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

fn open_log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open log file {}: {e}", path.display()),
            )
        })
}

/// The sinks of the installed logger, for [`critical`].
static SINKS: OnceLock<Arc<Sinks>> = OnceLock::new();

/// Controls the installed logger.
#[derive(Debug, Clone)]
pub struct LogHandle {
    sinks: Arc<Sinks>,
    filter: Arc<RwLock<LogFilter>>,
}

/// What the management methods `getLogLevel` and `setLogLevel` see: the enable rules.
impl LogControl for LogHandle {
    fn get(&self) -> String {
        let filter = self.filter.read().unwrap_or_else(|e| e.into_inner());
        let rules: Vec<String> = filter.enable.iter().map(LogRule::to_string).collect();
        rules.join(",")
    }

    fn set(&self, level: &str) -> Result<(), LogControlError> {
        let rules = level
            .split(',')
            .filter(|r| !r.trim().is_empty())
            .map(LogRule::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map_err(LogControlError::Invalid)?;
        if rules.is_empty() {
            return Err(LogControlError::Invalid("no log rule given".into()));
        }
        self.filter
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .enable = rules;
        // Callsites cached their interest and the global max level under the old rules.
        tracing::callsite::rebuild_interest_cache();
        tracing::info!(target: "Broker", notice = true, "Log level set to {level}");
        Ok(())
    }
}

impl LogHandle {
    /// Reopens the log file (after logrotate moved it). Returns the file reopened, or `None`
    /// without `--log-to-file`.
    pub fn reopen(&self) -> io::Result<Option<PathBuf>> {
        let mut guard = self
            .sinks
            .file
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        match guard.as_mut() {
            Some((path, file)) => {
                *file = open_log_file(path)?;
                Ok(Some(path.clone()))
            }
            None => Ok(None),
        }
    }

    /// Stops writing to stderr (a daemon, once detached).
    pub fn stop_stderr(&self) {
        self.sinks.stderr.store(false, Ordering::Relaxed);
    }
}

impl QpidLayer {
    fn filter(&self) -> std::sync::RwLockReadGuard<'_, LogFilter> {
        self.filter.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The tracing layer that filters and writes Qpid-style lines.
struct QpidLayer {
    filter: Arc<RwLock<LogFilter>>,
    sinks: Arc<Sinks>,
}

impl<S: Subscriber> Layer<S> for QpidLayer {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.filter().enabled(metadata.target(), *metadata.level()) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        self.filter().enabled(metadata.target(), *metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter().max_level())
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut visitor = LineVisitor::default();
        event.record(&mut visitor);
        let word = match *meta.level() {
            Level::TRACE => "trace",
            Level::DEBUG => "debug",
            Level::INFO if visitor.notice => "notice",
            Level::INFO => "info",
            Level::WARN => "warning",
            _ if visitor.critical => "critical",
            _ => "error",
        };
        visitor.message.push_str(&visitor.fields);
        self.sinks
            .write(&format_line(&now(), meta.target(), word, &visitor.message));
    }
}

/// Installs the global logger described by `options`.
pub fn init(options: &LogOptions) -> io::Result<LogHandle> {
    let file = match &options.to_file {
        Some(path) => Some((path.clone(), open_log_file(path)?)),
        None => None,
    };
    let sinks = Arc::new(Sinks {
        stderr: AtomicBool::new(options.to_stderr),
        file: Mutex::new(file),
    });
    let filter = Arc::new(RwLock::new(LogFilter {
        enable: options.enable.clone(),
        disable: options.disable.clone(),
    }));
    tracing_subscriber::registry()
        .with(QpidLayer {
            filter: filter.clone(),
            sinks: sinks.clone(),
        })
        .try_init()
        .map_err(|e| io::Error::other(format!("cannot install the logger: {e}")))?;
    let _ = SINKS.set(sinks.clone());
    Ok(LogHandle { sinks, filter })
}

/// Logs `critical Unexpected error: TEXT` whatever the filter says: to the logger's sinks, and
/// to stderr too when the logger does not write there (or is not installed yet).
pub fn critical_error(text: &str) {
    let line = format_line(
        &now(),
        "Broker",
        "critical",
        &format!("Unexpected error: {text}"),
    );
    match SINKS.get() {
        Some(sinks) => {
            sinks.write(&line);
            if !sinks.stderr.load(Ordering::Relaxed) {
                let _ = io::stderr().lock().write_all(line.as_bytes());
            }
        }
        None => {
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> LogRule {
        text.parse().unwrap()
    }

    #[test]
    fn rules_print_as_they_parse() {
        for text in [
            "notice+",
            "debug+:Management",
            "trace-",
            "error",
            "warning+:broker_core",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
    }

    #[test]
    fn rules_parse() {
        assert_eq!(
            rule("info+"),
            LogRule {
                level: QpidLevel::Info,
                direction: Direction::AndAbove,
                pattern: None
            }
        );
        assert_eq!(
            rule("debug-:Broker"),
            LogRule {
                level: QpidLevel::Debug,
                direction: Direction::AndBelow,
                pattern: Some("Broker".into())
            }
        );
        assert_eq!(rule("critical").direction, Direction::Only);
        assert!("loud+".parse::<LogRule>().is_err());
        assert!("info+:".parse::<LogRule>().is_err());
        assert!("".parse::<LogRule>().is_err());
    }

    #[test]
    fn rules_match_levels_and_patterns() {
        let notice = rule("notice+");
        assert!(notice.matches("Broker", Level::INFO));
        assert!(notice.matches("Broker", Level::ERROR));
        assert!(!notice.matches("Broker", Level::DEBUG));
        let below = rule("info-");
        assert!(below.matches("x", Level::TRACE) && below.matches("x", Level::INFO));
        assert!(!below.matches("x", Level::WARN));
        let only = rule("warning");
        assert!(only.matches("x", Level::WARN) && !only.matches("x", Level::ERROR));
        let broker = rule("debug+:Broker");
        assert!(broker.matches("Broker", Level::DEBUG));
        assert!(broker.matches("broker", Level::DEBUG));
        assert!(broker.matches("broker_core::server", Level::DEBUG));
        assert!(!broker.matches("Network", Level::DEBUG));
        let module = rule("trace+:ha_replication");
        assert!(module.matches("ha_replication::replica", Level::TRACE));
    }

    #[test]
    fn filter_combines_enable_and_disable() {
        let f = LogFilter {
            enable: vec![rule("notice+"), rule("debug+:Network")],
            disable: vec![rule("warning:Security")],
        };
        assert!(f.enabled("Network", Level::DEBUG));
        assert!(!f.enabled("Broker", Level::DEBUG));
        assert!(f.enabled("Security", Level::ERROR));
        assert!(!f.enabled("Security", Level::WARN));
        assert_eq!(f.max_level(), LevelFilter::DEBUG);
        assert_eq!(LogFilter::default().max_level(), LevelFilter::OFF);
        assert!(!LogFilter::default().enabled("Broker", Level::ERROR));
    }

    #[test]
    fn categories() {
        assert_eq!(category("Broker"), "Broker");
        assert_eq!(category("broker_core::server"), "Server");
        assert_eq!(category("qpidd"), "Qpidd");
    }

    #[test]
    fn timestamps_and_lines() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(format_utc(4_102_444_800), "2100-01-01 00:00:00");
        assert_eq!(
            format_line(
                "2024-01-02 03:04:05",
                "Broker",
                "notice",
                "Broker (pid=1) start-up"
            ),
            "2024-01-02 03:04:05 [Broker] notice Broker (pid=1) start-up\n"
        );
    }
}
