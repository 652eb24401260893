"""pmlmctl enqueue against a real private RabbitMQ (tests/broker.py): every line one persistent
message, in order; lines that are no task refused before anything is sent; a broker that is down,
refuses the login or does not take a message each give one line and their exit status, never a
traceback or the password."""

from __future__ import annotations

import os
import pty
import re
import socket
import subprocess
import sys
import uuid

import pika
import pytest

from support import wait_for


def pmlmctl(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", *args], input=stdin, capture_output=True,
                          timeout=timeout)


def enqueue(broker, queue: str, *args: str, stdin: bytes = b"", url: str | None = None):
    return pmlmctl("enqueue", "--amqp", url or broker.url, "--queue", queue, *args, stdin=stdin)


def one_line(stderr: bytes) -> str:
    """The whole of stderr, checked to be a single line and no traceback."""
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


def fresh_queue() -> str:
    return f"tasks-{uuid.uuid4().hex[:8]}"


def test_each_line_is_one_persistent_message_in_order(broker, tmp_path):
    queue = fresh_queue()
    lines = ["first task", "second  task with spaces", "dritte Aufgabe — ünïcode", "x\ry", "4"]
    tasks = tmp_path / "tasks"
    tasks.write_bytes(("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n").encode())
    result = enqueue(broker, queue, "--tasks-file", str(tasks))
    assert result.returncode == 0, result.stderr
    assert one_line(result.stderr) == f"enqueued 5 tasks to {queue}\n"
    assert result.stdout == b""
    taken = broker.drain(queue)
    assert [body.decode() for body, _ in taken] == lines
    for _, properties in taken:
        assert properties.delivery_mode == 2
        assert properties.content_type == "text/plain"
        assert len(properties.message_id) == 32 and int(properties.message_id, 16) >= 0
    assert len({p.message_id for _, p in taken}) == len(lines)


@pytest.mark.slow  # stops and starts a broker: seconds each
def test_the_queue_it_declares_is_durable_and_the_messages_survive_a_restart(broker):
    queue = fresh_queue()
    assert enqueue(broker, queue, "--tasks-file", "-", stdin=b"kept\n").returncode == 0
    broker.stop()
    broker.start()
    assert [body for body, _ in broker.drain(queue)] == [b"kept"]


def test_stdin_and_a_last_line_without_newline(broker):
    queue = fresh_queue()
    result = enqueue(broker, queue, "--tasks-file", "-", stdin=b"a\nb\nc")
    assert result.returncode == 0, result.stderr
    assert [body for body, _ in broker.drain(queue)] == [b"a", b"b", b"c"]


def test_null_splits_on_nul_and_keeps_newlines(broker):
    queue = fresh_queue()
    result = enqueue(broker, queue, "-0", "--tasks-file", "-", stdin=b"one\ntwo\0three\0\0four")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"enqueued 3 tasks to {queue}\n".encode()
    assert [body for body, _ in broker.drain(queue)] == [b"one\ntwo", b"three", b"four"]


def test_an_existing_queue_with_a_dead_letter_exchange_is_used_as_it_is(broker):
    queue = fresh_queue()
    broker.declare_exchange(f"{queue}-dlx")
    broker.declare(queue, dead_letter_exchange=f"{queue}-dlx")
    broker.publish(queue, [b"already there"])
    result = enqueue(broker, queue, "--tasks-file", "-", stdin=b"new\n")
    assert result.returncode == 0, result.stderr
    assert [body for body, _ in broker.drain(queue)] == [b"already there", b"new"]


@pytest.mark.parametrize("data,null,message", [
    (b"good\nbad \xff byte\nnever sent\n", False, "line 2 of standard input is not valid UTF-8 (byte 0xff"),
    (b"good\0bad \xc3\0", True, "item 2 of standard input is not valid UTF-8 (byte 0xc3"),
    (b"good\nwith \0 nul\n", False, "line 2 of standard input contains a NUL byte"),
])
def test_a_line_that_is_no_task_is_refused_and_nothing_is_published(broker, data, null, message):
    queue = fresh_queue()
    broker.declare(queue)
    result = enqueue(broker, queue, *(["-0"] if null else []), "--tasks-file", "-", stdin=data)
    assert result.returncode == 2
    assert message in one_line(result.stderr)
    assert "nothing was enqueued" in result.stderr.decode()
    assert broker.count(queue) == 0


def test_empty_input_enqueues_nothing_and_says_so(broker, tmp_path):
    queue = fresh_queue()
    (tmp_path / "empty").write_bytes(b"\n\n")
    result = enqueue(broker, queue, "--tasks-file", str(tmp_path / "empty"))
    assert result.returncode == 0
    assert "nothing enqueued" in one_line(result.stderr)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # not even declared: nothing reached the broker
        broker.count(queue)


@pytest.mark.slow  # stops and starts a broker: seconds each
def test_broker_down_is_exit_4_in_one_line_without_the_password(broker):
    secret = "s3cret-Pa55word"
    url = broker.url.replace("guest:guest@", f"guest:{secret}@")
    broker.stop()
    try:
        result = enqueue(broker, fresh_queue(), "--tasks-file", "-", stdin=b"task\n", url=url)
    finally:
        broker.start()
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert line.startswith(f"pmlmctl: cannot reach the broker at 127.0.0.1:{broker.port}: ")
    assert "is RabbitMQ running?" in line
    assert secret not in line


