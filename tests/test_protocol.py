"""The control protocol: requests parse with defaults filled, every bad input maps to an error code,
and no input bytes at all make parse_request raise anything but ProtocolError."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.core import protocol
from pmlmd.core.bounds import MAX_SIZE, MAX_TASKS
from pmlmd.core.protocol import (BAD_FIELD, BAD_JSON, BAD_VERSION, ERROR_CODES, INTERNAL, MAX_MESSAGE_BYTES, MISSING_FIELD,
                            NO_SUCH_BATCH, PERMISSION_DENIED, PROTOCOL_VERSION, QUOTA_EXCEEDED, REQUESTS, TOO_LARGE,
                            UNKNOWN_FIELD, UNKNOWN_REQUEST, ProtocolError, Request, decode_reply, encode_error,
                            encode_event, encode_reply, encode_request, parse_request)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SUBMIT_DEFAULTS = {
    "tasks": 1, "task_lines": None, "shell": False, "name": None, "priority": 0, "max_workers": None,
    "cpu_limit": None, "cpu_margin": None, "memfree_limit": None, "memory_metric": None, "memory_gap": None,
    "min_free": None, "victim": None, "term_grace": None, "interval": None, "retries": None,
    "retry_failed": None, "term_mode": None, "pause_mode": None, "agent_timeout": None, "user": None, "env": {},
}
# What workers inherit from the submitter; null: pmlmd's own umask, the owner's login limits.
SUBMIT_DEFAULTS.update({"umask": None, "rlimits": None})
SUBMIT_DEFAULTS["results"] = None  # no --results: the output stays with pmlmd only
# Tasks from the request, not from a queue (see pmlmd.broker.intake).
SUBMIT_DEFAULTS.update({"amqp": None, "queue": None, "until_empty": False, "dead_letter": None})
# The controls GNU parallel users know: off unless asked (append: pmlmctl asks for it by default).
SUBMIT_DEFAULTS.update({"timeout": None, "halt": None, "halt_fail": None, "halt_fail_pct": None, "append": False,
                        "joblog": None})
SUBMIT_MINIMAL = {"command": ["true"], "cwd": "/tmp"}
SUBMIT_FIELDS = tuple(SUBMIT_MINIMAL) + tuple(SUBMIT_DEFAULTS)


def frame(args=None, request="submit", **top):
    message = {"version": PROTOCOL_VERSION, "request": request, **top}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode()


def submit(**args):
    return frame({**SUBMIT_MINIMAL, **args})


def error_of(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(data)
    return info.value


# --- every request, defaults filled -----------------------------------------------------------

@pytest.mark.parametrize("request_name, args, expected", [
    ("ping", None, {}),
    ("list", {}, {}),
    ("status", None, {"batch": None}),
    ("status", {"batch": "b1"}, {"batch": "b1"}),
    ("cancel", {"batch": "b1"}, {"batch": "b1"}),
    ("pause", {"batch": "b1"}, {"batch": "b1"}),
    ("resume", {"batch": "b1"}, {"batch": "b1"}),
    ("report", {"batch": "b1"}, {"batch": "b1"}),
    ("events", None, {"batch": None, "follow": False, "kinds": None}),
    ("events", {"batch": "b1", "follow": True}, {"batch": "b1", "follow": True, "kinds": None}),
    ("events", {"kinds": ["end", "finished"]}, {"batch": None, "follow": False, "kinds": ["end", "finished"]}),
    ("retry", {"batch": "b1"}, {"batch": "b1", "failed_only": False, "joblog": None}),
    ("retry", {"batch": "b1", "failed_only": True, "joblog": "/tmp/j"}, {"batch": "b1", "failed_only": True,
                                                                         "joblog": "/tmp/j"}),
    ("submit", SUBMIT_MINIMAL, {**SUBMIT_MINIMAL, **SUBMIT_DEFAULTS}),
    ("submit", {**SUBMIT_MINIMAL, "task_lines": ["a", ""]},
     {**SUBMIT_MINIMAL, **SUBMIT_DEFAULTS, "tasks": None, "task_lines": ["a", ""]}),
    ("submit", {**SUBMIT_MINIMAL, "priority": None, "shell": None, "env": None},
     {**SUBMIT_MINIMAL, **SUBMIT_DEFAULTS}),
])
def test_request_parses_with_defaults(request_name, args, expected):
    assert parse_request(frame(args, request=request_name)) == Request(request_name, expected, None)


QUEUE = {"amqp": "amqp://worker:s3cret@broker.example:5672/jobs", "queue": "tasks"}


def test_a_queue_batch_names_its_broker_and_queue():
    parsed = parse_request(submit(**SUBMIT_MINIMAL, **QUEUE, until_empty=True, dead_letter="failed"))
    assert {k: parsed.args[k] for k in ("amqp", "queue", "until_empty", "dead_letter", "task_lines")} == {
        **QUEUE, "until_empty": True, "dead_letter": "failed", "task_lines": None}


@pytest.mark.parametrize("args, says", [
    ({"amqp": QUEUE["amqp"]}, "'amqp' needs 'queue'"),
    ({"queue": "tasks"}, "'queue' is given without 'amqp'"),
    ({"until_empty": True}, "'until_empty' is given without 'amqp'"),
    ({**QUEUE, "task_lines": ["a"]}, "leave 'task_lines' out"),
    ({**QUEUE, "amqp": "http://worker:s3cret@broker.example/"}, "must start with amqp:// or amqps://"),
    ({**QUEUE, "amqp": "amqp://worker:s3cret@:5672/"}, "names no host"),
    ({**QUEUE, "amqp": "amqp://worker:s3cret@broker.example:99999/"}, "cannot be used"),
    ({**QUEUE, "queue": "q" * 256}, "at most 255 characters"),
    ({**QUEUE, "queue": "\u00e9" * 200}, "the queue name must be 1 to 255 bytes"),  # 400 bytes of UTF-8
    ({**QUEUE, "dead_letter": ""}, "the dead-letter exchange name must be 1 to 255 bytes"),
])
def test_a_queue_batch_that_cannot_work_is_refused_without_showing_the_password(args, says):
    error = error_of(submit(**SUBMIT_MINIMAL, **args))
    assert error.code == BAD_FIELD and says in error.message and "s3cret" not in error.message


def test_submit_with_every_argument():
    args = {
        "command": ["sh", "", "-c"], "tasks": None, "task_lines": ["x"], "shell": True, "name": "n" * 200,
        "priority": -1000, "max_workers": 100_000, "cpu_limit": 100, "cpu_margin": 0.5, "memfree_limit": 0,
        "memory_metric": "free", "memory_gap": 0, "min_free": 10 ** 12, "victim": "largest", "term_grace": 3600,
        "interval": 0.01, "retries": 0, "retry_failed": 1000, "term_mode": "agent", "pause_mode": "signal",
        "agent_timeout": 2, "user": "nobody", "cwd": "/", "env": {"A": "b=c"}, "results": "/srv/r\udcff",
    }
    args.update(umask=0o777, rlimits={"nofile": [0, 2 ** 60], "as": [4096, "unlimited"], "cpu": ["unlimited"] * 2})
    args.update(timeout=30, halt="soon", halt_fail_pct=50, halt_fail=None, append=True, joblog="/tmp/j\udcff.tsv")
    parsed = parse_request(submit(**args))
    assert parsed.args == {**args, "cpu_limit": 100.0, "memfree_limit": 0.0, "term_grace": 3600.0,
                           "agent_timeout": 2.0, "timeout": 30.0, "halt_fail_pct": 50.0,
                           "amqp": None, "queue": None, "until_empty": False, "dead_letter": None}
    # numbers reach the daemon as floats, whatever JSON spelling the client used
    assert isinstance(parsed.args["cpu_limit"], float) and isinstance(parsed.args["memfree_limit"], float)


def test_request_id_is_read_and_echoed_in_errors():
    assert parse_request(frame(request="ping", request_id="abc")).request_id == "abc"
    assert parse_request(frame(request="ping", request_id=-3)).request_id == -3
    assert parse_request(frame(request="ping", request_id=None)).request_id is None
    assert error_of(frame({"bogus": 1}, request="ping", request_id=9)).request_id == 9
    assert error_of(frame(request="nope", request_id="r")).request_id == "r"


def test_requests_tuple_matches_the_schema_table_and_the_docstring():
    assert set(REQUESTS) == {"ping", "list", "status", "cancel", "pause", "resume", "report", "events", "submit",
                             "retry", "log"}
    assert set(protocol._SCHEMAS["submit"].fields) == set(SUBMIT_FIELDS)
    for name in REQUESTS:
        assert f"``{name}``" in protocol.__doc__
        for field in protocol._SCHEMAS[name].fields:
            assert f"``{field}``" in protocol.__doc__, field
    for code in ERROR_CODES:
        assert f"``{code}``" in protocol.__doc__, code


# --- one representative bad input per error code -----------------------------------------------

def _raw(message: dict) -> bytes:
    return json.dumps(message).encode()


ERROR_CASES = [
    # (input, code, substrings the message must contain)
    (b"\xff\xfe", BAD_JSON, ["UTF-8"]),
    (b"{not json", BAD_JSON, ["not valid JSON"]),
    (b"[1, 2]", BAD_JSON, ["JSON object"]),
    (b'{"version": NaN}', BAD_JSON, ["NaN"]),
    (b'{"version": 1e999}', BAD_JSON, ["1e999"]),
    (b'{"version": 1, "version": 1}', BAD_JSON, ["'version'", "twice"]),
    (b"[" * 200_000, BAD_JSON, ["nested"]),
    (b'{"version": ' + b"9" * 5000 + b"}", BAD_JSON, ["number"]),
    (b" " * (MAX_MESSAGE_BYTES + 1), TOO_LARGE, [str(MAX_MESSAGE_BYTES)]),
    (_raw({"request": "ping"}), BAD_VERSION, ["'version'", "upgrade"]),
    (_raw({"version": 7, "request": "ping"}), BAD_VERSION, ["version 7 is not supported", "version 1", "upgrade"]),
    (_raw({"version": "1", "request": "ping"}), BAD_VERSION, ["'version'", "'1'"]),
    (_raw({"version": True, "request": "ping"}), BAD_VERSION, ["'version'", "true"]),
    (frame(request="stauts"), UNKNOWN_REQUEST, ["'stauts'", "'status'"]),
    (_raw({"version": 1}), MISSING_FIELD, ["'request'"]),
    (frame({"batch": "x"}, request="list"), UNKNOWN_FIELD, ["'batch'", "list takes no arguments"]),
    (frame(request="ping", extra=1), UNKNOWN_FIELD, ["'extra'", "'args'"]),
    (submit(priorty=3), UNKNOWN_FIELD, ["'priorty'", "submit", "'priority'"]),
    (frame({"cwd": "/"}), MISSING_FIELD, ["'command'", "submit"]),
    (frame({"command": ["x"]}), MISSING_FIELD, ["'cwd'", "absolute path"]),
    (frame(None, request="cancel"), MISSING_FIELD, ["'batch'", "cancel"]),
    (frame(request=5), BAD_FIELD, ["'request'", "5"]),
    (frame(request="ping", request_id=1.5), BAD_FIELD, ["'request_id'", "1.5"]),
    (frame(request="ping", request_id="r" * 201), BAD_FIELD, ["'request_id'", "200"]),
    (frame(request="ping", request_id="\ud800"), BAD_FIELD, ["'request_id'"]),
    (frame([], request="ping"), BAD_FIELD, ["'args'", "object"]),
    (submit(priority="high"), BAD_FIELD, ["submit: 'priority' must be an integer from -1000 to 1000, got 'high'"]),
    (submit(priority=True), BAD_FIELD, ["'priority'", "true"]),
    (submit(priority=1001), BAD_FIELD, ["'priority'", "1001"]),
    (submit(tasks=1.0), BAD_FIELD, ["'tasks'", "1.0"]),
    (submit(tasks=0), BAD_FIELD, ["'tasks'", "0"]),
    (submit(tasks=10_000_001), BAD_FIELD, ["'tasks'"]),
    (submit(tasks=2, task_lines=["a"]), BAD_FIELD, ["'tasks'", "'task_lines'", "only one"]),
    (submit(task_lines=[]), BAD_FIELD, ["'task_lines'", "0 items"]),
    (submit(task_lines=["a", 3]), BAD_FIELD, ["'task_lines[1]'", "3"]),
    (submit(task_lines=["a\0b"]), BAD_FIELD, ["'task_lines[0]'", "NUL"]),
    (submit(command=[]), BAD_FIELD, ["'command'", "1 to 4096"]),
    (submit(command=["x"] * 4097), BAD_FIELD, ["'command'", "4097 items"]),
    (submit(command="ls -l"), BAD_FIELD, ["'command'", "'ls -l'"]),
    (submit(command=[""]), BAD_FIELD, ["'command[0]'", "empty"]),
    (submit(command=["ls", "a\0"]), BAD_FIELD, ["'command[1]'", "NUL"]),
    # U+DC80..U+DCFF carry bytes that are not UTF-8 (see test_task_bytes); other surrogates stand for nothing.
    (submit(command=["ls", "\ud800"]), BAD_FIELD, ["'command[1]'", "surrogate"]),
    (submit(shell=1), BAD_FIELD, ["'shell'", "true or false"]),
    (submit(name="n" * 201), BAD_FIELD, ["'name'", "200"]),
    (submit(name="a\0"), BAD_FIELD, ["'name'", "NUL"]),
    (submit(max_workers=0), BAD_FIELD, ["'max_workers'"]),
    (submit(cpu_limit=0.5), BAD_FIELD, ["'cpu_limit'", "0.5", "1 to 100"]),
    (submit(cpu_limit=False), BAD_FIELD, ["'cpu_limit'", "false"]),
    (submit(cpu_limit=10 ** 400), BAD_FIELD, ["'cpu_limit'"]),
    (submit(cpu_margin=99.5), BAD_FIELD, ["'cpu_margin'"]),
    (submit(memfree_limit="20%"), BAD_FIELD, ["'memfree_limit'", "'20%'"]),
    (submit(memory_metric="used"), BAD_FIELD, ["'memory_metric'", "'available'", "'used'"]),
    (submit(victim=1), BAD_FIELD, ["'victim'", "'newest'"]),
    (submit(memory_gap=-1), BAD_FIELD, ["'memory_gap'", "bytes"]),
    (submit(min_free="300M"), BAD_FIELD, ["'min_free'", "'300M'"]),
    (submit(term_grace=3601), BAD_FIELD, ["'term_grace'", "seconds"]),
    (submit(interval=0.001), BAD_FIELD, ["'interval'", "0.01"]),
    (submit(retries=-1), BAD_FIELD, ["'retries'"]),
    (submit(retry_failed=1001), BAD_FIELD, ["'retry_failed'"]),
    (submit(user=0), BAD_FIELD, ["'user'"]),
    (submit(cwd="tmp"), BAD_FIELD, ["'cwd'", "absolute", "'tmp'"]),
    (submit(cwd=None), BAD_FIELD, ["'cwd'", "null"]),
    (submit(env=[]), BAD_FIELD, ["'env'"]),
    (submit(env={"A=B": "c"}), BAD_FIELD, ["'env'", "'A=B'", "'='"]),
    (submit(env={"": "c"}), BAD_FIELD, ["'env'", "non-empty"]),
    (submit(env={"A": 1}), BAD_FIELD, ["'env' variable 'A' must be a string, got 1"]),
    (submit(env={"A": "\0"}), BAD_FIELD, ["'env' variable 'A'", "NUL"]),
    (frame({"batch": None}, request="cancel"), BAD_FIELD, ["'batch'", "null"]),
    (frame({"follow": "yes"}, request="events"), BAD_FIELD, ["'follow'", "'yes'"]),
    (frame({"kinds": ["ends"]}, request="events"), BAD_FIELD, ["'kinds'", "'ends'", "did you mean 'end'?"]),
    (frame({"kinds": ["sample"]}, request="events"), BAD_FIELD, ["'kinds'", "'sample'", "the kinds are decision"]),
    (submit(timeout=0), BAD_FIELD, ["'timeout'", "seconds", "0.01"]),
    (submit(timeout=True), BAD_FIELD, ["'timeout'", "true"]),
    (submit(halt="later", halt_fail=1), BAD_FIELD, ["'halt'", "'soon'", "'now'"]),
    (submit(halt="soon"), BAD_FIELD, ["'halt' needs exactly one of 'halt_fail'", "'halt_fail_pct'", "neither"]),
    (submit(halt="now", halt_fail=1, halt_fail_pct=5), BAD_FIELD, ["'halt' needs exactly one", "'halt_fail' and"]),
    (submit(halt_fail=2), BAD_FIELD, ["'halt_fail' is given without 'halt'"]),
    (submit(halt="soon", halt_fail=0), BAD_FIELD, ["'halt_fail'", "1 to 1000000"]),
    (submit(halt="soon", halt_fail_pct=0.5), BAD_FIELD, ["'halt_fail_pct'", "percent"]),
    (submit(append="yes"), BAD_FIELD, ["'append'", "true or false"]),
    (submit(joblog="log.tsv"), BAD_FIELD, ["'joblog'", "absolute", "'log.tsv'"]),
    (submit(joblog="/tmp/\ud800"), BAD_FIELD, ["'joblog'", "surrogate"]),
    (frame({"failed_only": True}, request="retry"), MISSING_FIELD, ["'batch'", "retry"]),
    (frame({"batch": "1", "failed_only": 1}, request="retry"), BAD_FIELD, ["'failed_only'", "true or false"]),
    (frame({"batch": "1", "joblog": "j"}, request="retry"), BAD_FIELD, ["'joblog'", "absolute"]),
]


@pytest.mark.parametrize("data, code, parts", ERROR_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input_gives_code_and_helpful_message(data, code, parts):
    error = error_of(data)
    assert error.code == code, error.message
    for part in parts:
        assert part in error.message
    assert len(error.message) < 500  # a huge value is never echoed in full


def test_every_code_the_parser_can_produce_is_covered():
    produced = {code for _, code, _ in ERROR_CASES}
    assert produced == set(ERROR_CODES) - {NO_SUCH_BATCH, PERMISSION_DENIED, QUOTA_EXCEEDED, INTERNAL}


def test_non_bytes_frame_is_bad_json():
    assert error_of("{}").code == BAD_JSON


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args", [
    ("ping", {}), ("list", {}), ("status", {"batch": "b"}), ("cancel", {"batch": "b"}), ("pause", {"batch": "b"}),
    ("resume", {"batch": "b"}), ("report", {"batch": "b"}), ("events", {"batch": None, "follow": True}),
    ("retry", {"batch": "b", "failed_only": True, "joblog": None}),
    ("submit", {**SUBMIT_MINIMAL, **SUBMIT_DEFAULTS, "name": "nightly", "env": {"Ü": "ß"}}),
])
def test_encode_request_round_trips(name, args):
    parsed = parse_request(encode_request(name, request_id=42, **args))
    assert parsed.name == name and parsed.request_id == 42
    assert {k: v for k, v in parsed.args.items() if k in args} == args


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
valid_submit = st.fixed_dictionaries(
    {"command": st.lists(text, min_size=1, max_size=5).filter(lambda c: c[0]), "cwd": text.map(lambda t: "/" + t)},
    optional={
        "tasks": st.integers(1, MAX_TASKS), "shell": st.booleans(), "name": st.none() | text,
        "priority": st.integers(-1000, 1000), "max_workers": st.none() | st.integers(1, 100_000),
        "cpu_limit": st.floats(1, 100), "cpu_margin": st.integers(0, 99), "memfree_limit": st.floats(0, 99),
        "memory_metric": st.sampled_from(["available", "free", None]),
        "victim": st.sampled_from(["newest", "oldest", "largest", None]),
        "memory_gap": st.integers(0, MAX_SIZE), "min_free": st.integers(0, MAX_SIZE), "term_grace": st.floats(0, 3600),
        "interval": st.floats(0.01, 60), "retries": st.integers(0, 1000), "retry_failed": st.integers(0, 1000),
        "user": text, "env": st.dictionaries(text.filter(lambda k: k and "=" not in k), text, max_size=3),
    })


@FUZZ
@given(valid_submit, st.none() | st.integers() | st.text(max_size=200).filter(lambda t: "\0" not in t))
def test_valid_submit_round_trips(args, request_id):
    try:
        request_id.encode() if isinstance(request_id, str) else None
    except UnicodeEncodeError:
        return  # unpaired surrogates cannot be sent as UTF-8 at all
    parsed = parse_request(encode_request("submit", request_id=request_id, **args))
    assert parsed.request_id == request_id
    assert set(parsed.args) == set(SUBMIT_FIELDS)
    for key, value in args.items():
        assert parsed.args[key] == value


# --- fuzzing: nothing but Request or ProtocolError ---------------------------------------------

def outcome(data: bytes):
    """parse_request's result, or the ProtocolError it raised; any other exception fails the test."""
    try:
        return parse_request(data)
    except ProtocolError as error:
        assert error.code in ERROR_CODES
        assert isinstance(error.message, str) and error.message
        # the error reply must always be encodable, whatever the input was
        assert decode_reply(encode_error(error.code, error.message, error.request_id))["ok"] is False
        return error


