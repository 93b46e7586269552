//! Bad input over raw sockets: garbage, wrong protocol headers, oversize frames, bad frame-end
//! octets, unknown frame types, methods on unopened channels, content frames out of order,
//! unknown and truncated methods, a stalled handshake. Each case checks the broker's exact
//! reply (connection.close code and failing class/method ids, decoded with amq-protocol) and
//! then that the broker process is alive and a fresh lapin client still publishes and consumes.

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, queue};
use integration_tests::{
    PROTOCOL_HEADER, RawClient, TestBroker, assert_serves_fresh_client, encode, method_frame,
};

/// A frame built by hand: type, channel, size, payload, frame-end.
fn raw_frame(frame_type: u8, channel: u16, payload: &[u8], frame_end: u8) -> Vec<u8> {
    let mut bytes = vec![frame_type];
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes.push(frame_end);
    bytes
}

/// The payload of a method frame as amq-protocol encodes it.
fn method_payload(method: AMQPClass) -> Vec<u8> {
    let frame = method_frame(1, method);
    frame[7..frame.len() - 1].to_vec()
}

fn declare_queue(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        ..Default::default()
    }))
}

/// After a bad-input case: the process lives and a fresh client is served.
async fn still_serving(broker: &mut TestBroker) {
    broker.assert_alive();
    assert_serves_fresh_client(broker).await;
    broker.assert_alive();
}

