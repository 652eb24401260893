"""A private RabbitMQ for tests: Debian's rabbitmq-server run as an ordinary process (no systemd).

Each ``Broker`` has its own data directory (a temp dir owned by user rabbitmq: the start script
drops to that user and could not write a root-owned one), its own node name, AMQP port,
distribution port and epmd port, and listens on 127.0.0.1 only, so it never meets the system's
broker or another test's. It can be stopped and started again on the same data and ports (a
durable queue's persistent messages survive), and ``close`` ends every process it caused:

* the broker itself, whose Erlang VM (beam.smp) writes its pid to a pid file;
* epmd, the Erlang port mapper, which this class starts itself on the private port before the
  broker (the VM would otherwise start ``epmd -daemon``, which outlives it);
* anything else the broker left: every process started for it carries a marker variable in its
  environment (``PMLM_TEST_BROKER=<data dir>``), and the last sweep ends what still has it.

Usage::

    broker = Broker()
    try:
        broker.start()
        broker.declare("jobs")
        broker.publish("jobs", [b"a", b"b"])
        assert [body for body, _ in broker.drain("jobs")] == [b"a", b"b"]
    finally:
        broker.close()
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RABBITMQ_SERVER = "/usr/sbin/rabbitmq-server"
EPMD = "/usr/bin/epmd"
MARKER = "PMLM_TEST_BROKER"
START_TIMEOUT = 60.0   # seconds until AMQP answers: 4-10 s normally, more on a loaded machine
STOP_TIMEOUT = 30.0    # seconds a clean shutdown may take before SIGKILL
TAIL_BYTES = 3000      # how much of the broker's output an error quotes


def available() -> bool:
    """Whether this machine can run a private broker (Debian's rabbitmq-server is installed)."""
    return os.path.exists(RABBITMQ_SERVER) and os.path.exists(EPMD)


def need() -> None:
    """Skip the calling test unless this machine can run a private broker."""
    import pytest

    if not available():
        pytest.skip(f"{RABBITMQ_SERVER} is not installed (Debian package rabbitmq-server)")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 just now (all held at once, so distinct)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to end (a pidfd turns readable); True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _tail(path: Path, size: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"({path}: {e.strerror})"


class Broker:
    """One private RabbitMQ node. Not started until ``start()``; ``close()`` always ends it."""

    def __init__(self):
        import pwd

        self.dir = Path(tempfile.mkdtemp(prefix="pmlm-rmq-"))
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")  # no plugins: no management listener
        account = pwd.getpwnam("rabbitmq")
        for path in (self.dir, self.dir / "mnesia", self.dir / "log", self.dir / "enabled_plugins"):
            os.chown(path, account.pw_uid, account.pw_gid)
        self.port, self.dist_port, self.epmd_port = free_ports(3)
        self.node = f"pmlmtest-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.pid_file = self.dir / "beam.pid"
        self.output_path = self.dir / "output.log"  # what the start script and the VM print
        self.proc: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self._output = None
        self._epmd_output = None

    # --- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The AMQP URL of the default vhost with the guest account (loopback only, as here)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _environment(self) -> dict[str, str]:
        # A clean environment: nothing of the test runner's (NOTIFY_SOCKET would make the start
        # script behave as under systemd; pyenv's PATH is no business of the broker's).
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.dir),
            MARKER: str(self.dir),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # The distribution listener would bind every interface; this node talks to no other.
            # No busy-waiting schedulers: an idle test broker must not take CPU the CPU-limit tests measure.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} "
                                                   "+sbwt none +sbwtdcpu none +sbwtdio none",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # The start script runs the VM in /var/lib/rabbitmq: a crash dump belongs here instead.
            "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
        }

    # --- life -----------------------------------------------------------------------------------
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> "Broker":
        """Start the broker (on the same data and ports as before, after a ``stop``) and wait until
        it takes an AMQP connection. A no-op when it runs already.

        Raises RuntimeError, with the end of the broker's output, when it exits or does not
        answer within ``timeout`` seconds (it is stopped again then).
        """
        if self.running():
            return self
        self._start_epmd(timeout)
        try:
            self.pid_file.unlink()  # a stale one would name the previous VM
        except FileNotFoundError:
            pass
        self._output = open(self.output_path, "ab")
        self.proc = subprocess.Popen([RABBITMQ_SERVER], stdin=subprocess.DEVNULL, stdout=self._output,
                                     stderr=subprocess.STDOUT, env=self._environment(), cwd=self.dir,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                problem = f"rabbitmq-server exited with status {self.proc.returncode} before it took a connection"
                break
            if self.beam_pid() is not None and self._answers():  # the pid file, for a clean stop
                return self
            if time.monotonic() > deadline:
                problem = f"rabbitmq-server took no AMQP connection on 127.0.0.1:{self.port} within {timeout:g}s"
                break
            time.sleep(0.2)  # nothing to wait on: readiness shows only as a connection that succeeds
        self.stop()
        raise RuntimeError(f"{problem}; the end of its output:\n{self.output_tail()}")

    def _answers(self) -> bool:
        import pika

        params = pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2")
        try:
            pika.BlockingConnection(params).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def _start_epmd(self, timeout: float) -> None:
        """Our own epmd on the private port, as a child of this process (the VM then uses it)."""
        if self.epmd is not None and self.epmd.poll() is None:
            return
        self._epmd_output = self._epmd_output or open(self.dir / "epmd.log", "ab")
        self.epmd = subprocess.Popen([EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     stdin=subprocess.DEVNULL, stdout=self._epmd_output, stderr=subprocess.STDOUT,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.epmd.poll() is not None:
                raise RuntimeError(f"epmd exited with status {self.epmd.returncode} on port {self.epmd_port}: "
                                   f"{_tail(self.dir / 'epmd.log')}")
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"epmd did not listen on 127.0.0.1:{self.epmd_port} within {timeout:g}s")
                time.sleep(0.05)  # until it listens: only a connection shows that

    def beam_pid(self) -> int | None:
        """The pid of the broker's Erlang VM, from its pid file (None before it wrote one)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker as its service would be (SIGTERM to the VM: a clean shutdown that keeps
        durable queues and persistent messages), SIGKILL after ``timeout`` seconds. Its data,
        ports and epmd stay for the next ``start``."""
        if self.proc is None:
            return
        pid = self.beam_pid()
        if pid is not None and self.proc.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_exit(pid, timeout):
                self._sweep(signal.SIGKILL)
        if pid is None:  # killed before the VM wrote its pid: nothing graceful to ask
            self._sweep(signal.SIGKILL)
        try:
            # The start script (with su between it and the VM) ends when the VM has.
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._sweep(signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # What the VM started (erl_child_setup, inet_gethost) normally ends with it; make sure.
        self._sweep(signal.SIGKILL)
        self.proc = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def close(self) -> None:
        """Stop the broker, end its epmd and whatever else it left, and remove its data. Idempotent."""
        try:
            self.stop()
        finally:
            if self.epmd is not None:
                if self.epmd.poll() is None:
                    self.epmd.terminate()
                    try:
                        self.epmd.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        self.epmd.kill()
                        self.epmd.wait()
                self.epmd = None
            if self._epmd_output is not None:
                self._epmd_output.close()
                self._epmd_output = None
            self._sweep(signal.SIGKILL)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _marked(self) -> list[int]:
        """Live processes whose environment carries this broker's marker: only what it caused."""
        wanted = f"{MARKER}={self.dir}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if wanted in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or a kernel thread
                continue
        return found

    def _sweep(self, sig: int) -> None:
        for pid in self._marked():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def output_tail(self) -> str:
        """The end of what the start script printed and of the node's own log."""
        return (f"--- {self.output_path.name}\n{_tail(self.output_path)}\n"
                f"--- log/{self.node}.log\n{_tail(self.dir / 'log' / f'{self.node}.log')}")

    # --- helpers for tests (each opens its own connection) ----------------------------------------
    def connection(self):
        import pika

        return pika.BlockingConnection(pika.URLParameters(self.url))

    def declare(self, queue: str, dead_letter_exchange: str | None = None, **arguments) -> None:
        """A durable queue; with ``dead_letter_exchange``, rejected messages go there. Further
        keyword arguments become queue arguments (``**{"x-max-length": 2}``)."""
        if dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = dead_letter_exchange
        with self.connection() as conn:
            conn.channel().queue_declare(queue, durable=True, arguments=arguments or None)

    def declare_exchange(self, name: str, type: str = "fanout") -> None:
        """A durable exchange (a fanout one serves as a dead-letter exchange)."""
        with self.connection() as conn:
            conn.channel().exchange_declare(name, exchange_type=type, durable=True)

    def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        with self.connection() as conn:
            conn.channel().queue_bind(queue, exchange, routing_key=routing_key)

    def publish(self, queue: str, bodies, **properties) -> None:
        """Publish each body (bytes, or str as UTF-8) to ``queue`` through the default exchange,
        persistent unless ``delivery_mode`` says otherwise, each confirmed by the broker.

        ``properties``: pika.BasicProperties fields. Raises pika's UnroutableError or NackError
        when the broker does not take one.
        """
        import pika

        properties.setdefault("delivery_mode", 2)
        with self.connection() as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish("", queue, body.encode() if isinstance(body, str) else body,
                                      pika.BasicProperties(**properties), mandatory=True)

    def count(self, queue: str) -> int:
        """How many messages of ``queue`` are ready (not delivered and unacknowledged)."""
        with self.connection() as conn:
            return conn.channel().queue_declare(queue, passive=True).method.message_count

    def drain(self, queue: str) -> list[tuple[bytes, object]]:
        """Take every ready message of ``queue``, acknowledged: [(body, pika.BasicProperties)] in
        queue order."""
        taken = []
        with self.connection() as conn:
            channel = conn.channel()
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    return taken
                channel.basic_ack(method.delivery_tag)
                taken.append((body, properties))
