//! Test harness for the integration tests: `TestBroker` starts a real `qpidd` process on a free
//! port, captures its log and kills it on drop (printing the log when the test failed); `RawClient`
//! speaks AMQP 0-9-1 frame by frame over a plain socket for the bad-input and capability tests.
//!
//! It is not a test itself and holds no assertions about the broker beyond "it started".

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, ProtocolVersion, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};

/// How long a broker has to print its port.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a test waits for something that should happen "at once" (a reply, a close).
pub const REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// How often the polling helpers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `qpidd` binary under test: `$QPIDD_BIN`, else `<target>/<profile>/qpidd` next to the
/// `deps/` directory this test binary lives in.
pub fn qpidd_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("QPIDD_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test binary's own path");
    let mut dir = exe
        .parent()
        .expect("the test binary's directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("qpidd");
    assert!(
        bin.exists(),
        "qpidd not found at {} (build it with `cargo build --workspace --bins`, or set QPIDD_BIN)",
        bin.display()
    );
    bin
}

/// The `qpid-config` binary under test: `$QPID_CONFIG_BIN`, else next to `qpidd_path()`.
pub fn qpid_config_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("QPID_CONFIG_BIN") {
        return PathBuf::from(bin);
    }
    let bin = qpidd_path().with_file_name("qpid-config");
    assert!(
        bin.exists(),
        "qpid-config not found at {} (build it with `cargo build --workspace --bins`, or set QPID_CONFIG_BIN)",
        bin.display()
    );
    bin
}

/// The `qpid-ha` binary under test: `$QPID_HA_BIN`, else next to `qpidd_path()`.
pub fn qpid_ha_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("QPID_HA_BIN") {
        return PathBuf::from(bin);
    }
    let bin = qpidd_path().with_file_name("qpid-ha");
    assert!(
        bin.exists(),
        "qpid-ha not found at {} (build it with `cargo build --workspace --bins`, or set QPID_HA_BIN)",
        bin.display()
    );
    bin
}

/// A `Command` for the `qpidd` under test, with no arguments and an empty `QPID_*` environment
/// (so a developer's settings cannot leak into a test).
pub fn qpidd_command() -> Command {
    let mut command = Command::new(qpidd_path());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QPID_") {
            command.env_remove(name);
        }
    }
    command
}

/// What a `qpidd` run to completion printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `qpidd args...` to completion (stdin empty, or `stdin` when given), killing it after
/// `deadline`. For `--help`, `--version`, refused start-ups and the user commands.
pub fn run_qpidd<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
    stdin: Option<&str>,
    deadline: Duration,
) -> Finished {
    let mut command = qpidd_command();
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn qpidd");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        let _ = input.write_all(text.as_bytes());
    }
    drop(input);
    let stdout = capture(child.stdout.take().expect("stdout"));
    let stderr = capture(child.stderr.take().expect("stderr"));
    let status = wait_child(&mut child, deadline).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "qpidd {:?} did not exit within {deadline:?}; stderr:\n{}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            text_of(&stderr)
        )
    });
    let (stdout, stderr) = (join_capture(stdout), join_capture(stderr));
    Finished {
        status,
        stdout,
        stderr,
    }
}

type Captured = (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>);

fn capture(mut pipe: impl Read + Send + 'static) -> Captured {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buffer, handle)
}

fn text_of(captured: &Captured) -> String {
    String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned()
}

