"""Interop: protocol errors as pika reports them. Soft errors close the channel with
ChannelClosedByBroker: 404 (passive declare of a missing queue, publish to or bind to a missing
exchange), 406 (inequivalent redeclare of a queue or exchange), 405 (another connection's
exclusive queue), 403 (declaring a reserved `amq.` name); after each the connection still works.
Each reply text must name what was wrong."""

import pytest

from helpers import expect_channel_error


def assert_connection_still_usable(conn):
    assert conn.is_open, "a channel error must not close the connection"
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"still alive")
    assert ch.basic_get(q, auto_ack=True)[2] == b"still alive"


# --- 404 NOT_FOUND ------------------------------------------------------------------------------


def test_passive_declare_of_missing_queue_is_404(conn):
    ch = conn.channel()
    err = expect_channel_error(404, ch.queue_declare, "no-such-queue", passive=True)
    assert "no-such-queue" in err.reply_text
    assert ch.is_closed
    assert_connection_still_usable(conn)


def test_publish_to_missing_exchange_is_404_with_confirms(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    err = expect_channel_error(404, ch.basic_publish, "no-such-exchange", "rk", b"x")
    assert "no-such-exchange" in err.reply_text
    assert_connection_still_usable(conn)


def test_publish_to_missing_exchange_is_404_without_confirms(conn):
    """Without confirms the publish itself returns; the channel closure surfaces on the next
    synchronous call on that channel."""
    ch = conn.channel()
    ch.basic_publish("no-such-exchange", "rk", b"x")
    err = expect_channel_error(404, ch.queue_declare, "", exclusive=True)
    assert "no-such-exchange" in err.reply_text
    assert_connection_still_usable(conn)


def test_passive_declare_of_missing_exchange_is_404(conn):
    ch = conn.channel()
    err = expect_channel_error(404, ch.exchange_declare, "no-such-x", "direct", passive=True)
    assert "no-such-x" in err.reply_text
    assert_connection_still_usable(conn)


def test_bind_to_missing_exchange_is_404(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    err = expect_channel_error(404, ch.queue_bind, q, "no-such-x", "rk")
    assert "no-such-x" in err.reply_text
    assert_connection_still_usable(conn)


def test_basic_get_from_missing_queue_is_404(conn):
    ch = conn.channel()
    expect_channel_error(404, ch.basic_get, "no-such-queue")
    assert_connection_still_usable(conn)


# --- 406 PRECONDITION_FAILED --------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [
        (dict(durable=False), dict(durable=True)),
        (dict(auto_delete=False), dict(auto_delete=True)),
        (dict(arguments={"x-message-ttl": 1000}), dict(arguments={"x-message-ttl": 2000})),
        (dict(arguments={"x-max-length": 10}), dict(arguments={})),
    ],
    ids=["durable", "auto_delete", "argument-value", "argument-missing"],
)
def test_inequivalent_queue_redeclare_is_406(conn, first, second):
    ch = conn.channel()
    ch.queue_declare("redeclared", **first)
    ch.queue_declare("redeclared", **first)  # an equivalent redeclare is fine
    err = expect_channel_error(406, ch.queue_declare, "redeclared", **second)
    assert "redeclared" in err.reply_text
    assert_connection_still_usable(conn)


@pytest.mark.parametrize(
    "first,second",
    [
        (dict(exchange_type="direct"), dict(exchange_type="fanout")),
        (dict(exchange_type="topic", durable=False), dict(exchange_type="topic", durable=True)),
    ],
    ids=["type", "durable"],
)
def test_inequivalent_exchange_redeclare_is_406(conn, first, second):
    ch = conn.channel()
    ch.exchange_declare("redeclared-x", **first)
    err = expect_channel_error(406, ch.exchange_declare, "redeclared-x", **second)
    assert "redeclared-x" in err.reply_text
    assert_connection_still_usable(conn)


def test_ack_of_unknown_delivery_tag_is_406(conn):
    ch = conn.channel()
    ch.basic_ack(12345)
    expect_channel_error(406, ch.queue_declare, "", exclusive=True)
    assert_connection_still_usable(conn)


# --- 405 RESOURCE_LOCKED ------------------------------------------------------------------------


EXCLUSIVE_OPS = {
    "declare": lambda ch, q: ch.queue_declare(q),
    "passive-declare": lambda ch, q: ch.queue_declare(q, passive=True),
    "consume": lambda ch, q: ch.basic_consume(q, lambda *a: None),
    "get": lambda ch, q: ch.basic_get(q),
}


@pytest.mark.parametrize("op", list(EXCLUSIVE_OPS))
def test_exclusive_queue_of_another_connection_is_405(broker, op):
    owner = broker.connect()
    owner.channel().queue_declare("mine-alone", exclusive=True)
    intruder = broker.connect()
    ch = intruder.channel()
    err = expect_channel_error(405, EXCLUSIVE_OPS[op], ch, "mine-alone")
    assert "mine-alone" in err.reply_text
    assert_connection_still_usable(intruder)
    # The owner is unaffected.
    owner.channel().queue_declare("mine-alone", passive=True)


def test_exclusive_queue_goes_with_its_connection(broker):
    owner = broker.connect()
    owner.channel().queue_declare("short-lived", exclusive=True)
    owner.close()
    other = broker.connect()
    expect_channel_error(404, other.channel().queue_declare, "short-lived", passive=True)


# --- 403 ACCESS_REFUSED -------------------------------------------------------------------------


def test_declaring_an_amq_exchange_is_403(conn):
    ch = conn.channel()
    err = expect_channel_error(403, ch.exchange_declare, "amq.foo", "direct")
    assert "amq.foo" in err.reply_text
    assert_connection_still_usable(conn)


def test_declaring_an_amq_queue_is_403(conn):
    ch = conn.channel()
    err = expect_channel_error(403, ch.queue_declare, "amq.foo")
    assert "amq.foo" in err.reply_text
    assert_connection_still_usable(conn)


def test_many_channel_errors_leave_the_connection_usable(conn):
    for _ in range(20):
        ch = conn.channel()
        expect_channel_error(404, ch.queue_declare, "missing", passive=True)
    assert_connection_still_usable(conn)
