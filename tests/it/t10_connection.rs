//! Connection-level behaviour: SASL PLAIN / AMQPLAIN / ANONYMOUS, refused credentials (403),
//! guest from loopback, vhosts other than `/` (530), heartbeat and tune negotiation, the
//! capabilities the broker advertises in connection.start, and a clean connection.close.

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use integration_tests::{
    RawClient, TestBroker, amqp_code, assert_serves_fresh_client, field, method_frame, within,
};
use lapin::ConnectionProperties;

#[tokio::test]
async fn plain_login_as_guest_from_loopback_is_accepted_with_auth_on() {
    let broker = TestBroker::builder().auth(true).start();
    let conn = broker.connect().await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().username(), "guest");
    assert_serves_fresh_client(&broker).await;
}

#[tokio::test]
async fn amqplain_login_is_accepted_with_auth_on() {
    let broker = TestBroker::builder().auth(true).start();
    let url = format!("{}?auth_mechanism=amqplain", broker.amqp_url());
    let conn = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect("AMQPLAIN guest/guest is accepted");
    let ch = conn.create_channel().await.expect("channel");
    ch.close(200, "ok".into()).await.expect("close channel");
    conn.close(200, "bye".into()).await.expect("close");
}

#[tokio::test]
async fn wrong_password_is_refused_with_403_through_lapin() {
    let broker = TestBroker::builder().auth(true).start();
    let url = broker.url_for("guest", "not-the-password");
    let err = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect_err("a wrong password must be refused");
    assert_eq!(amqp_code(&err), Some(403), "{err:?}");
}

#[test]
fn wrong_password_gets_connection_close_403_then_the_socket_closes() {
    let broker = TestBroker::builder().auth(true).start();
    let mut client = RawClient::connect(broker.port());
    client.send(integration_tests::PROTOCOL_HEADER);
    let _start = client.read_method();
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from("\0guest\0wrong"),
            locale: "en_US".into(),
        })),
    ));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 403, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (10, 11), "{close:?}");
}

#[tokio::test]
async fn unknown_user_is_refused_with_403() {
    let broker = TestBroker::builder().auth(true).start();
    let url = broker.url_for("nobody", "guest");
    let err = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect_err("an unknown user must be refused");
    assert_eq!(amqp_code(&err), Some(403), "{err:?}");
}

#[tokio::test]
async fn any_credentials_are_accepted_with_auth_off() {
    let broker = TestBroker::start();
    let url = broker.url_for("whoever", "whatever");
    let conn = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect("with --auth no any credentials are accepted");
    conn.close(200, "bye".into()).await.expect("close");
}

#[test]
fn anonymous_mechanism_is_offered_and_accepted_with_auth_off() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(integration_tests::PROTOCOL_HEADER);
    let start = match client.read_method() {
        (0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
        other => panic!("expected connection.start, got {other:?}"),
    };
    let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
    for m in ["PLAIN", "AMQPLAIN", "ANONYMOUS"] {
        assert!(
            mechanisms.split(' ').any(|x| x == m),
            "{m} missing from {mechanisms:?}"
        );
    }
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "ANONYMOUS".into(),
            response: LongString::default(),
            locale: "en_US".into(),
        })),
    ));
    match client.read_method() {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => {}
        other => panic!("expected connection.tune after ANONYMOUS, got {other:?}"),
    }
}

#[tokio::test]
async fn vhost_other_than_root_is_refused_with_530() {
    let broker = TestBroker::start();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/other", broker.port());
    let err = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect_err("vhost 'other' must be refused");
    assert_eq!(amqp_code(&err), Some(530), "{err:?}");
}

#[test]
fn vhost_refusal_names_connection_open() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    let (_start, tune) = client.negotiate_to_tune(FieldTable::default());
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        })),
    ));
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "other".into(),
        })),
    ));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 530, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (10, 40), "{close:?}");
}