fn join_capture(captured: Captured) -> String {
    let (buffer, handle) = captured;
    let _ = handle.join();
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

/// Polls `child` until it exits or `deadline` passes.
fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Adds a user to the users file of `data_dir` with `qpidd --user-add` (password on stdin),
/// with `tags` (comma list) when not empty, and asserts that it worked.
pub fn add_user(data_dir: &Path, name: &str, tags: &str, password: &str) {
    let mut args = vec![
        std::ffi::OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        std::ffi::OsStr::new("--user-add"),
        std::ffi::OsStr::new(name),
    ];
    if !tags.is_empty() {
        args.push(std::ffi::OsStr::new("--user-tags"));
        args.push(std::ffi::OsStr::new(tags));
    }
    let stdin = format!("{password}\n");
    let add = run_qpidd(&args, &[], Some(stdin.as_str()), Duration::from_secs(20));
    assert!(add.status.success(), "--user-add: {add:?}");
}

/// Polls `condition` until it holds (true) or `deadline` passes (false).
pub fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The async form of `wait_until`, for tests running lapin on a tokio runtime (a blocking sleep
/// there would stall the client's own I/O).
pub async fn eventually<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Awaits `future` for at most `REPLY_DEADLINE`, panicking with `what` when it takes longer.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    within_for(REPLY_DEADLINE, what, future).await
}

/// Awaits `future` for at most `deadline`, panicking with `what` when it takes longer.
pub async fn within_for<T>(
    deadline: Duration,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(deadline, future).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// The AMQP reply code carried by a lapin error (a channel or connection close), if any.
pub fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Asserts that `result` failed with AMQP reply `code`, and returns the error's text.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16) -> String {
    match result {
        Ok(v) => panic!("expected AMQP error {code}, got success: {v:?}"),
        Err(e) => {
            assert_eq!(
                amqp_code(&e),
                Some(code),
                "expected AMQP error {code}, got {e:?}"
            );
            e.to_string()
        }
    }
}

static NEXT_TEMP_DIR: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(purpose: &str) -> TempDir {
        let n = NEXT_TEMP_DIR.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("qpidd-it-{purpose}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the broker keeps its data.
#[derive(Debug)]
enum DataDir {
    None,
    Temp,
    At(PathBuf),
}

/// Options for a `TestBroker`: `TestBroker::builder().arg("--max-connections").arg("2").start()`.
#[derive(Debug)]
pub struct TestBrokerBuilder {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    data_dir: DataDir,
    auth: bool,
    port_from_env: bool,
    port: Option<u16>,
}

impl TestBrokerBuilder {
    /// Gives the port as `QPID_PORT=0` in the environment instead of `--port 0`.
    pub fn port_from_env(mut self) -> Self {
        self.port_from_env = true;
        self
    }

    /// Listens on `port` instead of a free one (to restart a broker where it was).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds one command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the broker.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `--auth yes` (default: `--auth no`, so most tests do not depend on the users file).
    pub fn auth(mut self, yes: bool) -> Self {
        self.auth = yes;
        self
    }

    /// A fresh temporary `--data-dir`, removed when the broker is dropped.
    pub fn temp_data_dir(mut self) -> Self {
        self.data_dir = DataDir::Temp;
        self
    }

    /// `--data-dir DIR` (kept after the broker is dropped).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = DataDir::At(dir.into());
        self
    }

    /// Starts the broker and waits for its port line, panicking (with its log) when it fails.
    pub fn start(self) -> TestBroker {
        match self.try_start() {
            Ok(broker) => broker,
            Err(failure) => panic!("qpidd did not start: {failure}"),
        }
    }

    /// Starts the broker; `Err` describes why it printed no port within `START_DEADLINE`.
    pub fn try_start(self) -> Result<TestBroker, String> {
        let temp_dir = match &self.data_dir {
            DataDir::Temp => Some(TempDir::new("data")),
            _ => None,
        };
        let mut command = qpidd_command();
        let port = self.port.unwrap_or(0).to_string();
        if self.port_from_env {
            command.env("QPID_PORT", &port);
        } else {
            command.arg("--port").arg(&port);
        }
        match (&self.data_dir, &temp_dir) {
            (DataDir::At(dir), _) => {
                command.arg("--data-dir").arg(dir);
            }
            (_, Some(temp)) => {
                command.arg("--data-dir").arg(temp.path());
            }
            _ => {
                command.arg("--no-data-dir");
            }
        }
        command
            .arg("--auth")
            .arg(if self.auth { "yes" } else { "no" })
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", qpidd_path().display()))?;
        let stderr = capture(child.stderr.take().expect("stderr"));
        let stdout_rest = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let rest = stdout_rest.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let _ = port_tx.send(first);
            let _ = reader.read_to_end(&mut rest.lock().unwrap());
        });
        let first_line = port_rx.recv_timeout(START_DEADLINE);
        let fail = |child: &mut Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{why}\n--- qpidd log ---\n{}", text_of(&stderr)))
        };
        let first_line = match first_line {
            Ok(line) => line,
            Err(_) => {
                return fail(
                    &mut child,
                    format!("no port line within {START_DEADLINE:?}"),
                );
            }
        };
        let port = match first_line.trim_end_matches('\n').parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return fail(
                    &mut child,
                    format!("the first stdout line is not a port: {first_line:?}"),
                );
            }
        };
        Ok(TestBroker {
            child,
            port,
            first_stdout_line: first_line,
            stdout_rest,
            stderr: stderr.0,
            stderr_reader: Some(stderr.1),
            exit_status: None,
            _temp_dir: temp_dir,
        })
    }
}

