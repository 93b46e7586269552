"""pytest fixtures for the pika interop tests: a real `qpidd` per test.

Each test that uses the `broker` fixture (or calls the `start_broker` factory) gets its own
broker process, started as

    $QPIDD_BIN --port 0 --no-data-dir --auth no --log-enable info+ [extra args]

(`start_broker(*extra_args, auth="yes")` for authentication tests). Brokers are per test, so
tests are independent and may reuse queue names.

The port is read from the first line of the broker's stdout, with a deadline. The broker's stderr
(its log) goes to a file under the test's tmp_path; when a test fails, that log is attached to the
failure report as a "qpidd log" section. At teardown the broker is stopped (SIGTERM, then SIGKILL
after a deadline), and the test errors if the broker died on its own, logged a panic or printed
anything on stdout after the port line.

A watchdog kills the test's brokers if a test runs longer than QPIDD_TEST_TIMEOUT seconds
(default 60), so a blocking pika call waiting on a broker that never answers fails instead of
hanging the run.

`QPIDD_BIN` must name the broker binary (`cargo xtask test` sets it); without it the run stops
with a usage error instead of skipping anything.
"""

import os
import signal
import subprocess
import threading
import time

import pika
import pytest

START_DEADLINE = 15.0
STOP_DEADLINE = 10.0
TEST_TIMEOUT = float(os.environ.get("QPIDD_TEST_TIMEOUT", "60"))


def pytest_configure(config):
    qpidd = os.environ.get("QPIDD_BIN")
    if not qpidd:
        raise pytest.UsageError(
            "QPIDD_BIN is not set: it must name the qpidd binary to test "
            "(`cargo xtask test` builds it and sets QPIDD_BIN)"
        )
    if not (os.path.isfile(qpidd) and os.access(qpidd, os.X_OK)):
        raise pytest.UsageError(f"QPIDD_BIN={qpidd!r} is not an executable file")


def _die_with_parent():
    """Runs in the broker child before exec: SIGKILL it if pytest dies (Linux only)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # pragma: no cover - best effort outside Linux
        pass


class Broker:
    """One running qpidd process and the means to reach and inspect it."""

    def __init__(self, log_path, extra_args=(), auth="no"):
        self.args = [
            os.environ["QPIDD_BIN"],
            "--port",
            "0",
            "--no-data-dir",
            "--auth",
            auth,
            "--log-enable",
            "info+",
            *extra_args,
        ]
        self.log_path = log_path
        self.stopped_by_us = False
        self.killed_by_watchdog = False
        self.extra_stdout = []
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.port = self._read_port()
        self._drainer = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drainer.start()

    def describe(self):
        return " ".join(self.args[1:])

    def _read_port(self):
        """Reads the first stdout line (the port) within START_DEADLINE seconds."""
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = time.monotonic() + START_DEADLINE
        buf = b""
        try:
            while b"\n" not in buf:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"qpidd printed no port line within {START_DEADLINE}s "
                        f"(stdout so far: {buf!r})\n{self.read_log()}"
                    )
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    code = self.proc.wait(timeout=STOP_DEADLINE)
                    raise RuntimeError(
                        f"qpidd exited ({code}) before printing its port "
                        f"(stdout: {buf!r})\n{self.read_log()}"
                    )
                if chunk:
                    buf += chunk
                else:
                    time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        finally:
            os.set_blocking(fd, True)
        line, _, rest = buf.partition(b"\n")
        if rest:
            self.extra_stdout.append(rest)
        text = line.decode(errors="replace").strip()
        if not text.isdigit() or not 0 < int(text) < 65536:
            self.stop()
            raise RuntimeError(
                f"qpidd's first stdout line is not a port number: {line!r}\n{self.read_log()}"
            )
        return int(text)

    def _drain_stdout(self):
        # Keep the pipe from filling up; stdout should carry nothing after the port line.
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.extra_stdout.append(chunk)

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(could not read the log {self.log_path}: {e})"

    def params(self, user="guest", password="guest", **kwargs):
        options = dict(
            host="127.0.0.1",
            port=self.port,
            virtual_host="/",
            credentials=pika.PlainCredentials(user, password),
            connection_attempts=1,
            socket_timeout=5,
            stack_timeout=15,
            blocked_connection_timeout=30,
        )
        options.update(kwargs)
        return pika.ConnectionParameters(**options)

    def connect(self, user="guest", password="guest", **kwargs):
        """A new pika BlockingConnection, closed at the end of the test."""
        conn = pika.BlockingConnection(self.params(user, password, **kwargs))
        self._connections.append(conn)
        return conn

    _connections = None  # set per instance by the fixture

    def kill(self):
        """SIGKILL, used by the watchdog."""
        self.killed_by_watchdog = True
        if self.proc.poll() is None:
            self.proc.kill()

    def stop(self):
        """Stops the broker: SIGTERM, then SIGKILL after STOP_DEADLINE seconds."""
        if self.proc.poll() is None:
            self.stopped_by_us = True
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches each of the test's broker logs to the report of a failed phase."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for n, broker in enumerate(getattr(item, "_qpidd_brokers", []), 1):
            note = " (killed by the test watchdog)" if broker.killed_by_watchdog else ""
            report.sections.append(
                (f"qpidd log #{n}{note}: {broker.describe()}", broker.read_log())
            )


@pytest.fixture
def start_broker(request, tmp_path):
    """Factory: start_broker(*extra_args, auth="no") -> Broker, stopped and checked at teardown."""
    brokers = []
    connections = []
    request.node._qpidd_brokers = brokers

    def start(*extra_args, auth="no"):
        broker = Broker(tmp_path / f"qpidd-{len(brokers) + 1}.log", extra_args, auth)
        broker._connections = connections
        brokers.append(broker)
        return broker

    def on_timeout():
        for b in brokers:
            b.kill()

    watchdog = threading.Timer(TEST_TIMEOUT, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield start
    finally:
        watchdog.cancel()
        for conn in connections:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass
        problems = []
        for broker in brokers:
            died = broker.proc.poll()
            broker.stop()
            broker._drainer.join(timeout=STOP_DEADLINE)
            log = broker.read_log()
            if broker.killed_by_watchdog:
                problems.append(f"the test ran over {TEST_TIMEOUT}s; the watchdog killed qpidd")
            elif died is not None:
                problems.append(f"qpidd exited by itself during the test (status {died})")
            if "panicked at" in log:
                problems.append("qpidd logged a panic")
            if broker.extra_stdout:
                problems.append(
                    f"qpidd wrote to stdout after the port line: {b''.join(broker.extra_stdout)!r}"
                )
        if problems:
            pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def broker(start_broker):
    """A broker with --auth no, private to the test."""
    return start_broker()


@pytest.fixture
def conn(broker):
    """A BlockingConnection to `broker`."""
    return broker.connect()


@pytest.fixture
def channel(conn):
    """A channel on `conn`."""
    return conn.channel()
