//! The `qpidd` process itself: the port line on stdout, SIGTERM/SIGINT shutdown (clients closed
//! with 320, exit 0), SIGHUP survival, the data-dir lock, the config file and `QPID_*`
//! environment (errors naming the line, precedence), `--help`/`--version`, bad options, a port
//! in use, Qpid-style log lines, `--daemon`/`--check`/`--quit`, and user management.

use std::time::Duration;

use futures_lite::StreamExt;
use integration_tests::{RawClient, TempDir, TestBroker, amqp_code, run_qpidd, wait_until, within};
use lapin::{ConnectionProperties, Event};

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

const EXIT_DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn port_zero_prints_only_the_port_on_the_first_stdout_line() {
    let mut broker = TestBroker::start();
    let line = broker.first_stdout_line().to_owned();
    assert!(
        line.ends_with('\n'),
        "the port line ends with a newline: {line:?}"
    );
    let digits = line.trim_end_matches('\n');
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "only digits on the port line: {line:?}"
    );
    assert_eq!(digits.parse::<u16>().unwrap(), broker.port());
    std::net::TcpStream::connect(("127.0.0.1", broker.port())).expect("the port accepts");
    broker.stop();
    assert!(broker.wait_exit(EXIT_DEADLINE).success());
    assert_eq!(
        broker.stdout_after_port(),
        "",
        "stdout carries only the port line"
    );
}

#[tokio::test]
async fn sigterm_closes_client_connections_with_320_and_exits_zero() {
    let mut broker = TestBroker::start();
    let conn = broker.connect().await;
    let mut events = conn.events_listener();
    let _ch = integration_tests::channel(&conn).await;
    broker.stop();
    let error = within("the connection error", async {
        loop {
            match events.next().await {
                Some(Event::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("the event stream ended without an error"),
            }
        }
    })
    .await;
    assert_eq!(amqp_code(&error), Some(320), "{error:?}");
    let status = broker.wait_exit(EXIT_DEADLINE);
    assert!(
        status.success(),
        "qpidd exits 0 after SIGTERM, got {status:?}"
    );
}

#[test]
fn sigterm_sends_connection_close_320_on_the_wire() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    broker.stop();
    let close = client.expect_connection_close();
    assert_eq!(close.code, 320, "{close:?}");
    assert!(broker.wait_exit(EXIT_DEADLINE).success());
}

#[test]
fn sigint_stops_the_broker_with_exit_zero() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    broker.signal("INT");
    let close = client.expect_connection_close();
    assert_eq!(close.code, 320, "{close:?}");
    assert!(broker.wait_exit(EXIT_DEADLINE).success());
}

#[tokio::test]
async fn sighup_does_not_stop_the_broker() {
    let mut broker = TestBroker::start();
    broker.signal("HUP");
    // Prove the signal was handled (not ignored by accident) and the broker goes on.
    integration_tests::assert_serves_fresh_client(&broker).await;
    broker.assert_alive();
}

#[test]
fn second_broker_on_the_same_data_dir_exits_non_zero_naming_the_directory() {
    let dir = TempDir::new("shared");
    let _first = TestBroker::builder().data_dir(dir.path()).start();
    let second = run_qpidd(
        &[
            os("--port"),
            os("0"),
            os("--auth"),
            os("no"),
            os("--data-dir"),
            os(dir.path()),
        ],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(!second.status.success(), "{second:?}");
    assert!(
        second.stderr.contains(&dir.path().display().to_string()),
        "the error names the directory: {}",
        second.stderr
    );
    assert_eq!(
        second.stdout, "",
        "no port line from a broker that did not start"
    );
}

#[test]
fn data_dir_is_free_again_after_the_first_broker_stops() {
    let dir = TempDir::new("reuse");
    let mut first = TestBroker::builder().data_dir(dir.path()).start();
    first.stop();
    assert!(first.wait_exit(EXIT_DEADLINE).success());
    let _second = TestBroker::builder().data_dir(dir.path()).start();
}

#[test]
fn data_dir_is_created_when_missing() {
    let parent = TempDir::new("create");
    let dir = parent.path().join("nested").join("data");
    let _broker = TestBroker::builder().data_dir(&dir).start();
    assert!(dir.is_dir());
}

#[test]
fn config_file_with_an_unknown_name_fails_naming_the_line() {
    let dir = TempDir::new("conf");
    let file = dir.path().join("qpidd.conf");
    std::fs::write(
        &file,
        "# a comment\nmax-connections=5\n\nno-such-option=1\n",
    )
    .unwrap();
    let run = run_qpidd(
        &[
            os("--config"),
            os(&file),
            os("--port"),
            os("0"),
            os("--no-data-dir"),
        ],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr.contains("line 4") && run.stderr.contains("no-such-option"),
        "the error names the line and the option: {}",
        run.stderr
    );
}

#[tokio::test]
async fn config_file_values_apply() {
    let dir = TempDir::new("conf-apply");
    let file = dir.path().join("qpidd.conf");
    std::fs::write(&file, "heartbeat=11\n").unwrap();
    let broker = TestBroker::builder()
        .arg("--config")
        .arg(file.as_os_str())
        .start();
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 11);
}