#[tokio::test]
async fn garbage_instead_of_a_protocol_header_gets_our_header_and_a_close() {
    let mut broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let reply = client.read_to_close();
    assert_eq!(
        reply,
        PROTOCOL_HEADER,
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn amqp_1_0_protocol_header_gets_our_header_and_a_close() {
    let mut broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(b"AMQP\x00\x01\x00\x00");
    assert_eq!(client.read_to_close(), PROTOCOL_HEADER);
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn amqp_0_8_protocol_header_gets_our_header_and_a_close() {
    let mut broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(b"AMQP\x01\x01\x08\x00");
    assert_eq!(client.read_to_close(), PROTOCOL_HEADER);
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn random_binary_garbage_after_the_handshake_closes_only_that_connection() {
    let mut broker = TestBroker::start();
    let bystander = broker.connect().await;
    let (mut client, _) = RawClient::open(broker.port());
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    client.send(&garbage);
    // Whatever the broker made of it, it must end the connection (close or plain EOF)...
    let _ = client.read_to_close();
    // ...and leave everybody else alone.
    let ch = integration_tests::channel(&bystander).await;
    integration_tests::declare(&ch, "bystander", Default::default()).await;
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn oversize_frame_is_refused_from_its_header_with_501() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    // Only the 7-byte frame header, announcing 100 MB: the broker must decide on it without
    // waiting for (or buffering) the payload.
    let mut header = vec![1u8];
    header.extend_from_slice(&1u16.to_be_bytes());
    header.extend_from_slice(&100_000_000u32.to_be_bytes());
    client.send(&header);
    let close = client.expect_connection_close();
    assert_eq!(close.code, 501, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn frame_one_byte_over_the_negotiated_frame_max_is_501() {
    let mut broker = TestBroker::builder().args(["--frame-max", "8192"]).start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    // frame_max counts the whole frame: 7 header bytes + payload + frame-end.
    let body = vec![0u8; 8192 - 8 + 1];
    client.send(&raw_frame(3, 1, &body, 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 501, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn frame_exactly_at_frame_max_is_accepted() {
    let mut broker = TestBroker::builder().args(["--frame-max", "8192"]).start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&method_frame(1, declare_queue("fm-exact")));
    let _declare_ok = client.read_method();
    client.send(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "fm-exact".into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    let body = vec![5u8; 8192 - 8];
    client.send(&encode(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: Default::default(),
        },
    )));
    client.send(&raw_frame(3, 1, &body, 0xCE));
    // A round trip proves the connection survived the full-size frame.
    client.send(&method_frame(1, declare_queue("fm-exact")));
    match client.read_method() {
        (1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
            assert_eq!(ok.message_count, 1);
        }
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn bad_frame_end_octet_is_501() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    let payload = method_payload(declare_queue("bad-end"));
    client.send(&raw_frame(1, 1, &payload, 0x00));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 501, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn unknown_frame_type_is_501() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.send(&raw_frame(9, 0, b"hello", 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 501, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn heartbeat_on_a_channel_other_than_zero_is_501() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&raw_frame(8, 1, b"", 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 501, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn method_on_a_channel_never_opened_is_504() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.send(&method_frame(5, declare_queue("nowhere")));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 504, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (50, 10), "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn channel_open_twice_is_504() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&method_frame(
        1,
        AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(
            amq_protocol::protocol::channel::Open {},
        )),
    ));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 504, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (20, 10), "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn body_frame_without_a_content_header_is_505() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&raw_frame(3, 1, b"orphan body", 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 505, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn content_header_without_a_publish_is_505() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&encode(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: Default::default(),
        },
    )));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 505, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn method_in_the_middle_of_a_content_is_505() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "x".into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    // A publish must be followed by its content header, not by another method.
    client.send(&method_frame(1, declare_queue("interrupt")));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 505, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn unknown_method_id_is_540_naming_the_class_and_method() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&999u16.to_be_bytes());
    client.send(&raw_frame(1, 1, &payload, 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 540, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 999), "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn unknown_class_id_is_540() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    let mut payload = Vec::new();
    payload.extend_from_slice(&4242u16.to_be_bytes());
    payload.extend_from_slice(&10u16.to_be_bytes());
    client.send(&raw_frame(1, 1, &payload, 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 540, "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn truncated_method_payload_is_502_naming_the_method() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    let payload = method_payload(declare_queue("truncated-queue-name"));
    // Class and method ids, the reserved short, then half of the queue name.
    let cut = &payload[..payload.len() / 2];
    client.send(&raw_frame(1, 1, cut, 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 502, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (50, 10), "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn truncated_publish_on_the_hand_written_path_is_502() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    let payload = method_payload(AMQPClass::Basic(basic::AMQPMethod::Publish(
        basic::Publish {
            exchange: "amq.direct".into(),
            routing_key: "some-key".into(),
            mandatory: false,
            immediate: false,
        },
    )));
    client.send(&raw_frame(1, 1, &payload[..payload.len() - 4], 0xCE));
    let close = client.expect_connection_close();
    assert_eq!(close.code, 502, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 40), "{close:?}");
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn method_payload_shorter_than_its_ids_is_an_error_not_a_panic() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.open_channel(1);
    client.send(&raw_frame(1, 1, &[0], 0xCE));
    let close = client.expect_connection_close();
    assert!(
        [501, 502].contains(&close.code),
        "a 1-byte method payload is a frame or syntax error: {close:?}"
    );
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn channel_method_on_channel_zero_is_a_connection_error() {
    let mut broker = TestBroker::start();
    let (mut client, _) = RawClient::open(broker.port());
    client.send(&method_frame(0, declare_queue("on-zero")));
    let close = client.expect_connection_close();
    assert!(
        [503, 504].contains(&close.code),
        "queue.declare on channel 0: {close:?}"
    );
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn channel_frames_before_connection_open_are_refused() {
    let mut broker = TestBroker::start();
    let mut client = RawClient::connect(broker.port());
    client.send(PROTOCOL_HEADER);
    let _start = client.read_method();
    client.send(&method_frame(1, declare_queue("too-early")));
    let reply = client.read_to_close();
    // Either a connection.close or just a closed socket: nothing else may come back.
    if !reply.is_empty() {
        let (_, frame) = amq_protocol::frame::parse_frame(&reply[..]).expect("a frame");
        assert!(
            matches!(
                frame,
                AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(_))
                )
            ),
            "{frame:?}"
        );
    }
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn stalled_handshake_is_dropped_after_max_negotiate_time() {
    let mut broker = TestBroker::builder()
        .args(["--max-negotiate-time", "0.3s"])
        .start();
    let mut client = RawClient::connect(broker.port());
    client.send(PROTOCOL_HEADER);
    let started = std::time::Instant::now();
    // The broker sends connection.start, then must give up on us.
    let _ = client.read_to_close();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stalled connection was kept for {:?}",
        started.elapsed()
    );
    still_serving(&mut broker).await;
}

#[tokio::test]
async fn half_sent_frame_then_disconnect_does_not_disturb_the_broker() {
    let mut broker = TestBroker::start();
    for _ in 0..5 {
        let (mut client, _) = RawClient::open(broker.port());
        client.open_channel(1);
        let frame = method_frame(1, declare_queue("half"));
        client.send(&frame[..frame.len() / 2]);
        drop(client);
    }
    still_serving(&mut broker).await;
}

/// A small deterministic generator, so a failing run can be replayed from its printed seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[tokio::test]
async fn mutated_frames_never_take_the_broker_down() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("mutated_frames_never_take_the_broker_down: seed {seed}");
    let mut rng = Lcg(seed);
    let mut broker = TestBroker::start();
    let mut valid = Vec::new();
    valid.extend(method_frame(1, declare_queue("fuzz")));
    valid.extend(method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "fuzz".into(),
            mandatory: true,
            immediate: false,
        })),
    ));
    valid.extend(encode(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 5,
            properties: amq_protocol::protocol::BasicProperties::default()
                .with_headers(integration_tests::table(&[(
                    "k",
                    amq_protocol::types::AMQPValue::LongString("v".into()),
                )]))
                .with_priority(3),
        },
    )));
    valid.extend(encode(&AMQPFrame::Body(1, b"hello".to_vec())));
    for _ in 0..200 {
        let mut bytes = valid.clone();
        for _ in 0..(1 + rng.next() % 4) {
            let at = (rng.next() as usize) % bytes.len();
            bytes[at] = rng.next() as u8;
        }
        let (mut client, _) = RawClient::open(broker.port());
        client.open_channel(1);
        client.send(&bytes);
        drop(client);
    }
    still_serving(&mut broker).await;
}
