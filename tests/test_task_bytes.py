"""Task lines, command words and environment strings are bytes: they reach the worker exactly.

Through the tasks file and stdin, --null, the control protocol, the state database and the
report; by ``{}`` in an argument, by $PMLM_TASK and through ``--shell``; with ``pmlmctl run``
and with ``pmlmctl submit`` to a daemon. What exec cannot take (a NUL, a line over Linux's
MAX_ARG_STRLEN) is a one-line usage error up front, never a failed task.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.core import protocol
from pmlmd.core.batch import Task
from pmlmd.core.protocol import BAD_FIELD, ProtocolError, decode_reply, encode_reply, encode_request, parse_request
from pmlmd.daemon.store import Store

PY = sys.executable
# Linux's limits, worked out here from fs/exec.c rather than taken from pmlmd.
PAGE = os.sysconf("SC_PAGESIZE")
MAX_ARG_STRLEN = 32 * PAGE  # one argument or environment string, its NUL included
MAX_LINE = MAX_ARG_STRLEN - len("PMLM_TASK=") - 1  # the line also travels as PMLM_TASK=LINE


def arg_max() -> int:
    """All arguments and environment strings together: a quarter of the stack limit, within [32 pages, 6 MiB]."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return max(32 * PAGE, 6 << 20 if soft == resource.RLIM_INFINITY else min(6 << 20, soft // 4))


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


# Each line holds something str.splitlines() would split at, or bytes that are not UTF-8.
LINES = [
    b"form\x0cfeed",
    b"file\x1cseparator",
    "paragraph\u2028separator".encode(),
    b"lone\rcarriage return",
    b"vertical\x0btab, group\x1dand record\x1eseparators",
    "next\u0085line, paragraph\u2029separator".encode(),
    "\ufeffbyte order mark".encode(),
    b"caf\xe9 latin-1",
    b"   ",  # only blanks: still a task
    b"quote ' \" $HOME `id` \\ ; | *",
    b"\xff\xfe\x80 not UTF-8 at all",
    b"crlf line\r",  # a CRLF file keeps its CR, as xargs and GNU parallel do
]
# The Python worker writes what it got, by argument (between < and >) and by environment.
WORKER = ("import os, sys; d = sys.argv[1]; i = os.environ['PMLM_TASK_INDEX']; "
          "open(os.path.join(d, i + '.arg'), 'wb').write(os.fsencode(sys.argv[2])); "
          "open(os.path.join(d, i + '.env'), 'wb').write(os.environb[b'PMLM_TASK'])")
# Without a governor in the way: the tests must not wait for a busy machine's CPU to fall.
FAST = ("--cpu-limit", "100", "--memfree-limit", "0", "--interval", "0.05")


@pytest.fixture
def daemon(daemon_factory):
    """A pmlmd whose limits FAST does not loosen (a batch may only tighten the node's)."""
    return daemon_factory("[limits]\ncpu_limit = 100\nmemfree_limit = 0\n").start()


def tasks_file(path: Path, lines: list[bytes], separator: bytes = b"\n") -> Path:
    # An empty line between (skipped) and no separator after the last line (still a task).
    path.write_bytes(lines[0] + separator + separator + separator.join(lines[1:]))
    return path


