"""The worker's end of agent mode (pmlmd/agent.py), with the manager played by the test.

The manager's end is real ZeroMQ: a PUB socket for requests and a PULL socket for acks. Workers
run as real subprocesses over ipc:// (the transport pmlmd uses). Tests that need several messages
to be waiting at the same moment run the agent in this process over inproc:// on a shared context,
where a message is in the receiver's queue as soon as send() returns, so "pending" is certain
rather than likely; they use an XPUB socket to see the agent's subscriptions arrive before
publishing. Nothing here sleeps to synchronise: waits are on sockets and pipes, with a bound.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from pmlmd.agent import Agent, TerminationRequested, topics

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "agent_worker.py"
RESEND_SECONDS = 0.1  # how often pmlmd re-publishes an unacknowledged request
WAIT = 15.0  # bound on any single wait; a healthy run needs milliseconds
QUIET_SECONDS = 0.5  # how long a paused worker must stay silent to count as standing still

# A worker like the ones agent mode is for: it ignores SIGTERM and stops only through the channel.
WORKER_SCRIPT = """
import signal, sys, time
from pmlmd.agent import Agent, TerminationRequested

signal.signal(signal.SIGTERM, signal.SIG_IGN)
with Agent.from_env() as agent:
    print("ready", flush=True)
    try:
        for tick in range(int(sys.argv[1])):
            agent.checkpoint()
            print(f"tick {tick}", flush=True)
            time.sleep(0.01)  # a unit of work
    except TerminationRequested as stop:
        print(f"cleanup {stop.request_id}", flush=True)
        sys.exit(0)
print("finished", flush=True)
"""
WORKER_TICKS = 3000  # bounds a worker's life (about 30 s of ticks) whatever happens to the test


def make_request(worker_id: str, command: str, *, request_id: str | None = None,
                 deadline_in: float = 60.0, pid: int = 0, **extra) -> dict:
    body = {"version": 1, "request_id": request_id or uuid.uuid4().hex, "command": command,
            "worker_id": worker_id, "deadline": time.time() + deadline_in,
            "Pids_for_terminate": [], "Pids_for_pause": [], "Pids_for_continue": []}
    body[f"Pids_for_{command}"] = [pid]
    body.update(extra)
    return body


class Manager:
    """The manager's end of the channel: requests out on (X)PUB, acks in on PULL."""

    def __init__(self, context: zmq.Context, address: str, ack_address: str, *, xpub: bool = False):
        self.address, self.ack_address = address, ack_address
        self.pub = context.socket(zmq.XPUB if xpub else zmq.PUB)
        if xpub:
            self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, not just new topics
        self.pub.bind(address)
        self.pull = context.socket(zmq.PULL)
        self.pull.bind(ack_address)

    def close(self) -> None:
        self.pub.close(linger=0)
        self.pull.close(linger=0)

    def wait_subscribed(self, worker_id: str) -> None:
        """Wait until the worker's two subscriptions have reached the XPUB socket."""
        missing = {b"\x01" + topic for topic in topics(worker_id)}
        while missing:
            assert self.pub.poll(WAIT * 1000), f"no subscription from worker {worker_id}"
            missing.discard(self.pub.recv())

    def publish(self, body: dict, topic: str | None = None) -> None:
        topic = topic if topic is not None else f"pmlm/{body['worker_id']}/"
        self.pub.send_multipart([topic.encode(), json.dumps(body).encode()])

    def next_ack(self, timeout: float = WAIT) -> dict:
        assert self.pull.poll(timeout * 1000), "no ack arrived"
        return json.loads(self.pull.recv())

    def acks_so_far(self) -> list[dict]:
        """Acks already received, without waiting (over inproc: every ack sent so far)."""
        acks = []
        while self.pull.poll(0):
            acks.append(json.loads(self.pull.recv()))
        return acks

    def deliver(self, body: dict, topic: str | None = None, resends: int | None = None) -> dict:
        """Publish like pmlmd: again every 100 ms until the request's ack arrives; return it.
        With `resends`, give up quietly after that many publications and return {}."""
        end = time.monotonic() + WAIT
        sent = 0
        while time.monotonic() < end and (resends is None or sent < resends):
            self.publish(body, topic)
            sent += 1
            wait_until = time.monotonic() + RESEND_SECONDS
            while (left := wait_until - time.monotonic()) > 0 and self.pull.poll(left * 1000):
                ack = json.loads(self.pull.recv())
                if ack["request_id"] == body["request_id"]:
                    return ack
                # an ack for a copy of an earlier request: keep waiting for this one
        assert resends is not None, f"request {body['command']} {body['request_id']} was never acked"
        return {}


