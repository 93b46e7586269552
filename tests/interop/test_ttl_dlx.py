"""Interop: message TTL (the queue argument `x-message-ttl` and the per-message `expiration`
property) and dead-lettering (`x-dead-letter-exchange`, `x-dead-letter-routing-key`) on expiry,
reject, nack and overflow, with the `x-death` header's reason, queue, count, exchange and
routing-keys as RabbitMQ writes them. Waits are polls with deadlines, never fixed sleeps."""

import pika

from helpers import depth, drain, drain_bodies, wait_depth

TTL_MS = 200


def test_queue_ttl_expires_messages(channel):
    channel.confirm_delivery()
    channel.exchange_declare("ttl-fan", "fanout")
    channel.queue_declare("with-ttl", arguments={"x-message-ttl": TTL_MS})
    channel.queue_declare("without-ttl")
    channel.queue_bind("with-ttl", "ttl-fan")
    channel.queue_bind("without-ttl", "ttl-fan")
    channel.basic_publish("ttl-fan", "", b"short-lived")
    wait_depth(channel, "with-ttl", 0)
    assert channel.basic_get("with-ttl") == (None, None, None)
    # The same message in a queue without TTL is still there: it expired, it was not lost.
    assert drain_bodies(channel, "without-ttl") == [b"short-lived"]


def test_queue_ttl_message_is_delivered_before_it_expires(channel):
    channel.confirm_delivery()
    channel.queue_declare("long-ttl", arguments={"x-message-ttl": 60_000})
    channel.basic_publish("", "long-ttl", b"fresh")
    assert drain_bodies(channel, "long-ttl") == [b"fresh"]


def test_per_message_expiration(channel):
    channel.confirm_delivery()
    q = channel.queue_declare("per-message-ttl").method.queue
    channel.basic_publish("", q, b"expires", pika.BasicProperties(expiration=str(TTL_MS)))
    channel.basic_publish("", q, b"stays", pika.BasicProperties(expiration="600000"))
    channel.basic_publish("", q, b"no-expiration")
    wait_depth(channel, q, 2)
    got = drain(channel, q)
    assert [b for _, _, b in got] == [b"stays", b"no-expiration"]
    assert got[0][1].expiration == "600000", "an unexpired message keeps its expiration"


def test_per_message_expiration_shorter_than_queue_ttl_wins(channel):
    channel.confirm_delivery()
    channel.queue_declare("both-ttls", arguments={"x-message-ttl": 600_000})
    channel.basic_publish("", "both-ttls", b"gone", pika.BasicProperties(expiration=str(TTL_MS)))
    channel.basic_publish("", "both-ttls", b"kept")
    wait_depth(channel, "both-ttls", 1)
    assert drain_bodies(channel, "both-ttls") == [b"kept"]


def dlx_setup(channel, source, source_args):
    """A fanout dead-letter exchange `dlx` bound to queue `dead`, and the source queue."""
    channel.confirm_delivery()
    channel.exchange_declare("dlx", "fanout")
    channel.queue_declare("dead")
    channel.queue_bind("dead", "dlx")
    channel.queue_declare(source, arguments={"x-dead-letter-exchange": "dlx", **source_args})


def only_death(props):
    deaths = props.headers["x-death"]
    assert isinstance(deaths, list) and len(deaths) == 1, deaths
    return deaths[0]


def test_expired_message_is_dead_lettered_with_x_death(channel):
    dlx_setup(channel, "expiring", {"x-message-ttl": TTL_MS})
    props = pika.BasicProperties(headers={"app": "kept"}, message_id="dl-1")
    channel.basic_publish("", "expiring", b"to-the-dlx", props)
    wait_depth(channel, "dead", 1)
    assert depth(channel, "expiring") == 0
    [(method, got, body)] = drain(channel, "dead")
    assert body == b"to-the-dlx"
    assert method.exchange == "dlx"
    assert method.routing_key == "expiring", "without x-dead-letter-routing-key the key is kept"
    assert got.message_id == "dl-1"
    assert got.headers["app"] == "kept"
    death = only_death(got)
    assert death["reason"] == "expired"
    assert death["queue"] == "expiring"
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == ["expiring"]