def pmlmctl(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pmlmd.client.ctl", *args], capture_output=True, timeout=120, **kw)


def what_workers_got(out: Path, count: int, kind: str) -> list[bytes]:
    assert sorted(p.name for p in out.glob(f"*.{kind}")) == sorted(f"{i}.{kind}" for i in range(count))
    return [(out / f"{i}.{kind}").read_bytes() for i in range(count)]


def report_lines(report: dict) -> list[bytes]:
    """The task lines of a report, as bytes (the report carries them as surrogate-escaped text)."""
    return [raw(t["task"]) for t in report["tasks"]]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert result.stdout == b""
    return stderr


# --- the tasks file, every way a line reaches the worker -------------------------------------------


@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
def test_run_hands_every_line_on_byte_exact(tmp_path, from_stdin):
    path = tasks_file(tmp_path / "tasks", LINES)
    out = tmp_path / text(b"out-\xe9")  # an argument that is not UTF-8 either
    out.mkdir()
    source = ["--tasks-file", "-"] if from_stdin else ["--tasks-file", str(path)]
    result = pmlmctl("run", *FAST, "--json", *source, "--", PY, "-c", WORKER, str(out), "<{}>",
                     input=path.read_bytes() if from_stdin else None)
    assert result.returncode == 0, result.stderr.decode()
    assert what_workers_got(out, len(LINES), "arg") == [b"<" + line + b">" for line in LINES]
    assert what_workers_got(out, len(LINES), "env") == LINES
    report = json.loads(result.stdout)
    assert report["counts"]["succeeded"] == len(LINES)
    assert report_lines(report) == LINES


def test_run_with_shell_hands_every_line_on_byte_exact(tmp_path):
    path = tasks_file(tmp_path / "tasks", LINES)
    out = tmp_path / "out"
    out.mkdir()
    result = pmlmctl("run", *FAST, "--shell", "--tasks-file", str(path), "--",
                     "printf", "%s", "{}", ">", f"{out}/$PMLM_TASK_INDEX.sh")
    assert result.returncode == 0, result.stderr.decode()
    assert what_workers_got(out, len(LINES), "sh") == LINES


def test_submit_hands_every_line_on_byte_exact_and_reports_it(daemon, tmp_path):
    path = tasks_file(tmp_path / "tasks", LINES)
    out = tmp_path / text(b"out-\xe9")  # an argument that is not UTF-8 either
    out.mkdir()
    result = daemon.ctl("submit", *FAST, "--wait", "--json", "--tasks-file", str(path), "--",
                        PY, "-c", WORKER, str(out), "<{}>")
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert what_workers_got(out, len(LINES), "arg") == [b"<" + line + b">" for line in LINES]
    assert what_workers_got(out, len(LINES), "env") == LINES
    assert report_lines(json.loads(result.stdout)) == LINES
    # Kept in the state database, and reported from there once finished.
    report = daemon.ctl("report", "1")
    assert report.returncode == 0, report.stderr
    assert report_lines(json.loads(report.stdout)) == LINES

    shell = daemon.ctl("submit", *FAST, "--wait", "--shell", "--tasks-file", "-", "--",
                       "printf", "%s", "{}", ">", f"{out}/$PMLM_TASK_INDEX.sh", stdin=text(path.read_bytes()),
                       errors="surrogateescape")
    assert shell.returncode == 0, shell.stderr + daemon.logs()
    assert what_workers_got(out, len(LINES), "sh") == LINES
    assert "Traceback" not in daemon.logs()


def test_null_splits_on_nul_only(tmp_path):
    lines = [b"two\nlines", b"tab\there", b"caf\xe9", b"\n"]
    path = tasks_file(tmp_path / "tasks", lines, separator=b"\0")
    out = tmp_path / "out"
    out.mkdir()
    result = pmlmctl("run", *FAST, "-0", "--tasks-file", str(path), "--", PY, "-c", WORKER, str(out), "{}")
    assert result.returncode == 0, result.stderr.decode()
    assert what_workers_got(out, len(lines), "arg") == lines
    assert what_workers_got(out, len(lines), "env") == lines
    # And through the shell: a newline inside a quoted word is just a byte.
    result = pmlmctl("run", *FAST, "--null", "--shell", "--tasks-file", str(path), "--",
                     "printf", "%s", "{}", ">", f"{out}/$PMLM_TASK_INDEX.sh")
    assert result.returncode == 0, result.stderr.decode()
    assert what_workers_got(out, len(lines), "sh") == lines


def test_submit_with_null_from_stdin(daemon, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = daemon.ctl("submit", *FAST, "--wait", "--null", "--tasks-file", "-", "--",
                        PY, "-c", WORKER, str(out), "{}", stdin="a\nb\0c\0")
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert what_workers_got(out, 2, "env") == [b"a\nb", b"c"]


# --- arguments, environment and working directory that are not UTF-8 ---------------------------------


def test_submit_hands_on_arguments_environment_and_directory_that_are_not_utf8(daemon, tmp_path):
    here = tmp_path / os.fsdecode(b"r\xe9pertoire")
    here.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    script = ("import os, sys; d = sys.argv[1]; "
              "open(os.path.join(d, 'arg'), 'wb').write(os.fsencode(sys.argv[2])); "
              "open(os.path.join(d, 'value'), 'wb').write(os.environb[b'PMLM_LATIN']); "
              "open(os.path.join(d, 'names'), 'wb').write(os.environb[b'A-B'] + os.environb[b'N\\xe9']); "
              "open(os.path.join(d, 'cwd'), 'wb').write(os.getcwdb())")
    # Names that are no shell names (the gate every daemon worker starts through is a shell) too.
    env = {**os.environ, "PMLM_LATIN": os.fsdecode(b"\xe9t\xe9 \xff"), "A-B": "x", os.fsdecode(b"N\xe9"): "y"}
    result = daemon.ctl("submit", *FAST, "--wait", "--json", "--", PY, "-c", script, str(out),
                        os.fsdecode(b"fichier-\xe9t\xe9.txt"), cwd=here, env=env)
    assert result.returncode == 0, result.stderr + daemon.logs()
    assert "Traceback" not in result.stderr
    assert (out / "arg").read_bytes() == b"fichier-\xe9t\xe9.txt"
    assert (out / "value").read_bytes() == b"\xe9t\xe9 \xff"
    assert (out / "names").read_bytes() == b"xy"
    assert (out / "cwd").read_bytes() == os.fsencode(here)
    assert raw(json.loads(result.stdout)["command"][-1]) == b"fichier-\xe9t\xe9.txt"
    # Status and list show the command too: nothing on the way out may choke on it.
    assert daemon.ctl("status", "1", "--json").returncode == 0
    assert daemon.ctl("list").returncode == 0


# --- what exec cannot take: one line, exit 2, nothing started -----------------------------------------


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_nul_inside_a_line_is_a_usage_error_naming_the_line(tmp_path, command):
    path = tmp_path / "tasks"
    path.write_bytes(b"one\n\ntw\0o\nthree\n")
    result = pmlmctl("--socket", "/nonexistent/ctl.sock", command, "--tasks-file", str(path), "--", "echo", "{}")
    message = one_line_error(result)
    assert f"line 3 of {str(path)!r} contains a NUL byte" in message and "use --null" in message


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_line_longer_than_exec_takes_is_a_usage_error_naming_the_limit(tmp_path, command):
    path = tmp_path / "tasks"
    path.write_bytes(b"short\n" + b"x" * (MAX_LINE + 1) + b"\n")
    result = pmlmctl("--socket", "/nonexistent/ctl.sock", command, "--tasks-file", str(path), "--", "echo", "{}")
    message = one_line_error(result)
    assert f"line 2 of {str(path)!r} is too long ({MAX_LINE + 1} bytes)" in message
    assert f"at most {MAX_LINE} bytes" in message and "MAX_ARG_STRLEN" in message
    # From stdin the same, naming it.
    result = pmlmctl("--socket", "/nonexistent/ctl.sock", command, "--tasks-file", "-", "--", "echo", "{}",
                     input=path.read_bytes())
    assert "line 2 of standard input is too long" in one_line_error(result)
    if command == "run":
        # One byte less is what the kernel takes: the line reaches the worker whole.
        line = b"y" * MAX_LINE
        path.write_bytes(line + b"\n")
        out = tmp_path / "out"
        out.mkdir()
        result = pmlmctl("run", *FAST, "--tasks-file", str(path), "--", PY, "-c", WORKER, str(out), "{}")
        assert result.returncode == 0, result.stderr.decode()
        assert what_workers_got(out, 1, "env") == [line] and what_workers_got(out, 1, "arg") == [line]


@pytest.mark.parametrize("shell, words, line, named", [
    (False, ["echo", "{}{}"], b"z" * 70000, "argument 1 of the command ('{}{}')"),
    # Every ' becomes '"'"' when the line is quoted for the shell.
    (True, ["echo", "{}"], b"'" * 30000, "the /bin/sh -c script"),
], ids=["argument", "shell"])
def test_a_line_that_makes_an_argument_too_long_is_a_usage_error(tmp_path, shell, words, line, named):
    path = tmp_path / "tasks"
    path.write_bytes(line)
    result = pmlmctl("run", *(["--shell"] if shell else []), "--tasks-file", str(path), "--", *words)
    message = one_line_error(result)
    assert "line 1 of" in message and f"with it, {named} would be" in message
    assert f"at most {MAX_ARG_STRLEN - 1} for one argument" in message


def test_lines_that_make_the_whole_exec_too_large_are_a_usage_error(tmp_path):
    line = b"w" * 100_000
    words = ["echo"] + ["{}"] * (arg_max() // len(line) + 1)
    path = tmp_path / "tasks"
    path.write_bytes(line)
    message = one_line_error(pmlmctl("run", "--tasks-file", str(path), "--", *words))
    assert "line 1 of" in message and "arguments and environment would take" in message
    assert str(arg_max()) in message


# --- the wire and the state database -----------------------------------------------------------------


SUBMIT = {"command": ["/bin/echo"], "cwd": "/tmp"}


def test_the_wire_carries_bytes_that_are_not_utf8_as_escapes():
    line = text(b"caf\xe9 \xff")
    frame = encode_request("submit", **SUBMIT, task_lines=[line], env={text(b"V\xe9"): line})
    assert b"\\udce9" in frame and frame.decode("utf-8")  # valid UTF-8, the bytes as escapes
    args = parse_request(frame).args
    assert args["task_lines"] == [line] and raw(args["env"][text(b"V\xe9")]) == b"caf\xe9 \xff"
    reply = encode_reply({"task": line})
    assert decode_reply(reply)["result"]["task"] == line
    # A name is text, not bytes: it stays refused.
    with pytest.raises(ProtocolError) as info:
        parse_request(encode_request("submit", **SUBMIT, name=text(b"\xe9")))
    assert info.value.code == BAD_FIELD and "'name'" in info.value.message


@pytest.mark.parametrize("args, parts", [
    (dict(task_lines=["a", "\ud800"]), ["'task_lines[1]'", "stands for no byte"]),
    (dict(command=["/bin/echo", "\udc41"]), ["'command[1]'", "stands for no byte"]),
    (dict(task_lines=["x" * (MAX_LINE + 1)]),
     ["'task_lines[0]' is too long", str(MAX_LINE), "MAX_ARG_STRLEN"]),
    (dict(command=["/bin/echo", "<{}{}>"], task_lines=["ok", "x" * 70000]),
     ["'task_lines[1]' is too long (70000 bytes)", "argument 1 of the command ('<{}{}>') would be 140002 bytes"]),
    (dict(env={"BIG": "v" * MAX_ARG_STRLEN}), ["cannot be executed", "'BIG'", "MAX_ARG_STRLEN"]),
], ids=["high-surrogate", "surrogate-below-0x80", "line", "argument", "environment"])
def test_the_daemon_refuses_what_exec_cannot_take(args, parts):
    frame = json.dumps({"version": 1, "request": "submit", "args": {**SUBMIT, **args}}).encode()
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    assert info.value.code == BAD_FIELD
    for part in parts:
        assert part in info.value.message, info.value.message
    assert protocol.decode_reply(protocol.encode_error(BAD_FIELD, info.value.message))["ok"] is False


def test_the_store_keeps_lines_that_are_not_utf8(tmp_path):
    store = Store(str(tmp_path))
    lines = [text(line) for line in LINES] + [None]
    submission = {**SUBMIT, "task_lines": lines[:-1]}
    store.add_batch("1", 1, None, (os.geteuid(), os.getegid(), []), 0, submission, time.time(), len(lines))
    store.tasks_changed("1", [Task(i, line) for i, line in enumerate(lines)])  # as taken: each gets its row
    store.close()
    (restored,) = Store(str(tmp_path)).active_batches()
    assert restored.problem is None, restored.problem
    assert [t.line for t in restored.tasks] == lines
    assert protocol.check_args("submit", restored.submission)["task_lines"] == lines[:-1]


# --- any bytes at all ------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(null=st.booleans(), data=st.data())
def test_any_bytes_reach_the_worker_exactly(tmp_path_factory, null, data):
    separator = b"\0" if null else b"\n"
    # Without --null a NUL is refused (see above); with it, a newline is just a byte.
    line = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and (null or b"\n" not in b))
    lines = data.draw(st.lists(line, min_size=1, max_size=40))
    tmp = tmp_path_factory.mktemp("bytes")
    path = tmp / "tasks"
    path.write_bytes(separator.join(lines) + data.draw(st.sampled_from([b"", separator])))
    # sh starts in a millisecond; printf %s writes its argument as it is.
    script = 'printf %s "$PMLM_TASK" > "$0/$PMLM_TASK_INDEX.env"; printf %s "$1" > "$0/$PMLM_TASK_INDEX.arg"'
    result = pmlmctl("run", *FAST, *(["--null"] if null else []), "--tasks-file", str(path), "--",
                     "/bin/sh", "-c", script, str(tmp), "{}")
    assert result.returncode == 0, result.stderr.decode()
    assert what_workers_got(tmp, len(lines), "env") == lines
    assert what_workers_got(tmp, len(lines), "arg") == lines
