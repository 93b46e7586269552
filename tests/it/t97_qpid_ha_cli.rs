//! `qpid-ha` with queue replication, the real binaries against real brokers: `detach` (usage,
//! a missing queue, an ordinary queue, a replica), `replicate` against an original that does not
//! listen (succeeds with a warning, the broker keeps trying) and against a live one, and the
//! replica and subscriber rows of `query` and `query --json`.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{TestBroker, channel, declare, qpid_ha_path, send, wait_until};
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
        assert_eq!((self.code, self.stderr.as_str()), (0, ""), "{self:?}");
        self.stdout
    }

    #[track_caller]
    fn failed_with(self, stderr: &str) {
        assert_eq!((self.code, self.stderr.as_str()), (1, stderr), "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
    }
}

/// Runs `qpid-ha ARGS` with no `QPID_*` variables from the environment.
fn run(args: &[&str]) -> Run {
    let mut command = Command::new(qpid_ha_path());
    command.args(args);
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

/// `qpid-ha ARGS -b BROKER --timeout 5`.
fn ha(broker: &TestBroker, args: &[&str]) -> Run {
    let address = address(broker);
    let mut all = args.to_vec();
    all.extend_from_slice(&["-b", address.as_str(), "--timeout", "5"]);
    run(&all)
}

fn replicating_broker() -> TestBroker {
    TestBroker::builder()
        .args(["--ha-queue-replication", "yes"])
        .start()
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

fn json_query(broker: &TestBroker) -> Value {
    serde_json::from_str(&ha(broker, &["query", "--json"]).ok()).expect("query --json is JSON")
}

#[test]
fn detach_usage() {
    let wrong = run(&["detach"]);
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(
        wrong
            .stdout
            .starts_with("Usage: detach [options] <queue>\n\nStop replicating <queue>"),
        "{wrong:?}"
    );
    assert_eq!(wrong.stderr, "Exception: Wrong number of arguments\n");
    assert_eq!(run(&["detach", "a", "b"]).code, 1);
    assert!(
        run(&["-h"])
            .ok()
            .contains("\n  detach       Stop replicating <queue> on the current broker.\n")
    );
}

#[test]
fn detach_refuses_missing_and_ordinary_queues_and_brokers_without_ha() {
    let plain = TestBroker::start();
    ha(&plain, &["detach", "q"]).failed_with(
        "PreconditionFailed: queue replication is disabled on this broker: start it with ha-queue-replication=yes\n",
    );

    let broker = replicating_broker();
    ha(&broker, &["detach", "missing"]).failed_with("NotFound: no queue 'missing'\n");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _conn = runtime.block_on(async {
        let conn = broker.connect().await;
        declare(&channel(&conn).await, "ordinary", FieldTable::default()).await;
        conn
    });
    ha(&broker, &["detach", "ordinary"])
        .failed_with("PreconditionFailed: queue 'ordinary' is not a replica\n");
    // No replicas and no subscriptions: Qpid's five lines, nothing more.
    assert_eq!(ha(&broker, &["query"]).ok().lines().count(), 5);
    let doc = json_query(&broker);
    assert_eq!(doc["version"], json!(1));
    assert_eq!(doc["brokers"][0]["replicas"], json!([]));
    assert_eq!(doc["brokers"][0]["subscriptions"], json!([]));
}

#[test]
fn replicate_from_a_silent_original_warns_and_keeps_trying() {
    let broker = replicating_broker();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _conn = runtime.block_on(async {
        let conn = broker.connect().await;
        declare(&channel(&conn).await, "orders", FieldTable::default()).await;
        conn
    });
    let original = format!("127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let replicate = run(&[
        "replicate",
        &original,
        "orders",
        "-b",
        &address(&broker),
        "--timeout",
        "2",
    ]);
    let took = started.elapsed();
    assert_eq!(
        (replicate.code, replicate.stdout.as_str()),
        (0, ""),
        "{replicate:?}"
    );
    assert!(replicate.stderr.starts_with("Warning: "), "{replicate:?}");
    assert_eq!(replicate.stderr.lines().count(), 1, "{replicate:?}");
    // The broker answered within 80% of the tool's timeout.
    assert!(took < Duration::from_secs(2), "{took:?}");

    // The broker keeps trying: the replica has a row, with no lag known yet.
    let query = ha(&broker, &["query"]).ok();
    let lines: Vec<&str> = query.lines().collect();
    assert_eq!(lines[5], "", "{query}");
    assert_eq!(lines[6], "Replicas", "{query}");
    assert!(lines[7].starts_with("  Queue   Original  "), "{query}");
    assert!(lines[8].starts_with("  ====="), "{query}");
    let row: Vec<&str> = lines[9].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(row[0].trim(), "orders", "{query}");
    assert_eq!(row[1].trim(), original, "{query}");
    assert!(
        row[2].trim() == "connecting" || row[2].trim().starts_with("disconnected since "),
        "{query}"
    );
    assert_eq!(row[3].trim(), "-", "{query}");
    assert_eq!(lines.len(), 10, "{query}");

    let doc = json_query(&broker);
    let replica = &doc["brokers"][0]["replicas"][0];
    assert_eq!(replica["queue"], json!("orders"), "{doc:#}");
    assert_eq!(replica["original"], json!(original), "{doc:#}");
    assert_eq!(replica["lag"], Value::Null, "{doc:#}");
    assert_eq!(doc["brokers"][0]["subscriptions"], json!([]), "{doc:#}");

    // Detach: an ordinary queue again, and the row is gone.
    assert_eq!(ha(&broker, &["detach", "orders"]).ok(), "");
    assert_eq!(ha(&broker, &["query"]).ok().lines().count(), 5);
    ha(&broker, &["detach", "orders"])
        .failed_with("PreconditionFailed: queue 'orders' is not a replica\n");
}

#[test]
fn replicate_from_a_live_original_shows_both_sides() {
    let original = replicating_broker();
    let replica = replicating_broker();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_c1, _c2) = runtime.block_on(async {
        let c1 = original.connect().await;
        let ch = channel(&c1).await;
        declare(&ch, "orders", FieldTable::default()).await;
        for _ in 0..3 {
            send(&ch, "orders", b"hello").await;
        }
        let c2 = replica.connect().await;
        declare(&channel(&c2).await, "orders", FieldTable::default()).await;
        (c1, c2)
    });
    assert_eq!(
        ha(&replica, &["replicate", &address(&original), "orders"]).ok(),
        ""
    );
    // Ready, and the original has reported the lag (it does every second).
    let ready = wait_until(Duration::from_secs(10), || {
        let doc = json_query(&replica);
        let row = &doc["brokers"][0]["replicas"][0];
        row["link"] == json!("ready") && row["lag"].is_object()
    });
    assert!(ready, "{:#}", json_query(&replica));

    let query = ha(&replica, &["query"]).ok();
    let row = query.lines().nth(9).unwrap_or_default().to_string();
    assert!(
        row.starts_with(&format!("  orders  {}  ready  ", address(&original))),
        "{query}"
    );
    assert!(row.ends_with(" ms"), "{query}");
    let doc = json_query(&replica);
    assert_eq!(
        doc["brokers"][0]["replicas"][0]["messages"],
        json!(3),
        "{doc:#}"
    );

    let query = ha(&original, &["query"]).ok();
    let lines: Vec<&str> = query.lines().collect();
    assert_eq!(lines[6], "Replicating subscriptions", "{query}");
    assert!(
        lines[7].starts_with("  Queue   Replica  ") && lines[7].ends_with("Confirms held"),
        "{query}"
    );
    assert!(lines[9].starts_with("  orders  127.0.0.1:"), "{query}");
    let doc = json_query(&original);
    let subscription = &doc["brokers"][0]["subscriptions"][0];
    assert_eq!(subscription["queue"], json!("orders"), "{doc:#}");
    assert_eq!(subscription["state"], json!("ready"), "{doc:#}");
    assert_eq!(doc["brokers"][0]["replicas"], json!([]), "{doc:#}");

    // Detach: the queue stays, as an ordinary one.
    assert_eq!(ha(&replica, &["detach", "orders"]).ok(), "");
    assert_eq!(ha(&replica, &["query"]).ok().lines().count(), 5);
}
