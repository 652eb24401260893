"""What reaches pmlmctl from others and from its surroundings: other users' names, commands and
reasons printed for a reader's terminal, tasks files that are huge or never end, a current
directory that was removed, and values typed on the command line. Real pmlmctl processes (and
a real pmlmd where one is needed); each outcome is text for a person and an exit status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmlmd.client import ctl
from pmlmd.core import events, tasklines

PY = sys.executable
NO_DAEMON = "/nonexistent/ctl.sock"
# What a terminal would act on: C0 controls but the newline that ends a line, DEL, C1 controls,
# line and paragraph separators, bidirectional marks, embeddings, overrides and isolates.
UNSHOWABLE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

CLEAR = "\x1b[2J\x1b[H"
FORGED_ROW = "x\n    99  -   root           0  finished"
TITLE = "exit 0 # \x1b]0;evil\x07\nfake line\r\u202eevil\u009b2J"


def pmlmctl(*args: str, cwd=None, stdin=subprocess.DEVNULL, memory: int | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """pmlmctl as a user starts it, output as bytes; ``memory``: its address-space limit (ulimit -v),
    so that a pmlmctl that reads without bound fails fast instead of taking the machine's memory."""
    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([PY, "-m", "pmlmd.client.ctl", *args], cwd=cwd, stdin=stdin, capture_output=True,
                          timeout=timeout, preexec_fn=limit)