/// A running `qpidd` process on its own free port. Dropping it kills the process; when the
/// test is panicking, the broker's log is printed to stderr first.
pub struct TestBroker {
    child: Child,
    port: u16,
    first_stdout_line: String,
    stdout_rest: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The thread copying stderr; joined once the process has exited, so `log()` then holds
    /// everything the broker wrote.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    exit_status: Option<ExitStatus>,
    _temp_dir: Option<TempDir>,
}

impl TestBroker {
    /// A broker with the default options (`--auth no`, no data dir).
    pub fn start() -> TestBroker {
        TestBroker::builder().start()
    }

    pub fn builder() -> TestBrokerBuilder {
        TestBrokerBuilder {
            args: Vec::new(),
            env: Vec::new(),
            data_dir: DataDir::None,
            auth: false,
            port_from_env: false,
            port: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        self.url_for("guest", "guest")
    }

    /// The URL for another user, on the default vhost.
    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }

    /// A lapin connection as guest, panicking when it is refused.
    pub async fn connect(&self) -> Connection {
        self.connect_with(ConnectionProperties::default()).await
    }

    /// A lapin connection as guest with `props`, panicking when it is refused.
    pub async fn connect_with(&self, props: ConnectionProperties) -> Connection {
        match self.try_connect_url(&self.amqp_url(), props).await {
            Ok(conn) => conn,
            Err(e) => panic!("cannot connect to the broker on port {}: {e:?}", self.port),
        }
    }

    /// A lapin connection to `url`, bounded by `REPLY_DEADLINE`.
    pub async fn try_connect_url(
        &self,
        url: &str,
        props: ConnectionProperties,
    ) -> lapin::Result<Connection> {
        within("the AMQP handshake", Connection::connect(url, props)).await
    }

    /// The broker's stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The first line the broker printed on stdout (the port line, with its newline).
    pub fn first_stdout_line(&self) -> &str {
        &self.first_stdout_line
    }

