"""Protocol fuzzing against a live pmlmd: random bytes, random JSON, requests with wrong types,
unknown fields, unknown names and bad versions, truncated requests, huge and multi-frame
messages. Each malformed request gets an error reply and the daemon keeps serving.

One daemon serves the whole module: hypothesis runs all examples of a test inside one call of
it, so there is no per-example fixture, and a daemon per test would only add start-up time. The
expected error code of each message is what
``protocol.parse_request`` says about it: the daemon is documented to answer every frame with
the ProtocolError that function raises, so the fuzzing checks that the running daemon really
does, on the wire, for inputs nobody wrote by hand.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from pmlmd.core import protocol
from pmlmd.core.protocol import ERROR_CODES, INTERNAL, MAX_MESSAGE_BYTES, REQUESTS, TOO_LARGE, ProtocolError, Request

from support import Daemon

REPLY_TIMEOUT_MS = 5000
# The fixtures are module-scoped, so hypothesis's function-scoped-fixture check does not apply;
# too_slow is off because the machine is shared and generating nested JSON can lag under load.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the daemon and the wire ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed():
    """One pmlmd for every example; ended (with anything it started) when the module is done."""
    base = Path(tempfile.mkdtemp(prefix="pmlm-"))  # short: the socket path must fit in 108 bytes
    daemon = Daemon(base)
    try:
        yield daemon.start()  # its notify messages are read all along, as systemd does
    finally:
        daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


class Wire:
    """A raw DEALER socket on the daemon, as any program could open one (no pmlmctl checks)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.ctx = zmq.Context()
        self.sock = self.new_socket(daemon)

    def new_socket(self, daemon: Daemon) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("ipc://" + daemon.socket)
        return sock

    def reply(self, sock: zmq.Socket | None = None) -> dict:
        """The next reply on the socket; events (only ``events`` sends them) are passed over."""
        sock = sock or self.sock
        while True:
            assert sock.poll(REPLY_TIMEOUT_MS), (f"pmlmd sent no reply within {REPLY_TIMEOUT_MS} ms (exit status "
                                                 f"{self.daemon.proc.poll()}):\n{self.daemon.logs()}")
            message = protocol.decode_reply(sock.recv())
            if "event" not in message:
                return message

    def ask(self, frame: bytes, sock: zmq.Socket | None = None) -> dict:
        (sock or self.sock).send(frame)
        return self.reply(sock)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def wire(fuzzed):
    w = Wire(fuzzed)
    yield w
    w.close()


_ping_ids = itertools.count(1)


def assert_still_serving(daemon: Daemon) -> None:
    """The daemon runs, answers a ping from a client that was never involved, and logged no crash."""
    assert daemon.proc.poll() is None, f"pmlmd exited:\n{daemon.logs()}"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect("ipc://" + daemon.socket)
        request_id = f"alive-{next(_ping_ids)}"
        sock.send(protocol.encode_request("ping", request_id=request_id))
        assert sock.poll(REPLY_TIMEOUT_MS), f"pmlmd does not answer ping any more:\n{daemon.logs()}"
        reply = protocol.decode_reply(sock.recv())
        assert reply["ok"] is True and reply["request_id"] == request_id, reply
    finally:
        sock.close()
        ctx.term()
    # log.exception in the request handler writes a traceback: a request hit a bug.
    assert "Traceback" not in daemon.logs()


def check_answer(wire: Wire, frame: bytes) -> dict | None:
    """Send one frame and check the reply against what the protocol says about that frame."""
    try:
        parsed = protocol.parse_request(frame)
    except ProtocolError as exc:
        expected = exc
    else:
        expected = parsed
    if isinstance(expected, Request):
        # Never let a fuzzed message start workers, nor open a stream that is never closed.
        if expected.name == "submit" or (expected.name == "events" and expected.args["follow"]):
            event("valid submit or follow: not sent")
            return None
        reply = wire.ask(frame)
        event(f"valid {expected.name}: " + ("ok" if reply["ok"] else reply["error"]["code"]))
        # A valid request is answered (its id echoed), a result or a refusal, but never a crash.
        assert reply["request_id"] == expected.request_id, reply
        if not reply["ok"]:
            assert reply["error"]["code"] in ERROR_CODES and reply["error"]["code"] != INTERNAL, reply
            assert reply["error"]["message"].strip(), reply
        return reply
    event(f"refused: {expected.code}")  # shown by --hypothesis-show-statistics
    reply = wire.ask(frame)
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert error["code"] in ERROR_CODES, reply
    assert error["code"] == expected.code, (reply, expected)
    assert error["message"].strip(), reply
    # Clients match answers by request_id: an error echoes it whenever it could be read.
    assert reply["request_id"] == expected.request_id, reply
    return reply