#[tokio::test]
async fn environment_overrides_the_file_and_the_command_line_overrides_both() {
    let dir = TempDir::new("conf-prec");
    let file = dir.path().join("qpidd.conf");
    std::fs::write(&file, "heartbeat=11\nchannel-max=11\nframe-max=11000\n").unwrap();
    let broker = TestBroker::builder()
        .arg("--config")
        .arg(file.as_os_str())
        .env("QPID_HEARTBEAT", "22")
        .env("QPID_CHANNEL_MAX", "22")
        .args(["--channel-max", "33"])
        .start();
    let conn = broker.connect().await;
    let config = conn.configuration();
    assert_eq!(config.frame_max(), 11000, "file only");
    assert_eq!(config.heartbeat(), 22, "environment beats the file");
    assert_eq!(
        config.channel_max(),
        33,
        "command line beats the environment"
    );
}

#[tokio::test]
async fn qpid_config_environment_variable_names_the_config_file() {
    let dir = TempDir::new("conf-env");
    let file = dir.path().join("other.conf");
    std::fs::write(&file, "heartbeat=13\n").unwrap();
    let broker = TestBroker::builder()
        .env("QPID_CONFIG", file.as_os_str())
        .start();
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 13);
}

#[tokio::test]
async fn qpid_port_environment_variable_sets_the_port() {
    let broker = TestBroker::builder().port_from_env().start();
    integration_tests::assert_serves_fresh_client(&broker).await;
}

#[test]
fn invalid_environment_value_is_refused_naming_the_variable() {
    let run = run_qpidd(
        &["--port", "0", "--no-data-dir"],
        &[("QPID_MAX_CONNECTIONS", "lots")],
        None,
        EXIT_DEADLINE,
    );
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr.contains("QPID_MAX_CONNECTIONS"),
        "the error names the variable: {}",
        run.stderr
    );
}

#[test]
fn boolean_option_accepts_every_qpid_spelling() {
    // --log-to-stderr is observable: off means an empty stderr (the start-up notice is gone).
    for (spelling, on) in [
        ("yes", true),
        ("true", true),
        ("on", true),
        ("1", true),
        ("no", false),
        ("false", false),
        ("off", false),
        ("0", false),
    ] {
        let mut broker = TestBroker::builder()
            .env("QPID_LOG_TO_STDERR", spelling)
            .start();
        broker.stop();
        assert!(broker.wait_exit(EXIT_DEADLINE).success());
        assert_eq!(
            !broker.log().is_empty(),
            on,
            "QPID_LOG_TO_STDERR={spelling}: stderr was {:?}",
            broker.log()
        );
    }
}

#[tokio::test]
async fn durations_take_fractions_and_units() {
    let broker = TestBroker::builder()
        .args([
            "--max-negotiate-time",
            "1.5s",
            "--queue-purge-interval",
            "250ms",
        ])
        .start();
    broker.connect().await;
}

#[test]
fn help_exits_zero_and_lists_the_options() {
    let run = run_qpidd(&["--help"], &[], None, EXIT_DEADLINE);
    assert!(run.status.success(), "{run:?}");
    for option in [
        "--port",
        "--data-dir",
        "--config",
        "--max-connections",
        "--memory-high-watermark",
    ] {
        assert!(run.stdout.contains(option), "--help mentions {option}");
    }
}

#[test]
fn version_exits_zero_and_prints_a_version() {
    let run = run_qpidd(&["--version"], &[], None, EXIT_DEADLINE);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{:?}",
        run.stdout
    );
}

#[test]
fn unknown_command_line_option_fails_naming_it() {
    let run = run_qpidd(&["--no-such-flag"], &[], None, EXIT_DEADLINE);
    assert!(!run.status.success(), "{run:?}");
    assert!(run.stderr.contains("no-such-flag"), "{}", run.stderr);
}