    /// What the broker printed on stdout after the port line, so far.
    pub fn stdout_after_port(&self) -> String {
        String::from_utf8_lossy(&self.stdout_rest.lock().unwrap()).into_owned()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exit_status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit_status = Some(status);
                false
            }
            _ => true,
        }
    }

    /// Sends SIGTERM.
    pub fn stop(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`, `KILL`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
        // A stop takes effect thread by thread: wait until every thread is stopped (or, for a
        // continue, none is), so that what the test does next happens to a frozen (or running)
        // process.
        let frozen = match name {
            "STOP" => true,
            "CONT" => false,
            _ => return,
        };
        let pid = self.child.id();
        let settled = wait_until(Duration::from_secs(10), || {
            thread_states(pid).is_none_or(|states| {
                !states.is_empty() && states.iter().all(|&s| (s == 'T') == frozen)
            })
        });
        assert!(
            settled,
            "after kill -{name} {pid} the thread states are {:?}",
            thread_states(pid)
        );
    }

    /// Whether every thread of the process is stopped (`T` in `/proc/<pid>/task/*/stat`).
    pub fn is_frozen(&self) -> bool {
        thread_states(self.child.id()).is_some_and(|s| !s.is_empty() && s.iter().all(|&c| c == 'T'))
    }

    /// Waits for the process to exit, panicking after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(status) = self.exit_status {
            return status;
        }
        match wait_child(&mut self.child, deadline) {
            Some(status) => {
                self.exit_status = Some(status);
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                status
            }
            None => panic!("qpidd did not exit within {deadline:?}"),
        }
    }

    /// Checks that the broker process is still alive, panicking with its exit status if not.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        assert!(
            self.is_running(),
            "the broker process died: {:?}",
            self.exit_status
        );
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- qpidd log (port {}, pid {}) ---\n{}--- end of qpidd log ---",
                self.port,
                self.child.id(),
                self.log()
            );
        }
    }
}

/// The state letter of each thread of `pid` (`R`, `S`, `T`, ...), or None when the process is
/// gone.
fn thread_states(pid: u32) -> Option<Vec<char>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut states = Vec::new();
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (comm) S ...": the state follows the last ')'.
        if let Some(state) = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next())
        {
            states.push(state);
        }
    }
    Some(states)
}

// ---- raw AMQP over a plain socket ---------------------------------------------------------

/// Encodes one frame with amq-protocol.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new())).expect("encode a frame");
    ctx.into_inner().0
}

/// Encodes a method frame.
pub fn method_frame(channel_id: u16, method: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel_id, method))
}

/// The client's protocol header, `AMQP\x00\x00\x09\x01`.
pub const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// A connection.close as the broker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReply {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

/// An AMQP 0-9-1 client speaking frame by frame over a blocking socket.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Opens a socket to the broker; nothing is sent yet.
    pub fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Connects and completes the handshake (PLAIN guest/guest, the broker's tune values,
    /// vhost `/`), returning the client and the broker's connection.start.
    pub fn open(port: u16) -> (RawClient, connection::Start) {
        let mut client = RawClient::connect(port);
        let start = client.handshake_to_open(FieldTable::default());
        (client, start)
    }

    /// Sends the protocol header and start-ok (PLAIN guest/guest with `client_properties`),
    /// returning the broker's connection.start and connection.tune.
    pub fn negotiate_to_tune(
        &mut self,
        client_properties: FieldTable,
    ) -> (connection::Start, connection::Tune) {
        self.send(PROTOCOL_HEADER);
        let start = match self.read_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => start,
            other => panic!("expected connection.start, got {other:?}"),
        };
        self.send(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: LongString::from("\0guest\0guest"),
                locale: "en_US".into(),
            })),
        ));
        let tune = match self.read_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => tune,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        (start, tune)
    }

    /// Sends the protocol header and completes the handshake with `client_properties`.
    pub fn handshake_to_open(&mut self, client_properties: FieldTable) -> connection::Start {
        let (start, tune) = self.negotiate_to_tune(client_properties);
        self.send(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat: 0,
            })),
        ));
        self.send(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ));
        match self.read_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        start
    }

    /// Opens channel `id` and waits for channel.open-ok.
    pub fn open_channel(&mut self, id: u16) {
        self.send(&method_frame(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ));
        match self.read_method() {
            (ch, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if ch == id => {}
            other => panic!("expected channel.open-ok on {id}, got {other:?}"),
        }
    }

    /// Writes raw bytes (errors ignored: the broker may already have closed).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads the next frame, skipping heartbeats. `None` when the broker closed the socket;
    /// panics after `REPLY_DEADLINE` or on bytes amq-protocol cannot parse.
    pub fn read_frame(&mut self) -> Option<AMQPFrame> {
        let end = Instant::now() + REPLY_DEADLINE;
        loop {
            if !self.buffer.is_empty() {
                match parse_frame(&self.buffer[..]) {
                    Ok((rest, frame)) => {
                        let used = self.buffer.len() - rest.len();
                        self.buffer.drain(..used);
                        if matches!(frame, AMQPFrame::Heartbeat) {
                            continue;
                        }
                        return Some(frame);
                    }
                    Err(e) if e.is_incomplete() => {}
                    Err(e) => panic!(
                        "unparsable bytes from the broker ({e:?}): {:?}",
                        self.buffer
                    ),
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no frame from the broker within {REPLY_DEADLINE:?}"
            );
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("reading from the broker: {e}"),
            }
        }
    }

    /// Reads the next frame, which must be a method: `(channel, method)`.
    pub fn read_method(&mut self) -> (u16, AMQPClass) {
        match self.read_frame() {
            Some(AMQPFrame::Method(ch, method)) => (ch, method),
            other => panic!("expected a method frame, got {other:?}"),
        }
    }

    /// Reads all the raw bytes until the broker closes the socket (bounded by
    /// `REPLY_DEADLINE`), for replies that are not frames (a protocol header).
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let end = Instant::now() + REPLY_DEADLINE;
        let mut all = std::mem::take(&mut self.buffer);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the broker did not close the socket within {REPLY_DEADLINE:?}; got {all:?}"
            );
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return all,
            }
        }
    }

    /// Expects connection.close on channel 0, answers close-ok, and checks the socket is then
    /// closed by the broker. Returns what the close said.
    pub fn expect_connection_close(&mut self) -> CloseReply {
        let close = loop {
            match self.read_frame() {
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(close)),
                )) => break close,
                // Frames the broker sent before it noticed the error are skipped.
                Some(AMQPFrame::Method(_, AMQPClass::Connection(other))) => {
                    panic!("expected connection.close, got connection method {other:?}")
                }
                Some(_) => continue,
                None => panic!("the broker closed the socket without connection.close"),
            }
        };
        self.send(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ));
        let rest = self.read_to_close();
        assert!(
            rest.is_empty() || parse_frame(&rest[..]).is_ok(),
            "garbage after connection.close: {rest:?}"
        );
        CloseReply {
            code: close.reply_code,
            text: close.reply_text.as_str().to_owned(),
            class_id: close.class_id,
            method_id: close.method_id,
        }
    }

    /// Expects channel.close on `id` and answers close-ok. Returns what the close said.
    pub fn expect_channel_close(&mut self, id: u16) -> CloseReply {
        loop {
            match self.read_frame() {
                Some(AMQPFrame::Method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::Close(close)),
                )) if ch == id => {
                    self.send(&method_frame(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    ));
                    return CloseReply {
                        code: close.reply_code,
                        text: close.reply_text.as_str().to_owned(),
                        class_id: close.class_id,
                        method_id: close.method_id,
                    };
                }
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(close)),
                )) => panic!("expected channel.close, got connection.close {close:?}"),
                Some(_) => continue,
                None => panic!("the broker closed the socket without channel.close"),
            }
        }
    }
}

/// A value from a field table, by key.
pub fn field<'a>(table: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    table.inner().get(key)
}

/// Publishes one message to `queue` through the default exchange and consumes it back with a
/// fresh lapin connection: the "broker still serves clients" check after a bad-input case.
pub async fn assert_serves_fresh_client(broker: &TestBroker) {
    use futures_lite::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    let conn = broker.connect().await;
    let ch = within("channel.open", conn.create_channel())
        .await
        .expect("open a channel");
    let queue = within(
        "queue.declare",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare a queue");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            b"still alive",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish");
    assert!(
        within("the publish confirm", confirm)
            .await
            .expect("confirm")
            .is_ack()
    );
    let mut consumer = ch
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = within("the delivery", consumer.next())
        .await
        .expect("a delivery")
        .expect("a delivery, not an error");
    assert_eq!(delivery.data, b"still alive");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    let _ = conn.close(200, "bye".into()).await;
}

/// The protocol version amq-protocol speaks (0-9-1).
pub fn amqp_0_9_1() -> ProtocolVersion {
    ProtocolVersion::amqp_0_9_1()
}

// ---- lapin helpers --------------------------------------------------------------------------

/// A field table from `(key, value)` pairs.
pub fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Opens a channel, bounded by `REPLY_DEADLINE`.
pub async fn channel(conn: &Connection) -> lapin::Channel {
    within("channel.open", conn.create_channel())
        .await
        .expect("open a channel")
}

/// Declares a queue with `options` and `arguments`, bounded by `REPLY_DEADLINE`.
pub async fn try_declare(
    ch: &lapin::Channel,
    name: &str,
    options: lapin::options::QueueDeclareOptions,
    arguments: FieldTable,
) -> lapin::Result<lapin::Queue> {
    within(
        "queue.declare",
        ch.queue_declare(name.into(), options, arguments),
    )
    .await
}

/// Opens a channel in confirm mode, bounded by `REPLY_DEADLINE`.
pub async fn confirming(conn: &Connection) -> lapin::Channel {
    let ch = channel(conn).await;
    within("confirm.select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    ch
}

/// Declares a durable queue with `arguments` and panics on failure.
pub async fn declare_durable(ch: &lapin::Channel, name: &str, arguments: FieldTable) {
    let options = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    try_declare(ch, name, options, arguments)
        .await
        .unwrap_or_else(|e| panic!("declare durable queue {name:?}: {e:?}"));
}

/// The properties of a persistent message (delivery mode 2).
pub fn persistent() -> lapin::BasicProperties {
    lapin::BasicProperties::default().with_delivery_mode(2)
}

/// Declares a plain queue (not durable, not exclusive) and panics on failure.
pub async fn declare(ch: &lapin::Channel, name: &str, arguments: FieldTable) -> lapin::Queue {
    try_declare(ch, name, Default::default(), arguments)
        .await
        .unwrap_or_else(|e| panic!("declare queue {name:?}: {e:?}"))
}

/// Publishes and returns lapin's confirm future's result (in confirm mode, the broker's
/// answer; otherwise `NotRequested`).
pub async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> lapin::Result<lapin::Confirmation> {
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            Default::default(),
            body,
            properties,
        ),
    )
    .await?;
    within("the publish confirm", confirm).await
}

/// Publishes to the default exchange with no properties and panics on failure.
pub async fn send(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    publish(ch, "", queue, body, lapin::BasicProperties::default())
        .await
        .unwrap_or_else(|e| panic!("publish to {queue:?}: {e:?}"));
}

/// Starts a consumer with a server-chosen tag.
pub async fn consume(ch: &lapin::Channel, queue: &str, no_ack: bool) -> lapin::Consumer {
    within(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("consume from {queue:?}: {e:?}"))
}

/// The next delivery of `consumer`, panicking after `REPLY_DEADLINE`, on an error or when the
/// consumer ended.
pub async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures_lite::StreamExt;
    within("a delivery", consumer.next())
        .await
        .expect("the consumer ended")
        .expect("a delivery, not an error")
}

/// Asserts that `consumer` receives nothing for `quiet` (a negative check: the only place a
/// fixed wait is the point of the test).
pub async fn assert_no_delivery(consumer: &mut lapin::Consumer, quiet: Duration) {
    use futures_lite::StreamExt;
    if let Ok(item) = tokio::time::timeout(quiet, consumer.next()).await {
        panic!("expected no delivery within {quiet:?}, got {item:?}");
    }
}

/// basic.get, panicking on a channel error.
pub async fn get(
    ch: &lapin::Channel,
    queue: &str,
    no_ack: bool,
) -> Option<lapin::message::BasicGetMessage> {
    within(
        "basic.get",
        ch.basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack }),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.get from {queue:?}: {e:?}"))
}

/// The bodies of everything `basic.get` (no-ack) drains from `queue`, in order.
pub async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        bodies.push(m.delivery.data);
    }
    bodies
}

/// The message count of `queue` from a passive declare (on a throw-away channel, so a 404
/// does not close the caller's).
pub async fn message_count(conn: &Connection, queue: &str) -> lapin::Result<u32> {
    let ch = channel(conn).await;
    let q = try_declare(
        &ch,
        queue,
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "".into()).await;
    Ok(q.message_count())
}

/// Whether `queue` exists (a passive declare on a throw-away channel succeeds, or says 405
/// because another connection holds it exclusively).
pub async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    match message_count(conn, queue).await {
        Ok(_) => true,
        Err(e) if amqp_code(&e) == Some(405) => true,
        Err(e) if amqp_code(&e) == Some(404) => false,
        Err(e) => panic!("passive declare of {queue:?}: {e:?}"),
    }
}

/// Checks the first `x-death` entry names `queue` and `reason`, with a count of 1.
#[track_caller]
pub fn assert_x_death(properties: &lapin::BasicProperties, queue: &str, reason: &str) {
    let headers = properties
        .headers()
        .clone()
        .expect("headers on a dead letter");
    let deaths = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.clone(),
        other => panic!("x-death must be an array, got {other:?}"),
    };
    let first = match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        other => panic!("x-death[0] must be a table, got {other:?}"),
    };
    let get = |k: &str| first.inner().get(k).cloned();
    let as_text = |v: Option<AMQPValue>| match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        other => panic!("expected a string, got {other:?}"),
    };
    assert_eq!(as_text(get("queue")), queue, "{first:?}");
    assert_eq!(as_text(get("reason")), reason, "{first:?}");
    match get("count") {
        Some(AMQPValue::LongLongInt(1) | AMQPValue::LongInt(1) | AMQPValue::LongUInt(1)) => {}
        other => panic!("x-death count must be 1, got {other:?}"),
    }
}

/// A TCP proxy the test controls, to cut or stall a link between two brokers: it forwards
/// connections from its own loopback port to `target`.
pub struct TcpProxy {
    port: u16,
    shared: Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    stalled: std::sync::atomic::AtomicBool,
    refusing: std::sync::atomic::AtomicBool,
    stopped: std::sync::atomic::AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    accepted: AtomicU64,
}

impl TcpProxy {
    /// A proxy on a free loopback port forwarding to `127.0.0.1:target`.
    pub fn start(target: u16) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(ProxyShared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            while !s.stopped.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if s.refusing.load(Ordering::Acquire) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        s.accepted.fetch_add(1, Ordering::AcqRel);
                        for sock in [&client, &server] {
                            if let Ok(c) = sock.try_clone() {
                                s.sockets.lock().unwrap().push(c);
                            }
                        }
                        for (from, to) in [
                            (client.try_clone(), server.try_clone()),
                            (Ok(server), Ok(client)),
                        ] {
                            if let (Ok(from), Ok(to)) = (from, to) {
                                let s = s.clone();
                                std::thread::spawn(move || pump(from, to, &s));
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TcpProxy { port, shared }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Acquire)
    }

    /// Closes every forwarded connection; with `refuse`, new ones are closed at once too until
    /// `restore`.
    pub fn cut(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::Release);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::Release);
    }

    /// Stops (true) or resumes (false) forwarding bytes, keeping the connections open.
    pub fn stall(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::Release);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.cut(true);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: &ProxyShared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while shared.stalled.load(Ordering::Acquire) && !shared.stopped.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

// ---- HA clusters and the tools, shared by the replication and cluster tests ---------------

/// How long cluster tests wait for a status or a count to follow.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(15);

/// A free loopback port (free when asked: a broker started on it right after gets it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").port()
}

/// `127.0.0.1:p1,127.0.0.1:p2,...`, an `--ha-brokers-url` of loopback members.
pub fn loopback_url(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `127.0.0.1:<port>` of a broker.
pub fn addr(b: &TestBroker) -> String {
    format!("127.0.0.1:{}", b.port())
}

/// One cluster member on `port` knowing the members `url`, with fast link maintenance
/// (0.1 s) and heartbeats (1 s) unless `extra` sets them, plus `extra` arguments.
pub fn member(port: u16, url: &str, extra: &[&str]) -> TestBroker {
    let mut b =
        TestBroker::builder()
            .port(port)
            .args(["--ha-cluster", "yes", "--ha-brokers-url", url]);
    for (name, value) in [
        ("--link-maintenance-interval", "0.1s"),
        ("--link-heartbeat-interval", "1s"),
    ] {
        if !extra.contains(&name) {
            b = b.args([name, value]);
        }
    }
    b.args(extra.iter().copied()).start()
}

/// `n` cluster members on fixed free ports, each knowing all of them, and their URL.
pub fn cluster(n: usize, extra: &[&str]) -> (Vec<TestBroker>, String) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let url = loopback_url(&ports);
    let brokers = ports.iter().map(|p| member(*p, &url, extra)).collect();
    (brokers, url)
}

/// A cluster of `n` with member 0 promoted and every other member ready, and its URL.
pub async fn ready_cluster(n: usize, extra: &[&str]) -> (Vec<TestBroker>, String) {
    let (brokers, url) = cluster(n, extra);
    promote(&brokers[0]);
    for b in &brokers[1..] {
        wait_status(b, "ready").await;
    }
    (brokers, url)
}

/// How a run of one of the tools ended.
#[derive(Debug)]
pub struct Run {
    /// The exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `program ARGS` to completion.
pub fn run_tool(program: PathBuf, args: &[&str]) -> Run {
    let out = Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qpid-ha ARGS`.
pub fn qpid_ha(args: &[&str]) -> Run {
    run_tool(qpid_ha_path(), args)
}

/// The HA status `qpid-ha status` prints for the broker at `address`.
pub fn status_at(address: &str) -> String {
    qpid_ha(&["status", "-b", address])
        .stdout
        .trim()
        .to_string()
}

/// The HA status of `b`.
pub fn status(b: &TestBroker) -> String {
    status_at(&addr(b))
}

/// Waits until the HA status at `address` is `expected`, panicking after `CLUSTER_DEADLINE`.
pub async fn wait_status_at(address: &str, expected: &str) {
    let ok = eventually(CLUSTER_DEADLINE, || async {
        status_at(address) == expected
    })
    .await;
    assert!(
        ok,
        "{address} never became {expected}: {}",
        status_at(address)
    );
}

/// Waits until `b`'s HA status is `expected`, panicking after `CLUSTER_DEADLINE`.
pub async fn wait_status(b: &TestBroker, expected: &str) {
    wait_status_at(&addr(b), expected).await;
}

/// `qpid-ha promote --cluster-manager` on `address`, which must succeed silently.
#[track_caller]
pub fn promote_at(address: &str) {
    let r = qpid_ha(&["promote", "--cluster-manager", "-b", address]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
}

/// `qpid-ha promote --cluster-manager` on `b`, which must succeed silently.
#[track_caller]
pub fn promote(b: &TestBroker) {
    promote_at(&addr(b));
}

/// An administrator's connection (`qpid.ha-admin`), which backups let in.
pub async fn admin(b: &TestBroker) -> Connection {
    let props =
        ConnectionProperties::default().with_client_property("qpid.ha-admin".into(), "1".into());
    b.connect_with(props).await
}

/// splitmix64: a tiny deterministic PRNG, so that a printed seed replays a randomized test
/// (kill delays, operation mixes).
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}
