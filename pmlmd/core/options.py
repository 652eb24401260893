"""The limit options, declared once.

One row per limit a node sets and a batch may tighten. From this table come pmlmctl's options
(``run`` and ``submit``), the ``[limits]`` keys of pmlmd.toml, the fields of a submit request
(protocol), the daemon's check of what a batch asks for, and the Limits a batch runs under.
tests/test_options.py checks the rest against it: the protocol's field table, the man pages,
the commented pmlmd.toml and the bash completion.

Pure and light: the client imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .bounds import BOUNDS, SIZE, Bound
from .governor import MEMORY_METRICS, VICTIM_POLICIES, Limits
from .units import format_size


@dataclass(frozen=True)
class LimitOption:
    """One limit. Its range is ``bounds.BOUNDS[name]`` (or ``choices``), its default the
    Limits field's, its unit the Bound's."""

    name: str  # the governor.Limits field, the submit field and the [limits] key; the option is --NAME with dashes
    help: str  # for --help, without the default
    metavar: str | None = None  # None for a choice
    choices: tuple[str, ...] | None = None
    # Which of two values is the stricter (min or max); None: any value is the batch's own choice.
    stricter: Callable[[Any, Any], Any] | None = None
    # A looser ask is refused with the node's value (else it is held to the node's value).
    refuse_looser: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return Limits.__dataclass_fields__[self.name].default

    @property
    def bound(self) -> Bound | None:
        return BOUNDS.get(self.name)

    def text(self, value: Any) -> str:
        """``value`` as pmlmctl's help and pmlmd's messages show it: a size with its suffix
        (200M), a number as written (0.5), a choice as it is."""
        if self.choices:
            return str(value)
        return format_size(value) if self.bound.kind == SIZE else f"{value:g}"

    def looser(self, asked: Any, node: Any) -> bool:
        """Would ``asked`` loosen the node's ``node``?"""
        return self.stricter is not None and asked != node and self.stricter(asked, node) == node


LIMIT_OPTIONS: tuple[LimitOption, ...] = (
    LimitOption("cpu_limit", "node-wide CPU utilisation over all cores to stay under", "PCT",
                stricter=min, refuse_looser=True),
    LimitOption("cpu_margin", "CPU must fall this many points below the limit before workers are "
                "continued or admitted while others run (at most half the limit)", "PCT", stricter=max,
                refuse_looser=True),
    LimitOption("memfree_limit", "share of total memory that must stay free", "PCT",
                stricter=max, refuse_looser=True),
    LimitOption("memory_metric", "what counts as free: MemAvailable (includes reclaimable cache) "
                "or MemFree", choices=MEMORY_METRICS),
    LimitOption("memory_gap", "band above the memory limit where workers are paused, not terminated; "
                "also the headroom a new worker needs", "SIZE", stricter=max, refuse_looser=True),
    LimitOption("min_free", "critical floor: below it workers are killed at once", "SIZE", stricter=max,
                refuse_looser=True),
    LimitOption("victim", "which worker pays first", choices=VICTIM_POLICIES),
    # A batch may sample more often than the node, within [quotas] min_interval; a longer interval
    # than the node's is held to the node's.
    LimitOption("interval", "base sampling interval; pmlmd samples faster near a limit", "SECONDS",
                stricter=min),
)
BY_NAME = {option.name: option for option in LIMIT_OPTIONS}


def tighten(node: Limits, **asked) -> Limits:
    """A batch's limits: the node's, made stricter where the batch asks (never looser).

    ``asked`` takes option names (Limits fields); None means "as the node". A looser ask is held to the
    node's value (the daemon refuses those of ``refuse_looser`` options before, with the reason).
    TypeError for a field that is no limit option.
    """
    changes = {}
    for name, value in asked.items():
        if value is None:
            continue
        option = BY_NAME.get(name)
        if option is None:
            raise TypeError(f"tighten: unknown limit {name!r}")
        changes[name] = value if option.stricter is None else option.stricter(getattr(node, name), value)
    return dataclasses.replace(node, **changes) if changes else node


def limits_from(values: Any, max_workers: int) -> Limits:
    """The Limits named by ``values``' attributes (argparse's Namespace, the daemon's Config: one
    attribute per option name), with ``max_workers``."""
    return Limits(max_workers=max_workers, **{o.name: getattr(values, o.name) for o in LIMIT_OPTIONS})
