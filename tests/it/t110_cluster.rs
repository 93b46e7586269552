//! Active-passive clusters (issue 5, first slice): statuses and promotion, backups refusing
//! clients with 530 naming the primary, queues at level `all` copied to every backup, and a
//! failover that keeps every confirmed message.

use std::process::Command;
use std::time::Duration;

use integration_tests::{TestBroker, channel, declare, eventually, get, message_count, table};
use integration_tests::{
    addr, admin, cluster, free_port, member, promote, qpid_ha, status, wait_status,
};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};

const FOLLOW: Duration = Duration::from_secs(15);

async fn wait_count(conn: &lapin::Connection, queue: &str, n: u32) {
    let ok = eventually(FOLLOW, || async {
        message_count(conn, queue).await.ok() == Some(n)
    })
    .await;
    assert!(
        ok,
        "'{queue}' holds {:?}, expected {n}",
        message_count(conn, queue).await.ok()
    );
}

async fn publish_confirmed(ch: &lapin::Channel, queue: &str, range: std::ops::Range<u32>) {
    for i in range {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn members_join_one_is_promoted_and_the_others_become_ready_backups() {
    let (brokers, _) = cluster(3, &[]);
    for b in &brokers {
        assert_eq!(status(b), "joining");
    }
    promote(&brokers[0]);
    assert_eq!(status(&brokers[0]), "active");
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    // The primary's view of the cluster, in query.
    let q = qpid_ha(&["query", "-b", &addr(&brokers[0])]);
    assert!(q.stdout.contains("Members"), "{q:?}");
    assert_eq!(q.stdout.matches(" ready ").count(), 2, "{q:?}");
    assert_eq!(q.stdout.matches(" active ").count(), 1, "{q:?}");
    let j: serde_json::Value =
        serde_json::from_str(&qpid_ha(&["query", "--json", "-b", &addr(&brokers[1])]).stdout)
            .unwrap();
    assert_eq!(
        j["brokers"][0]["members"].as_array().map(Vec::len),
        Some(3),
        "{j:#}"
    );
    // Backups are shown by their own addresses in the member list.
    let listed: Vec<String> = j["brokers"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["address"].as_str().map(str::to_string))
        .collect();
    for b in &brokers[1..] {
        assert!(listed.contains(&addr(b)), "{listed:?}");
    }
    // Promoting the primary again is ignored.
    promote(&brokers[0]);
    let r = qpid_ha(&["status", "--is-primary", "-b", &addr(&brokers[0])]);
    assert_eq!(r.code, 0);
    let r = qpid_ha(&["status", "--is-primary", "-b", &addr(&brokers[1])]);
    assert_eq!(r.code, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_refuses_clients_with_530_naming_the_primary() {
    let (brokers, _) = cluster(2, &[]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let e = brokers[1]
        .try_connect_url(&brokers[1].amqp_url(), Default::default())
        .await
        .expect_err("a backup refuses clients");
    let text = e.to_string();
    assert!(
        text.contains("530") || text.contains("NOT_ALLOWED"),
        "{text}"
    );
    assert!(text.contains(&addr(&brokers[0])), "{text}");
    // Administrators are let in (qpid-ha status just worked).
    let _ = admin(&brokers[1]).await;
    // The primary serves clients.
    let _ = brokers[0].connect().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joining_member_cannot_be_promoted_when_another_member_is_established() {
    let (brokers, _) = cluster(2, &[]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    // A member that only knows the backup: the backup refuses its link (it is no primary), so
    // it stays joining; but its status check finds an established member there.
    let lonely = TestBroker::builder()
        .args([
            "--ha-cluster",
            "yes",
            "--ha-brokers-url",
            &addr(&brokers[1]),
        ])
        .args(["--link-maintenance-interval", "0.1s"])
        .start();
    assert_eq!(status(&lonely), "joining");
    let r = qpid_ha(&["promote", "--cluster-manager", "-b", &addr(&lonely)]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("Joining active cluster, cannot be promoted."),
        "{r:?}"
    );
    assert_eq!(status(&lonely), "joining");
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_queues_reach_every_backup_and_survive_a_failover() {
    let (mut brokers, _) = cluster(3, &[]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    let pc = brokers[0].connect().await;
    let args = table(&[("qpid.replicate", AMQPValue::LongString("all".into()))]);
    declare(&channel(&pc).await, "orders", args).await;
    declare(&channel(&pc).await, "local", FieldTable::default()).await;
    let ch = channel(&pc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "orders", 0..100).await;
    for _ in 0..10 {
        get(&ch, "orders", false)
            .await
            .expect("a message")
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    let b1 = admin(&brokers[1]).await;
    let b2 = admin(&brokers[2]).await;
    wait_count(&b1, "orders", 90).await;
    wait_count(&b2, "orders", 90).await;
    // Level none (the default): not replicated.
    assert!(!integration_tests::queue_exists(&b1, "local").await);
    // Failover: the primary dies, the cluster manager promotes a ready backup.
    drop(pc);
    // Only a ready backup may be promoted: new queues made it catch up for a moment.
    wait_status(&brokers[1], "ready").await;
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    promote(&brokers[1]);
    // Recovering until the other backup, ready before, is ready again under the new primary.
    assert!(matches!(
        status(&brokers[1]).as_str(),
        "recovering" | "active"
    ));
    wait_status(&brokers[1], "active").await;
    assert!(
        eventually(FOLLOW, || async {
            brokers[1].log().contains("All backups recovered.")
        })
        .await,
        "log lacks All backups recovered.: {}",
        brokers[1].log()
    );
    let nc = brokers[1].connect().await;
    wait_count(&nc, "orders", 90).await;
    // The other backup follows the new primary, without gaps or duplicates.
    let ch = channel(&nc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "orders", 100..105).await;
    wait_status(&brokers[2], "ready").await;
    let b2 = admin(&brokers[2]).await;
    wait_count(&b2, "orders", 95).await;
    let mut bodies = Vec::new();
    while let Some(m) = get(&ch, "orders", false).await {
        let body = String::from_utf8(m.data.clone()).unwrap();
        // Inherited from the old primary: flagged redelivered; published on the new one: not.
        let inherited = body[1..].parse::<u32>().unwrap() < 100;
        assert_eq!(m.redelivered, inherited, "{body}");
        bodies.push(body);
        m.ack(BasicAckOptions::default()).await.unwrap();
    }
    let expected: Vec<String> = (10..105).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    wait_count(&b2, "orders", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_replication_value_is_refused() {
    let b = TestBroker::start();
    let c = b.connect().await;
    let r = integration_tests::try_declare(
        &channel(&c).await,
        "bad",
        Default::default(),
        table(&[("qpid.replicate", AMQPValue::LongString("sometimes".into()))]),
    )
    .await;
    let text = integration_tests::expect_code(r.map(|_| ()), 406);
    assert!(text.contains("Invalid replication value"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn administrators_cannot_change_a_backups_objects() {
    let (brokers, _) = cluster(2, &[]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let a = admin(&brokers[1]).await;
    let text = integration_tests::expect_code(
        integration_tests::try_declare(
            &channel(&a).await,
            "new",
            Default::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ()),
        405,
    );
    assert!(text.contains(&addr(&brokers[0])), "{text}");
    // Its own exclusive queue (a tool's reply queue) is fine.
    let exclusive = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    integration_tests::try_declare(&channel(&a).await, "mine", exclusive, FieldTable::default())
        .await
        .expect("an exclusive queue on a backup");
    // qpid-config through the management protocol too.
    let r = Command::new(integration_tests::qpid_config_path())
        .args(["-b", &addr(&brokers[1]), "add", "queue", "viamgmt"])
        .output()
        .expect("run qpid-config");
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("HA backup"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exchanges_and_bindings_are_replicated_and_route_after_a_failover() {
    let (mut brokers, _) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let pc = brokers[0].connect().await;
    let ch = channel(&pc).await;
    ch.exchange_declare(
        "events".into(),
        lapin::ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "audit", FieldTable::default()).await;
    declare(&ch, "plain", FieldTable::default()).await;
    ch.queue_bind(
        "audit".into(),
        "events".into(),
        "order.#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "plain".into(),
        "amq.direct".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A binding added and removed again is not left behind.
    ch.queue_bind(
        "audit".into(),
        "events".into(),
        "gone.*".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_unbind(
        "audit".into(),
        "events".into(),
        "gone.*".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let b = admin(&brokers[1]).await;
    let ok = eventually(FOLLOW, || async {
        integration_tests::queue_exists(&b, "plain").await
    })
    .await;
    assert!(ok);
    // Let the bind events arrive before the failover (they follow the declares in order).
    publish_to(&ch, "events", "order.new", b"before").await;
    wait_count(&b, "audit", 1).await;
    drop(pc);
    // Only a ready backup may be promoted: new queues made it catch up for a moment.
    wait_status(&brokers[1], "ready").await;
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    promote(&brokers[1]);
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_to(&ch, "events", "order.paid", b"after").await;
    publish_to(&ch, "events", "gone.x", b"nowhere").await;
    publish_to(&ch, "amq.direct", "k", b"direct").await;
    wait_count(&nc, "audit", 2).await;
    wait_count(&nc, "plain", 1).await;
}

async fn publish_to(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recovering_primary_holds_confirms_for_an_expected_backup_until_the_timeout() {
    let (mut brokers, _) = cluster(3, &["--ha-replicate", "all", "--ha-backup-timeout", "2s"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "held", FieldTable::default()).await;
    let b2 = admin(&brokers[2]).await;
    wait_count(&b2, "held", 0).await;
    wait_status(&brokers[1], "ready").await;
    wait_status(&brokers[2], "ready").await;
    drop(pc);
    // The old primary dies; one of the two ready backups is frozen (it stays expected).
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    brokers[2].signal("STOP");
    promote(&brokers[1]);
    assert_eq!(status(&brokers[1]), "recovering");
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    // A queue declared while recovering is guarded too.
    declare(&ch, "fresh", FieldTable::default()).await;
    let ch2 = channel(&nc).await;
    ch2.confirm_select(Default::default()).await.unwrap();
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(
        async {
            publish_confirmed(&ch, "held", 0..1).await;
            started.elapsed()
        },
        async {
            publish_confirmed(&ch2, "fresh", 0..1).await;
            started.elapsed()
        }
    );
    for waited in [a, b] {
        assert!(
            waited >= Duration::from_millis(1500),
            "confirmed after {waited:?}: not held"
        );
    }
    wait_status(&brokers[1], "active").await;
    assert!(
        eventually(FOLLOW, || async {
            brokers[1].log().contains("--ha-backup-timeout")
        })
        .await,
        "log lacks --ha-backup-timeout: {}",
        brokers[1].log()
    );
    // Once active, confirms no longer wait for it.
    let started = std::time::Instant::now();
    publish_confirmed(&ch, "held", 1..2).await;
    assert!(started.elapsed() < Duration::from_millis(1500));
    brokers[2].signal("CONT");
    wait_status(&brokers[2], "ready").await;
    let b2 = admin(&brokers[2]).await;
    wait_count(&b2, "held", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_replica_of_a_cluster_queue_follows_the_new_primary() {
    let (mut brokers, url) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "feed", FieldTable::default()).await;
    let ch = channel(&pc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "feed", 0..20).await;
    // A broker outside the cluster replicates the queue from the whole cluster; the backup,
    // listed first, refuses the link (530) and the replica goes on to the primary.
    let outside = TestBroker::builder()
        .args([
            "--ha-queue-replication",
            "yes",
            "--link-maintenance-interval",
            "0.1s",
        ])
        .start();
    let oc = outside.connect().await;
    declare(&channel(&oc).await, "feed", FieldTable::default()).await;
    let list = format!("{},{}", addr(&brokers[1]), addr(&brokers[0]));
    let r = qpid_ha(&["replicate", "-b", &addr(&outside), &list, "feed"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    wait_count(&oc, "feed", 20).await;
    wait_status(&brokers[1], "ready").await;
    drop((ch, pc));
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "feed", 20..25).await;
    get(&ch, "feed", true).await.expect("a message");
    // No gap, no duplicate: 20 + 5 - 1.
    wait_count(&oc, "feed", 24).await;
    let _ = url;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_old_primary_sees_the_newer_epoch_and_demotes_itself() {
    let (brokers, _) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let old = brokers[0].connect().await;
    declare(&channel(&old).await, "fenced", FieldTable::default()).await;
    wait_status(&brokers[1], "ready").await;
    // The primary freezes; the cluster manager promotes the backup (a new epoch).
    brokers[0].signal("STOP");
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    let nc = brokers[1].connect().await;
    let ch = channel(&nc).await;
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "fenced", 0..3).await;
    // The old primary wakes up: it finds the newer primary, stops serving its clients and
    // follows the new primary as a backup.
    brokers[0].signal("CONT");
    let ok = eventually(FOLLOW, || async {
        matches!(status(&brokers[0]).as_str(), "catchup" | "ready")
    })
    .await;
    assert!(
        ok,
        "the old primary did not demote itself: {}",
        status(&brokers[0])
    );
    assert!(
        eventually(FOLLOW, || async { brokers[0].log().contains("Demoted") }).await,
        "log lacks Demoted: {}",
        brokers[0].log()
    );
    let ok = eventually(FOLLOW, || async { !old.status().connected() }).await;
    assert!(ok, "the old primary's client is still connected");
    let e = brokers[0]
        .try_connect_url(&brokers[0].amqp_url(), Default::default())
        .await
        .expect_err("a demoted primary refuses clients");
    assert!(e.to_string().contains(&addr(&brokers[1])), "{e}");
    wait_status(&brokers[0], "ready").await;
    let a = admin(&brokers[0]).await;
    wait_count(&a, "fenced", 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_promotion_stores_a_new_epoch_in_the_data_directory() {
    let dirs = [
        integration_tests::TempDir::new("epoch-a"),
        integration_tests::TempDir::new("epoch-b"),
    ];
    let ports = [free_port(), free_port()];
    let url = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let start = |i: usize| {
        TestBroker::builder()
            .port(ports[i])
            .data_dir(dirs[i].path())
            .args(["--ha-cluster", "yes", "--ha-brokers-url", &url])
            .args(["--link-maintenance-interval", "0.1s"])
            .start()
    };
    let mut a = start(0);
    let b = start(1);
    promote(&a);
    wait_status(&b, "ready").await;
    let read =
        |i: usize| std::fs::read_to_string(dirs[i].path().join("ha-epoch")).unwrap_or_default();
    assert!(read(0).starts_with("qpidd-ha-epoch 1 1 "), "{}", read(0));
    // The backup records the epoch it follows.
    let ok = eventually(FOLLOW, || async {
        read(1).starts_with("qpidd-ha-epoch 1 1 ")
    })
    .await;
    assert!(ok, "{}", read(1));
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    promote(&b);
    assert!(read(1).starts_with("qpidd-ha-epoch 1 2 "), "{}", read(1));
    // The old primary restarts: it rejoins as a backup of epoch 2.
    let a = start(0);
    wait_status(&a, "ready").await;
    let ok = eventually(FOLLOW, || async {
        read(0).starts_with("qpidd-ha-epoch 1 2 ")
    })
    .await;
    assert!(ok, "{}", read(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_an_exclusive_queue_is_adopted_by_the_first_exclusive_declare() {
    let (mut brokers, _) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let exclusive = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let pc = brokers[0].connect().await;
    let ch = channel(&pc).await;
    ch.queue_declare("mine".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&ch, "mine", 0..3).await;
    let b = admin(&brokers[1]).await;
    wait_count(&b, "mine", 3).await;
    wait_status(&brokers[1], "ready").await;
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    drop((ch, pc));
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    // The application reconnects and declares its queue exclusive again: it gets it, with its
    // messages; another connection is then locked out (405).
    let c1 = brokers[1].connect().await;
    let ch1 = channel(&c1).await;
    let q = ch1
        .queue_declare("mine".into(), exclusive, FieldTable::default())
        .await
        .expect("the first exclusive declare adopts the queue");
    assert_eq!(q.message_count(), 3);
    let c2 = brokers[1].connect().await;
    let r = integration_tests::try_declare(
        &channel(&c2).await,
        "mine",
        exclusive,
        FieldTable::default(),
    )
    .await;
    integration_tests::expect_code(r.map(|_| ()), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_ha_min_backups_confirms_wait_for_a_ready_backup_then_are_nacks() {
    let ports = [free_port(), free_port()];
    let url = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let extra = [
        "--ha-replicate",
        "all",
        "--ha-min-backups",
        "1",
        "--ha-backup-timeout",
        "2s",
    ];
    let a = member(ports[0], &url, &extra);
    let mut b = member(ports[1], &url, &extra);
    promote(&a);
    wait_status(&b, "ready").await;
    let pc = a.connect().await;
    let ch = channel(&pc).await;
    declare(&ch, "min", FieldTable::default()).await;
    wait_status(&b, "ready").await;
    ch.confirm_select(Default::default()).await.unwrap();
    let publish = |body: &'static [u8]| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                "min".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm")
        }
    };
    assert!(publish(b"with a backup").await.is_ack());
    // No ready backup: the confirm waits, then is a nack.
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5));
    let ok = eventually(FOLLOW, || async {
        let q = qpid_ha(&["query", "--json", "-b", &addr(&a)]).stdout;
        !q.contains("\"ready\"")
    })
    .await;
    assert!(ok);
    let started = std::time::Instant::now();
    let c = publish(b"alone").await;
    assert!(c.is_nack(), "{c:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // The broker's log is read by another thread: poll it.
    let logged = eventually(FOLLOW, || async { a.log().contains("--ha-min-backups") }).await;
    assert!(logged, "{}", a.log());
    // A backup comes back within the timeout: the waiting confirm is an ack.
    let pending = tokio::spawn(publish(b"waiting"));
    let b = member(ports[1], &url, &extra);
    wait_status(&b, "ready").await;
    let c = pending.await.unwrap();
    assert!(c.is_ack(), "{c:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_queue_on_a_cluster_keeps_replicating_after_the_cluster_fails_over() {
    // The seed's case 2: the original is outside; its replica lives on a cluster.
    let outside = TestBroker::builder()
        .args(["--ha-queue-replication", "yes"])
        .start();
    let xc = outside.connect().await;
    declare(&channel(&xc).await, "src", FieldTable::default()).await;
    let (mut brokers, _) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let pc = brokers[0].connect().await;
    declare(&channel(&pc).await, "src", FieldTable::default()).await;
    let r = qpid_ha(&[
        "replicate",
        "-b",
        &addr(&brokers[0]),
        &addr(&outside),
        "src",
    ]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let xch = channel(&xc).await;
    xch.confirm_select(Default::default()).await.unwrap();
    publish_confirmed(&xch, "src", 0..10).await;
    // The primary's replica, and the backup's copy of it.
    let b = admin(&brokers[1]).await;
    wait_count(&b, "src", 10).await;
    wait_status(&brokers[1], "ready").await;
    drop(pc);
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    // The new primary resumed the replica definition it inherited: it follows the original.
    publish_confirmed(&xch, "src", 10..15).await;
    for _ in 0..3 {
        get(&xch, "src", false)
            .await
            .expect("a message")
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    let nc = admin(&brokers[1]).await;
    wait_count(&nc, "src", 12).await;
    let q = qpid_ha(&["query", "-b", &addr(&brokers[1])]).stdout;
    assert!(q.contains(&addr(&outside)), "{q}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_delete_queues_that_had_consumers_go_at_promotion_and_the_others_stay() {
    let (mut brokers, _) = cluster(2, &["--ha-replicate", "all"]);
    promote(&brokers[0]);
    wait_status(&brokers[1], "ready").await;
    let auto_delete = lapin::options::QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    let pc = brokers[0].connect().await;
    let ch = channel(&pc).await;
    for q in ["used", "unused"] {
        ch.queue_declare(q.into(), auto_delete, FieldTable::default())
            .await
            .unwrap();
    }
    let _consumer = integration_tests::consume(&ch, "used", false).await;
    // Configuration events arrive in order: once this queue is on the backup, so is the news
    // that "used" had a consumer.
    declare(&ch, "marker", FieldTable::default()).await;
    let b = admin(&brokers[1]).await;
    let ok = eventually(FOLLOW, || async {
        integration_tests::queue_exists(&b, "marker").await
            && integration_tests::queue_exists(&b, "unused").await
    })
    .await;
    assert!(ok);
    wait_status(&brokers[1], "ready").await;
    // The primary dies with the consumer.
    brokers[0].signal("KILL");
    brokers[0].wait_exit(Duration::from_secs(5));
    promote(&brokers[1]);
    wait_status(&brokers[1], "active").await;
    let nc = brokers[1].connect().await;
    assert!(!integration_tests::queue_exists(&nc, "used").await);
    assert!(integration_tests::queue_exists(&nc, "unused").await);
}
