"""Interop: an active-passive cluster as pika sees it (issue 5, reference `test_failover_python`,
client side). Two members are started by the test, one is promoted with `qpid-ha promote
--cluster-manager`, and `pika.BlockingConnection([backup, primary])` (pika tries the parameters
in turn) ends on the primary: the backup refuses the client with connection.close 530 naming
the primary. Publishing with confirms and consuming then work there.

`qpid-ha` is looked for next to `$QPIDD_BIN` (`cargo build --workspace --bins` puts it there)."""

import contextlib
import os
import socket
import subprocess

import pika
import pytest

from helpers import wait_for


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qpid_ha_bin():
    path = os.path.join(os.path.dirname(os.environ["QPIDD_BIN"]), "qpid-ha")
    if not os.access(path, os.X_OK):
        pytest.skip(f"qpid-ha not found at {path} (build it with `cargo build --workspace --bins`)")
    return path


def qpid_ha(*args):
    return subprocess.run(
        [qpid_ha_bin(), *args], capture_output=True, text=True, timeout=20, check=False
    )


@contextlib.contextmanager
def listening_on(port):
    """While active, the conftest's `qpidd --port 0 ...` is started with `--port <port>`
    instead (cluster members must know each other's ports before they start)."""
    real = subprocess.Popen
    qpidd = os.environ["QPIDD_BIN"]

    def popen(args, *rest, **kwargs):
        if args and args[0] == qpidd:
            args = list(args)
            i = args.index("--port")
            args[i + 1] = str(port)
        return real(args, *rest, **kwargs)

    subprocess.Popen = popen
    try:
        yield
    finally:
        subprocess.Popen = real


def start_cluster(start_broker, n):
    ports = [free_port() for _ in range(n)]
    url = ",".join(f"127.0.0.1:{p}" for p in ports)
    members = []
    for port in ports:
        with listening_on(port):
            members.append(
                start_broker(
                    "--ha-cluster",
                    "yes",
                    "--ha-brokers-url",
                    url,
                    "--ha-replicate",
                    "all",
                    "--link-maintenance-interval",
                    "0.1s",
                )
            )
        assert members[-1].port == port
    return members


def status(broker):
    return qpid_ha("status", "-b", f"127.0.0.1:{broker.port}").stdout.strip()


def test_pika_given_backup_then_primary_connects_to_the_primary(start_broker):
    qpid_ha_bin()
    primary, backup = start_cluster(start_broker, 2)
    r = qpid_ha("promote", "--cluster-manager", "-b", f"127.0.0.1:{primary.port}")
    assert (r.returncode, r.stderr) == (0, ""), r
    wait_for(lambda: status(backup) == "ready", lambda: f"backup status {status(backup)!r}")

    # The backup alone refuses the client with 530, naming the primary.
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        pika.BlockingConnection(backup.params())
    text = str(info.value)
    assert "530" in text, text
    assert f"127.0.0.1:{primary.port}" in text, text

    # Given [backup, primary], pika tries the backup, is refused, and ends on the primary.
    conn = pika.BlockingConnection([backup.params(), primary.params()])
    try:
        ch = conn.channel()
        ch.queue_declare("landed")
        ch.confirm_delivery()
        for i in range(10):
            ch.basic_publish(
                "",
                "landed",
                f"m{i}".encode(),
                pika.BasicProperties(delivery_mode=2, headers={"n": i}),
                mandatory=True,
            )
        got = []
        for method, props, body in ch.consume("landed", inactivity_timeout=5):
            assert method is not None, f"only {got} consumed"
            assert props.headers == {"n": len(got)}
            got.append(body.decode())
            ch.basic_ack(method.delivery_tag)
            if len(got) == 10:
                break
        ch.cancel()
        assert got == [f"m{i}" for i in range(10)]
    finally:
        conn.close()