#[test]
fn invalid_limit_value_fails_naming_the_option() {
    let run = run_qpidd(
        &["--port", "0", "--no-data-dir", "--frame-max", "12"],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(
        !run.status.success(),
        "frame-max below 4096 is refused: {run:?}"
    );
    assert!(run.stderr.contains("frame-max"), "{}", run.stderr);
}

#[test]
fn port_in_use_fails_with_a_non_zero_exit() {
    let first = TestBroker::start();
    let port = first.port().to_string();
    let run = run_qpidd(
        &[
            "--port",
            port.as_str(),
            "--no-data-dir",
            "--interface",
            "127.0.0.1",
        ],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(!run.status.success(), "{run:?}");
    assert_eq!(run.stdout, "", "no port line when nothing was bound");
}

#[test]
fn log_lines_look_like_qpid_lines() {
    let mut broker = TestBroker::start();
    broker.stop();
    broker.wait_exit(EXIT_DEADLINE);
    let log = broker.log();
    assert!(
        !log.is_empty(),
        "the broker logs its start-up at notice level"
    );
    for line in log.lines() {
        // YYYY-MM-DD HH:MM:SS [Category] level text
        let b = line.as_bytes();
        let shape = b.len() > 22
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b' '
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b' '
            && b[20] == b'[';
        assert!(shape, "not a Qpid-style log line: {line:?}");
        let after = &line[line.find("] ").expect("] after the category") + 2..];
        let level = after.split(' ').next().unwrap();
        assert!(
            [
                "trace", "debug", "info", "notice", "warning", "error", "critical"
            ]
            .contains(&level),
            "unknown level in {line:?}"
        );
    }
}

#[test]
fn log_enable_debug_shows_debug_lines() {
    let mut broker = TestBroker::builder()
        .args(["--log-enable", "debug+"])
        .start();
    let (_client, _) = RawClient::open(broker.port());
    assert!(
        wait_until(Duration::from_secs(3), || broker.log().contains(" debug ")),
        "no debug line in:\n{}",
        broker.log()
    );
    broker.stop();
    broker.wait_exit(EXIT_DEADLINE);
}

#[test]
fn log_to_file_writes_the_log_there() {
    let dir = TempDir::new("logfile");
    let file = dir.path().join("qpidd.log");
    let mut broker = TestBroker::builder()
        .arg("--log-to-file")
        .arg(file.as_os_str())
        .start();
    assert!(
        wait_until(Duration::from_secs(3), || std::fs::read_to_string(&file)
            .map(|t| t.contains("start-up"))
            .unwrap_or(false)),
        "the log file gets the start-up line"
    );
    broker.stop();
    broker.wait_exit(EXIT_DEADLINE);
}

#[test]
fn daemon_check_and_quit_work_through_the_pidfile() {
    let dir = TempDir::new("daemon");
    let pidfile = dir.path().join("qpidd.pid");
    let data = dir.path().join("data");
    let common = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--port".into(),
            "0".into(),
            "--auth".into(),
            "no".into(),
            "--data-dir".into(),
            data.clone().into(),
            "--pidfile".into(),
            pidfile.clone().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        args
    };
    let started = run_qpidd(&common(&["--daemon"]), &[], None, EXIT_DEADLINE);
    assert!(started.status.success(), "{started:?}");
    let port: u16 = started
        .stdout
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("--daemon prints the port: {started:?}"));
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the daemon listens");
    let check = run_qpidd(&common(&["--check"]), &[], None, EXIT_DEADLINE);
    assert!(
        check.status.success(),
        "--check finds the daemon: {check:?}"
    );
    let quit = run_qpidd(&common(&["--quit"]), &[], None, EXIT_DEADLINE);
    assert!(quit.status.success(), "--quit stops the daemon: {quit:?}");
    let check = run_qpidd(&common(&["--check"]), &[], None, EXIT_DEADLINE);
    assert!(!check.status.success(), "--check after --quit: {check:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the daemon is gone"
    );
}

#[tokio::test]
async fn user_added_from_the_shell_can_log_in_with_auth_on() {
    let dir = TempDir::new("users");
    let add = run_qpidd(
        &[
            os("--data-dir"),
            os(dir.path()),
            os("--user-add"),
            os("alice"),
            os("--user-tags"),
            os("admin"),
        ],
        &[],
        Some("s3cret\n"),
        EXIT_DEADLINE,
    );
    assert!(add.status.success(), "--user-add: {add:?}");
    let users = std::fs::read_to_string(dir.path().join("users")).unwrap_or_default();
    assert!(
        !users.contains("s3cret"),
        "the password is never stored in plain text"
    );
    let list = run_qpidd(
        &[os("--data-dir"), os(dir.path()), os("--user-list")],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(
        list.status.success() && list.stdout.contains("alice"),
        "{list:?}"
    );
    let broker = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .start();
    let conn = broker
        .try_connect_url(
            &broker.url_for("alice", "s3cret"),
            ConnectionProperties::default(),
        )
        .await
        .expect("alice logs in with her password");
    conn.close(200, "bye".into()).await.expect("close");
    let err = broker
        .try_connect_url(
            &broker.url_for("alice", "wrong"),
            ConnectionProperties::default(),
        )
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(amqp_code(&err), Some(403), "{err:?}");
}

#[tokio::test]
async fn deleted_user_can_no_longer_log_in() {
    let dir = TempDir::new("users-del");
    let data = [os("--data-dir"), os(dir.path())];
    let add = run_qpidd(
        &[data[0], data[1], os("--user-add"), os("bob")],
        &[],
        Some("pw\n"),
        EXIT_DEADLINE,
    );
    assert!(add.status.success(), "--user-add: {add:?}");
    let del = run_qpidd(
        &[data[0], data[1], os("--user-del"), os("bob")],
        &[],
        None,
        EXIT_DEADLINE,
    );
    assert!(del.status.success(), "--user-del: {del:?}");
    let broker = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .start();
    let err = broker
        .try_connect_url(
            &broker.url_for("bob", "pw"),
            ConnectionProperties::default(),
        )
        .await
        .expect_err("a deleted user is refused");
    assert_eq!(amqp_code(&err), Some(403), "{err:?}");
}
