"""Interop: publish, basic.get and basic.consume with pika, and message properties and headers
coming back exactly as published (every basic property, nested tables, arrays, each field type
pika can encode), bodies of every size, get-empty, get-ok's message count, delivery order, qos
prefetch and the consumer-cancel notification when a queue is deleted."""

import datetime
import decimal
import os

import pika

from helpers import consume, declare_temp_queue, depth, drain, wait_depth, wait_for

HEADERS = {
    "string": "héllo wörld",
    "empty": "",
    "int": 42,
    "negative": -7,
    "int32_max": 2**31 - 1,
    "big": 2**40,  # long-long
    "negative_big": -(2**40),
    "unsigned_big": 2**63 + 5,  # pika encodes as 'l' (unsigned 64-bit)
    "true": True,
    "false": False,
    "none": None,
    "decimal": decimal.Decimal("3.14"),
    "timestamp": datetime.datetime(2024, 2, 29, 12, 34, 56),
    "bytes": b"\x00\x01\xfe\xff",  # a byte array ('x')
    "array": [1, "two", [3, {"four": 4}], None, True],
    "empty_array": [],
    "empty_table": {},
    "nested": {"level1": {"level2": {"level3": "deep", "n": -1}}, "list": [{"a": 1}]},
}

FULL_PROPERTIES = pika.BasicProperties(
    content_type="application/json",
    content_encoding="utf-8",
    headers=HEADERS,
    delivery_mode=2,
    priority=7,
    correlation_id="corr-42",
    reply_to="reply-queue",
    expiration="600000",
    message_id="msg-0001",
    timestamp=1700000000,
    type="order.created",
    user_id=None,  # must match the authenticated user: see test_user_id_of_the_sender_is_kept
    app_id="interop-tests",
    cluster_id="cluster-a",
)

PROPERTY_NAMES = [
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
]


def assert_same_properties(got, sent):
    for name in PROPERTY_NAMES:
        assert getattr(got, name) == getattr(sent, name), f"property {name} differs"
    # Equality above is value equality; the content header must come back byte for byte, so
    # also make sure no value changed type on the way (bytes became str, a table became an
    # array, ...) and no table changed its field order.
    assert _types(got.headers) == _types(sent.headers)