def json_tree(floats):
    return st.recursive(
        st.none() | st.booleans() | st.integers() | floats | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    )


json_values = json_tree(st.floats())  # NaN and infinities too: the parser must refuse them as bad-json
finite_json_values = json_tree(st.floats(allow_nan=False, allow_infinity=False))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    outcome(data)


@FUZZ
@given(json_values)
def test_arbitrary_json(value):
    outcome(json.dumps(value).encode())


@FUZZ
@given(st.sampled_from(REQUESTS), json_values, json_values)
def test_arbitrary_args_and_request_id(name, args, request_id):
    data = json.dumps({"version": 1, "request": name, "request_id": request_id, "args": args})
    outcome(data.encode())


@FUZZ
@given(st.sampled_from(SUBMIT_FIELDS), finite_json_values)
def test_each_submit_field_with_any_value(field, value):
    result = outcome(submit(**{field: value}))
    if isinstance(result, ProtocolError):
        assert result.code == BAD_FIELD
        assert f"'{field}" in result.message
    else:
        assert result.name == "submit"


@FUZZ
@given(valid_submit, st.data())
def test_truncated_requests(args, data):
    encoded = encode_request("submit", request_id="id", **args)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    result = outcome(encoded[:cut])
    assert isinstance(result, ProtocolError) and result.code == BAD_JSON


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 1000), st.sampled_from([b" ", b"[", b"\xff", b'"a",']))
def test_huge_messages_refused_before_decoding(extra, filler):
    prefix = b'{"version": 1, "request": "submit", "args": {"command": ['
    data = prefix + filler * ((MAX_MESSAGE_BYTES - len(prefix)) // len(filler) + extra)
    assert len(data) > MAX_MESSAGE_BYTES
    assert outcome(data).code == TOO_LARGE


def test_message_of_exactly_the_limit_is_decoded():
    data = encode_request("ping")
    data = data + b" " * (MAX_MESSAGE_BYTES - len(data))
    assert parse_request(data).name == "ping"
    assert parse_request(bytearray(data)).name == "ping"
    assert parse_request(memoryview(data)).name == "ping"


# --- replies -----------------------------------------------------------------------------------

def test_reply_error_and_event_decode_back():
    assert decode_reply(encode_reply({"batches": ["a"]}, request_id=3)) == {
        "version": 1, "ok": True, "result": {"batches": ["a"]}, "request_id": 3}
    assert decode_reply(encode_error(NO_SUCH_BATCH, "no batch 'x'", "r")) == {
        "version": 1, "ok": False, "error": {"code": NO_SUCH_BATCH, "message": "no batch 'x'"}, "request_id": "r"}
    assert decode_reply(encode_event({"type": "started", "pid": 5})) == {
        "version": 1, "ok": True, "event": {"type": "started", "pid": 5}, "request_id": None}


@FUZZ
@given(st.sampled_from(ERROR_CODES), st.text(max_size=50).filter(lambda t: t.isprintable()),
       st.none() | st.integers() | st.text(max_size=20).filter(lambda t: t.isprintable()))
def test_every_error_code_round_trips(code, message, request_id):
    reply = decode_reply(encode_error(code, message, request_id))
    assert reply["error"] == {"code": code, "message": message} and reply["request_id"] == request_id


def test_encoders_refuse_what_is_not_a_message():
    with pytest.raises(ValueError):
        encode_error("no-such-code", "x")
    with pytest.raises(TypeError):
        encode_reply(["not", "a", "dict"])
    with pytest.raises(TypeError):
        encode_event("started")
    with pytest.raises(ValueError):
        encode_reply({"cpu": float("nan")})


def test_encode_request_takes_submit_name_as_an_argument():
    parsed = parse_request(encode_request("submit", name="nightly", **SUBMIT_MINIMAL))
    assert parsed.args["name"] == "nightly"


@pytest.mark.parametrize("data, code", [
    (b"\xff", BAD_JSON),
    (b"[]", BAD_JSON),
    (b'{"ok": true, "result": {}}', BAD_VERSION),
    (b'{"version": 2, "ok": true, "result": {}}', BAD_VERSION),
    (b'{"version": 1, "result": {}}', MISSING_FIELD),
    (b'{"version": 1, "ok": "yes", "result": {}}', BAD_FIELD),
    (b'{"version": 1, "ok": true}', MISSING_FIELD),
    (b'{"version": 1, "ok": true, "result": {}, "event": {}}', BAD_FIELD),
    (b'{"version": 1, "ok": true, "result": []}', BAD_FIELD),
    (b'{"version": 1, "ok": true, "result": {}, "request_id": [1]}', BAD_FIELD),
    (b'{"version": 1, "ok": false}', MISSING_FIELD),
    (b'{"version": 1, "ok": false, "error": {"code": "internal"}}', BAD_FIELD),
])
def test_malformed_replies(data, code):
    with pytest.raises(ProtocolError) as info:
        decode_reply(data)
    assert info.value.code == code


def test_reply_version_mismatch_says_to_upgrade():
    with pytest.raises(ProtocolError) as info:
        decode_reply(b'{"version": 2, "ok": true, "result": {}}')
    assert "version 2" in info.value.message and "upgrade" in info.value.message


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_reply_never_raises_anything_else(data):
    try:
        assert isinstance(decode_reply(data), dict)
    except ProtocolError as error:
        assert error.code in ERROR_CODES