def usage_error(result: subprocess.CompletedProcess) -> str:
    """The one line of a usage error (exit 2, nothing on stdout, no traceback)."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, (result.returncode, stderr)
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert result.stdout == b""
    return stderr


# --- 1. other users' text on a reader's terminal ------------------------------------------------


def test_names_commands_and_reasons_of_others_reach_a_terminal_escaped(daemon, tmp_path):
    """A batch's name and command come from any member of the group, and everyone may list them:
    list, status and events show what a terminal would act on escaped, --json the exact text,
    and what the tasks themselves write is handed on as written."""
    shown = daemon.ctl("submit", "--name", CLEAR, "--", "sleep", "60")  # running: status shows it too
    forged = daemon.ctl("submit", "--name", FORGED_ROW, "--", "true")
    titled = daemon.ctl("submit", "--wait", "--shell", "--", f"printf '\\033[1mbold\\n'; {TITLE}")
    assert shown.returncode == forged.returncode == titled.returncode == 0, (shown.stderr, titled.stderr)
    batches = [shown.stdout.strip(), forged.stdout.strip(), re.search(r"batch (\S+) submitted", titled.stderr)[1]]
    assert titled.stdout.startswith("\x1b[1mbold\n")  # the task's own output: as it wrote it

    listed = daemon.ctl("list")
    assert not UNSHOWABLE.search(listed.stdout), listed.stdout
    assert len(listed.stdout.splitlines()) == 1 + 3  # the header and one row per batch: none forged
    assert "\\x1b[2J\\x1b[H" in listed.stdout and "x\\n    99" in listed.stdout
    node = daemon.ctl("status")
    assert not UNSHOWABLE.search(node.stdout) and "\\x1b[2J" in node.stdout, node.stdout
    assert daemon.ctl("cancel", batches[0]).returncode == 0
    one = daemon.ctl("status", batches[2])
    assert not UNSHOWABLE.search(one.stdout), one.stdout
    assert "\\x1b]0;evil\\x07\\nfake line\\r\\u202eevil\\x9b2J" in one.stdout
    assert len(daemon.ctl("status", batches[1]).stdout.splitlines()) == len(one.stdout.splitlines())
    for batch in batches:
        text = daemon.ctl("events", batch)
        assert text.returncode == 0 and text.stdout and not UNSHOWABLE.search(text.stdout), text.stdout
        waited = daemon.ctl("wait", batch)
        assert not UNSHOWABLE.search(waited.stderr), waited.stderr
    # --json is exact: json.dumps escapes, the reader gets the very strings.
    names = {b["batch"]: b["name"] for b in json.loads(daemon.ctl("list", "--json").stdout)}
    assert names[batches[0]] == CLEAR and names[batches[1]] == FORGED_ROW
    assert TITLE in json.loads(daemon.ctl("status", "--json", batches[2]).stdout)["command"][-1]
    assert daemon.ctl("log", batches[2]).stdout == "\x1b[1mbold\n"


def test_every_event_line_shows_hostile_text_escaped():
    """Whatever an event's text fields hold (a reason quoting a task line, a broker's detail),
    its line in pmlmctl events and submit --wait is one line with nothing a terminal acts on."""
    hostile = f"{CLEAR}{FORGED_ROW}{TITLE}"
    quoting = set()
    for kind, cls in events.KINDS.items():
        hints = typing.get_type_hints(cls)
        fields = {f.name: hostile if str in (typing.get_args(hints[f.name]) or (hints[f.name],)) else 7
                  for f in dataclasses.fields(cls)}
        line = ctl.describe_event({"time": 0.0, **cls(**fields).wire()})
        assert "\n" not in line and not UNSHOWABLE.search(line), (kind, line)
        if "\\x1b[2J" in line:  # the hostile text is there, escaped
            quoting.add(kind)
    assert {"decision", "end", "deferred", "halted", "returned", "settled", "intake"} <= quoting, quoting


@pytest.mark.parametrize("text,shown", [
    ("\x1b[2J", "\\x1b[2J"), ("a\nb\rc\td", "a\\nb\\rc\\td"), ("\x00\x7f\u0085\u009b", "\\x00\\x7f\\x85\\x9b"),
    ("\u202eevil\u2066\u200f", "\\u202eevil\\u2066\\u200f"), ("x\u2028y", "x\\u2028y"),
    ("caf\udce9", "caf\\udce9"),  # a byte that is not UTF-8, as before
    ("été ✓ 名前 \\x1b", "été ✓ 名前 \\x1b"),  # printable text, backslashes too, stays as it is
])
def test_printable_escapes_what_a_terminal_acts_on_and_nothing_else(text, shown):
    assert ctl._printable(text) == shown
    assert ctl._printable(shown) == shown  # escaping twice changes nothing


# --- 2. tasks files: streamed, bounded ------------------------------------------------------------

LIMITED = 800_000 * 1024  # ulimit -v 800000, as a user would try it


@pytest.mark.parametrize("command", ["run", "submit"])
def test_an_endless_tasks_file_of_nuls_is_refused_at_its_first_line(command):
    result = pmlmctl("--socket", NO_DAEMON, command, "--tasks-file", "/dev/zero", "--", "echo", memory=LIMITED,
                     timeout=30)
    assert "line 1 of '/dev/zero' contains a NUL byte" in usage_error(result)


@pytest.mark.parametrize("command,limit", [("run", "1073741824 bytes (1G)"), ("submit", "1048576 bytes (1M)")])
def test_endless_empty_items_are_refused_at_the_byte_limit(command, limit):
    result = pmlmctl("--socket", NO_DAEMON, command, "-0", "--tasks-file", "/dev/zero", "--", "echo",
                     memory=LIMITED, timeout=60)
    message = usage_error(result)
    assert f"tasks file '/dev/zero' holds more than {limit}" in message and "split it into several batches" in message


@pytest.mark.parametrize("null", [False, True], ids=["lines", "items"])
def test_one_endless_line_is_refused_once_it_is_longer_than_exec_takes(null):
    endless = subprocess.Popen(["tr", "\\000", "x"], stdin=open("/dev/zero", "rb"), stdout=subprocess.PIPE)
    try:
        result = pmlmctl("run", *(["-0"] if null else []), "--tasks-file", "-", "--", "echo", stdin=endless.stdout,
                         memory=LIMITED, timeout=30)
    finally:
        endless.kill()
        endless.wait()
        endless.stdout.close()
    message = usage_error(result)
    assert f"{'item' if null else 'line'} 1 of standard input is too long (" in message
    assert f"a task line may have at most {tasklines.MAX_LINE_BYTES} bytes" in message


@pytest.mark.parametrize("command,refused", [
    ("run", "holds more than the 1000000 tasks a batch may have: split it into several batches"),
    ("submit", "holds more than 1048576 bytes (1M), more than one submit request carries"),
])
def test_yes_as_a_tasks_file_stops_at_the_first_limit(command, refused):
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        result = pmlmctl("--socket", NO_DAEMON, command, "--tasks-file", "-", "--", "true", stdin=yes.stdout,
                         memory=LIMITED, timeout=60)
    finally:
        yes.kill()
        yes.wait()
        yes.stdout.close()
    assert refused in usage_error(result)


@pytest.mark.parametrize("feed", ["zeros", "yes"])
def test_enqueue_of_input_that_never_ends_is_refused_before_anything_is_sent(feed):
    # Every line is checked before the first is published, so what is read is held: it is bounded.
    source = subprocess.Popen(["cat", "/dev/zero"] if feed == "zeros" else ["yes"], stdout=subprocess.PIPE)
    try:
        result = pmlmctl("enqueue", "--amqp", "amqp://guest:guest@127.0.0.1:1/%2F", "--queue", "q", "-0",
                         "--tasks-file", "-", stdin=source.stdout, memory=LIMITED, timeout=120)
    finally:
        source.kill()
        source.wait()
        source.stdout.close()
    message = usage_error(result)
    assert "split it and enqueue each part" in message or "split it, and enqueue each part" in message, message


def test_a_million_tasks_are_still_a_batch(tmp_path):
    """The most tasks a batch may have are read (and checked) whole; one more is refused."""
    path = tmp_path / "tasks"
    path.write_bytes(b"t\n" * 1_000_000)
    probe = pmlmctl("--socket", NO_DAEMON, "submit", "--tasks-file", str(path), "--", "true")
    assert "more than 1048576 bytes" in usage_error(probe)  # 2 MB: too big for one request, as pmlmd says
    program = ("import sys, argparse\nfrom pmlmd.client import ctl\n"
               "args = argparse.Namespace(tasks_file=sys.argv[1], null=False, shell=False, append=True)\n"
               "tasks = ctl._read_tasks(ctl.build_parser(), args, ['true'], {}, ctl.RUN_TASKS_LIMIT)\n"
               "print(len(tasks), set(tasks))\n")
    result = subprocess.run([PY, "-c", program, str(path)], capture_output=True, text=True, timeout=60)
    assert result.stdout == "1000000 {'t'}\n", result.stderr


class _Refused(Exception):
    pass


class _Parser:
    def error(self, message):
        raise _Refused(message)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80).map(lambda b: bytes(b"ab\n\0\r\xff"[x % 6] for x in b)),
       null=st.booleans(), chunk=st.integers(1, 9))
def test_a_tasks_file_read_a_chunk_at_a_time_splits_as_the_whole(tmp_path_factory, data, null, chunk):
    """Wherever the chunks end, the tasks are tasklines.split's, byte for byte, and the first line
    holding a NUL is the one named."""
    path = tmp_path_factory.mktemp("tasks") / "file"
    path.write_bytes(data)
    args = argparse.Namespace(tasks_file=str(path), null=null, shell=False, append=True)
    original, ctl.TASKS_CHUNK = ctl.TASKS_CHUNK, chunk
    try:
        got = ctl._read_tasks(_Parser(), args, ["true"], {}, ctl.RUN_TASKS_LIMIT)
    except _Refused as refused:
        got = str(refused)
    finally:
        ctl.TASKS_CHUNK = original
    lines = tasklines.split(data, null)
    bad = [number for number, line in lines if b"\0" in line]
    if bad:
        assert got.startswith(f"line {bad[0]} of {str(path)!r} contains a NUL byte"), got
    elif not lines:
        assert "holds no tasks" in got
    else:
        assert [tasklines.raw(task) for task in got] == [line for _, line in lines]


# --- 3. a current directory that was removed -------------------------------------------------------


@pytest.mark.parametrize("args,needed", [
    (["submit", "--", "true"], "pmlmd runs the workers there: cd to an existing directory"),
    (["submit", "--results", "r", "--tasks-file", "t", "--", "true"], "pmlmd runs the workers there"),
    (["retry", "--joblog", "j", "1"], "--joblog 'j' is relative to it: cd to an existing directory, or give "
                                      "--joblog an absolute path"),
])
def test_a_removed_current_directory_is_a_usage_error_naming_the_fix(tmp_path, args, needed):
    gone = tmp_path / "gone"
    gone.mkdir()
    # The shell stands in the directory while it is removed, as a user's does, then becomes pmlmctl.
    result = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone), PY, "-m",
                             "pmlmd.client.ctl", "--socket", NO_DAEMON, *args], capture_output=True, timeout=60)
    message = usage_error(result)
    assert "the current directory no longer exists (it was removed)" in message and needed in message


# --- 4. values typed on the command line ---------------------------------------------------------


@pytest.mark.parametrize("command", ["wait", "log", "status", "cancel", "report", "events", "retry"])
def test_an_id_that_is_not_utf8_is_refused_by_the_command_given(command):
    result = pmlmctl("--socket", NO_DAEMON, command, os.fsdecode(b"\xff"))
    message = usage_error(result)
    assert message.startswith(f"pmlmctl {command}: error: argument ID: b'\\xff' is not UTF-8 text"), message
