"""The events pmlmd streams: each kind declared once (pmlmd/core/events.py), documented in the
protocol, described by pmlmctl events, and sent with its declared fields and no others."""

import dataclasses
import re
import typing

import pytest

from pmlmd.core import events, protocol
from pmlmd.client.ctl import describe_event

SENT = [kind for kind in events.KINDS if kind != "sample"]  # samples stay inside pmlmd


def example(cls: type[events.Event]) -> events.Event:
    """An event of ``cls`` with a value of its type in every field, each value a different one."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        fields[f.name] = f"<{f.name}>" if str in kinds else 100 + i if int in kinds else 1000.5 + i
    return cls(**fields)


# What a line of pmlmctl events shows of an event; the figures (CPU, memory, latency, start
# ticks) are for programs (--json). An ended attempt shows its exit status or its signal.
SHOWN = {"batch", "task", "attempt", "reason", "summary", "detail", "settled", "count", "state", "decision", "rule",
         "cause", "status"}


@pytest.mark.parametrize("kind", SENT)
def test_the_protocol_documents_each_event_with_its_fields(kind):
    rows = re.findall(rf"^``{kind}``\s+(.*)$", protocol.__doc__, re.M)
    assert rows, f"the protocol's event table lacks {kind}"
    assert rows[-1].split(", ") == [f.name for f in dataclasses.fields(events.KINDS[kind])]


@pytest.mark.parametrize("kind", SENT)
def test_pmlmctl_describes_each_event_with_what_it_says(kind):
    event = example(events.KINDS[kind])
    line = describe_event({"time": 0.0, **event.wire()})
    missing = [name for name, value in vars(event).items() if name in SHOWN and str(value) not in line]
    assert not missing, f"{line!r} leaves out {missing}"
    assert "{" not in line and "None" not in line


def test_the_wire_form_is_the_kind_then_the_fields_in_their_order():
    end = events.End("3", 1, 2, pid=None, exit_code=0, signal=None, cause="exit", status="succeeded", reason=None)
    assert list(end.wire()) == ["event", "batch", "task", "attempt", "pid", "exit_code", "signal", "cause", "status",
                                "reason"]
    assert end.wire()["event"] == "end"


def test_a_daemon_sends_each_event_with_its_declared_fields_only(daemon):
    batch = daemon.ctl("submit", "-n", "3", "--", "sh", "-c", "exit $PMLM_TASK_INDEX").stdout.strip()
    with daemon.client() as client:
        seen = []
        for event in client.stream("events", batch=batch, follow=True):
            seen.append(event)
    kinds = {e["event"] for e in seen}
    assert {"decision", "start", "end", "finished"} <= kinds
    for e in seen:
        declared = {f.name for f in dataclasses.fields(events.KINDS[e["event"]])}
        assert set(e) - {"event", "time"} <= declared, e
    ends = sorted((e["task"], e["exit_code"], e["status"]) for e in seen if e["event"] == "end")
    assert ends == [(0, 0, "succeeded"), (1, 1, "failed"), (2, 2, "failed")]


def test_a_follower_gets_only_the_kinds_it_asked_for_and_its_other_requests_answered_meanwhile(daemon):
    """submit --wait's stream: task ends and the batch's end, with calls on the same connection
    between them (client.Client.open_stream and take)."""
    from pmlmd.client.connection import StreamEnded

    batch = daemon.ctl("submit", "-n", "4", "--", "sh", "-c", "sleep 0.$PMLM_TASK_INDEX").stdout.strip()
    with daemon.client() as client:
        stream = client.open_stream("events", batch=batch, follow=True, kinds=["end", "finished"])
        kinds, statuses = [], 0
        while True:
            assert client.call("status", batch=batch)["batch"] == batch  # answered though events come in
            statuses += 1
            try:
                event = client.take(stream, 30)
            except StreamEnded:
                break
            assert event is not None, "no event within 30 s"
            kinds.append(event["event"])
    assert kinds.count("end") == 4 and kinds[-1] == "finished" and set(kinds) == {"end", "finished"}
    assert statuses == len(kinds) + 1


def test_pmlmctl_events_shows_only_the_kinds_asked_for(daemon):
    import json

    submitted = daemon.ctl("submit", "--wait", "-n", "2", "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    batch = submitted.stderr.split()[1]  # "batch N submitted"
    shown = daemon.ctl("events", batch, "--kind", "end", "--kind", "finished", "--json")
    assert shown.returncode == 0, shown.stderr
    kinds = [json.loads(line)["event"] for line in shown.stdout.splitlines()]
    assert kinds == ["end", "end", "finished"]
    refused = daemon.ctl("events", batch, "--kind", "sample")
    assert refused.returncode == 2 and "invalid choice: 'sample'" in refused.stderr


def test_events_follow_goes_on_when_pmlmd_restarts(daemon_factory):
    """A restarted pmlmd does not know the streams of the one before: pmlmctl events -f notices
    (after a quiet spell) and follows the new one, so a batch submitted after the restart shows."""
    import json
    import queue
    import subprocess
    import sys
    import threading

    from support import wait_for

    daemon = daemon_factory().start()
    follower = subprocess.Popen([sys.executable, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "events", "-f", "--json",
                                 "--kind", "finished"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [finished.put(json.loads(line)["batch"]) for line in follower.stdout],
                     daemon=True).start()
    try:
        seen = []

        def shown():
            while not finished.empty():
                seen.append(finished.get_nowait())
            return seen

        for _ in range(2):
            batch = daemon.ctl("submit", "--", "true").stdout.strip()
            wait_for(lambda: batch in shown(), what=f"batch {batch} followed", timeout=30)
            assert daemon.stop() == 0
            daemon.start()
        assert seen == ["1", "2"] and follower.poll() is None
    finally:
        follower.kill()
        follower.wait()
