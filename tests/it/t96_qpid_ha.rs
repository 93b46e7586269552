//! `qpid-ha`, the real binary against real brokers: `ping`, `status`, `query` (Qpid's lines and
//! `--json`), `promote` and `replicate` on a broker without HA, with `ha-queue-replication` and
//! with `ha-cluster`; Qpid's usage errors and exit codes; an unreachable and a silent broker;
//! `--config qpidd.conf` credentials against `--auth yes`; `qpid.ha-admin` on every connection.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{TempDir, TestBroker, add_user, channel, declare, qpid_ha_path};
use lapin::types::FieldTable;
use serde_json::{Value, json};

/// How a `qpid-ha` run ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> String {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
        self.stdout
    }

    /// Exit 1 with `stderr` exactly.
    #[track_caller]
    fn failed_with(self, stderr: &str) {
        assert_eq!(self.code, 1, "{self:?}");
        assert_eq!(self.stderr, stderr, "{self:?}");
    }

    /// Exit 1 with stderr starting with `prefix`.
    #[track_caller]
    fn failed(self, prefix: &str) -> String {
        assert_eq!(self.code, 1, "{self:?}");
        assert!(self.stderr.starts_with(prefix), "{self:?}");
        self.stderr
    }

    /// Exit `code` with no output at all.
    #[track_caller]
    fn silent(self, code: i32) {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(
            (self.stdout.as_str(), self.stderr.as_str()),
            ("", ""),
            "{self:?}"
        );
    }
}

/// Runs `qpid-ha ARGS` (with a 5 s timeout after them unless ARGS set one or a config file).
fn run(args: &[&str]) -> Run {
    let mut command = Command::new(qpid_ha_path());
    command.args(args);
    if !args
        .iter()
        .any(|a| a.starts_with("--timeout") || a.starts_with("--config"))
    {
        command.arg("--timeout=5");
    }
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QPID_") {
            command.env_remove(name);
        }
    }
    let output = command.output().expect("run qpid-ha");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn address(broker: &TestBroker) -> String {
    format!("127.0.0.1:{}", broker.port())
}

