"""Interop: the management protocol scripted from pika exactly as `docs/management-protocol.md`
shows it: a create and a query by class, a query by object id, events on `qmf.default.topic`,
and malformed requests answered with `_exception`s."""

import json
import uuid

import pika

BROKER = {"_object_name": "org.apache.qpid.broker:broker:amqp-broker"}


class Agent:
    """The request() function of the protocol document, as a small class."""

    def __init__(self, channel):
        self.ch = channel
        self.reply = channel.queue_declare("", exclusive=True).method.queue

    def send(self, opcode, body, raw=None):
        cid = str(uuid.uuid4())
        payload = raw if raw is not None else json.dumps(dict(version=1, **body))
        self.ch.basic_publish(
            "qmf.default.direct",
            "broker",
            payload,
            pika.BasicProperties(
                reply_to=self.reply,
                correlation_id=cid,
                content_type="application/json",
                headers={"qmf.opcode": opcode},
            ),
        )
        return cid

    def answers(self, cid):
        """Every response message to `cid` until the last, as (opcode, body)."""
        out = []
        for method, props, payload in self.ch.consume(
            self.reply, auto_ack=True, inactivity_timeout=10
        ):
            assert method is not None, "no answer within 10 s"
            assert props.correlation_id == cid
            assert props.content_type == "application/json"
            out.append((props.headers["qmf.opcode"], json.loads(payload)))
            if not props.headers.get("partial"):
                self.ch.cancel()
                return out

    def request(self, opcode, body):
        return self.answers(self.send(opcode, body))


def test_create_then_query_from_pika(channel):
    agent = Agent(channel)
    [(opcode, answer)] = agent.request(
        "_method_request",
        {
            "_object_id": BROKER,
            "_method_name": "create",
            "_arguments": {
                "type": "queue",
                "name": "q1",
                "properties": {"durable": True, "qpid.max_count": 100},
                "strict": True,
            },
        },
    )
    assert opcode == "_method_response", answer
    assert answer["version"] == 1 and answer["_arguments"] == {}
    pages = agent.request(
        "_query_request", {"_what": "OBJECT", "_schema_id": {"_class_name": "queue"}}
    )
    objects = [o for opcode, body in pages for o in body["objects"]]
    assert all(opcode == "_query_response" for opcode, _ in pages)
    q1 = [o["_values"] for o in objects if o["_values"]["name"] == "q1"]
    assert q1 and q1[0]["durable"] is True and q1[0]["msgDepth"] == 0
    assert q1[0]["arguments"] == {"qpid.max_count": 100}
    [(_, by_id)] = agent.request(
        "_query_request", {"_object_id": {"_object_name": "org.apache.qpid.broker:queue:q1"}}
    )
    assert [o["_values"]["name"] for o in by_id["objects"]] == ["q1"]
    assert by_id["sequence"] >= pages[0][1]["sequence"]


def test_events_follow_changes_with_increasing_sequence(conn, channel):
    events = conn.channel()
    events.queue_declare("events", exclusive=True)
    events.queue_bind("events", "qmf.default.topic", "agent.ind.event.org_apache_qpid_broker.#")
    channel.exchange_declare("ex", "fanout")
    channel.queue_declare("eq")
    channel.queue_bind("eq", "ex")
    channel.queue_delete("eq")
    seen = []
    for method, props, payload in events.consume("events", auto_ack=True, inactivity_timeout=10):
        assert method is not None, f"only {seen} arrived"
        body = json.loads(payload)
        assert props.headers["qmf.content"] == "_event"
        if body["_values"].get("qName") == "events":
            continue  # the event queue's own bind and subscribe
        assert method.routing_key.startswith(
            "agent.ind.event.org_apache_qpid_broker." + body["_schema_id"]["_class_name"] + ".info."
        )
        seen.append((body["_schema_id"]["_class_name"], body["sequence"]))
        if len(seen) == 4:
            break
    assert [name for name, _ in seen] == ["exchangeDeclare", "queueDeclare", "bind", "queueDelete"]
    sequences = [s for _, s in seen]
    assert sequences == sorted(sequences) and len(set(sequences)) == 4


def test_malformed_requests_get_exceptions(channel):
    agent = Agent(channel)
    cases = [
        ("_method_request", "{oops", "not valid JSON"),
        ("_query_request", json.dumps({"version": 99}), "unsupported version"),
        (
            "_method_request",
            json.dumps({"version": 1, "_object_id": BROKER, "_method_name": "nosuch"}),
            "unknown method",
        ),
    ]
    for opcode, raw, expected in cases:
        [(answer_opcode, body)] = agent.answers(agent.send(opcode, None, raw=raw))
        assert answer_opcode == "_exception", body
        assert body["error_code"] == 3 and expected in body["error_text"], body
    # The broker still serves.
    [(opcode, body)] = agent.request("_query_request", {"_schema_id": {"_class_name": "broker"}})
    assert opcode == "_query_response" and body["objects"][0]["_values"]["name"] == "amqp-broker"
