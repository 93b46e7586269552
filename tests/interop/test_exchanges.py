"""Interop: routing through each exchange type with pika: the default exchange, direct, fanout,
topic (`*` and `#`, including `#` matching zero words) and headers (`x-match` all and any), the
predeclared `amq.*` exchanges, and unbinding. Publishes are confirmed, so routing is complete
when each queue is read."""

import pika
import pytest

from helpers import drain_bodies


@pytest.fixture
def ch(channel):
    channel.confirm_delivery()
    return channel


def queues(ch, *names):
    for name in names:
        ch.queue_declare(name, exclusive=True)
    return names


def contents(ch, names):
    return {name: drain_bodies(ch, name) for name in names}


def test_default_exchange_routes_by_queue_name(ch):
    queues(ch, "alpha", "beta")
    ch.basic_publish("", "alpha", b"to-alpha")
    ch.basic_publish("", "beta", b"to-beta")
    ch.basic_publish("", "gamma", b"to-nowhere")
    assert contents(ch, ["alpha", "beta"]) == {"alpha": [b"to-alpha"], "beta": [b"to-beta"]}


def test_direct_exchange_routes_by_exact_key_and_unbind_stops_it(ch):
    ch.exchange_declare("dx", "direct")
    qs = queues(ch, "qa", "qb", "qab")
    ch.queue_bind("qa", "dx", "a")
    ch.queue_bind("qb", "dx", "b")
    ch.queue_bind("qab", "dx", "a")
    ch.queue_bind("qab", "dx", "b")
    for key in ["a", "b", "c", "A", "a.b", ""]:
        ch.basic_publish("dx", key, key.encode())
    assert contents(ch, qs) == {"qa": [b"a"], "qb": [b"b"], "qab": [b"a", b"b"]}
    ch.queue_unbind("qab", "dx", "a")
    ch.basic_publish("dx", "a", b"after-unbind")
    assert contents(ch, qs) == {"qa": [b"after-unbind"], "qb": [], "qab": []}


def test_fanout_exchange_routes_to_every_bound_queue_whatever_the_key(ch):
    ch.exchange_declare("fx", "fanout")
    bound = queues(ch, "f1", "f2", "f3")
    unbound = queues(ch, "f4")
    for name, key in zip(bound, ["", "ignored", "x.y"], strict=True):
        ch.queue_bind(name, "fx", key)
    ch.basic_publish("fx", "any-key", b"m1")
    ch.basic_publish("fx", "", b"m2")
    assert contents(ch, bound + unbound) == {
        "f1": [b"m1", b"m2"],
        "f2": [b"m1", b"m2"],
        "f3": [b"m1", b"m2"],
        "f4": [],
    }


TOPIC_BINDINGS = {
    "t1": ["*.orange.*"],
    "t2": ["*.*.rabbit", "lazy.#"],
    "t3": ["#"],
    "t4": ["a.#.z"],
    "t5": ["*"],
}

TOPIC_ROUTES = {
    "quick.orange.rabbit": {"t1", "t2", "t3"},
    "lazy.orange.elephant": {"t1", "t2", "t3"},
    "quick.orange.fox": {"t1", "t3"},
    "lazy.brown.fox": {"t2", "t3"},
    "lazy.pink.rabbit": {"t2", "t3"},  # matches both of t2's bindings, delivered once
    "quick.brown.fox": {"t3"},
    "orange": {"t3", "t5"},
    "quick.orange.male.rabbit": {"t3"},
    "lazy.orange.male.rabbit": {"t2", "t3"},
    "lazy": {"t2", "t3", "t5"},  # '#' matches zero words
    "a.z": {"t3", "t4"},
    "a.b.c.z": {"t3", "t4"},
    "a.b": {"t3"},
    "": {"t3"},  # '#' matches the empty key
}


def test_topic_exchange_star_and_hash(ch):
    ch.exchange_declare("tx", "topic")
    for name, patterns in TOPIC_BINDINGS.items():
        queues(ch, name)
        for pattern in patterns:
            ch.queue_bind(name, "tx", pattern)
    for key in TOPIC_ROUTES:
        ch.basic_publish("tx", key, key.encode())
    expected = {
        name: [k.encode() for k, targets in TOPIC_ROUTES.items() if name in targets]
        for name in TOPIC_BINDINGS
    }
    assert contents(ch, list(TOPIC_BINDINGS)) == expected


HEADER_MESSAGES = [
    ("pdf-report", {"format": "pdf", "type": "report"}),
    ("pdf-log", {"format": "pdf", "type": "log"}),
    ("zip-log", {"format": "zip", "type": "log"}),
    ("zip-report", {"format": "zip", "type": "report"}),
    ("pdf-only", {"format": "pdf"}),
    ("pdf-report-extra", {"format": "pdf", "type": "report", "extra": 1}),
    ("no-headers", None),
]


def test_headers_exchange_x_match_all_and_any(ch):
    ch.exchange_declare("hx", "headers")
    queues(ch, "h-all", "h-any", "h-default")
    ch.queue_bind("h-all", "hx", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    ch.queue_bind("h-any", "hx", arguments={"x-match": "any", "format": "pdf", "type": "log"})
    # Without x-match the default is "all".
    ch.queue_bind("h-default", "hx", arguments={"format": "zip", "type": "log"})
    for name, headers in HEADER_MESSAGES:
        ch.basic_publish("hx", "", name.encode(), pika.BasicProperties(headers=headers))
    assert contents(ch, ["h-all", "h-any", "h-default"]) == {
        "h-all": [b"pdf-report", b"pdf-report-extra"],
        "h-any": [b"pdf-report", b"pdf-log", b"zip-log", b"pdf-only", b"pdf-report-extra"],
        "h-default": [b"zip-log"],
    }


def test_headers_exchange_ignores_routing_key(ch):
    ch.exchange_declare("hx2", "headers")
    queues(ch, "h2")
    ch.queue_bind("h2", "hx2", "some-key", arguments={"x-match": "all", "k": "v"})
    ch.basic_publish("hx2", "other-key", b"yes", pika.BasicProperties(headers={"k": "v"}))
    ch.basic_publish("hx2", "some-key", b"no", pika.BasicProperties(headers={"k": "w"}))
    assert drain_bodies(ch, "h2") == [b"yes"]


@pytest.mark.parametrize(
    "name,kind",
    [
        ("amq.direct", "direct"),
        ("amq.fanout", "fanout"),
        ("amq.topic", "topic"),
        ("amq.headers", "headers"),
        ("amq.match", "headers"),
    ],
)
def test_predeclared_exchange_exists_and_routes(ch, name, kind):
    ch.exchange_declare(name, kind, passive=True)
    queues(ch, "pq")
    if kind == "headers":
        ch.queue_bind("pq", name, arguments={"x-match": "all", "k": "v"})
        props = pika.BasicProperties(headers={"k": "v"})
    else:
        ch.queue_bind("pq", name, "rk")
        props = None
    ch.basic_publish(name, "rk", b"via " + name.encode(), props)
    assert drain_bodies(ch, "pq") == [b"via " + name.encode()]


def test_exchange_to_queue_with_many_bindings_and_keys(ch):
    """Many queues on one exchange: each message reaches exactly its queue."""
    ch.exchange_declare("many", "direct")
    names = [f"mq{i}" for i in range(50)]
    queues(ch, *names)
    for name in names:
        ch.queue_bind(name, "many", name)
    for name in reversed(names):
        ch.basic_publish("many", name, name.encode())
    assert contents(ch, names) == {name: [name.encode()] for name in names}
