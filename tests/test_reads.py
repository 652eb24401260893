"""Reads that never hold up the governor: a batch's report is built a slice at a time between
the loop's turns (live) or read from the database a slice at a time (finished). Here: what a
reader gets is whole and exact. Real daemon, real ZeroMQ clients."""

from __future__ import annotations

import json

import pytest
import zmq

from pmlmd.core import protocol

from support import wait_for

BIG = 100_000  # lines that fit a 1 MiB request: a report of about 7 MB


def _dealer(ctx, daemon):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + daemon.socket)
    return sock


def _reply(sock, timeout_ms=60_000) -> dict:
    assert sock.poll(timeout_ms), "no reply"
    return protocol.decode_reply(sock.recv())


def test_a_big_report_built_in_slices_is_whole_and_carries_bytes_exactly(daemon_factory):
    daemon = daemon_factory().start()
    ctx = zmq.Context()
    reader, other = _dealer(ctx, daemon), _dealer(ctx, daemon)
    try:
        # A task line that is not UTF-8 must come back as the same bytes through the sliced encoding.
        lines = ["caf\udce9"] + [str(i) for i in range(1, BIG)]
        reader.send(protocol.encode_request("submit", command=["sleep", "60"], cwd="/tmp", task_lines=lines,
                                            max_workers=1))
        batch = _reply(reader)["result"]["batch"]
        for finished in (False, True):
            reader.send(protocol.encode_request("report", batch=batch))
            other.send(protocol.encode_request("ping"))  # served meanwhile (how soon: bench/)
            assert _reply(other)["ok"] is True
            report = _reply(reader)["result"]
            assert len(report["tasks"]) == BIG and report["tasks"][0]["task"].encode("utf-8", "surrogateescape") \
                == b"caf\xe9"
            assert report["state"] == ("cancelled" if finished else "running")
            assert json.loads(json.dumps(report)) == report
            if not finished:
                other.send(protocol.encode_request("cancel", batch=batch))
                assert _reply(other)["ok"] is True
                wait_for(lambda: daemon.ctl("status", "--json", batch).stdout.count('"ended": null') == 0,
                         timeout=60, what="the batch to end")
    finally:
        reader.close()
        other.close()
        ctx.term()


class _NoWalk(list):
    """A batch's task list that fails the test when anything walks it."""

    def __iter__(self):
        raise AssertionError("the summary walked every task")


def test_a_summary_costs_no_walk_over_the_tasks():
    from pmlmd.core.batch import CANCELLED, Batch, BatchSpec
    from pmlmd.core.governor import Limits
    from pmlmd.core.summary import summarize

    spec = BatchSpec(batch_id="1", command=["true"], tasks=[None] * 1000, limits=Limits())
    batch = Batch(spec, now=1000.0)
    task = batch.next_task()
    batch.end_attempt(task, batch.start_attempt(task, 42, 1001.0), 1002.0, "exit")  # exit code None: failed
    batch.queue[0].status = CANCELLED
    batch.tasks = _NoWalk(batch.tasks)
    summary = summarize(batch, now=1003.0, owner_uid=0, owner_user="root")
    counts = summary.counts
    assert (counts.failed, counts.cancelled, counts.queued) == (1, 1, 998)
    assert summary.started is not None and summary.terminated_attempts == 0


def test_a_read_left_unanswered_by_a_pmlmd_that_stopped_is_asked_again(tmp_path, monkeypatch):
    """A stopping pmlmd leaves unanswered what it had received; the one after it answers the read
    asked again (client.Client.read). Here a stand-in at the socket drops the first request."""
    from pmlmd.client import connection as clientlib

    monkeypatch.setattr(clientlib, "READ_TIMEOUT", 0.2)
    path = str(tmp_path / "ctl.sock")
    seen = []

    def answer(router, peer, request, n):
        seen.append(request.name)
        if n:  # the first is dropped, as a stopping pmlmd drops it
            router.send_multipart([peer, protocol.encode_reply({"pid": 1, "uptime_s": 0.0}, request.request_id)])
        return not n

    assert _read_ping_from(path, answer) == {"pid": 1, "uptime_s": 0.0}
    assert seen == ["ping", "ping"]


def _read_ping_from(path: str, answer) -> dict:
    """client.Client.read("ping") against a stand-in at ``path`` (_stand_in)."""
    from pmlmd.client import connection as clientlib

    thread, router, ctx = _stand_in(path, answer)
    try:
        with clientlib.Client(path) as client:
            return client.read("ping")
    finally:
        thread.join(timeout=10)
        router.close()
        ctx.term()


def _stand_in(path: str, answer):
    """A stand-in at ``path``: a ROUTER whose thread hands the requests it receives to
    ``answer(router, peer, request, n)``, until that returns False. (thread, router, context)."""
    import threading

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("ipc://" + path)

    def serve():
        for n in range(10):
            if not router.poll(10_000):
                return
            peer, frame = router.recv_multipart()
            if not answer(router, peer, protocol.parse_request(frame), n):
                return

    thread = threading.Thread(target=serve)
    thread.start()
    return thread, router, ctx


def test_a_read_takes_the_answer_to_an_earlier_ask(tmp_path, monkeypatch):
    """A busy pmlmd answers the first ask after the read asked again: that answer is taken, not
    thrown away while the read waits for the second."""
    from pmlmd.client import connection as clientlib

    monkeypatch.setattr(clientlib, "READ_TIMEOUT", 0.2)
    path = str(tmp_path / "ctl.sock")
    asks = []

    def answer(router, peer, request, n):
        asks.append(request.request_id)
        if n == 1:  # the second ask came: answer the first one only
            router.send_multipart([peer, protocol.encode_reply({"pid": 1, "uptime_s": 0.0}, asks[0])])
            return False
        return True

    assert _read_ping_from(path, answer) == {"pid": 1, "uptime_s": 0.0}
    assert len(asks) == 2


def test_a_read_says_at_once_when_pmlmd_has_stopped(tmp_path, monkeypatch):
    """A pmlmd that stopped for good (its socket gone) is named as not running once nothing has
    listened for RESTART_GRACE, not after READ_PATIENCE of asking again."""
    from pmlmd.client import connection as clientlib

    monkeypatch.setattr(clientlib, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(clientlib, "RESTART_GRACE", 0.5)
    monkeypatch.setattr(clientlib, "READ_PATIENCE", 3600.0)
    path = str(tmp_path / "ctl.sock")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("ipc://" + path)
    try:
        with clientlib.Client(path) as client:
            router.close()  # unbinding removes the socket file, as a stopping pmlmd does
            with pytest.raises(clientlib.Unreachable, match="pmlmd is not running"):
                client.read("ping")
    finally:
        router.close()
        ctx.term()