#[tokio::test]
async fn heartbeat_proposed_by_the_broker_is_negotiated() {
    let broker = TestBroker::builder().args(["--heartbeat", "7"]).start();
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 7);
}

#[tokio::test]
async fn client_asking_a_shorter_heartbeat_gets_it() {
    let broker = TestBroker::builder().args(["--heartbeat", "30"]).start();
    let url = format!("{}?heartbeat=5", broker.amqp_url());
    let conn = broker
        .try_connect_url(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    assert_eq!(conn.configuration().heartbeat(), 5);
}

#[test]
fn tune_carries_the_configured_limits_and_heartbeat() {
    let broker = TestBroker::builder()
        .args([
            "--heartbeat",
            "9",
            "--channel-max",
            "77",
            "--frame-max",
            "65536",
        ])
        .start();
    let mut client = RawClient::connect(broker.port());
    let (_start, t) = client.negotiate_to_tune(FieldTable::default());
    assert_eq!((t.channel_max, t.frame_max, t.heartbeat), (77, 65536, 9));
}

#[test]
fn broker_sends_heartbeats_at_the_negotiated_interval() {
    let broker = TestBroker::builder().args(["--heartbeat", "1"]).start();
    let mut client = RawClient::connect(broker.port());
    let (_start, tune) = client.negotiate_to_tune(FieldTable::default());
    assert_eq!(tune.heartbeat, 1);
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 1,
        })),
    ));
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    ));
    let _open_ok = client.read_method();
    // A heartbeat frame is 8 bytes: type 8, channel 0, size 0, frame-end.
    let mut raw = [0u8; 8];
    client
        .stream
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    std::io::Read::read_exact(&mut client.stream, &mut raw)
        .expect("a heartbeat within 3 s at heartbeat=1");
    assert_eq!(raw, [8, 0, 0, 0, 0, 0, 0, 0xCE]);
}

#[test]
fn server_properties_advertise_the_supported_capabilities() {
    let broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(integration_tests::PROTOCOL_HEADER);
    let start = match client.read_method() {
        (0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
        other => panic!("expected connection.start, got {other:?}"),
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let capabilities = match field(&start.server_properties, "capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        other => panic!("no capabilities table: {other:?}"),
    };
    for name in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "authentication_failure_close",
        "per_consumer_qos",
        "connection.blocked",
    ] {
        assert_eq!(
            field(&capabilities, name),
            Some(&AMQPValue::Boolean(true)),
            "capability {name} in {capabilities:?}"
        );
    }
    for name in ["product", "version"] {
        assert!(
            field(&start.server_properties, name).is_some(),
            "server property {name} missing"
        );
    }
}

#[tokio::test]
async fn client_close_is_answered_and_other_connections_go_on() {
    let broker = TestBroker::start();
    let first = broker.connect().await;
    let second = broker.connect().await;
    within("connection.close", first.close(200, "bye".into()))
        .await
        .expect("close-ok");
    assert!(!first.status().connected());
    let ch = second.create_channel().await.expect("second still works");
    ch.close(200, "ok".into()).await.expect("close channel");
    assert_serves_fresh_client(&broker).await;
}

// guest from a non-loopback address (403) is covered by the unit tests of
// `broker_core::auth::authenticate`: reaching the broker from a non-loopback address would need
// traffic to an address other than loopback, which the tests never send.

#[test]
fn silent_client_is_disconnected_after_missed_heartbeats() {
    let broker = TestBroker::builder().args(["--heartbeat", "1"]).start();
    let mut client = RawClient::connect(broker.port());
    let (_start, tune) = client.negotiate_to_tune(FieldTable::default());
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 1,
        })),
    ));
    client.send(&method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    ));
    let _open_ok = client.read_method();
    // We never send a heartbeat: the broker must give up on us after about two intervals.
    let started = std::time::Instant::now();
    let _ = client.read_to_close();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "kept a silent peer for {:?}",
        started.elapsed()
    );
}
