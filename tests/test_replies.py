"""Reply bodies (pmlmd/core/replies.py): documented, read back as sent, refused when malformed, and
what a real pmlmd answers."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pmlmd.core import protocol, replies
from support import wait_for


def documented() -> dict[str, set[str]]:
    """The table of replies.py's docstring: request -> the field names its rows give."""
    table: dict[str, set[str]] = {}
    current: list[str] = []
    lines = replies.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    for line in lines[rules[1] + 1:rules[2]]:
        if line.startswith("``"):
            request, _, rest = line.partition("  ")
            current = [request.strip("`")]
            table.setdefault(current[0], set())
            for name in current:
                table[name].update(re.findall(r"``(\w+)``", rest))
        elif line.startswith(" " * 15) and current:
            for name in current:
                table[name].update(re.findall(r"``(\w+)``", line))
    return table


def test_every_body_and_field_is_documented_for_each_request_it_answers():
    table = documented()
    for body in replies.BODIES:
        fields = {f.name for f in dataclasses.fields(body)}
        assert set(body.TYPES) == fields, body
        # A row may continue a neighbour's (submit's fields are retry's): documented on either.
        told = set().union(*(table.get(r, set()) for r in body.REQUESTS))
        assert fields <= told | {"events"}, (body.__name__, fields - told)
        for request in body.REQUESTS:
            assert request in table, f"{request} has no row"
            assert request in protocol.REQUESTS, request


@pytest.mark.parametrize("body", [
    replies.Pong("0.1.0", 42, 1.5),
    replies.Started("7", None, {"nofile": [1024, 2048]}),
    replies.Started("8", "again", {}, retried=[0, 3], of="7"),
    replies.Control("7", "cancelling"),
    replies.LogSlice([{"task": 0, "offset": 0, "data": "x", "skipped": 0}], 1, 0, False, True),
    replies.EventsEnd(),
    replies.NodeStatus("1 batch", None, {"cpu_limit": 90}, [], "a cgroup each"),
    replies.BatchList([{"batch": "7"}]),
])
def test_a_body_is_read_back_as_it_was_sent(body):
    wire = protocol.decode_reply(protocol.encode_reply(body.to_json(), 1))["result"]
    assert type(body).from_json(wire) == body


def test_a_submit_reply_leaves_out_what_only_a_retry_has():
    assert replies.Started("7", None, {}).to_json() == {"batch": "7", "name": None, "rlimits_lowered": {}}


@pytest.mark.parametrize("result, words", [
    ({"version": "1", "pid": 3}, "no 'uptime_s'"),
    ({"version": "1", "pid": "3", "uptime_s": 1.0}, "'pid'"),
    ({"version": "1", "pid": True, "uptime_s": 1.0}, "'pid'"),
    (["not", "an", "object"], "not an object"),
])
def test_a_malformed_body_is_a_protocol_error_naming_the_field(result, words):
    with pytest.raises(protocol.ProtocolError, match=re.escape(words)):
        replies.Pong.from_json(result)


def test_what_a_real_pmlmd_answers_reads_as_its_body(daemon):
    with daemon.client() as client:
        replies.Pong.from_json(client.call("ping"))
        started = replies.Started.from_json(client.call("submit", command=["sh", "-c", "echo hi"], cwd="/tmp"))
        wait_for(lambda: client.call("status", batch=started.batch)["ended"] is not None, what="the batch ended")
        log = replies.LogSlice.from_json(client.call("log", batch=started.batch))
        assert log.complete and [c["data"] for c in log.chunks] == ["hi\n"]
        control = replies.Control.from_json(client.call("cancel", batch=started.batch))
        assert control == replies.Control(started.batch, "finished")
        node = replies.NodeStatus.from_json(client.call("status"))
        assert node.workers and node.limits["interval"] == 0.5 and node.batches == []
        assert [b["batch"] for b in replies.BatchList.from_json(client.call("list")).batches] == [started.batch]
        answer = client.call("status", batch=started.batch)
        status = replies.BatchStatus.from_json(answer)
        assert status.summary.batch == started.batch and status.summary.state == "finished" and status.node
        assert status.to_json() == answer  # read back as it was sent
        with pytest.raises(protocol.ProtocolError, match="not a batch summary"):
            replies.BatchStatus.from_json(dict(answer, elapsed_s=10**400))  # a number no float holds
        waiting = dict(answer, waiting="free memory 1MiB is below the batch's floor 300MiB (min_free)")
        assert replies.BatchStatus.from_json(waiting).to_json() == waiting  # and with what it waits for
        with pytest.raises(protocol.ProtocolError, match="'waiting'"):
            replies.BatchStatus.from_json(dict(answer, waiting=3))


@pytest.mark.parametrize("result, words", [
    ({"batch": "7", "node": None}, "not a batch summary"),
    ({"summary_version": 1, "batch": "7"}, "no 'node'"),
    ({"node": 3}, "'node'"),
    ("status", "not an object"),
])
def test_a_malformed_batch_status_is_a_protocol_error(result, words):
    with pytest.raises(protocol.ProtocolError, match=re.escape(words)):
        replies.BatchStatus.from_json(result)
