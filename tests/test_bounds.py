"""Numbers pmlmd accepts are numbers it can compute with, and no stored batch can take the daemon down.

One table, ``pmlmd/core/bounds.py``, gives every number its kind and range; the control protocol,
pmlmd.toml and pmlmctl's options are all checked against it. Here: the three agree at every
edge of every range; values that once passed validation and then broke the governor's
arithmetic (10**400 bytes for ``min_free``, floats near 1e308, nan and inf spelled in JSON,
bools, negative and huge counts) are refused at each door with a one-line reason; the
governor never raises for any value inside the ranges; and a state database holding batches
that cannot be used (written here with sqlite3, in the store's schema) costs those batches
only: the daemon starts, marks them failed with the reason and runs the others.
"""

from __future__ import annotations

import grp
import itertools
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.core import protocol
from pmlmd.core.bounds import BOUNDS, INTEGER, MAX_SIZE, SIZE
from pmlmd.daemon.config import Config, ConfigError, load_config
from pmlmd.client.ctl import build_parser
from pmlmd.core.governor import (PAUSED, ENDING, RUNNING, Limits, NodeSample, SHORTEST_INTERVAL, WorkerView, Workload, decide,
                            next_interval)
from pmlmd.core.options import tighten
from pmlmd.node.sampler import ProcReader
from pmlmd.daemon.store import SCHEMA, SCHEMA_VERSION

from support import Daemon, wait_for

REPLY_TIMEOUT_MS = 10_000
WIRE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The numeric arguments of submit, and where else each can be given.
SUBMIT_NUMBERS = sorted(name for name, field in protocol._SCHEMAS["submit"].fields.items()
                        if field.kind in (protocol._INT, protocol._NUMBER))
CONFIG_NUMBERS = sorted(name for name in BOUNDS if name in Config.__dataclass_fields__)
QUOTAS = ("tasks_queued", "batches_active", "min_interval", "state_bytes", "request_bytes", "output_bytes")  # pmlmd.toml's [quotas]: the daemon's own
# No option: the daemon's own, and the umask, which submit takes from pmlmctl's process.
# output_limit is the daemon's; task_index is log's TASK, the position of a task, not an option;
# --halt WHEN,fail=N and WHEN,fail=N% carry halt_fail and halt_fail_pct (see the test of --halt).
CLI_NUMBERS = sorted(name for name in BOUNDS if name not in ("prune_after", "umask", "output_limit", "task_index",
                                                            "halt_fail", "halt_fail_pct", *QUOTAS))

# Refused for every numeric argument: beyond any range, of the wrong type, or not a number at all.
POISON = [10 ** 400, -10 ** 400, 2 ** 63, 2 ** 64, -2 ** 63 - 1, MAX_SIZE * 4, 1e308, -1e308, 1e20, True, False,
          "1", "1e400", "inf", [], {}, [1]]
# JSON that a strict reader refuses: inf and nan spelled the ways JSON writers spell them.
POISON_TOKENS = [b"1e400", b"-1e400", b"Infinity", b"-Infinity", b"NaN", b"1" + b"0" * 5000]


def test_the_table_covers_every_number_of_submit_config_and_cli():
    assert set(SUBMIT_NUMBERS) == set(BOUNDS) - {"prune_after", "output_limit", "task_index", *QUOTAS}
    assert set(CONFIG_NUMBERS) == {"cpu_limit", "cpu_margin", "memfree_limit", "memory_gap", "min_free", "interval",
                                   "max_workers", "retries", "retry_failed", "term_grace", "prune_after",
                                   "output_limit", *QUOTAS}
    field, bound = protocol._SCHEMAS["log"].fields["task"], BOUNDS["task_index"]
    assert (field.low, field.high) == (bound.low, bound.high)
    for name in SUBMIT_NUMBERS:
        field, bound = protocol._SCHEMAS["submit"].fields[name], BOUNDS[name]
        assert (field.low, field.high) == (bound.low, bound.high), name
    # Every size and count stays where floats are exact and SQLite's integers reach.
    assert MAX_SIZE * 3 < 2 ** 62 and all(b.high < 2 ** 53 or b.kind == SIZE for b in BOUNDS.values())


