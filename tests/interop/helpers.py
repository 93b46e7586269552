"""Small helpers shared by the pika interop tests: polling with deadlines, draining queues,
consuming a known number of messages, and asserting on broker-reported errors."""

import time

import pika
import pytest

DEFAULT_DEADLINE = 10.0


def wait_for(predicate, what, timeout=DEFAULT_DEADLINE, interval=0.02):
    """Polls `predicate()` until it returns a truthy value, which is returned; fails the test
    with `what` (a string, or a callable giving one) in the message when `timeout` seconds pass
    first."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            if callable(what):
                what = what()
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


def depth(channel, queue):
    """Messages ready in `queue` (passive queue.declare's message_count)."""
    return channel.queue_declare(queue, passive=True).method.message_count


def wait_depth(channel, queue, expected, timeout=DEFAULT_DEADLINE):
    """Polls until `queue` holds exactly `expected` ready messages."""
    seen = []

    def check():
        seen.append(depth(channel, queue))
        return seen[-1] == expected

    wait_for(
        check,
        lambda: f"queue {queue!r} to hold {expected} message(s) (it holds {seen[-1]})",
        timeout,
    )


def drain(channel, queue, auto_ack=True):
    """basic_get until get-empty; returns the list of (method, properties, body)."""
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=auto_ack)
        if method is None:
            return out
        out.append((method, props, body))


def drain_bodies(channel, queue):
    """The bodies of everything in `queue`, in order, acknowledged."""
    return [body for _, _, body in drain(channel, queue)]


def consume(channel, queue, count, auto_ack=False, timeout=DEFAULT_DEADLINE):
    """Consumes exactly `count` messages from `queue` with basic.consume (pika's consume()
    generator), then cancels the consumer. Returns [(method, properties, body)]; the caller
    acknowledges them when auto_ack is False."""
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in channel.consume(queue, auto_ack=auto_ack, inactivity_timeout=0.05):
        if method is not None:
            got.append((method, props, body))
            if len(got) == count:
                break
        if time.monotonic() > deadline:
            break
    # cancel() returns pending (delivered but not yet yielded) messages to the queue.
    channel.cancel()
    assert len(got) == count, (
        f"consumed {len(got)} of {count} message(s) from {queue!r} within {timeout}s"
    )
    return got


def declare_temp_queue(channel, **kwargs):
    """A server-named exclusive queue; returns its name."""
    return channel.queue_declare("", exclusive=True, **kwargs).method.queue


def expect_channel_error(code, fn, *args, **kwargs):
    """Calls fn(*args, **kwargs), which must make the broker close the channel with `code`;
    returns the ChannelClosedByBroker exception."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.reply_code == code, f"expected {code}, got {err.reply_code} {err.reply_text!r}"
    assert err.reply_text, "the broker gave no reply text"
    return err