@pytest.mark.slow  # stops and starts a broker: seconds each
def test_a_broker_stopped_midway_is_exit_4_and_every_task_counted_as_enqueued_is_kept(broker):
    queue = fresh_queue()
    broker.declare(queue)
    total = 50_000
    proc = subprocess.Popen([sys.executable, "-m", "pmlmd.client.ctl", "enqueue", "--amqp", broker.url, "--queue", queue,
                             "--tasks-file", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"".join(b"task %d\n" % i for i in range(total)))
        proc.stdin.close()
        wait_for(lambda: broker.count(queue) >= 100, timeout=60, poll=0.05, what="the first tasks to arrive")
        broker.stop()
        stderr = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.start()
    assert proc.returncode == 4, stderr
    line = one_line(stderr)
    assert line.startswith(f"pmlmctl: lost the connection to the broker at 127.0.0.1:{broker.port}: ")
    enqueued = int(re.search(r"; (\d+) of 50000 tasks enqueued", line).group(1))
    # Each counted task was confirmed, so it is kept; the one in flight may have arrived or not.
    bodies = [body for body, _ in broker.drain(queue)]
    assert bodies[:enqueued] == [b"task %d" % i for i in range(enqueued)]
    assert len(bodies) in (enqueued, enqueued + 1)


def test_a_port_that_never_answers_is_exit_4():
    # Something listens but speaks no AMQP: the handshake times out (stack_timeout in the URL).
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        result = pmlmctl("enqueue", "--amqp", f"amqp://guest:guest@127.0.0.1:{port}/%2F?stack_timeout=1",
                         "--queue", "q", "--tasks-file", "-", stdin=b"task\n")
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert line.startswith(f"pmlmctl: cannot reach the broker at 127.0.0.1:{port}: no AMQP handshake within ")


def test_a_refused_login_is_exit_4_without_the_password(broker):
    secret = "wr0ng-Pa55word"
    url = broker.url.replace("guest:guest@", f"guest:{secret}@")
    result = enqueue(broker, fresh_queue(), "--tasks-file", "-", stdin=b"task\n", url=url)
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert "refused the login of user 'guest'" in line
    assert secret not in line


def test_a_nacked_message_is_exit_1_naming_how_many_were_enqueued(broker):
    queue = fresh_queue()
    # A full queue that refuses new messages: the broker nacks the third.
    broker.declare(queue, **{"x-max-length": 2, "x-overflow": "reject-publish"})
    result = enqueue(broker, queue, "--tasks-file", "-", stdin=b"1\n2\n3\n4\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "refused task 3" in line and "2 of 4 tasks enqueued" in line
    assert [body for body, _ in broker.drain(queue)] == [b"1", b"2"]


@pytest.mark.parametrize("url,message", [
    ("http://guest:guest@127.0.0.1:5672/%2F", "starts with amqp:// or amqps://"),
    ("amqp://guest:hunter2pw@127.0.0.1:notaport/%2F", "port of the AMQP URL is not a number"),
    ("amqp://guest:hunter2pw@127.0.0.1:99999/%2F", "port of the AMQP URL is not a number"),
    ("amqp:///%2F", "names no host"),
    ("amqp://guest:hunter2pw@127.0.0.1/%2F?bogus=1", "Unknown URL parameter: 'bogus'"),
    ("amqp://guest:hunter2pw@127.0.0.1/a/b", "one path segment"),
    ("garbage", "starts with amqp://"),
])
def test_a_bad_url_is_a_usage_error(url, message):
    result = pmlmctl("enqueue", "--amqp", url, "--queue", "q", "--tasks-file", "-", stdin=b"task\n")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert message in line
    assert "hunter2pw" not in line


@pytest.mark.parametrize("queue,message", [("", "queue name is empty"), ("q" * 256, "at most 255")])
def test_a_bad_queue_name_is_a_usage_error(queue, message):
    result = pmlmctl("enqueue", "--amqp", "amqp://127.0.0.1/", "--queue", queue, "--tasks-file", "-",
                     stdin=b"task\n")
    assert result.returncode == 2
    assert message in one_line(result.stderr)


def test_progress_is_drawn_on_a_terminal(broker):
    queue = fresh_queue()
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pmlmd.client.ctl", "enqueue", "--amqp", broker.url, "--queue",
                                 queue, "--tasks-file", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=terminal)
        os.close(terminal)
        terminal = None
        proc.communicate(b"a\nb\nc\n", timeout=60)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last writer has closed it
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0
    assert b"enqueued 3/3" in seen
    assert seen.endswith(f"\r\033[Kenqueued 3 tasks to {queue}\r\n".encode())


def test_status_never_loads_pika(tmp_path):
    # A node without pika (or a broker) still gets status, list and the rest.
    program = ("import sys, pmlmd.client.ctl\n"
               "code = pmlmd.client.ctl.main(['--socket', sys.argv[1], 'status'])\n"
               "print('pika' in sys.modules, code)\n")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "none.sock")], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == "False 4\n", result.stderr


def test_parse_url_shapes():
    from pmlmd.broker import enqueue as lib

    params = lib.parse_url("amqp://user:p%40ss@broker.example:5673/jobs%2Fa?heartbeat=30")
    assert (params.host, params.port, params.virtual_host) == ("broker.example", 5673, "jobs/a")
    assert params.credentials.password == "p@ss"
    assert lib.where(params) == "broker.example:5673/jobs%2Fa"
    assert lib.where(lib.parse_url("amqps://[::1]/")) == "[::1]:5671/%2F"
    with pytest.raises(ValueError, match="user but no password"):
        lib.parse_url("amqp://user@host/")