# --- the edges of every range, at each of the three doors ----------------------------------------

def _edges(name):
    """(value, admitted) at and just beyond both ends of the range."""
    bound = BOUNDS[name]
    if bound.kind in (INTEGER, SIZE):
        return [(bound.low, True), (bound.high, True), (bound.low - 1, False), (bound.high + 1, False)]
    step = max(abs(bound.high), 1) * 1e-6
    return [(float(bound.low), True), (float(bound.high), True), (bound.low - step, False),
            (bound.high + step, False)]


def _submit_frame(**args) -> bytes:
    # json.dumps, not protocol.encode_request: a careless client writes nan and inf (as NaN, Infinity).
    if "halt_fail" in args or "halt_fail_pct" in args:
        args = {"halt": "soon", **args}  # they count for 'halt' only
    return json.dumps({"version": 1, "request": "submit",
                       "args": {"command": ["/bin/true"], "cwd": "/tmp", **args}}).encode()


@pytest.mark.parametrize("name", SUBMIT_NUMBERS)
def test_protocol_takes_exactly_the_range_of_the_table(name):
    for value, admitted in _edges(name):
        if admitted:
            assert protocol.parse_request(_submit_frame(**{name: value})).args[name] == value
        else:
            with pytest.raises(protocol.ProtocolError) as caught:
                protocol.parse_request(_submit_frame(**{name: value}))
            assert caught.value.code == protocol.BAD_FIELD and f"'{name}'" in caught.value.message
            assert f"from {BOUNDS[name].low} to {BOUNDS[name].high}" in caught.value.message


