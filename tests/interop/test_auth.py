"""Interop: authentication as pika sees it. With `--auth yes`, guest/guest from 127.0.0.1 may
connect and work, and wrong credentials get connection.close 403 (pika raises
ProbableAuthenticationError wrapping ConnectionClosedByBroker(403, ...) because the close comes
during the handshake). With `--auth no`, any PLAIN credentials are accepted."""

import pika
import pytest


def assert_refused_with_403(broker, user, password):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        broker.connect(user, password)
    err = info.value
    # pika reports a close during the handshake as ProbableAuthenticationError whose message is
    # the repr of the underlying ConnectionClosedByBroker; a bare ConnectionClosedByBroker is
    # accepted too. A dropped socket (StreamLostError) without a 403 close is not.
    assert isinstance(
        err,
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ConnectionClosedByBroker),
    ), repr(err)
    text = str(err)
    if isinstance(err, pika.exceptions.ConnectionClosedByBroker):
        assert err.reply_code == 403, text
    else:
        assert "ConnectionClosedByBroker" in text and "(403)" in text, text
    assert "ACCESS_REFUSED" in text or "auth" in text.lower(), text


def test_guest_from_loopback_can_connect_and_work(start_broker):
    broker = start_broker(auth="yes")
    conn = broker.connect("guest", "guest")
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"authenticated")
    assert ch.basic_get(q, auto_ack=True)[2] == b"authenticated"


def test_wrong_password_is_refused_with_403(start_broker):
    broker = start_broker(auth="yes")
    assert_refused_with_403(broker, "guest", "not-the-password")
    # The refusal does not disturb the broker: the right password still works.
    assert broker.connect("guest", "guest").is_open


def test_unknown_user_is_refused_with_403(start_broker):
    broker = start_broker(auth="yes")
    assert_refused_with_403(broker, "nobody", "guest")


def test_auth_no_accepts_any_credentials(start_broker):
    broker = start_broker(auth="no")
    conn = broker.connect("anyone", "anything")
    assert conn.channel().is_open