def _types(value):
    if isinstance(value, dict):
        return [(k, _types(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"  # pika decodes 64-bit integers as its own int subclass `long`
    return type(value).__name__


def test_basic_get_returns_properties_and_headers_exactly(channel):
    q = declare_temp_queue(channel)
    channel.basic_publish("", q, b'{"id": 1}', FULL_PROPERTIES)
    method, props, body = _get_one(channel, q)
    assert body == b'{"id": 1}'
    assert method.exchange == ""
    assert method.routing_key == q
    assert method.redelivered is False
    assert_same_properties(props, FULL_PROPERTIES)


def _get_one(channel, queue):
    """basic_get with a deadline (the publish may still be in flight)."""
    result = []

    def attempt():
        m, p, b = channel.basic_get(queue, auto_ack=True)
        if m is not None:
            result.append((m, p, b))
        return bool(result)

    wait_for(attempt, f"a message in {queue!r}")
    return result[0]


def test_basic_consume_returns_properties_and_headers_exactly(channel):
    q = declare_temp_queue(channel)
    channel.basic_publish("", q, b"payload", FULL_PROPERTIES)
    [(method, props, body)] = consume(channel, q, 1, auto_ack=True)
    assert body == b"payload"
    assert method.routing_key == q
    assert method.redelivered is False
    assert_same_properties(props, FULL_PROPERTIES)


def test_absent_properties_stay_absent(channel):
    q = declare_temp_queue(channel)
    channel.basic_publish("", q, b"bare")
    _, props, body = _get_one(channel, q)
    assert body == b"bare"
    for name in PROPERTY_NAMES:
        assert getattr(props, name) is None, f"property {name} appeared: {getattr(props, name)!r}"


def test_properties_one_at_a_time(channel):
    """Each property alone (the property-flags bit for it set and no other) survives."""
    q = declare_temp_queue(channel)
    sent = []
    for name in PROPERTY_NAMES:
        value = getattr(FULL_PROPERTIES, name)
        if value is None:
            continue
        props = pika.BasicProperties(**{name: value})
        channel.basic_publish("", q, name.encode(), props)
        sent.append((name, props))
    wait_depth(channel, q, len(sent))
    got = drain(channel, q)
    assert [b for _, _, b in got] == [name.encode() for name, _ in sent]
    for (_, props, _), (_, sent_props) in zip(got, sent, strict=True):
        assert_same_properties(props, sent_props)


def test_bodies_of_every_size_round_trip(channel):
    """Empty, one byte, all byte values, and bodies spanning several frames (frame_max 131072)."""
    q = declare_temp_queue(channel)
    bodies = [
        b"",
        b"x",
        bytes(range(256)),
        os.urandom(131072 - 8),  # exactly one full body frame
        os.urandom(131072 - 7),  # one byte into a second frame
        os.urandom(1_000_000),
    ]
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("", q, body)
    got = drain(channel, q)
    assert [len(b) for _, _, b in got] == [len(b) for b in bodies]
    assert [b for _, _, b in got] == bodies
    channel.basic_publish("", q, bodies[-1])
    [(_, _, body)] = consume(channel, q, 1, auto_ack=True)
    assert body == bodies[-1]


def test_basic_get_empty_and_message_count(channel):
    q = declare_temp_queue(channel)
    assert channel.basic_get(q, auto_ack=True) == (None, None, None)
    channel.confirm_delivery()
    for i in range(3):
        channel.basic_publish("", q, f"m{i}".encode())
    counts = []
    bodies = []
    for _ in range(3):
        method, _, body = channel.basic_get(q, auto_ack=True)
        counts.append(method.message_count)
        bodies.append(body)
    assert bodies == [b"m0", b"m1", b"m2"]
    assert counts == [2, 1, 0], "get-ok's message_count is the number of messages left"
    assert channel.basic_get(q, auto_ack=True) == (None, None, None)


def test_consume_delivers_in_publish_order(channel):
    q = declare_temp_queue(channel)
    n = 500
    for i in range(n):
        channel.basic_publish("", q, str(i).encode())
    got = consume(channel, q, n)
    assert [int(b) for _, _, b in got] == list(range(n))
    tags = [m.delivery_tag for m, _, _ in got]
    assert tags == list(range(1, n + 1)), "delivery tags count up from 1 on a new channel"
    channel.basic_ack(tags[-1], multiple=True)
    assert depth(channel, q) == 0


def test_publish_on_one_connection_consume_on_another(broker):
    producer = broker.connect().channel()
    consumer_conn = broker.connect()
    consumer = consumer_conn.channel()
    q = consumer.queue_declare("shared-queue").method.queue
    producer.confirm_delivery()
    producer.basic_publish("", q, b"across", pika.BasicProperties(message_id="x1"))
    [(_, props, body)] = consume(consumer, q, 1, auto_ack=True)
    assert (body, props.message_id) == (b"across", "x1")


def test_prefetch_count_limits_unacked_deliveries(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish("", q, str(i).encode())
    channel.basic_qos(prefetch_count=2)
    got = []
    channel.basic_consume(q, lambda ch, m, p, b: got.append((m, b)))
    conn = channel.connection
    wait_for(lambda: (conn.process_data_events(time_limit=0.02), len(got) >= 2)[1], "2 deliveries")
    # Exactly two are out; the other three are still ready in the queue.
    assert depth(channel, q) == 3
    conn.process_data_events(time_limit=0.1)
    assert [b for _, b in got] == [b"0", b"1"]
    channel.basic_ack(got[0][0].delivery_tag)
    wait_for(lambda: (conn.process_data_events(time_limit=0.02), len(got) >= 3)[1], "3rd delivery")
    assert depth(channel, q) == 2
    assert [b for _, b in got] == [b"0", b"1", b"2"]


def test_consumer_is_cancelled_when_its_queue_is_deleted(broker):
    conn = broker.connect()
    ch = conn.channel()
    q = ch.queue_declare("doomed").method.queue
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume(q, lambda *a: None)
    other = broker.connect().channel()
    other.queue_delete(q)
    wait_for(
        lambda: (conn.process_data_events(time_limit=0.02), cancelled)[1],
        "the broker's basic.cancel",
    )
    assert cancelled == [tag]
    assert ch.is_open and conn.is_open


def test_server_named_queue(channel):
    name = channel.queue_declare("", exclusive=True).method.queue
    assert name.startswith("amq.gen-"), name
    channel.confirm_delivery()
    channel.basic_publish("", name, b"to a generated name")
    assert _get_one(channel, name)[2] == b"to a generated name"


def test_priority_queue_delivers_highest_priority_first(channel):
    q = declare_temp_queue(channel, arguments={"x-max-priority": 10})
    channel.confirm_delivery()
    for priority in [1, 5, None, 9, 5]:
        props = pika.BasicProperties(priority=priority)
        channel.basic_publish("", q, f"p{priority}".encode(), props)
    got = [b for _, _, b in drain(channel, q)]
    assert got == [b"p9", b"p5", b"p5", b"p1", b"pNone"]


def test_basic_recover_redelivers_unacked_messages(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"recover me")
    method, _, _ = channel.basic_get(q)
    assert method.redelivered is False
    channel.basic_recover(requeue=True)
    wait_depth(channel, q, 1)
    method, _, body = channel.basic_get(q, auto_ack=True)
    assert (body, method.redelivered) == (b"recover me", True)


def test_user_id_of_the_sender_is_kept(start_broker):
    """user_id naming the authenticated user is accepted and delivered unchanged."""
    broker = start_broker(auth="yes")
    channel = broker.connect("guest", "guest").channel()
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"signed", pika.BasicProperties(user_id="guest"))
    _, props, body = _get_one(channel, q)
    assert (body, props.user_id) == (b"signed", "guest")
