//! `qpid-config`, the real binary against a real broker: every command, golden listings in
//! Qpid's formats and in `--json`, exit codes, and the error paths (unknown queue, non-empty
//! queue, unreachable or silent broker, wrong password, a user without `admin`, a bad
//! `--replicate` level, `--start-replica` without queue replication).

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{TempDir, TestBroker, add_user, channel, declare, qpid_config_path, send};
use lapin::types::FieldTable;
use serde_json::{Value, json};

/// How a `qpid-config` run ended.
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
        self.stdout
    }

    #[track_caller]
    fn failed(self, prefix: &str) -> String {
        assert_eq!(self.code, 1, "{self:?}");
        assert!(self.stderr.starts_with(prefix), "{self:?}");
        self.stderr
    }

    #[track_caller]
    fn json(self) -> Value {
        serde_json::from_str(&self.ok()).expect("qpid-config --json prints JSON")
    }
}

/// Runs `qpid-config ARGS` (with a 5 s timeout unless ARGS set one).
fn run(args: &[&str]) -> Run {
    let mut command = Command::new(qpid_config_path());
    if !args.contains(&"-t") {
        command.args(["-t", "5"]);
    }
    let output = command.args(args).output().expect("run qpid-config");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `qpid-config -b 127.0.0.1:PORT ARGS`.
fn config(broker: &TestBroker, args: &[&str]) -> Run {
    let address = format!("127.0.0.1:{}", broker.port());
    let mut all = vec!["-b", address.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

fn lines(text: &[&str]) -> String {
    text.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn queues_listing_matches_qpid_format_and_filters() {
    let broker = TestBroker::start();
    config(
        &broker,
        &[
            "add",
            "queue",
            "orders",
            "--durable",
            "--max-queue-size",
            "1000",
            "--max-queue-count",
            "5",
            "--limit-policy",
            "reject",
            "--lvq-key",
            "k",
            "--alternate-exchange",
            "amq.fanout",
            "--argument",
            "x-message-ttl=5000",
            "--argument",
            "qpid.priorities=3",
            "--argument",
            "x-colour=blue",
        ],
    )
    .ok();
    config(&broker, &["add", "queue", "q2"]).ok();
    let stderr = config(
        &broker,
        &["add", "queue", "q3", "--argument", "colour=blue"],
    )
    .failed("Failed: InvalidRequest: ");
    assert!(stderr.contains("colour"), "{stderr}");
    assert_eq!(
        config(&broker, &["queues"]).ok(),
        lines(&[
            "Queue Name  Attributes",
            "===================================",
            "orders      --durable --max-queue-size=1000 --max-queue-count=5 \
             --limit-policy=reject --lvq-key=k --alternate-exchange=amq.fanout \
             --argument qpid.priorities=3 --argument x-colour=blue --argument x-message-ttl=5000",
            "q2         ",
        ])
    );
    let orders = config(&broker, &["queues", "rde"]).ok();
    assert_eq!(orders.lines().count(), 3, "{orders}");
    assert!(
        orders
            .lines()
            .nth(2)
            .unwrap_or_default()
            .starts_with("orders "),
        "{orders}"
    );
    assert_eq!(
        config(&broker, &["queues", "2"]).ok(),
        lines(&[
            "Queue Name  Attributes",
            "===================================",
            "q2         "
        ])
    );
    let nothing = config(&broker, &["queues", "nomatch"]);
    assert_eq!(
        (nothing.code, nothing.stdout.as_str()),
        (1, ""),
        "{nothing:?}"
    );
}

#[test]
fn exchanges_listing_and_overview_match_qpid_format() {
    let broker = TestBroker::start();
    config(
        &broker,
        &[
            "add",
            "exchange",
            "topic",
            "events",
            "--durable",
            "--replicate",
            "all",
        ],
    )
    .ok();
    config(
        &broker,
        &[
            "add",
            "exchange",
            "fanout",
            "spill",
            "--alternate-exchange",
            "amq.fanout",
        ],
    )
    .ok();
    assert_eq!(
        config(&broker, &["exchanges"]).ok(),
        lines(&[
            "Type      Exchange Name       Attributes",
            "==================================================",
            "direct                        --durable",
            "direct    amq.direct          --durable",
            "fanout    amq.fanout          --durable",
            "headers   amq.headers         --durable",
            "headers   amq.match           --durable",
            "topic     amq.topic           --durable",
            "topic     events              --durable --replicate=all",
            "direct    qmf.default.direct  --durable",
            "topic     qmf.default.topic   --durable",
            "fanout    spill               --alternate-exchange=amq.fanout",
        ])
    );
    assert_eq!(
        config(&broker, &["exchanges", "amq.t"]).ok(),
        lines(&[
            "Type      Exchange Name  Attributes",
            "=============================================",
            "topic     amq.topic      --durable",
        ])
    );
    config(&broker, &["exchanges", "nomatch"]).failed("");
    config(&broker, &["add", "queue", "d1", "--durable"]).ok();
    config(&broker, &["add", "queue", "t1"]).ok();
    assert_eq!(
        config(&broker, &[]).ok(),
        lines(&[
            "Total Exchanges: 10",
            "         direct: 3",
            "         fanout: 2",
            "        headers: 2",
            "          topic: 3",
            "",
            "   Total Queues: 2",
            "        durable: 1",
            "    non-durable: 1",
        ])
    );
}

#[test]
fn json_listings_follow_the_documented_schema() {
    let broker = TestBroker::start();
    config(
        &broker,
        &["add", "queue", "jq", "--durable", "--max-queue-count", "7"],
    )
    .ok();
    config(&broker, &["bind", "amq.direct", "jq", "k1"]).ok();
    assert_eq!(
        config(&broker, &["--json", "queues", "jq"]).json(),
        json!({"version": 1, "queues": [{
            "name": "jq", "durable": true, "autoDelete": false, "exclusive": false,
            "arguments": {"qpid.max_count": 7}, "altExchange": null, "msgDepth": 0,
            "byteDepth": 0, "consumerCount": 0, "bindingCount": 2}]})
    );
    assert_eq!(
        config(&broker, &["queues", "jq", "-r", "--json"]).json()["queues"][0]["bindings"],
        json!([{"exchange": "amq.direct", "queue": "jq", "key": "k1", "arguments": {}}])
    );
    assert_eq!(
        config(&broker, &["--json", "exchanges", "amq.direct"]).json(),
        json!({"version": 1, "exchanges": [{
            "name": "amq.direct", "type": "direct", "durable": true, "autoDelete": false,
            "arguments": {}, "altExchange": null, "bindingCount": 1}]})
    );
    assert_eq!(
        config(&broker, &["--json"]).json(),
        json!({"version": 1,
               "exchanges": {"total": 8, "byType": {"direct": 3, "fanout": 1, "headers": 2, "topic": 2}},
               "queues": {"total": 1, "durable": 1, "nonDurable": 0}})
    );
    assert_eq!(
        config(&broker, &["--json", "list", "queue"]).json(),
        json!({"version": 1, "type": "queue",
               "objects": [{"name": "jq", "durable": true, "autoDelete": false}]})
    );
    assert_eq!(config(&broker, &["--json", "log"]).json()["version"], 1);
}

#[test]
fn add_and_delete_exchanges_and_bindings() {
    let broker = TestBroker::start();
    config(&broker, &["add", "queue", "bq"]).ok();
    config(&broker, &["add", "exchange", "topic", "tx"]).ok();
    config(&broker, &["add", "exchange", "headers", "hx"]).ok();
    config(&broker, &["bind", "tx", "bq", "a.#"]).ok();
    config(&broker, &["bind", "hx", "bq", "k", "any", "x=1,", "y=2"]).ok();
    assert_eq!(
        config(&broker, &["exchanges", "x", "-r"]).ok(),
        lines(&[
            "Exchange 'hx' (headers)",
            r#"    bind [k] => bq {"x":"1","x-match":"any","y":"2"}"#,
            "Exchange 'tx' (topic)",
            "    bind [a.#] => bq",
        ])
    );
    assert_eq!(
        config(&broker, &["queues", "bq", "-r"]).ok(),
        lines(&[
            "Queue 'bq'",
            "    bind [bq] => ''",
            "    bind [k] => hx",
            "    bind [a.#] => tx",
        ])
    );
    config(&broker, &["unbind", "tx", "bq", "a.#"]).ok();
    config(&broker, &["unbind", "tx", "bq", "a.#"]).failed("Failed: NotFound: ");
    assert_eq!(
        config(&broker, &["queues", "bq", "-r", "--ignore-default"]).ok(),
        lines(&["Queue 'bq'", "    bind [k] => hx"])
    );
    config(&broker, &["del", "exchange", "tx"]).ok();
    config(&broker, &["exchanges", "tx"]).failed("");
    config(&broker, &["del", "exchange", "tx"]).failed("Failed: NotFound: ");
    config(&broker, &["del", "exchange", "amq.direct"]).failed("Failed: AccessDenied: ");
    config(&broker, &["add", "exchange", "direct", "hx"]).failed("Failed: PreconditionFailed: ");
}

#[tokio::test]
async fn delete_queue_refuses_non_empty_or_used_queues_unless_forced() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "full", FieldTable::default()).await;
    send(&ch, "full", b"m").await;
    // A round trip on the same channel: the message is in the queue once it returns.
    declare(&ch, "full", FieldTable::default()).await;

    let stderr = config(&broker, &["del", "queue", "full"]).failed("Failed: PreconditionFailed: ");
    assert!(stderr.contains("full"), "{stderr}");
    config(&broker, &["del", "queue", "full", "--force-if-used"])
        .failed("Failed: PreconditionFailed: ");
    config(&broker, &["del", "queue", "full", "--force-if-not-empty"]).ok();
    config(&broker, &["queues", "full"]).failed("");

    declare(&ch, "used", FieldTable::default()).await;
    let _consumer = integration_tests::consume(&ch, "used", true).await;
    config(&broker, &["del", "queue", "used"]).failed("Failed: PreconditionFailed: ");
    config(&broker, &["del", "queue", "used", "--force"]).ok();

    assert_eq!(
        config(&broker, &["del", "queue", "nope"]).failed("Failed: NotFound: "),
        "Failed: NotFound: no queue 'nope'\n"
    );
}

#[test]
fn invalid_replicate_level_fails_and_creates_nothing() {
    let broker = TestBroker::start();
    assert_eq!(
        config(&broker, &["add", "queue", "r1", "--replicate", "most"]).failed("Failed: "),
        "Failed: InvalidRequest: Invalid replication level 'most', should be one of: none, \
         configuration, all\n"
    );
    config(
        &broker,
        &["add", "exchange", "direct", "r2", "--replicate", "x"],
    )
    .failed("Failed: ");
    config(
        &broker,
        &["add", "queue", "r3", "--replicate", "configuration"],
    )
    .ok();
    assert_eq!(
        config(&broker, &["queues", "r"]).ok(),
        lines(&[
            "Queue Name  Attributes",
            "===================================",
            "r3          --replicate=configuration",
        ])
    );
    config(
        &broker,
        &["add", "queue", "r4", "--limit-policy", "ring-strict"],
    )
    .failed("");
    config(&broker, &["queues", "r1"]).failed("");
}

#[test]
fn start_replica_without_queue_replication_fails_and_leaves_no_queue() {
    let broker = TestBroker::start();
    let stderr = config(
        &broker,
        &["add", "queue", "rq", "--start-replica", "localhost:5999"],
    )
    .failed("Failed: NotImplemented: ");
    assert!(
        stderr.contains("'rq'") && stderr.contains("removed"),
        "{stderr}"
    );
    config(&broker, &["queues", "rq"]).failed("");
}

#[test]
fn list_log_and_shutdown() {
    let mut broker = TestBroker::start();
    config(&broker, &["add", "queue", "lq", "--durable"]).ok();
    assert_eq!(
        config(&broker, &["list", "queue"]).ok(),
        lines(&[
            "Objects of type 'queue'",
            "  name  durable  autoDelete",
            "  ===========================",
            "  lq    True     False",
        ])
    );
    assert_eq!(
        config(
            &broker,
            &[
                "list",
                "exchange",
                "--show-property",
                "name",
                "--show-property",
                "type"
            ]
        )
        .ok()
        .lines()
        .nth(4),
        Some("  amq.direct          direct")
    );
    let bindings = config(&broker, &["list", "binding"]).ok();
    assert_eq!(bindings, "Objects of type 'binding'\n");
    config(&broker, &["list", "nonsense"]).failed("Failed: NotFound: ");

    assert!(config(&broker, &["log"]).ok().starts_with("Log level: "));
    config(&broker, &["log", "info+,debug+:Broker"]).ok();
    assert_eq!(
        config(&broker, &["log"]).ok(),
        "Log level: info+,debug+:Broker\n"
    );
    config(&broker, &["log", "bogus+"]).failed("Failed: InvalidRequest: ");

    config(&broker, &["shutdown"]).ok();
    assert!(broker.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn ha_admin_sets_the_client_property() {
    let broker = TestBroker::start();
    let listing = config(
        &broker,
        &[
            "--ha-admin",
            "--json",
            "list",
            "connection",
            "--show-property",
            "clientProperties",
        ],
    )
    .json();
    let objects = listing["objects"].as_array().expect("objects");
    assert!(
        objects
            .iter()
            .any(|c| c["clientProperties"]["qpid.ha-admin"] == "true"),
        "{listing}"
    );
}

#[test]
fn broker_addresses_in_both_forms() {
    let broker = TestBroker::builder().auth(true).temp_data_dir().start();
    let port = broker.port();
    run(&[
        "-b",
        &format!("guest/guest@127.0.0.1:{port}"),
        "add",
        "queue",
        "a1",
    ])
    .ok();
    run(&[
        "-a",
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        "queues",
        "a1",
    ])
    .ok();
    run(&[
        "queues",
        "a1",
        "--broker-addr",
        &format!("guest@127.0.0.1:{port}"),
    ])
    .ok();
    run(&[
        "-b",
        &format!("127.0.0.1:{port}"),
        "--sasl-mechanism",
        "PLAIN",
        "queues",
        "a1",
    ])
    .ok();
}

#[test]
fn unreachable_broker_is_a_connection_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    run(&["-b", &format!("127.0.0.1:{port}"), "queues"]).failed("Failed: Connection: ");
}

#[test]
fn a_broker_that_never_answers_is_a_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("its address").port();
    let holder = std::thread::spawn(move || {
        let (socket, _) = listener.accept().expect("accept");
        std::thread::sleep(Duration::from_secs(4));
        drop(socket);
    });
    let started = Instant::now();
    let stderr =
        run(&["-b", &format!("127.0.0.1:{port}"), "-t", "1", "queues"]).failed("Failed: Timeout: ");
    assert!(started.elapsed() < Duration::from_secs(3), "{stderr}");
    holder.join().expect("the silent peer");
}

#[test]
fn wrong_password_is_an_auth_error() {
    let broker = TestBroker::builder().auth(true).temp_data_dir().start();
    let address = format!("guest/wrong@127.0.0.1:{}", broker.port());
    run(&["-b", &address, "queues"]).failed("Failed: Auth: ");
}

#[test]
fn users_without_admin_are_refused() {
    let dir = TempDir::new("qpid-config-users");
    add_user(dir.path(), "plain", "", "pw");
    let broker = TestBroker::builder()
        .auth(true)
        .data_dir(dir.path())
        .start();
    let address = format!("plain/pw@127.0.0.1:{}", broker.port());
    let stderr = run(&["-b", &address, "add", "queue", "nope"]).failed("Failed: AccessDenied: ");
    assert!(stderr.contains("admin"), "{stderr}");
    run(&["-b", &address, "queues"]).failed("Failed: AccessDenied: ");
}

#[test]
fn usage_errors_exit_one_and_help_exits_zero() {
    let usage = run(&["frobnicate"]);
    assert_eq!(usage.code, 1, "{usage:?}");
    let help = run(&["--help"]);
    assert_eq!(help.code, 0, "{help:?}");
    assert!(
        help.stdout
            .contains("qpid-config [OPTIONS] add queue <name>"),
        "{help:?}"
    );
}

#[tokio::test]
async fn listings_longer_than_one_answer_page_are_complete() {
    let broker = TestBroker::start();
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    for i in 0..1500 {
        declare(&ch, &format!("page-{i:04}"), FieldTable::default()).await;
    }
    let listing = config(&broker, &["--json", "queues", "page-"]).json();
    let names: Vec<&str> = listing["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names.len(), 1500);
    assert_eq!(
        config(&broker, &["queues", "page-"]).ok().lines().count(),
        1502
    );
}