def _toml(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("name", CONFIG_NUMBERS)
def test_config_takes_exactly_the_range_of_the_table(tmp_path, name):
    table = {"retries": "batches", "retry_failed": "batches", "term_grace": "batches",
             "prune_after": "daemon", "output_limit": "daemon",
             **dict.fromkeys(QUOTAS, "quotas")}.get(name, "limits")
    for value, admitted in _edges(name):
        path = tmp_path / "pmlmd.toml"
        path.write_text(f"[{table}]\n{name} = {_toml(value)}\n")
        if admitted:
            assert getattr(load_config(str(path)), name) == value
        else:
            with pytest.raises(ConfigError) as caught:
                load_config(str(path))
            message = str(caught.value)
            assert message.startswith(f"{path}: {table}.{name}: expected ") and BOUNDS[name].span() in message
            assert "\n" not in message


@pytest.mark.parametrize("name", CLI_NUMBERS)
def test_cli_takes_exactly_the_range_of_the_table(name, capsys):
    command = "submit" if name == "priority" else "run"
    option = "--" + name.replace("_", "-")
    for value, admitted in _edges(name):
        # option=value: argparse would take a lone "-1e-06" for an option of its own
        argv = [command, f"{option}={repr(value) if isinstance(value, float) else value}", "--", "true"]
        if admitted:
            assert getattr(build_parser().parse_args(argv), name) == value
        else:
            with pytest.raises(SystemExit) as caught:
                build_parser().parse_args(argv)
            assert caught.value.code == 2
            err = capsys.readouterr().err
            assert option in err and err.count("\n") == 1, err
            # A negative size is no size at all; everything else is told its range.
            assert "must be between" in err or (value < 0 and "invalid size" in err), err


@pytest.mark.parametrize("name", ["halt_fail", "halt_fail_pct"])
def test_cli_halt_takes_exactly_the_range_of_the_table(name, capsys):
    for value, admitted in _edges(name):
        shown = f"{value!r}%" if name == "halt_fail_pct" else str(value)
        for when in ("soon", "now"):
            argv = ["run", f"--halt={when},fail={shown}", "--", "true"]
            if admitted:
                expected = (when, value, None) if name == "halt_fail" else (when, None, value)
                assert build_parser().parse_args(argv).halt == expected
            else:
                with pytest.raises(SystemExit) as caught:
                    build_parser().parse_args(argv)
                assert caught.value.code == 2
                err = capsys.readouterr().err
                assert "--halt" in err and err.count("\n") == 1, err
                assert "fail= takes" in err, err


# --- poisonous values: refused at each door with one line --------------------------------------------

CLI_POISON = [
    ("--min-free", "99999999999999P"),
    ("--min-free", "99999999999999T"),
    ("--min-free", str(MAX_SIZE + 1)),
    ("--memory-gap", "9" * 400),
    ("--memory-gap", "9" * 5000 + "T"),
    ("--cpu-limit", "nan"),
    ("--interval", "inf"),
    ("--term-grace", "1e308"),
    ("--agent-timeout", "-1"),
    ("--tasks", "10000000000"),
    ("--retries", "9" * 30),
    ("--retry-failed", "-1"),
    ("--max-workers", "1e9"),
    ("--timeout", "0"),
    ("--timeout", "nan"),
    ("--timeout", "1e400"),
    ("--halt", "soon,fail=0"),
    ("--halt", "now,fail=" + "9" * 400),
    ("--halt", "soon,fail=nan%"),
    ("--halt", "soon,fail=101%"),
    ("--halt", "later,fail=1"),
    ("--halt", "now,success=1"),
]


@pytest.mark.parametrize("option,value", CLI_POISON, ids=lambda v: str(v)[:24])
def test_cli_refuses_poison_with_one_line_and_exit_2(option, value):
    for command in ("run", "submit"):
        result = subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", "--socket", "/nonexistent/ctl.sock", command,
                                 option, value, "--", "true"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert result.stderr.count("\n") == 1 and option in result.stderr, result.stderr
        assert len(result.stderr) < 400  # the value is shown briefly, never in full


def test_cli_refuses_a_tasks_file_beyond_the_task_count(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.write_text("x\n" * (BOUNDS["tasks"].high + 1))
    result = subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", "run", "--tasks-file", str(tasks), "--", "echo", "{}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"more than the {BOUNDS['tasks'].high}" in result.stderr and "split it" in result.stderr


TOML_POISON = [
    ("limits", "min_free", '"99999999999999T"'),
    ("limits", "min_free", "9223372036854775807"),
    ("limits", "memory_gap", '"' + "9" * 400 + '"'),
    ("limits", "memory_gap", '"' + "9" * 400 + '.5G"'),
    ("limits", "memory_gap", "-1"),
    ("limits", "cpu_limit", "-inf"),
    ("limits", "cpu_margin", "nan"),
    ("limits", "interval", "1e308"),
    ("limits", "interval", "inf"),
    ("limits", "max_workers", "9223372036854775807"),
    ("batches", "retries", "9223372036854775807"),
    ("batches", "term_grace", "1e308"),
    ("batches", "retry_failed", "true"),
    ("daemon", "prune_after", "1e308"),
    ("daemon", "prune_after", '"99999999999999999999d"'),
    ("daemon", "prune_after", '"' + "9" * 400 + 'd"'),
]


@pytest.mark.parametrize("table,key,value", TOML_POISON, ids=lambda v: str(v)[:24])
def test_config_refuses_poison_naming_the_key_and_the_range(tmp_path, table, key, value):
    path = tmp_path / "pmlmd.toml"
    path.write_text(f"[{table}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: {table}.{key}: expected ") and BOUNDS[key].span() in message
    assert "\n" not in message and len(message) < 400


def test_daemon_with_a_poisoned_config_refuses_to_start_in_one_line(tmp_path):
    config = tmp_path / "pmlmd.toml"
    config.write_text('[limits]\nmemory_gap = "' + "9" * 400 + '"\n')
    result = subprocess.run([sys.executable, "-m", "pmlmd", "--config", str(config), "--socket",
                             str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "limits.memory_gap" in result.stderr and "1048576T" in result.stderr


# --- over the wire: one daemon for the module -----------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    base = Path(tempfile.mkdtemp(prefix="pmlm-"))  # short: the socket path must fit in 108 bytes
    base.chmod(0o755)
    # The caller's own group may submit, so valid submits are taken also when the tests do not run as root.
    # The node's limits as loose as they go: a batch may only tighten them, so every value in range is
    # taken (a looser one would be refused, as test_daemon checks).
    daemon = Daemon(base, f'[daemon]\ngroup = "{grp.getgrgid(os.getegid()).gr_name}"\n[limits]\ncpu_limit = 100\n'
                          'cpu_margin = 0\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n')
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        daemon.start()
        sock.connect("ipc://" + daemon.socket)
        yield daemon, sock
    finally:
        sock.close()
        ctx.term()
        daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


_ids = itertools.count(1)


def ask(served, frame: bytes) -> dict:
    daemon, sock = served
    sock.send(frame)
    assert sock.poll(REPLY_TIMEOUT_MS), f"pmlmd did not answer (exit {daemon.proc.poll()}):\n{daemon.logs()}"
    return protocol.decode_reply(sock.recv())


def assert_serving(served) -> None:
    daemon, _ = served
    request_id = f"ping-{next(_ids)}"
    reply = ask(served, protocol.encode_request("ping", request_id=request_id))
    assert reply["ok"] and reply["request_id"] == request_id, reply
    assert daemon.proc.poll() is None and "Traceback" not in daemon.logs(), daemon.logs()


def submit_and_cancel(served, frame: bytes) -> dict:
    """Send a submit; should it be taken, cancel the batch at once (these tests look at the numbers only)."""
    reply = ask(served, frame)
    if reply["ok"]:
        cancelled = ask(served, protocol.encode_request("cancel", batch=reply["result"]["batch"]))
        assert cancelled["ok"], cancelled
    return reply


def _raw_submit(name: str, token: bytes) -> bytes:
    return (b'{"version": 1, "request": "submit", "args": {"command": ["/bin/true"], "cwd": "/tmp", "'
            + name.encode() + b'": ' + token + b"}}")


@pytest.mark.parametrize("name", SUBMIT_NUMBERS)
def test_poisonous_submits_get_bad_field_and_the_daemon_serves_on(served, name):
    for value in POISON:
        reply = submit_and_cancel(served, _submit_frame(**{name: value}))
        assert not reply["ok"], (name, value, reply)
        assert reply["error"]["code"] == protocol.BAD_FIELD, reply
        message = reply["error"]["message"]
        assert f"'{name}'" in message and "must be" in message and len(message) < 500, message
        assert_serving(served)
    for token in POISON_TOKENS:
        reply = submit_and_cancel(served, _raw_submit(name, token))
        assert not reply["ok"] and reply["error"]["code"] == protocol.BAD_JSON, (token[:20], reply)
        assert_serving(served)


def impossible(name: str, reply: dict) -> bool:
    """A submit refused because its memory limits ask for more free memory than the node has
    (service._refuse_impossible): in range, yet no task of it could ever start."""
    return (name in ("memory_gap", "min_free", "memfree_limit") and not reply["ok"]
            and reply["error"]["code"] == protocol.BAD_FIELD and "no task could ever start" in reply["error"]["message"])


def test_submits_at_the_edges_of_every_range_are_run_without_harm(served):
    # The largest sizes, the shortest and longest times: taken, governed for a while, cancelled;
    # or, for memory limits that ask for more free memory than the node has, refused as such.
    for name in SUBMIT_NUMBERS:
        for value, admitted in _edges(name):
            if admitted and not (name == "tasks" and value > 1000):
                reply = submit_and_cancel(served, _submit_frame(**{name: value}))
                assert reply["ok"] or impossible(name, reply), (name, value, reply)
    time.sleep(1)  # a few governor steps with those limits in force
    assert_serving(served)


# Any JSON value, weighted towards numbers near and beyond the edges.
edge_numbers = st.sampled_from(sorted({v for name in BOUNDS for v, _ in _edges(name)}, key=repr))
json_numbers = (st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | edge_numbers | st.sampled_from(POISON)
                | st.booleans() | st.none() | st.text(max_size=8) | st.lists(st.integers(), max_size=2))


@WIRE
@given(name=st.sampled_from(SUBMIT_NUMBERS), value=json_numbers)
def test_random_numbers_in_submit_never_crash_the_daemon(served, name, value):
    if name == "tasks" and isinstance(value, int) and 1000 < value <= BOUNDS["tasks"].high:
        value = 1000  # a valid count still builds the whole batch; keep each example quick
    frame = _submit_frame(**{name: value})  # nan and inf come out as NaN and Infinity: not strict JSON
    try:
        protocol.parse_request(frame)
    except protocol.ProtocolError as exc:
        expected = exc.code
    else:
        expected = None
    reply = submit_and_cancel(served, frame)
    if expected is None:
        assert reply["ok"] or impossible(name, reply), reply
    else:
        assert not reply["ok"] and reply["error"]["code"] == expected, reply
        assert expected in (protocol.BAD_FIELD, protocol.BAD_JSON)
    assert_serving(served)


# --- the governor over the full ranges ---------------------------------------------------------------

def bounded(name):
    bound = BOUNDS[name]
    if bound.kind in (INTEGER, SIZE):
        return st.integers(bound.low, bound.high)
    return st.floats(bound.low, bound.high)


limits_st = st.builds(Limits, cpu_limit=bounded("cpu_limit"), memfree_limit=bounded("memfree_limit"),
                      memory_metric=st.sampled_from(["available", "free"]), memory_gap=bounded("memory_gap"),
                      min_free=bounded("min_free"), victim=st.sampled_from(["newest", "oldest", "largest"]),
                      max_workers=bounded("max_workers"), cpu_margin=bounded("cpu_margin"),
                      interval=bounded("interval"))
MEMORY = st.integers(0, MAX_SIZE)  # a /proc reading; no node has more


@st.composite
def samples(draw):
    total = draw(st.integers(1, MAX_SIZE))
    return NodeSample(time=draw(st.floats(0, 1e9)), cpu_pct=draw(st.none() | st.floats(0, 100)),
                      mem_total=total, mem_available=draw(st.integers(0, total)), mem_free=draw(st.integers(0, total)))


@st.composite
def situations(draw):
    sample = draw(samples())
    workers = []
    for key in range(draw(st.integers(0, 8))):
        state = draw(st.sampled_from([RUNNING, PAUSED, *ENDING]))
        paused_at = draw(st.floats(0, sample.time)) if state == PAUSED else None
        workers.append(WorkerView(key=key, started=draw(st.floats(0, sample.time)), state=state, rss=draw(MEMORY),
                                  rss_growth=draw(st.none() | st.floats(-1e15, 1e15)),
                                  cpu=draw(st.none() | st.floats(0, 100)), paused_at=paused_at,
                                  cpu_at_pause=draw(st.none() | st.floats(0, 100)) if paused_at is not None else None,
                                  priority=draw(bounded("priority")), batch=draw(st.sampled_from("ab"))))
    # An average of whole byte counts over at most the tasks of a batch: 0, or at least 1 / MAX_TASKS.
    demands = [Workload(queued=draw(st.integers(0, BOUNDS["tasks"].high)),
                        avg_rss=draw(st.none() | st.floats(1 / BOUNDS["tasks"].high, MAX_SIZE)),
                        avg_cpu=draw(st.none() | st.floats(0, 100)), key=key,
                        room=draw(st.none() | st.integers(0, BOUNDS["max_workers"].high))) for key in "ab"]
    return sample, workers, demands


@settings(max_examples=400, deadline=None)
@given(situation=situations(), node=limits_st, asked=st.fixed_dictionaries(
    {}, optional={"cpu_limit": bounded("cpu_limit"), "cpu_margin": bounded("cpu_margin"),
                  "memfree_limit": bounded("memfree_limit"), "memory_gap": bounded("memory_gap"),
                  "min_free": bounded("min_free"), "interval": bounded("interval")}))
def test_decide_tighten_and_next_interval_never_raise_within_the_ranges(situation, node, asked):
    sample, workers, demands = situation
    limits = tighten(node, **asked)
    # A batch's limits stay inside the ranges, so everything downstream can rely on them.
    for field, name in (("cpu_limit", "cpu_limit"), ("cpu_margin", "cpu_margin"), ("memfree_limit", "memfree_limit"),
                        ("memory_gap", "memory_gap"), ("min_free", "min_free"), ("interval", "interval")):
        assert BOUNDS[name].admits(getattr(limits, field)), field
    decisions = decide(sample, workers, demands, limits)
    for d in decisions:
        assert 0 <= d.count <= BOUNDS["max_workers"].high and d.reason
    later = NodeSample(time=sample.time + 0.5, cpu_pct=sample.cpu_pct, mem_total=sample.mem_total,
                       mem_available=sample.mem_available // 2, mem_free=sample.mem_free // 3)
    for previous, now in ((None, sample), (sample, later), (later, sample)):
        interval = next_interval(previous, now, limits)
        assert math.isfinite(interval) and SHORTEST_INTERVAL <= interval <= limits.interval


# --- state that would poison every restart ----------------------------------------------------------------

GOOD = {"command": ["/bin/true"], "cwd": "/tmp", "tasks": 1, "task_lines": None, "shell": False, "name": None,
        "priority": 0, "env": {}}


def _submission(**changes) -> str:
    return json.dumps({**GOOD, **changes})


def _write_state(state_dir: Path, batches: list[dict]) -> None:
    """A state.db in the store's schema, holding ``batches`` as given (no checks: that is the point)."""
    state_dir.mkdir(parents=True)
    db = sqlite3.connect(state_dir / "state.db")
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    db.execute("INSERT INTO meta VALUES ('last_seq', ?)", (str(len(batches)),))
    for seq, b in enumerate(batches, 1):
        db.execute("INSERT INTO batches (id, seq, name, owner_uid, owner_gid, owner_groups, priority, submission, "
                   "state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active', ?)",
                   (b.get("id", str(seq)), b.get("seq", seq), b.get("name"), os.geteuid(), os.getegid(),
                    b.get("groups", json.dumps([os.getegid()])), b.get("priority", 0), b["submission"],
                    b.get("created", time.time())))
        for idx, line, status in b.get("tasks", [(0, None, "queued")]):
            db.execute("INSERT INTO tasks (batch_id, idx, line, status) VALUES (?, ?, ?, ?)",
                       (b.get("id", str(seq)), idx, line, status))
        for idx, number, pid, ticks in b.get("attempts", []):
            db.execute("INSERT INTO attempts (batch_id, idx, number, pid, start_ticks, start) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (b.get("id", str(seq)), idx, number, pid, ticks, time.time()))
    db.commit()
    db.close()


def test_a_poisoned_state_db_costs_only_the_poisoned_batches(daemon_factory, tmp_path):
    # A live process recorded as a poisoned batch's worker: nobody could govern it, so it must end.
    # Another, recorded as the good batch's, is adopted as ever.
    stray = subprocess.Popen(["sleep", "300"], start_new_session=True)
    adoptee = subprocess.Popen(["sleep", "1"], start_new_session=True)
    try:
        ticks = wait_for(lambda: ProcReader().pid_stat(stray.pid), what="the stray's stat").start_ticks
        adoptee_ticks = wait_for(lambda: ProcReader().pid_stat(adoptee.pid), what="the adoptee's stat").start_ticks
        poisoned = {  # what the report must say about each
            "min_free": dict(submission=_submission(min_free=10 ** 400, retries=10 ** 400),
                             tasks=[(0, None, "running")], attempts=[(0, 1, stray.pid, ticks)]),
            "memory_gap": dict(submission=_submission().replace('"tasks": 1', '"tasks": 1, "memory_gap": 1e400')),
            "interval": dict(submission=_submission().replace('"tasks": 1', '"tasks": 1, "interval": NaN')),
            "'tasks'": dict(submission=_submission(tasks=10 ** 9)),
            "term_grace": dict(submission=_submission(term_grace=True)),
            "'command'": dict(submission=json.dumps({"cwd": "/tmp"})),
            "JSONDecodeError": dict(submission="{not json"),
            "its priority": dict(submission=_submission(), priority="high"),
            "its owner's group list": dict(submission=_submission(), groups="[1e999]"),
            "its creation time": dict(submission=_submission(), created="yesterday"),
            "UnicodeDecodeError": dict(submission=_submission(), tasks=[(0, b"\xff\xfe", "queued")]),
            "the pid of attempt": dict(submission=_submission(), tasks=[(0, None, "running")],
                                       attempts=[(0, 1, 2 ** 40, 5)]),
            "the index of its task": dict(submission=_submission(), tasks=[(0, None, "queued"), (5, None, "queued")]),
            "the status of task 0": dict(submission=_submission(), tasks=[(0, None, "exploded")]),
        }
        good = dict(submission=_submission(name="good", command=["/bin/sh", "-c", "exit 0"], tasks=2),
                    tasks=[(0, None, "running"), (1, None, "queued")], attempts=[(0, 1, adoptee.pid, adoptee_ticks)])
        # Its last task ended, but the pmlmd of the time stopped before marking it finished.
        over = dict(submission=_submission(name="over"), tasks=[(0, None, "succeeded")])
        daemon = daemon_factory()
        batches = list(poisoned.values()) + [over, good]
        _write_state(Path(daemon.state_dir), batches)
        # A text that is not UTF-8 is stored as such with a cast; sqlite3 would store bytes as a blob.
        with sqlite3.connect(Path(daemon.state_dir) / "state.db") as db:
            db.execute("UPDATE tasks SET line = CAST(line AS TEXT) WHERE typeof(line) = 'blob'")
        daemon.start()
        good_id = str(len(batches))

        def status(batch):
            with daemon.client() as client:
                return client.call("status", batch=batch)

        done = wait_for(lambda: (s := status(good_id))["state"] == "finished" and s, timeout=30,
                        what="the good batch to finish")
        assert done["counts"]["succeeded"] == 2 and done["exit_status"] == 0, (done, daemon.logs())
        over_status = status(str(len(batches) - 1))
        assert over_status["state"] == "finished" and over_status["exit_status"] == 0, over_status
        with daemon.client() as client:
            for seq, fragment in enumerate(poisoned, 1):
                assert status(str(seq))["state"] == "failed"
                report = client.call("report", batch=str(seq))
                assert report["exit_status"] == 1 and report["error_exist"] is True
                assert report["error_message"].startswith("not restored when pmlmd started: ")
                assert fragment in report["error_message"], (fragment, report["error_message"])
            listed = {b["batch"]: b for b in client.call("list")["batches"]}
        assert all(listed[str(seq)]["exit_status"] == 1 for seq in range(1, len(poisoned) + 1)), listed
        assert stray.wait(timeout=10) == -signal.SIGTERM  # ended, not orphaned
        logs = daemon.logs()
        assert f"batch {good_id} restored: 1 tasks queued, 1 workers adopted" in logs
        assert logs.count("cannot be restored and is marked failed") == len(poisoned), logs
        assert "Traceback" not in logs

        # The next start finds them finished: nothing left to refuse, nothing to crash on.
        daemon.stop()
        daemon.start()
        assert status("1")["state"] == "failed" and status(good_id)["state"] == "finished"
        assert daemon.logs().count("cannot be restored") == len(poisoned)
    finally:
        for process in (stray, adoptee):
            if process.poll() is None:
                process.kill()
            process.wait()
