"""The ``result`` of pmlmd's replies, one typed body per request: what the daemon answers and
pmlmctl reads (protocol.py, "Replies"; the requests' arguments are protocol.SCHEMAS).

``to_json()`` is the result as it goes out, ``from_json(result)`` reads one back and raises
protocol.ProtocolError (``bad-field``) when a field is missing or of the wrong type, so that a
reader never meets a KeyError. ``status`` and ``list`` describe
batches by their summary (summary.BatchSummary, ``summary_version`` 1), ``events`` streams
events.Event bodies and ends with EventsEnd.

=============  ======================================================================
request        result fields (types; units)
=============  ======================================================================
``ping``       ``version`` (str: pmlmd's), ``pid`` (int), ``uptime_s`` (float: seconds
               since it started)
``submit``     ``batch`` (str: its id), ``name`` (str or null), ``rlimits_lowered``
``retry``      (object: each limit sent that the workers get lower, name ->
               [soft, hard]); a retry adds ``retried`` (list of int: the task
               indexes of the batch retried) and ``of`` (str: that batch)
``cancel``     ``batch`` (str), ``state`` (str: cancel "cancelling", or "finished"
``pause``      when it had ended already; pause "held"; resume "active")
``resume``
``log``        ``chunks`` (list of {``task`` int, ``offset`` int, ``data`` str carrying
               bytes, ``skipped`` int: bytes before offset not kept}), ``from_task``
               (int) and ``offset`` (int: where to go on), ``more`` (bool: ask again
               at once), ``complete`` (bool: nothing more will come)
``events``     ``events`` (str: "end") after the stream
``status``     without a batch: ``status`` (str: pmlmd's STATUS= line), ``node``
               (object or null before the first sample: ``cpu_pct``, ``free_bytes``,
               ``total_bytes``, ``free_pct``), ``limits`` (object: the node's limits by
               option name, every one of options.LIMIT_OPTIONS, and ``max_workers``),
               ``workers`` (str: how workers are held), ``batches``
               (list: the live batches' summaries); with one (BatchStatus): its
               ``summary`` (summary.BatchSummary's fields, flat in the body), ``node``
               and, only while the node starts none of its waiting tasks, ``waiting``
               (str: why, governor.held_back)
``list``       ``batches`` (list: every batch's summary, finished ones first)
=============  ======================================================================

Adding a field is compatible (readers ignore what they do not know); renaming or removing one
is a new protocol version (protocol.PROTOCOL_VERSION).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .protocol import BAD_FIELD, ProtocolError
from .summary import BatchSummary


@dataclass(frozen=True)
class Result:
    REQUESTS: ClassVar[tuple[str, ...]] = ()  # the requests answered with this body
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {}  # field -> the JSON types it may have

    def to_json(self) -> dict:
        """The body as it goes out: every field, in order (a None that is optional left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (getattr(self, f.name) is None and f.default is None)}

    @classmethod
    def from_json(cls, result) -> "Result":
        """The body of a reply's ``result``; protocol.ProtocolError when it is not this shape."""
        if not isinstance(result, dict):
            raise ProtocolError(BAD_FIELD, f"pmlmd's reply to {cls.REQUESTS[0]} is not an object")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in result:
                if f.default is None:
                    values[f.name] = None
                    continue
                raise ProtocolError(BAD_FIELD, f"pmlmd's reply to {cls.REQUESTS[0]} has no {f.name!r}")
            value = result[f.name]
            types = cls.TYPES[f.name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ProtocolError(BAD_FIELD, f"{f.name!r} in pmlmd's reply to {cls.REQUESTS[0]} has the wrong "
                                    f"type ({type(value).__name__})")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class Pong(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("ping",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"version": (str,), "pid": (int,), "uptime_s": (int, float)}
    version: str
    pid: int
    uptime_s: float


@dataclass(frozen=True)
class Started(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("submit", "retry")
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"batch": (str,), "name": (str, type(None)),
                                                    "rlimits_lowered": (dict,), "retried": (list,), "of": (str,)}
    batch: str
    name: str | None
    rlimits_lowered: dict = field(default_factory=dict)
    retried: list | None = None  # retry only
    of: str | None = None  # retry only


@dataclass(frozen=True)
class Control(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("cancel", "pause", "resume")
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"batch": (str,), "state": (str,)}
    batch: str
    state: str


@dataclass(frozen=True)
class LogSlice(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("log",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"chunks": (list,), "from_task": (int,), "offset": (int,),
                                                    "more": (bool,), "complete": (bool,)}
    chunks: list
    from_task: int
    offset: int
    more: bool
    complete: bool


@dataclass(frozen=True)
class EventsEnd(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("events",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"events": (str,)}
    events: str = "end"


@dataclass(frozen=True)
class NodeStatus(Result):
    """status without a batch (with one, the reply is that batch's summary and ``node``)."""

    REQUESTS: ClassVar[tuple[str, ...]] = ("status",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"status": (str,), "node": (dict, type(None)), "limits": (dict,),
                                                    "batches": (list,), "workers": (str,)}
    status: str
    node: dict | None
    limits: dict
    batches: list
    workers: str | None = None  # an older pmlmd does not say


@dataclass(frozen=True)
class BatchStatus(Result):
    """status with a batch: its summary, whose fields are the body's own (as in ``list``), and
    ``node`` as NodeStatus has it; ``waiting`` (only while it is so) why the node starts none of
    the batch's tasks now (governor.held_back)."""

    REQUESTS: ClassVar[tuple[str, ...]] = ("status",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"summary": (dict,), "node": (dict, type(None)),
                                                    "waiting": (str, type(None))}
    summary: BatchSummary
    node: dict | None
    waiting: str | None = None

    def to_json(self) -> dict:
        body = {**self.summary.to_json(), "node": self.node}
        if self.waiting is not None:
            body["waiting"] = self.waiting
        return body

    @classmethod
    def from_json(cls, result) -> "BatchStatus":
        if not isinstance(result, dict):
            raise ProtocolError(BAD_FIELD, "pmlmd's reply to status is not an object")
        if "node" not in result:
            raise ProtocolError(BAD_FIELD, "pmlmd's reply to status has no 'node'")
        node = result["node"]
        if not isinstance(node, (dict, type(None))):
            raise ProtocolError(BAD_FIELD, f"'node' in pmlmd's reply to status has the wrong type "
                                f"({type(node).__name__})")
        waiting = result.get("waiting")
        if not isinstance(waiting, (str, type(None))):
            raise ProtocolError(BAD_FIELD, f"'waiting' in pmlmd's reply to status has the wrong type "
                                f"({type(waiting).__name__})")
        try:
            summary = BatchSummary.from_json({k: v for k, v in result.items() if k not in ("node", "waiting")})
        except (ValueError, KeyError, TypeError, ArithmeticError) as e:
            raise ProtocolError(BAD_FIELD, f"pmlmd's reply to status is not a batch summary: {e}") from None
        return cls(summary, node, waiting)


@dataclass(frozen=True)
class BatchList(Result):
    REQUESTS: ClassVar[tuple[str, ...]] = ("list",)
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {"batches": (list,)}
    batches: list


BODIES: tuple[type[Result], ...] = (Pong, Started, Control, LogSlice, EventsEnd, NodeStatus, BatchStatus,
                                      BatchList)
