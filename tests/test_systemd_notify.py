"""sd_notify messages and log routing, against real sockets and real processes.

A datagram socket bound in tmp_path stands in for systemd's notification socket, so each
backend's bytes on the wire are checked as systemd would receive them. Logging is checked in
child processes, whose stderr and JOURNAL_STREAM we control. A missing library is simulated in
the child by putting None in sys.modules, which makes its import fail as if it were absent.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from pmlmd.node import systemd as sd

BOTH_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(name not in sd.AVAILABLE_BACKENDS,
                                                             reason=f"{name} is not installed"))
                 for name in (sd.BACKEND_PYTHON_SYSTEMD, sd.BACKEND_SDNOTIFY)]

BLOCK_PYTHON_SYSTEMD = "import sys; sys.modules['systemd'] = None\n"
BLOCK_SDNOTIFY = "import sys; sys.modules['sdnotify'] = None\n"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket playing systemd's side; NOTIFY_SOCKET points at it."""
    path = str(tmp_path / "notify")
    assert len(path.encode()) < 108, "tmp_path too long for sun_path"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> str:
    sock.settimeout(2.0)
    return sock.recv(4096).decode("utf-8")


def assert_nothing_sent(sock: socket.socket) -> None:
    # A datagram to a local socket is queued before send() returns, so "nothing now" is final.
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def assignments(datagram: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.split("\n") if line)


# --- notify: what each backend puts on the wire ---

@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_ready_carries_status(notify_socket, backend):
    notifier = sd.Notifier(backend=backend)
    assert notifier.backend == backend
    assert notifier.ready("x") is True
    assert assignments(receive(notify_socket)) == {"READY": "1", "STATUS": "x"}


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_ready_alone(notify_socket, backend):
    assert sd.Notifier(backend=backend).ready() is True
    assert receive(notify_socket) == "READY=1"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_status_is_one_line_and_utf8(notify_socket, backend):
    assert sd.Notifier(backend=backend).status("3 batches\n  12 workers\x00 · 40% cpu") is True
    assert receive(notify_socket) == "STATUS=3 batches 12 workers · 40% cpu"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_reload_sequence(notify_socket, backend):
    notifier = sd.Notifier(backend=backend)
    before = time.monotonic_ns() // 1000
    assert notifier.reloading() is True
    after = time.monotonic_ns() // 1000
    fields = assignments(receive(notify_socket))
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert notifier.ready() is True
    assert receive(notify_socket) == "READY=1"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_stopping(notify_socket, backend):
    assert sd.Notifier(backend=backend).stopping() is True
    assert receive(notify_socket) == "STOPPING=1"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_watchdog_ping(notify_socket, monkeypatch, backend):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd.Notifier(backend=backend).watchdog() is True
    assert receive(notify_socket) == "WATCHDOG=1"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_watchdog_not_asked_sends_nothing(notify_socket, monkeypatch, backend):
    assert sd.Notifier(backend=backend).watchdog() is False
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert sd.Notifier(backend=backend).watchdog() is False
    assert_nothing_sent(notify_socket)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_abstract_socket(monkeypatch, backend):
    name = f"pmlmd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.Notifier(backend=backend).ready() is True
        assert receive(sock) == "READY=1"


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_unreachable_socket_returns_false(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = sd.Notifier(backend=backend)
    assert notifier.ready("x") is False
    assert notifier.stopping() is False


@pytest.mark.parametrize("backend", [*BOTH_BACKENDS, sd.BACKEND_NONE, None])
def test_without_notify_socket_everything_is_false(monkeypatch, backend):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = sd.Notifier(backend=backend)
    assert notifier.ready("x") is False
    assert notifier.status("y") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False


def test_none_backend_sends_nothing(notify_socket):
    notifier = sd.Notifier(backend="none")
    assert notifier.backend == "none"
    assert notifier.ready("x") is False
    assert notifier.stopping() is False
    assert_nothing_sent(notify_socket)


def test_default_backend_is_the_preferred_installed_one():
    expected = sd.AVAILABLE_BACKENDS[0] if sd.AVAILABLE_BACKENDS else "none"
    assert sd.Notifier().backend == expected


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        sd.Notifier(backend="dbus")


def run_python(script: str, env: dict | None = None, stderr=subprocess.PIPE, block: str = "") -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(script)], env=child_env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=30, check=True)


