"""Interop: acknowledgements with pika: ack (single and multiple), unacked messages requeued when
their channel closes, basic.nack with and without requeue (multiple too), basic.reject with and
without requeue, and the redelivered flag on every requeued message."""

import pika

from helpers import consume, declare_temp_queue, depth, drain, wait_depth


def fill(channel, queue, n, prefix="m"):
    """Publishes n messages, waits until all are queued and returns their bodies."""
    bodies = [f"{prefix}{i}".encode() for i in range(n)]
    for body in bodies:
        channel.basic_publish("", queue, body)
    wait_depth(channel, queue, n)
    return bodies


def test_ack_removes_the_message(conn):
    ch = conn.channel()
    q = ch.queue_declare("acked").method.queue
    fill(ch, q, 1)
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"m0"
    ch.basic_ack(method.delivery_tag)
    ch.close()
    # Nothing comes back when the channel that acked it is gone.
    other = conn.channel()
    assert depth(other, q) == 0
    assert other.basic_get(q) == (None, None, None)


def test_ack_multiple_acknowledges_everything_up_to_the_tag(conn):
    ch = conn.channel()
    q = ch.queue_declare("acked-multiple").method.queue
    fill(ch, q, 4)
    got = consume(ch, q, 4)
    ch.basic_ack(got[2][0].delivery_tag, multiple=True)  # m0..m2
    ch.close()
    other = conn.channel()
    [(method, _, body)] = drain(other, q)
    assert body == b"m3"
    assert method.redelivered is True


def test_unacked_message_is_requeued_with_redelivered_when_channel_closes(conn):
    ch = conn.channel()
    q = ch.queue_declare("unacked").method.queue
    fill(ch, q, 1)
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert (body, method.redelivered) == (b"m0", False)
    assert depth(ch, q) == 0, "an unacked message is not ready"
    ch.close()
    other = conn.channel()
    wait_depth(other, q, 1)
    method, _, body = other.basic_get(q, auto_ack=True)
    assert (body, method.redelivered) == (b"m0", True)


def test_nack_with_requeue_redelivers_with_redelivered_flag(channel):
    q = declare_temp_queue(channel)
    fill(channel, q, 1)
    [(method, _, body)] = consume(channel, q, 1)
    assert method.redelivered is False
    channel.basic_nack(method.delivery_tag, requeue=True)
    [(method, _, again)] = consume(channel, q, 1)
    assert again == body
    assert method.redelivered is True
    channel.basic_ack(method.delivery_tag)
    assert depth(channel, q) == 0


def test_nack_with_requeue_keeps_the_message_properties(channel):
    q = declare_temp_queue(channel)
    props = pika.BasicProperties(message_id="id-1", headers={"k": {"nested": [1, 2]}}, priority=3)
    channel.basic_publish("", q, b"body", props)
    wait_depth(channel, q, 1)
    method, _, _ = channel.basic_get(q)
    channel.basic_nack(method.delivery_tag, requeue=True)
    method, got, body = channel.basic_get(q, auto_ack=True)
    assert method.redelivered is True
    assert (body, got.message_id, got.headers, got.priority) == (
        b"body",
        "id-1",
        {"k": {"nested": [1, 2]}},
        3,
    )


def test_nack_multiple_with_requeue_redelivers_all(channel):
    q = declare_temp_queue(channel)
    bodies = fill(channel, q, 3)
    got = consume(channel, q, 3)
    channel.basic_nack(got[-1][0].delivery_tag, multiple=True, requeue=True)
    again = consume(channel, q, 3, auto_ack=True)
    assert sorted(b for _, _, b in again) == bodies
    assert all(m.redelivered for m, _, _ in again)


def test_nack_without_requeue_discards(channel):
    q = declare_temp_queue(channel)
    fill(channel, q, 3)
    got = consume(channel, q, 3)
    channel.basic_nack(got[-1][0].delivery_tag, multiple=True, requeue=False)
    assert depth(channel, q) == 0
    assert channel.basic_get(q) == (None, None, None)


def test_reject_without_requeue_discards(conn):
    ch = conn.channel()
    q = ch.queue_declare("rejected").method.queue
    fill(ch, q, 2)
    method, _, body = ch.basic_get(q)
    assert body == b"m0"
    ch.basic_reject(method.delivery_tag, requeue=False)
    ch.close()  # had the reject not been applied, closing would requeue m0
    other = conn.channel()
    assert [b for _, _, b in drain(other, q)] == [b"m1"]


def test_reject_with_requeue_redelivers_with_redelivered_flag(channel):
    q = declare_temp_queue(channel)
    fill(channel, q, 1)
    method, _, body = channel.basic_get(q)
    channel.basic_reject(method.delivery_tag, requeue=True)
    wait_depth(channel, q, 1)
    method, _, again = channel.basic_get(q, auto_ack=True)
    assert again == body
    assert method.redelivered is True


def test_auto_ack_consumer_leaves_nothing_to_requeue(conn):
    ch = conn.channel()
    q = ch.queue_declare("auto-acked").method.queue
    fill(ch, q, 3)
    consume(ch, q, 3, auto_ack=True)
    ch.close()
    assert depth(conn.channel(), q) == 0