# --- what to send ----------------------------------------------------------------------------------

# Strings sometimes hold what the protocol forbids in them: NUL and unpaired surrogates (the
# latter reach the daemon as \\udXXX escapes, or as invalid UTF-8 when not escaped).
chars = st.characters() | st.just("\x00") | st.characters(categories=["Cs"])
# Every character a request string may hold: UTF-8 encodable (no surrogates), no NUL.
valid_chars = st.characters(codec="utf-8", exclude_characters="\x00")
# Any JSON value, including NaN and Infinity, which json.dumps writes but strict JSON forbids.
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(chars, max_size=30))
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(chars, max_size=10),
                                                                                       inner, max_size=5),
                           max_leaves=10)


def dumps(value, ascii_only: bool) -> bytes:
    # surrogatepass: an unpaired surrogate becomes bytes that are not UTF-8, as a buggy client would send.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


ARG_NAMES = sorted({name for schema in protocol._SCHEMAS.values() for name in schema.fields})
VALID = {
    "ping": {},
    "list": {},
    "status": {"batch": "1"},
    "cancel": {"batch": "no-such"},
    "pause": {"batch": "no-such"},
    "resume": {"batch": "no-such"},
    "report": {"batch": "no-such"},
    "events": {"batch": None, "follow": False},
    "submit": {"command": ["/bin/true"], "cwd": "/tmp", "name": "fuzz ✓ é", "env": {"LANG": "C.UTF-8"}},
}
request_names = st.sampled_from(REQUESTS) | st.sampled_from(["Ping", "stat", "submitt", "", "kill"]) \
    | st.text(max_size=12)


def seldom(draw) -> bool:
    """True one time in ten: most generated requests break the protocol in only one or two places,
    so every check of the parser is reached, not just the first one (the version)."""
    return draw(st.integers(0, 9)) == 0


@st.composite
def envelopes(draw) -> bytes:
    """Requests that look right and are wrong somewhere: types, ranges, names, versions, keys."""
    name = draw(request_names)
    args = dict(VALID.get(name, {}))
    schema = protocol._SCHEMAS.get(name)
    own_args = sorted(schema.fields) if schema and schema.fields else ARG_NAMES
    # Change, add or remove some arguments: wrong types, out-of-range values, unknown names.
    for arg in draw(st.lists(st.sampled_from(own_args) | st.sampled_from(ARG_NAMES) | st.text(max_size=10),
                             max_size=3)):
        if draw(st.integers(0, 3)):
            args[arg] = draw(json_values)
        else:
            args.pop(arg, None)
    if isinstance(args.get("joblog"), str) and args["joblog"].startswith("/"):
        # A valid joblog would be created, as root: keep it under a directory that does not exist.
        args["joblog"] = "/nonexistent-pmlm-fuzz" + args["joblog"]
    message = {}
    if not seldom(draw):
        message["version"] = 1 if not seldom(draw) else draw(
            st.sampled_from([2, 0, -1, 1.0, True, "1", None]) | json_values)
    if not seldom(draw):
        message["request"] = name if not seldom(draw) else draw(json_values)
    if draw(st.booleans()):
        message["request_id"] = draw(st.none() | st.integers() | st.text(max_size=210) | json_values)
    if not seldom(draw):
        message["args"] = args if not seldom(draw) else draw(json_values)
    if seldom(draw):
        message[draw(st.text(max_size=10))] = draw(json_values)  # an unknown top-level key
    frame = dumps(message, draw(st.booleans()))
    if message and seldom(draw):
        # Usually a key given twice (json.loads would silently keep the last; the protocol refuses it).
        frame = frame[:-1] + b', "version": 1}'
    return frame


truncated_requests = st.sampled_from(sorted(VALID)).flatmap(
    # ensure_ascii=False, so a cut can fall inside a multi-byte UTF-8 character.
    lambda name: st.just(protocol.encode_request(name, request_id="cut-é", **VALID[name]))
).flatmap(lambda frame: st.integers(0, len(frame) - 1).map(lambda n: frame[:n]))


# --- the tests -------------------------------------------------------------------------------------

