"""Interop: publisher confirms (`confirm_delivery()`), mandatory publishes and basic.return, and
transactions (tx.select / commit / rollback) with pika's BlockingChannel."""

import pika
import pytest

from helpers import declare_temp_queue, depth, drain, drain_bodies, wait_depth, wait_for


# --- publisher confirms -------------------------------------------------------------------------


def test_confirmed_publish_is_queued(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"one")  # raises if nacked or the channel closes
    assert depth(channel, q) == 1


def test_many_publishes_are_each_confirmed(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    n = 2000
    for i in range(n):
        channel.basic_publish("", q, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    assert depth(channel, q) == n
    assert [int(b) for b in drain_bodies(channel, q)] == list(range(n))


def test_confirms_for_persistent_messages_on_a_durable_queue(channel):
    q = channel.queue_declare("durable-confirmed", durable=True).method.queue
    channel.confirm_delivery()
    for _ in range(100):
        channel.basic_publish("", q, b"p", pika.BasicProperties(delivery_mode=2))
    assert depth(channel, q) == 100


def test_unroutable_publish_without_mandatory_is_confirmed_and_dropped(channel):
    channel.exchange_declare("nowhere", "direct")
    channel.confirm_delivery()
    channel.basic_publish("nowhere", "no-binding", b"lost")  # acked, no error


def test_publish_to_full_reject_publish_queue_is_nacked(channel):
    q = declare_temp_queue(channel, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.confirm_delivery()
    channel.basic_publish("", q, b"fits")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", q, b"refused")
    assert drain_bodies(channel, q) == [b"fits"]
    assert channel.is_open


# --- mandatory and basic.return -----------------------------------------------------------------


def test_mandatory_unroutable_publish_raises_unroutable_error_with_confirms(channel):
    channel.exchange_declare("mandatory-x", "direct")
    channel.confirm_delivery()
    props = pika.BasicProperties(message_id="m-1", headers={"h": "v"})
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        channel.basic_publish("mandatory-x", "nobody-home", b"bounce", props, mandatory=True)
    [returned] = info.value.messages
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.method.exchange == "mandatory-x"
    assert returned.method.routing_key == "nobody-home"
    assert returned.body == b"bounce"
    assert (returned.properties.message_id, returned.properties.headers) == ("m-1", {"h": "v"})
    assert channel.is_open


def test_mandatory_routable_publish_is_delivered(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"arrives", mandatory=True)
    assert drain_bodies(channel, q) == [b"arrives"]


def test_mandatory_return_without_confirms_reaches_on_return_callback(conn):
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda c, method, props, body: returned.append((method, body)))
    ch.basic_publish("amq.direct", "unbound-key", b"back to sender", mandatory=True)
    wait_for(lambda: (conn.process_data_events(time_limit=0.02), returned)[1], "the basic.return")
    [(method, body)] = returned
    assert (method.reply_code, method.exchange, method.routing_key, body) == (
        312,
        "amq.direct",
        "unbound-key",
        b"back to sender",
    )


# --- transactions -------------------------------------------------------------------------------


def test_tx_commit_delivers_and_nothing_is_visible_before(conn):
    tx = conn.channel()
    observer = conn.channel()
    q = observer.queue_declare("tx-commit").method.queue
    tx.tx_select()
    for i in range(3):
        tx.basic_publish("", q, f"t{i}".encode())
    assert depth(observer, q) == 0, "uncommitted publishes must not be visible"
    tx.tx_commit()
    assert drain_bodies(observer, q) == [b"t0", b"t1", b"t2"]


def test_tx_rollback_discards_publishes_and_channel_stays_transactional(conn):
    tx = conn.channel()
    observer = conn.channel()
    q = observer.queue_declare("tx-rollback").method.queue
    tx.tx_select()
    tx.basic_publish("", q, b"discarded-1")
    tx.basic_publish("", q, b"discarded-2")
    tx.tx_rollback()
    assert depth(observer, q) == 0
    tx.basic_publish("", q, b"kept")
    assert depth(observer, q) == 0
    tx.tx_commit()
    assert drain_bodies(observer, q) == [b"kept"]


def test_tx_ack_takes_effect_only_on_commit(conn):
    setup = conn.channel()
    q = setup.queue_declare("tx-ack").method.queue
    setup.confirm_delivery()
    setup.basic_publish("", q, b"work")

    tx = conn.channel()
    tx.tx_select()
    method, _, _ = tx.basic_get(q)
    tx.basic_ack(method.delivery_tag)
    tx.close()  # the ack was never committed: the message is requeued
    wait_depth(setup, q, 1)
    [(method, _, body)] = drain(setup, q, auto_ack=False)
    assert body == b"work" and method.redelivered is True
    setup.basic_nack(method.delivery_tag, requeue=True)

    tx = conn.channel()
    tx.tx_select()
    method, _, _ = tx.basic_get(q)
    tx.basic_ack(method.delivery_tag)
    tx.tx_commit()
    tx.close()
    assert depth(setup, q) == 0
    assert setup.basic_get(q) == (None, None, None)