@pytest.mark.skipif(sd.BACKEND_SDNOTIFY not in sd.AVAILABLE_BACKENDS, reason="sdnotify is not installed")
def test_falls_back_to_sdnotify_without_python_systemd():
    out = run_python("""
        from pmlmd.node.systemd import Notifier
        print(Notifier().backend)
        try:
            Notifier(backend="python-systemd")
        except RuntimeError:
            print("refused")
    """, block=BLOCK_PYTHON_SYSTEMD).stdout.split()
    assert out == ["sdnotify", "refused"]


def test_falls_back_to_none_and_warns_under_systemd(notify_socket):
    result = run_python("""
        from pmlmd.node.systemd import Notifier
        n = Notifier()
        print(n.backend, n.ready())
    """, env={"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}, block=BLOCK_PYTHON_SYSTEMD + BLOCK_SDNOTIFY)
    assert result.stdout.split() == ["none", "False"]
    assert "neither python-systemd nor sdnotify" in result.stderr
    assert_nothing_sent(notify_socket)


# --- watchdog interval ---

@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("3000000", None, 1.5),
    ("3000000", "self", 1.5),
    ("3000000", "other", None),
    ("0", None, None),
    ("soon", None, None),
    ("3000000", "nobody", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getppid())}.get(pid, pid))
    assert sd.Notifier().watchdog_interval() == expected


# --- is stderr the journal? ---

def stderr_check(tmp_path, journal_stream: str | None) -> str:
    with open(tmp_path / "stderr", "w") as err:
        env = {"JOURNAL_STREAM": journal_stream} if journal_stream is not None else {}
        return run_python("from pmlmd.node.systemd import stderr_is_journal; print(stderr_is_journal())",
                          env=env, stderr=err).stdout.strip()