@FUZZ
@given(frame=st.binary(max_size=200))
def test_arbitrary_bytes_get_an_error_reply(fuzzed, wire, frame):
    check_answer(wire, frame)


@FUZZ
@given(value=json_values, ascii_only=st.booleans())
def test_arbitrary_json_gets_an_error_reply(fuzzed, wire, value, ascii_only):
    check_answer(wire, dumps(value, ascii_only))


@settings(FUZZ, max_examples=200)
@given(frame=envelopes())
def test_malformed_requests_get_the_matching_error(fuzzed, wire, frame):
    check_answer(wire, frame)


@FUZZ
@given(name=st.sampled_from(["status", "cancel", "pause", "resume", "report", "events"]),
       batch=st.text(valid_chars, max_size=60), request_id=st.integers() | st.text(valid_chars, max_size=200))
def test_requests_for_unknown_batches_get_no_such_batch(fuzzed, wire, name, batch, request_id):
    # Valid requests reach the daemon's own code, the store's lookups, with odd batch ids.
    # This daemon has never run a batch, so every one is unknown.
    reply = check_answer(wire, protocol.encode_request(name, request_id=request_id, batch=batch))
    assert reply["ok"] is False and reply["error"]["code"] == protocol.NO_SUCH_BATCH, reply
    assert reply["request_id"] == request_id


@FUZZ
@given(frame=truncated_requests)
def test_truncated_requests_get_bad_json(fuzzed, wire, frame):
    reply = check_answer(wire, frame)
    assert reply["ok"] is False and reply["error"]["code"] == protocol.BAD_JSON, reply


def test_fuzzing_left_the_daemon_serving(fuzzed, wire):
    # Runs after the fuzz tests above (file order); each later test checks again for itself.
    reply = wire.ask(protocol.encode_request("ping", request_id=42))
    assert reply["ok"] is True and reply["request_id"] == 42
    assert_still_serving(fuzzed)


def test_request_at_the_size_limit_is_served(fuzzed, wire):
    # JSON allows whitespace, so a ping padded to exactly the limit is a valid request.
    frame = protocol.encode_request("ping", request_id="big")
    frame += b" " * (MAX_MESSAGE_BYTES - len(frame))
    assert len(frame) == MAX_MESSAGE_BYTES
    reply = wire.ask(frame)
    assert reply["ok"] is True and reply["request_id"] == "big", reply
    assert_still_serving(fuzzed)


@pytest.mark.parametrize("size", [MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES])
def test_too_large_request_gets_too_large(fuzzed, wire, size):
    frame = protocol.encode_request("ping", request_id="huge")
    frame += b" " * (size - len(frame))
    reply = wire.ask(frame)
    assert reply["ok"] is False and reply["error"]["code"] == TOO_LARGE, reply
    assert str(MAX_MESSAGE_BYTES) in reply["error"]["message"]
    # The same connection is still served.
    assert wire.ask(protocol.encode_request("ping", request_id=7))["request_id"] == 7
    assert_still_serving(fuzzed)


def test_far_too_large_request_drops_only_that_connection(fuzzed, wire):
    # Beyond 4 x the limit libzmq itself refuses the message (ZMQ_MAXMSGSIZE) and closes the
    # connection, before pmlmd could read (and buffer) it: no reply, but nothing else is harmed.
    sock = wire.new_socket(fuzzed)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.send(b"x" * (4 * MAX_MESSAGE_BYTES + 1))
        assert monitor.poll(REPLY_TIMEOUT_MS), "pmlmd did not drop the connection"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert not sock.poll(0), "a dropped message got a reply"
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()
    assert_still_serving(fuzzed)


@FUZZ
@given(frames=st.lists(st.binary(max_size=50) | st.just(protocol.encode_request("ping")), min_size=2, max_size=3))
def test_multi_frame_messages_do_not_disturb_the_daemon(fuzzed, wire, frames):
    # A pmlmctl never sends these; the daemon must just carry on serving the same connection.
    wire.sock.send_multipart(frames)
    request_id = f"after-{len(frames)}"
    wire.sock.send(protocol.encode_request("ping", request_id=request_id))
    while True:  # whatever the multi-frame message may have caused comes first
        reply = wire.reply()
        if reply["request_id"] == request_id:
            break
    assert reply["ok"] is True


def test_multi_frame_left_the_daemon_serving(fuzzed):
    assert_still_serving(fuzzed)