class Lines:
    """The lines a subprocess writes to its stdout, read with a bound on every wait."""

    def __init__(self, proc: subprocess.Popen):
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.eof = False

    def _fill(self, timeout: float) -> bool:
        """Read what is available within timeout; False when nothing came."""
        if self.eof or not select.select([self.fd], [], [], timeout)[0]:
            return False
        chunk = os.read(self.fd, 65536)
        self.eof = not chunk
        self.buffer += chunk
        return bool(chunk)

    def readline(self, timeout: float = WAIT) -> str:
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if not self._fill(max(0.0, end - time.monotonic())) and (self.eof or time.monotonic() >= end):
                raise AssertionError(f"no line from the worker (eof={self.eof}, buffered={self.buffer!r})")
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def available(self) -> list[str]:
        """Every complete line already written, without waiting for more."""
        while self._fill(0):
            pass
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines]

    def quiet_for(self, seconds: float) -> bool:
        """True when nothing at all is written for `seconds`."""
        return not self._fill(seconds) and not self.buffer

    def rest(self) -> str:
        while self._fill(WAIT):
            pass
        rest, self.buffer = self.buffer.decode(), b""
        return rest


@pytest.fixture
def short_dir():
    """A private directory with a short path: ipc:// socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pmlm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def ipc_manager(context, short_dir):
    manager = Manager(context, f"ipc://{short_dir}/agent.sock", f"ipc://{short_dir}/agent-ack.sock")
    yield manager
    manager.close()


@pytest.fixture
def spawn(ipc_manager, short_dir):
    """Start worker subprocesses wired to ipc_manager; each is killed (SIGKILL: they ignore
    SIGTERM) and reaped when the test ends, whatever happened."""
    script = short_dir / "worker.py"
    script.write_text(WORKER_SCRIPT)
    procs: list[subprocess.Popen] = []

    def start(worker_id: str, argv: list[str] | None = None) -> tuple[subprocess.Popen, Lines]:
        env = dict(os.environ, PMLM_AGENT_ADDRESS=ipc_manager.address,
                   PMLM_AGENT_ACK_ADDRESS=ipc_manager.ack_address, PMLM_WORKER_ID=worker_id,
                   PMLM_BATCH_ID="b1", PMLM_TASK_INDEX="0", PMLM_ATTEMPT="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        argv = argv or [str(script), str(WORKER_TICKS)]
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc, Lines(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def inproc(context):
    """A manager on inproc:// and a maker of in-process agents on the same context, each
    subscribed before it is returned."""
    # A wrong agent can block this very process in checkpoint(); end the run with a traceback
    # rather than hang it.
    faulthandler.dump_traceback_later(60, exit=True)
    manager = Manager(context, "inproc://agent", "inproc://agent-ack", xpub=True)
    agents: list[Agent] = []

    def make_agent(worker_id: str = "1.1.1") -> Agent:
        agent = Agent(manager.address, manager.ack_address, worker_id, context=context)
        agents.append(agent)
        manager.wait_subscribed(worker_id)
        return agent

    yield manager, make_agent
    for agent in agents:
        agent.close()
    manager.close()
    faulthandler.cancel_dump_traceback_later()


def finish(proc: subprocess.Popen, lines: Lines) -> tuple[int, str]:
    output = lines.rest()
    return proc.wait(timeout=WAIT), output


# -- no agent channel ---------------------------------------------------------------------------

def test_without_agent_address_the_agent_is_a_no_op_that_needs_no_zmq(monkeypatch):
    monkeypatch.setitem(sys.modules, "zmq", None)  # any `import zmq` now fails
    for environ in ({}, {"PMLM_AGENT_ADDRESS": "", "PMLM_WORKER_ID": "1.1.1"}):
        with Agent.from_env(environ) as agent:
            assert not agent.enabled and not agent.paused
            for _ in range(3):
                agent.checkpoint()
        agent.checkpoint()  # still nothing after close


def test_importing_the_helper_does_not_import_zmq():
    code = "import sys, pmlmd.agent; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT,
                         check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "False"


def test_an_address_without_ack_address_or_worker_id_is_refused():
    with pytest.raises(ValueError):
        Agent.from_env({"PMLM_AGENT_ADDRESS": "ipc:///nonexistent/a", "PMLM_WORKER_ID": "1.1.1"})
    with pytest.raises(ValueError):
        Agent.from_env({"PMLM_AGENT_ADDRESS": "ipc:///nonexistent/a",
                        "PMLM_AGENT_ACK_ADDRESS": "ipc:///nonexistent/b"})


# -- subprocess workers over ipc:// -------------------------------------------------------------

def test_terminate_is_acked_and_the_worker_cleans_up_and_exits_0(ipc_manager, spawn):
    proc, lines = spawn("12.3.1")
    assert lines.readline() == "ready"
    request = make_request("12.3.1", "terminate", pid=proc.pid)
    ack = ipc_manager.deliver(request)
    assert ack == {"version": 1, "request_id": request["request_id"], "worker_id": "12.3.1",
                   "pid": proc.pid, "command": "terminate"}
    returncode, output = finish(proc, lines)
    assert returncode == 0
    assert output.splitlines()[-1] == f"cleanup {request['request_id']}"


def test_a_paused_worker_stands_still_until_continue(ipc_manager, spawn):
    proc, lines = spawn("1.1.1")
    assert lines.readline() == "ready"
    first = lines.readline()
    assert first.startswith("tick ")  # it is working

    ipc_manager.deliver(make_request("1.1.1", "pause"))
    # The worker writes a tick only after checkpoint() has returned, and acks inside it, so every
    # tick from before the pause is in the pipe by the time the ack has arrived.
    last_tick = int([first, *lines.available()][-1].split()[1])
    assert lines.quiet_for(QUIET_SECONDS), "a paused worker went on ticking"

    ipc_manager.deliver(make_request("1.1.1", "continue"))
    assert lines.readline() == f"tick {last_tick + 1}"  # it goes on where it stood still

    ipc_manager.deliver(make_request("1.1.1", "terminate"))
    assert finish(proc, lines)[0] == 0


def test_terminate_while_paused_ends_the_blocked_checkpoint(ipc_manager, spawn):
    proc, lines = spawn("1.1.1")
    assert lines.readline() == "ready"
    ipc_manager.deliver(make_request("1.1.1", "pause"))
    lines.available()
    assert lines.quiet_for(QUIET_SECONDS)

    terminate = make_request("1.1.1", "terminate")
    ipc_manager.deliver(terminate)
    returncode, output = finish(proc, lines)
    assert returncode == 0
    assert output.splitlines() == [f"cleanup {terminate['request_id']}"]


def test_a_late_subscriber_still_gets_a_request_that_is_re_sent(ipc_manager, spawn):
    request = make_request("4.2.7", "terminate")
    # Published three times, 100 ms apart, before any worker exists: all three copies are lost.
    assert ipc_manager.deliver(request, resends=3) == {}
    proc, lines = spawn("4.2.7")
    ack = ipc_manager.deliver(request)  # the manager goes on re-sending
    assert ack["request_id"] == request["request_id"] and ack["pid"] == proc.pid
    returncode, output = finish(proc, lines)
    assert returncode == 0 and f"cleanup {request['request_id']}" in output


def test_the_example_worker_ignores_sigterm_and_stops_through_the_channel(ipc_manager, spawn):
    proc, lines = spawn("7.1.1", [str(EXAMPLE), "600"])  # 600 tasks of 0.1 s: ends on its own at worst
    assert lines.readline() == "started with agent channel as worker 7.1.1"
    os.kill(proc.pid, signal.SIGTERM)  # ignored: it would have killed the process at once
    request = make_request("7.1.1", "terminate", pid=proc.pid)
    # Published only after the SIGTERM, so this ack proves the worker outlived it.
    ack = ipc_manager.deliver(request)
    assert ack["pid"] == proc.pid
    returncode, output = finish(proc, lines)
    assert returncode == 0
    assert output.splitlines()[-1].startswith("cleaned up task ")


def test_the_example_worker_runs_alone_without_a_channel():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMLM_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(EXAMPLE), "2"], env=env, capture_output=True,
                         text=True, timeout=WAIT, check=True)
    assert out.stdout.splitlines() == ["started with no agent channel", "did task 0", "did task 1",
                                       "finished 2 tasks"]


# -- in-process agents over inproc:// -----------------------------------------------------------

def test_one_checkpoint_drains_every_pending_message(inproc):
    manager, make_agent = inproc
    agent = make_agent()
    pause, resume = make_request("1.1.1", "pause"), make_request("1.1.1", "continue")
    manager.publish(pause)
    manager.publish(resume)
    agent.checkpoint()  # would block if it had applied the pause alone
    assert not agent.paused
    assert [(a["request_id"], a["command"]) for a in manager.acks_so_far()] == [
        (pause["request_id"], "pause"), (resume["request_id"], "continue")]
    agent.checkpoint()
    assert manager.acks_so_far() == []


@pytest.mark.parametrize("order", [("pause", "terminate"), ("terminate", "pause"),
                                   ("terminate", "continue"), ("pause", "terminate", "continue")])
def test_terminate_wins_over_everything_pending(inproc, order):
    manager, make_agent = inproc
    agent = make_agent()
    requests = [make_request("1.1.1", command) for command in order]
    for request in requests:
        manager.publish(request)
    terminate_id = next(r["request_id"] for r in requests if r["command"] == "terminate")
    with pytest.raises(TerminationRequested) as raised:
        agent.checkpoint()
    assert raised.value.request_id == terminate_id
    assert not agent.paused
    assert [a["request_id"] for a in manager.acks_so_far()] == [r["request_id"] for r in requests]
    # Told to stop is told to stop: every later checkpoint says so again.
    with pytest.raises(TerminationRequested) as again:
        agent.checkpoint()
    assert again.value.request_id == terminate_id


def test_copies_are_acked_every_time_but_applied_once(inproc):
    manager, make_agent = inproc
    agent = make_agent()
    pause, resume = make_request("1.1.1", "pause"), make_request("1.1.1", "continue")
    for request in (pause, pause, resume, pause):  # the last: a copy re-sent before its ack arrived
        manager.publish(request)
    agent.checkpoint()  # a re-applied pause would block here
    assert not agent.paused
    assert [a["command"] for a in manager.acks_so_far()] == ["pause", "pause", "continue", "pause"]
    manager.publish(pause)  # and one more copy, at a later checkpoint
    agent.checkpoint()
    assert not agent.paused
    assert [a["request_id"] for a in manager.acks_so_far()] == [pause["request_id"]]


def test_a_broadcast_is_applied_and_acked_under_the_workers_own_id(inproc):
    manager, make_agent = inproc
    agent = make_agent("3.1.4")
    request = make_request("*", "terminate")
    manager.publish(request)
    with pytest.raises(TerminationRequested):
        agent.checkpoint()
    [ack] = manager.acks_so_far()
    assert ack == {"version": 1, "request_id": request["request_id"], "worker_id": "3.1.4",
                   "pid": os.getpid(), "command": "terminate"}


def test_a_pause_past_its_deadline_is_acked_but_not_applied(inproc):
    manager, make_agent = inproc
    agent = make_agent()
    stale_pause = make_request("1.1.1", "pause", deadline_in=-1.0)
    manager.publish(stale_pause)
    agent.checkpoint()  # returns: the manager stopped waiting for this pause long ago
    assert not agent.paused
    assert [a["request_id"] for a in manager.acks_so_far()] == [stale_pause["request_id"]]
    manager.publish(make_request("1.1.1", "terminate", deadline_in=-1.0))
    with pytest.raises(TerminationRequested):  # a late terminate still ends the worker
        agent.checkpoint()


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def valid(**changes) -> dict:
    return {**make_request("1.1.1", "terminate"), **changes}


IGNORED_MESSAGES = {
    "one frame": [b"pmlm/1.1.1/"],
    "three frames": [b"pmlm/1.1.1/", json.dumps(valid()).encode(), b"extra"],
    "not JSON": [b"pmlm/1.1.1/", b"terminate now"],
    "not UTF-8": [b"pmlm/1.1.1/", b'{"version": 1, "x": "\xff\xfe"}'],
    "empty body": [b"pmlm/1.1.1/", b""],
    "JSON array": [b"pmlm/1.1.1/", b"[1, 2]"],
    "JSON null": [b"pmlm/1.1.1/", b"null"],
    "JSON string": [b"pmlm/1.1.1/", b'"terminate"'],
    "absurd nesting": [b"pmlm/1.1.1/", b"[" * 100_000],
    "the older tool's message": [b"pmlm/1.1.1/", body(Pids_for_terminate=[os.getpid()],
                                                      Pids_for_pause=[], Pids_for_continue=[])],
    "version 2": [b"pmlm/1.1.1/", body(**valid(version=2))],
    "version as a string": [b"pmlm/1.1.1/", body(**valid(version="1"))],
    "version true": [b"pmlm/1.1.1/", body(**valid(version=True))],
    "no version": [b"pmlm/1.1.1/", body(**{k: v for k, v in valid().items() if k != "version"})],
    "empty request id": [b"pmlm/1.1.1/", body(**valid(request_id=""))],
    "numeric request id": [b"pmlm/1.1.1/", body(**valid(request_id=7))],
    "unknown command": [b"pmlm/1.1.1/", body(**valid(command="stop"))],
    "no deadline": [b"pmlm/1.1.1/", body(**{k: v for k, v in valid().items() if k != "deadline"})],
    "deadline as a string": [b"pmlm/1.1.1/", body(**valid(deadline="soon"))],
    "no worker id": [b"pmlm/1.1.1/", body(**{k: v for k, v in valid().items() if k != "worker_id"})],
    "another worker on the broadcast topic": [b"pmlm/*/", body(**valid(worker_id="1.1.10"))],
    "another worker on this worker's topic": [b"pmlm/1.1.1/", body(**valid(worker_id="1.1.2"))],
    # Only the subscription keeps this one out (its body names 1.1.1): the trailing slash at work.
    "the topic of an id that starts alike": [b"pmlm/1.1.10/", body(**valid(worker_id="1.1.1"))],
}


def test_malformed_foreign_and_other_version_messages_are_ignored(inproc):
    manager, make_agent = inproc
    agent = make_agent("1.1.1")
    for frames in IGNORED_MESSAGES.values():
        manager.pub.send_multipart(frames)
    agent.checkpoint()  # no crash, nothing applied
    assert not agent.paused
    assert manager.acks_so_far() == []

    # And a valid request behind all of them is still reached by one checkpoint.
    for frames in IGNORED_MESSAGES.values():
        manager.pub.send_multipart(frames)
    terminate = make_request("1.1.1", "terminate")
    manager.publish(terminate)
    with pytest.raises(TerminationRequested):
        agent.checkpoint()
    assert [a["request_id"] for a in manager.acks_so_far()] == [terminate["request_id"]]


def test_unknown_keys_and_compatibility_pids_in_object_form_are_accepted(inproc):
    manager, make_agent = inproc
    agent = make_agent("1.1.1")
    request = make_request("1.1.1", "terminate", Pids_for_terminate={"1": os.getpid()},
                           priority="high", reason={"rule": "memory"})
    manager.publish(request)
    with pytest.raises(TerminationRequested):
        agent.checkpoint()
    assert [a["request_id"] for a in manager.acks_so_far()] == [request["request_id"]]


# A request's id always stands for one command, as with pmlmd; ids repeat to make copies.
requests_with_copies = st.lists(st.sampled_from([("p1", "pause"), ("c1", "continue"), ("p2", "pause"),
                                                 ("c2", "continue"), ("t1", "terminate")]),
                                max_size=12)


@settings(max_examples=40, deadline=None)
@given(sequence=requests_with_copies)
def test_any_pending_sequence_is_acked_copy_by_copy_and_terminate_wins(sequence):
    # Ends with a fresh continue so that no outcome leaves the checkpoint blocked.
    sequence = [*sequence, ("c-final", "continue")]
    ctx = zmq.Context()
    faulthandler.dump_traceback_later(60, exit=True)  # as in the inproc fixture
    try:
        manager = Manager(ctx, "inproc://agent", "inproc://agent-ack", xpub=True)
        with Agent(manager.address, manager.ack_address, "9.9.9", context=ctx) as agent:
            manager.wait_subscribed("9.9.9")
            for request_id, command in sequence:
                manager.publish(make_request("9.9.9", command, request_id=request_id))
            terminated = any(command == "terminate" for _, command in sequence)
            if terminated:
                with pytest.raises(TerminationRequested):
                    agent.checkpoint()
            else:
                agent.checkpoint()
            assert not agent.paused
            assert [(a["request_id"], a["command"]) for a in manager.acks_so_far()] == sequence
        manager.close()
    finally:
        ctx.destroy(linger=0)
        faulthandler.cancel_dump_traceback_later()