def file_stream_id(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_stderr_is_journal_when_stream_matches(tmp_path):
    (tmp_path / "stderr").touch()
    dev, ino = file_stream_id(tmp_path / "stderr")
    assert stderr_check(tmp_path, f"{dev}:{ino}") == "True"


@pytest.mark.parametrize("mismatch", ["other-inode", "unset", "empty", "garbage"])
def test_stderr_is_not_journal(tmp_path, mismatch):
    (tmp_path / "stderr").touch()
    dev, ino = file_stream_id(tmp_path / "stderr")
    value = {"other-inode": f"{dev}:{ino + 1}", "unset": None, "empty": "", "garbage": "journal"}[mismatch]
    assert stderr_check(tmp_path, value) == "False"


# --- setup_logging ---

LOG_SCRIPT = """
    import logging
    from pmlmd.node.systemd import setup_logging, decision_fields
    print(setup_logging({target!r}, {level!r}))
    log = logging.getLogger("pmlmd.governor")
    log.debug("debug detail")
    log.info("paused worker %d", 4242, extra=decision_fields(batch_id="b1", task_index=3, worker_pid=4242,
             decision="pause", reason="cpu", cpu_pct=97.5, mem_free_pct=None))
    log.warning("memory low")
"""


def run_logging(target: str, level: str = "info", env: dict | None = None, block: str = "",
                stderr_file=None) -> tuple[str, list[str]]:
    script = LOG_SCRIPT.format(target=target, level=level)
    if stderr_file is None:
        result = run_python(script, env=env, block=block)
        return result.stdout.strip(), result.stderr.splitlines()
    with open(stderr_file, "w") as err:
        result = run_python(script, env=env, stderr=err, block=block)
    return result.stdout.strip(), stderr_file.read_text().splitlines()


def test_console_logging_is_one_compact_line_per_message():
    chosen, lines = run_logging("console")
    assert chosen == "console"
    assert len(lines) == 2
    assert lines[0].endswith(" INFO pmlmd.governor: paused worker 4242")
    assert lines[1].endswith(" WARNING pmlmd.governor: memory low")
    assert not any("BATCH_ID" in line or "b1" in line for line in lines)


def test_console_logging_level():
    _, lines = run_logging("console", level="debug")
    assert lines[0].endswith(" DEBUG pmlmd.governor: debug detail")
    _, lines = run_logging("console", level="warning")
    assert len(lines) == 1 and lines[0].endswith("memory low")


def test_auto_without_journal_is_console():
    chosen, lines = run_logging("auto")
    assert chosen == "console"
    assert lines[0].endswith("paused worker 4242")


@pytest.mark.skipif(sd.JournalHandler is None, reason="python-systemd is not installed")
def test_auto_with_stderr_on_journal_uses_journal_handler(tmp_path):
    (tmp_path / "stderr").touch()
    dev, ino = file_stream_id(tmp_path / "stderr")
    with open(tmp_path / "stderr", "w") as err:
        out = run_python("""
            import logging
            from systemd.journal import JournalHandler
            from pmlmd.node.systemd import setup_logging
            print(setup_logging("auto"))
            print([type(h).__name__ for h in logging.getLogger("pmlmd").handlers])
        """, env={"JOURNAL_STREAM": f"{dev}:{ino}"}, stderr=err).stdout.split("\n")
    assert out[:2] == ["journal", "['JournalHandler']"]


def test_stderr_on_journal_without_python_systemd_prefixes_priorities(tmp_path):
    (tmp_path / "stderr").touch()
    dev, ino = file_stream_id(tmp_path / "stderr")
    chosen, lines = run_logging("auto", env={"JOURNAL_STREAM": f"{dev}:{ino}"}, block=BLOCK_PYTHON_SYSTEMD,
                                stderr_file=tmp_path / "stderr")
    assert chosen == "console"
    # journald stamps time and pid itself and reads the priority from the prefix.
    assert lines == ["<6>pmlmd.governor: paused worker 4242", "<4>pmlmd.governor: memory low"]


def test_forced_journal_without_python_systemd_warns_once():
    chosen, lines = run_logging("journal", block=BLOCK_PYTHON_SYSTEMD)
    assert chosen == "console"
    warnings = [line for line in lines if "python-systemd" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0]
    assert lines[1].endswith("paused worker 4242")


@pytest.fixture
def restore_pmlmd_logger():
    logger = logging.getLogger("pmlmd")
    saved = (list(logger.handlers), logger.level, logger.propagate, sd._installed_handler)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    sd._installed_handler = saved[3]


@pytest.mark.skipif(sd.JournalHandler is None, reason="python-systemd is not installed")
def test_forced_journal_installs_journal_handler_with_fields(restore_pmlmd_logger):
    """There is no journald on this machine, so the handler's sender (its documented
    ``sender_function`` hook) is swapped for a recorder; a real journald receives these
    entries in the systemd test tier (tests/systemd)."""
    logger = restore_pmlmd_logger
    assert sd.setup_logging("journal") == "journal"
    handlers = [h for h in logger.handlers if isinstance(h, sd.JournalHandler)]
    assert len(handlers) == 1 and logger.propagate is False

    sent = []
    # Same first parameter as systemd.journal.send: the handler also passes the record's own
    # lowercase attributes (message, msg, ...), which journald discards as invalid field names.
    handlers[0].send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))
    logging.getLogger("pmlmd.governor").info(
        "paused worker %d", 4242, extra=sd.decision_fields(batch_id="b1", task_index=3, worker_pid=4242,
                                                           decision="pause", reason="cpu", cpu_pct=97.5,
                                                           mem_free_pct=None, rule="cpu-high", latency_ms=12))
    (message, fields), = sent
    assert message == "paused worker 4242"
    assert fields["SYSLOG_IDENTIFIER"] == "pmlmd"
    assert fields["PRIORITY"] == "6"
    assert {k: fields[k] for k in ("BATCH_ID", "TASK_INDEX", "WORKER_PID", "DECISION", "REASON", "CPU_PCT",
                                   "RULE", "LATENCY_MS")} == {
        "BATCH_ID": "b1", "TASK_INDEX": "3", "WORKER_PID": "4242", "DECISION": "pause", "REASON": "cpu",
        "CPU_PCT": "97.5", "RULE": "cpu-high", "LATENCY_MS": "12"}
    assert "MEM_FREE_PCT" not in fields


def test_setup_logging_twice_keeps_one_handler(restore_pmlmd_logger):
    logger = restore_pmlmd_logger
    before = len(logger.handlers)
    assert sd.setup_logging("console") == "console"
    assert sd.setup_logging("console", "debug") == "console"
    assert len(logger.handlers) == before + 1
    assert logger.level == logging.DEBUG


@pytest.mark.parametrize("target, level", [("syslog", "info"), ("auto", "verbose")])
def test_setup_logging_refuses_bad_values(target, level):
    with pytest.raises(ValueError):
        sd.setup_logging(target, level)


# --- decision_fields ---

def test_decision_fields_uppercases_stringifies_and_drops_none():
    assert sd.decision_fields(batch_id="b1", task_index=0, cpu_pct=97.5, mem_free_pct=None, REASON="cpu") == {
        "BATCH_ID": "b1", "TASK_INDEX": "0", "CPU_PCT": "97.5", "REASON": "cpu"}
    assert sd.decision_fields() == {}


@pytest.mark.parametrize("name", ["_pid", "message", "priority", "code_line", "x" * 65])
def test_decision_fields_refuses_names_the_journal_would_lose(name):
    with pytest.raises(ValueError):
        sd.decision_fields(**{name: "v"})