def test_per_message_expiration_dead_letter_removes_expiration(channel):
    dlx_setup(channel, "expiring-per-message", {})
    channel.basic_publish(
        "", "expiring-per-message", b"m", pika.BasicProperties(expiration=str(TTL_MS))
    )
    wait_depth(channel, "dead", 1)
    [(_, got, _)] = drain(channel, "dead")
    death = only_death(got)
    assert (death["reason"], death["queue"], death["count"]) == (
        "expired",
        "expiring-per-message",
        1,
    )
    # As RabbitMQ: the dead-lettered copy must not expire again; the original is recorded.
    assert got.expiration is None
    assert death["original-expiration"] == str(TTL_MS)


def test_rejected_message_is_dead_lettered_with_routing_key_override(channel):
    channel.confirm_delivery()
    channel.exchange_declare("dlx-direct", "direct")
    channel.queue_declare("dead-by-key")
    channel.queue_bind("dead-by-key", "dlx-direct", "dead-key")
    channel.queue_declare(
        "rejecting",
        arguments={
            "x-dead-letter-exchange": "dlx-direct",
            "x-dead-letter-routing-key": "dead-key",
        },
    )
    channel.basic_publish("", "rejecting", b"unwanted", pika.BasicProperties(headers={"n": 1}))
    method, _, _ = channel.basic_get("rejecting")
    channel.basic_reject(method.delivery_tag, requeue=False)
    wait_depth(channel, "dead-by-key", 1)
    [(method, got, body)] = drain(channel, "dead-by-key")
    assert body == b"unwanted"
    assert method.routing_key == "dead-key"
    assert got.headers["n"] == 1
    death = only_death(got)
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", "rejecting", 1)
    assert death["routing-keys"] == ["rejecting"], "x-death records the original routing key"


def test_nacked_message_is_dead_lettered_as_rejected(channel):
    dlx_setup(channel, "nacking", {})
    channel.basic_publish("", "nacking", b"nacked")
    method, _, _ = channel.basic_get("nacking")
    channel.basic_nack(method.delivery_tag, requeue=False)
    wait_depth(channel, "dead", 1)
    [(_, got, body)] = drain(channel, "dead")
    assert body == b"nacked"
    death = only_death(got)
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", "nacking", 1)


def test_requeued_message_is_not_dead_lettered(channel):
    dlx_setup(channel, "requeueing", {})
    channel.basic_publish("", "requeueing", b"again")
    method, _, _ = channel.basic_get("requeueing")
    channel.basic_nack(method.delivery_tag, requeue=True)
    wait_depth(channel, "requeueing", 1)
    assert depth(channel, "dead") == 0


def test_overflowed_message_is_dead_lettered_as_maxlen(channel):
    dlx_setup(channel, "bounded", {"x-max-length": 2})
    for i in range(3):
        channel.basic_publish("", "bounded", f"m{i}".encode())
    wait_depth(channel, "dead", 1)
    [(_, got, body)] = drain(channel, "dead")
    assert body == b"m0", "drop-head overflow drops (and dead-letters) the oldest"
    death = only_death(got)
    assert (death["reason"], death["queue"], death["count"]) == ("maxlen", "bounded", 1)
    assert drain_bodies(channel, "bounded") == [b"m1", b"m2"]


def test_x_death_count_increments_each_time_the_message_dies_the_same_way(channel):
    """A queue dead-lettering to itself (through the default exchange): every reject of the same
    message adds one to the count of the single (queue, reason) entry."""
    channel.confirm_delivery()
    channel.queue_declare(
        "phoenix",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "phoenix"},
    )
    channel.basic_publish("", "phoenix", b"rises")
    for expected in (1, 2, 3):
        wait_depth(channel, "phoenix", 1)
        method, props, body = channel.basic_get("phoenix")
        assert body == b"rises"
        if expected > 1:
            death = only_death(props)
            assert (death["reason"], death["queue"], death["count"]) == (
                "rejected",
                "phoenix",
                expected - 1,
            )
        channel.basic_reject(method.delivery_tag, requeue=False)
    wait_depth(channel, "phoenix", 1)
    [(_, props, _)] = drain(channel, "phoenix")
    assert only_death(props)["count"] == 3