/// Runs `qpid-ha ARGS -b 127.0.0.1:PORT` (the command first, `-b` last: any order works).
fn ha(broker: &TestBroker, args: &[&str]) -> Run {
    let address = address(broker);
    let mut all = args.to_vec();
    all.extend_from_slice(&["-b", address.as_str()]);
    run(&all)
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

const PROMOTE_WARNING: &str = "Exception: 'promote' should only be called by the cluster manager.\nIncorrect use of 'promote' will cause cluster malfunction.\nTo call from a cluster manager use 'promote --cluster-manager'. \n";
const NOT_A_MEMBER: &str = "PreconditionFailed: not a cluster member: promote needs a broker started with ha-cluster=yes; nothing was changed\n";

fn is_uuid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && text.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[test]
fn a_broker_without_ha_is_standalone_and_says_ha_is_disabled() {
    let broker = TestBroker::start();
    assert_eq!(ha(&broker, &["status"]).ok(), "standalone\n");
    ha(&broker, &["status", "--expect=standalone"]).silent(0);
    ha(&broker, &["status", "--expect", "active"]).silent(1);
    ha(&broker, &["status", "--is-primary"]).silent(1);
    assert_eq!(
        ha(&broker, &["query"]).ok(),
        "Status:              standalone\n\
         HA:                  disabled (start qpidd with ha-queue-replication=yes or ha-cluster=yes)\n"
    );
    let doc: Value = serde_json::from_str(&ha(&broker, &["query", "--json"]).ok()).expect("JSON");
    assert_eq!(
        doc,
        json!({"version": 1, "brokers": [{"address": address(&broker), "ha": false,
            "status": "standalone", "brokerId": null, "brokersUrl": null, "publicUrl": null,
            "replicate": null, "members": [], "replicas": [], "subscriptions": [], "epoch": null,
            "store": [], "error": null}]})
    );
    ha(&broker, &["ping"]).silent(0);
    ha(&broker, &["promote", "--cluster-manager"]).failed_with(NOT_A_MEMBER);
    ha(&broker, &["replicate", "127.0.0.1:1", "q"]).failed_with(
        "PreconditionFailed: queue replication is disabled on this broker: start it with ha-queue-replication=yes\n",
    );
}

#[tokio::test]
async fn queue_replication_shows_the_ha_object() {
    let broker = TestBroker::builder()
        .args(["--ha-queue-replication", "yes", "--ha-replicate", "all"])
        .args(["--ha-public-url", "amqp:tcp:vip:5672"])
        .start();
    let closed = closed_port();
    let url = format!("amqp:tcp:{},tcp:127.0.0.1:{closed}", address(&broker));
    let broker2 = TestBroker::builder()
        .args([
            "--ha-queue-replication",
            "yes",
            "--ha-brokers-url",
            url.as_str(),
        ])
        .start();

    assert_eq!(ha(&broker, &["status"]).ok(), "standalone\n");
    ha(&broker, &["status", "--expect=standalone"]).silent(0);
    ha(&broker, &["status", "--is-primary"]).silent(1);
    let query = ha(&broker, &["query"]).ok();
    let lines: Vec<&str> = query.lines().collect();
    assert_eq!(lines.len(), 5, "{query}");
    assert_eq!(lines[0], "Status:              standalone");
    let id = lines[1]
        .strip_prefix("Broker ID:           ")
        .expect(&query);
    assert!(is_uuid(id), "{query}");
    assert_eq!(lines[2], "Brokers URL:         ");
    assert_eq!(lines[3], "Public URL:          amqp:tcp:vip:5672");
    assert_eq!(lines[4], "Replicate:           all");
    // The id belongs to the broker process: the same on every call, another broker's differs.
    assert!(ha(&broker, &["query"]).ok().contains(id));
    assert!(!ha(&broker2, &["query"]).ok().contains(id));

    let doc: Value = serde_json::from_str(&ha(&broker, &["--json", "query"]).ok()).expect("JSON");
    assert_eq!(
        doc,
        json!({"version": 1, "brokers": [{"address": address(&broker), "ha": true,
            "status": "standalone", "brokerId": id, "brokersUrl": "",
            "publicUrl": "amqp:tcp:vip:5672", "replicate": "all", "members": [], "replicas": [],
            "subscriptions": [], "epoch": 0, "store": [], "error": null}]})
    );

    // --all walks brokersUrl: the first broker answers, the closed port does not.
    let all = ha(&broker2, &["status", "--all"]).ok();
    let closed_line = format!("127.0.0.1:{closed} Connection: ");
    assert!(
        all.starts_with(&format!("{} standalone\n{closed_line}", address(&broker))),
        "{all}"
    );
    let all = ha(&broker2, &["query", "--all"]).ok();
    assert!(
        all.starts_with(&format!(
            "Address:             {}\nStatus:              standalone\nBroker ID:           {id}\n",
            address(&broker)
        )),
        "{all}"
    );
    assert!(all.contains(&format!("\n\n{closed_line}")), "{all}");
    let doc: Value =
        serde_json::from_str(&ha(&broker2, &["query", "--all", "--json"]).ok()).expect("JSON");
    assert_eq!(doc["brokers"][0]["brokerId"], json!(id));
    assert_eq!(doc["brokers"][1]["error"]["kind"], json!("Connection"));

    // replicate: the local queue must exist; an original that does not answer in time makes
    // it succeed with a warning (t97 has more).
    ha(&broker, &["replicate", "127.0.0.1:1", "missing"])
        .failed_with("NotFound: no queue 'missing'\n");
    let conn = broker.connect().await;
    declare(&channel(&conn).await, "orders", FieldTable::default()).await;
    let replicate = run(&[
        "replicate",
        "127.0.0.1:1",
        "orders",
        "-b",
        &address(&broker),
        "--timeout=1",
    ]);
    assert_eq!(replicate.code, 0, "{replicate:?}");
    assert!(replicate.stderr.starts_with("Warning: "), "{replicate:?}");
    assert_eq!(ha(&broker, &["detach", "orders"]).ok(), "");

    // promote: refused, by the tool without --cluster-manager, by the broker with it.
    run(&["promote"]).failed_with(PROMOTE_WARNING);
    ha(&broker, &["promote"]).failed_with(PROMOTE_WARNING);
    ha(&broker, &["--cluster-manager", "promote"]).failed_with(NOT_A_MEMBER);
    assert_eq!(ha(&broker, &["status"]).ok(), "standalone\n");
}

#[test]
fn a_lone_cluster_member_is_joining_until_promoted() {
    let broker = TestBroker::builder().args(["--ha-cluster", "yes"]).start();
    assert_eq!(ha(&broker, &["status"]).ok(), "joining\n");
    ha(&broker, &["status", "--expect=joining"]).silent(0);
    ha(&broker, &["status", "--is-primary"]).silent(1);
    assert!(
        ha(&broker, &["query"])
            .ok()
            .starts_with("Status:              joining\n")
    );
    ha(&broker, &["promote"]).failed_with(PROMOTE_WARNING);
    assert_eq!(ha(&broker, &["status"]).ok(), "joining\n");
    // With no other member to ask (no --ha-brokers-url), the cluster manager may promote it.
    assert_eq!(ha(&broker, &["promote", "--cluster-manager"]).ok(), "");
    assert_eq!(ha(&broker, &["status"]).ok(), "active\n");
    ha(&broker, &["status", "--is-primary"]).silent(0);
}

#[test]
fn usage_and_argument_errors_are_qpids() {
    let usage = "usage: qpid-ha <command> [<arguments>]\n\nCommands are:\n\n\
        \x20 ping         Check if the broker is alive and responding.\n\
        \x20 status       Print HA status.\n\
        \x20 replicate    Set up replication from <queue> on <remote-broker> to <queue> on the current broker.\n\
        \x20 detach       Stop replicating <queue> on the current broker.\n\
        \x20 query        Print HA configuration and status.\n\n\
        For help with a command type: qpid-ha <command> --help\n";
    let none = run(&[]);
    assert_eq!((none.code, none.stdout.as_str()), (1, usage), "{none:?}");
    assert_eq!(none.stderr, "Exception: No valid command\n");
    let unknown = run(&["frobnicate"]);
    assert_eq!(
        (unknown.code, unknown.stdout.as_str()),
        (1, usage),
        "{unknown:?}"
    );
    assert_eq!(unknown.stderr, "Exception: No valid command\n");
    for help in ["help", "--help", "-h"] {
        assert_eq!(run(&[help]).ok(), usage);
    }
    assert!(run(&["--cluster-manager", "-h"]).ok().contains(
        "  promote      [Cluster manager only] Promote the broker from backup to primary.\n"
    ));

    let wrong = run(&["replicate", "node1"]);
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(
        wrong
            .stdout
            .starts_with("Usage: replicate [options] <remote-broker> <queue>\n"),
        "{wrong:?}"
    );
    assert_eq!(wrong.stderr, "Exception: Wrong number of arguments\n");
    let extra = run(&["status", "extra"]);
    assert_eq!(
        (extra.code, extra.stderr.as_str()),
        (1, "Exception: Wrong number of arguments\n")
    );

    let help = run(&["status", "--help"]).ok();
    assert!(
        help.starts_with("Usage: status [options]\n\nPrint HA status.\n"),
        "{help}"
    );
    assert!(
        help.contains("--is-primary") && help.contains("--timeout=<seconds>"),
        "{help}"
    );

    let bad = run(&["status", "--frob"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(
        bad.stderr
            .contains("qpid-ha: error: no such option: --frob"),
        "{bad:?}"
    );
}

#[test]
fn unreachable_and_silent_brokers() {
    let closed = format!("127.0.0.1:{}", closed_port());
    let ping = run(&["ping", "-b", &closed]);
    assert_eq!((ping.code, ping.stdout.as_str()), (1, ""), "{ping:?}");
    assert!(ping.stderr.starts_with("Connection: "), "{ping:?}");
    run(&["-b", &closed, "status"]).failed("Connection: ");

    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("its address").port();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(listener.accept().expect("accept"));
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let silent = format!("127.0.0.1:{port}");
    for command in ["ping", "status"] {
        let started = Instant::now();
        let stderr = run(&[command, "-b", &silent, "--timeout", "1"]).failed("Timeout: ");
        assert!(started.elapsed() < Duration::from_secs(3), "{stderr}");
    }
    // Without --timeout, --config gives it (Qpid takes the link heartbeat interval).
    let dir = TempDir::new("qpid-ha-timeout");
    let conf = dir.path().join("qpidd.conf");
    std::fs::write(&conf, "link-heartbeat-interval=1s\n").expect("write qpidd.conf");
    let started = Instant::now();
    let conf_arg = format!("--config={}", conf.display());
    let stderr = run(&["status", "-b", &silent, &conf_arg]).failed("Timeout: ");
    assert!(started.elapsed() < Duration::from_secs(3), "{stderr}");
    holder.join().expect("the silent peer");
}

#[test]
fn config_file_gives_credentials_port_and_mechanism() {
    let dir = TempDir::new("qpid-ha-users");
    add_user(dir.path(), "hauser", "admin,ha", "s3cret");
    let broker = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .args(["--ha-queue-replication", "yes"])
        .start();
    let conf = dir.path().join("qpidd.conf");
    let write = |text: String| std::fs::write(&conf, text).expect("write qpidd.conf");
    let conf_arg = format!("--config={}", conf.display());
    write(format!(
        "# HA settings\nha-username=hauser\nha-password = s3cret # inline comment\nha-mechanism=PLAIN\nport={}\n",
        broker.port()
    ));
    // No port and no credentials on the command line: all from the file.
    assert_eq!(
        run(&["status", "-b", "127.0.0.1", &conf_arg]).ok(),
        "standalone\n"
    );
    assert_eq!(
        run(&["status", "-b", &address(&broker), &conf_arg]).ok(),
        "standalone\n"
    );
    // Credentials in -b win over the file.
    run(&[
        "status",
        "-b",
        &format!("hauser/wrong@{}", address(&broker)),
        &conf_arg,
    ])
    .failed("Auth: ");
    // A wrong password in the file is used, and refused.
    write(format!(
        "ha-username=hauser\nha-password=wrong\nport={}\n",
        broker.port()
    ));
    run(&["status", "-b", "127.0.0.1", &conf_arg]).failed("Auth: ");
    // --sasl-mechanism wins over ha-mechanism.
    write(format!(
        "ha-username=hauser\nha-password=s3cret\nha-mechanism=EXTERNAL\nport={}\n",
        broker.port()
    ));
    run(&[
        "status",
        "-b",
        "127.0.0.1",
        &conf_arg,
        "--sasl-mechanism",
        "PLAIN",
    ])
    .ok();
    run(&[
        "status",
        "-b",
        "127.0.0.1",
        "--config",
        "/nonexistent/qpidd.conf",
    ])
    .failed("Exception: cannot read config file /nonexistent/qpidd.conf");
}

#[tokio::test]
async fn every_connection_is_an_admin_connection() {
    // With --max-connections 1 taken by a client, only administrative connections
    // (`qpid.ha-admin`) get in.
    let broker = TestBroker::builder()
        .args(["--max-connections", "1"])
        .start();
    let _client = broker.connect().await;
    let refused = broker
        .try_connect_url(&broker.amqp_url(), lapin::ConnectionProperties::default())
        .await;
    assert!(refused.is_err(), "a second ordinary connection got in");
    assert_eq!(ha(&broker, &["status"]).ok(), "standalone\n");
    ha(&broker, &["ping"]).silent(0);
}
