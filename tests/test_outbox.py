"""What the daemon sends a client that does not read (pmlmd/daemon/outbox.py), over real ZeroMQ sockets:
replies are never lost while the client is there, events are each sent or counted in a dropped
marker before the next message of their stream, and a client that has gone is forgotten."""

from __future__ import annotations

import zmq

from pmlmd.core import protocol
from pmlmd.daemon.outbox import Outboxes

from support import wait_for


def pair(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 4)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/out.sock")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"ipc://{tmp_path}/out.sock")
    dealer.send(b"hello")
    assert router.poll(10_000)
    client, _ = router.recv_multipart()
    return ctx, router, dealer, client


def drain(dealer, outboxes, request_id) -> list[dict]:
    """Read until the closing reply of ``request_id``'s stream, flushing the daemon's side as the loop would."""
    messages = []
    while not messages or "event" in messages[-1] or messages[-1]["request_id"] != request_id:
        outboxes.flush()
        if dealer.poll(100):
            messages.append(protocol.decode_reply(dealer.recv()))
        else:
            assert outboxes.boxes, f"nothing waits and no closing reply after {len(messages)} messages"
    return messages


def test_events_beyond_the_bound_are_counted_and_the_reply_always_arrives(tmp_path):
    ctx, router, dealer, client = pair(tmp_path)
    try:
        outboxes = Outboxes(router, events_per_client=10)
        for i in range(500):
            outboxes.event(client, "r", {"event": "start", "task": i})
        assert outboxes.boxes[client].events <= 10
        outboxes.reply(client, "other", protocol.encode_reply({"pong": True}, "other"))
        outboxes.reply(client, "r", protocol.encode_reply({"events": "end"}, "r"))  # its marker goes first
        messages = drain(dealer, outboxes, "r")
        assert messages[-1]["result"] == {"events": "end"} and messages[-1]["request_id"] == "r"
        replies = [m for m in messages[:-1] if "event" not in m]
        assert replies == [{"version": 1, "ok": True, "result": {"pong": True}, "request_id": "other"}]
        expected, dropped = 0, 0
        for message in (m for m in messages[:-1] if "event" in m):
            event = message["event"]
            assert message["request_id"] == "r"
            if event["event"] == "dropped":
                expected += event["count"]
                dropped += event["count"]
            else:
                assert event["task"] == expected
                expected += 1
        assert expected == 500 and dropped > 0
        assert not outboxes.boxes and not outboxes.dropped
    finally:
        router.close()
        dealer.close()
        ctx.term()


def test_the_marker_comes_before_the_closing_reply_when_nothing_else_follows(tmp_path):
    ctx, router, dealer, client = pair(tmp_path)
    try:
        outboxes = Outboxes(router, events_per_client=3)
        for i in range(50):
            outboxes.event(client, 7, {"event": "end", "task": i})
        outboxes.reply(client, 7, protocol.encode_reply({"events": "end"}, 7))
        messages = drain(dealer, outboxes, 7)
        assert messages[-2]["event"]["event"] == "dropped"
        kept = [m for m in messages[:-1] if m["event"]["event"] != "dropped"]
        assert len(kept) + sum(m["event"].get("count", 0) for m in messages[:-1]) == 50
    finally:
        router.close()
        dealer.close()
        ctx.term()


def test_a_client_that_has_gone_is_forgotten(tmp_path):
    ctx, router, dealer, client = pair(tmp_path)
    gone = []
    try:
        outboxes = Outboxes(router, on_gone=gone.append, events_per_client=5)
        for i in range(100):
            outboxes.event(client, "r", {"event": "start", "task": i})
        assert client in outboxes.boxes and outboxes.dropped
        dealer.close()

        def forgotten():
            outboxes.flush()
            return gone
        wait_for(forgotten, what="the outbox to forget the closed client")
        assert gone == [client] and not outboxes.boxes and not outboxes.dropped
        outboxes.reply(client, "r", b"{}")  # to a client that is gone: forgotten again, nothing kept
        assert not outboxes.boxes
    finally:
        router.close()
        if not dealer.closed:
            dealer.close()
        ctx.term()
