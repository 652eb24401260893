"""The load governor: a pure function from (node sample, worker table) to decisions.

No I/O happens here. The caller samples /proc, builds the worker table, calls
``decide`` and carries the decisions out (signals, spawns). Everything the policy
needs, including the current time, arrives in the arguments, so a table of inputs
fully describes a situation and the same input always yields the same decisions.

Rules, first match wins (L = memory limit, G = memory gap, F = floor, C = CPU limit):

1. floor      free < F          kill victims at once until projected free >= max(L, F);
                                with no worker left and tasks queued: critical.
2. memory     free < L          terminate victims (SIGTERM, then SIGKILL after the
                                grace) until projected free >= L; admit nothing.
3. gap        free < L + G      pause every running worker whose memory grows off
                                course (see profiles below); admit nothing else. If all
                                are paused and nothing changes for an interval: continue
                                the last one if it was paused for CPU; terminate it if
                                it was paused for growing (continued, it would only
                                grow on); make room by terminating the first victim
                                among several.
4. cpu        cpu > C           admit nothing; pause running victims that use CPU
                                until their share covers the excess. The last running
                                worker is kept if it fits the limit alone (within half
                                the margin, for measuring noise) and the node
                                without it is within the limit (pausing it would only
                                start a pause/continue cycle).
5. calm       otherwise         continue one paused worker (oldest first) per step if
                                it fits the CPU headroom; else, when a burner has
                                run its turn (2 intervals / number sharing its place),
                                it and the worker paused longest take turns (rule
                                "turn", also in rule 4 for a kept last runner within
                                half the margin); with nothing paused, admit
                                new workers while their memory fits (below) and
                                their average CPU fits under C (C = 100: no bound).

Memory profiles: a batch of which a worker has finished has a profile, the highest peak P
of its finished workers. A worker of it is on course while its memory is within P (plus
PEAK_SLACK); each running worker may still take what it lacks to P (all of P within an
interval of its start: the node's reading lags). Such a batch is packed by P: admitted while
free memory minus what running workers may still take minus P per new worker stays >= L,
in the gap too. In the gap, an on-course grower runs on while that projection holds (else
the newest pay first by pausing), and one paused on course goes on once its rest fits. A
batch without a profile is admitted while usage + 2 x max(average, G) + G fits (a worker
started within an interval counts as at least G: it may allocate after it starts), never in
the gap, and its growers there are paused.

Several batches: workers carry their batch's priority (victims come from the lowest
priority first) and admissions go through the batches' workloads in the order given
(highest priority first, FIFO within a priority). Workers of a batch that a user paused
are HELD: never continued or counted as paused, but still victims of the memory rules.

Hysteresis: continue and admit need cpu <= C - margin while any worker runs (the
memory rules already hold the gap G in reserve). A worker is never continued in the
interval it was paused in. Liveness: when no worker runs, one may be continued or
admitted as soon as no limit is breached, so a batch always makes progress.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

RUNNING = "running"
PAUSED = "paused"
TERMINATING = "terminating"  # SIGTERM sent, waiting for exit or the grace to pass
KILLED = "killed"  # SIGKILL sent, waiting for the exit to be reaped
HELD = "held"  # stopped because its batch was paused by a user: only memory rules touch it
ENDING = (TERMINATING, KILLED)  # being ended by pmlmd

# The fastest a node's free memory is taken to fall, in bytes per second: the sampling schedule
# leaves no worker time to cross a threshold unseen at this rate. A process touching fresh pages
# on one core fills about 1.5-2 GB/s here (bench/RESULTS.md, scenario 1); earlyoom assumes RAM
# fills at up to 6000 MiB/s and sleeps accordingly, and so does pmlmd.
FILL_RATE_MAX = 6000 * (1 << 20)
# While every worker stood still at the last refresh, none is paused and no batch waits to be
# admitted, samples may be up to this many intervals apart (see next_interval).
STILL_STRETCH = 2
# The shortest wait between two node samples, in seconds, while free memory falls at FALLING_FAST
# or more: a worker growing at 200 MB/s is then seen within this (plus a loop turn) of crossing a
# threshold. 10 ms made the worst reaction 10-11 ms (bench/RESULTS.md 1e), 5 ms about 6 ms. While
# free memory holds still, twice that: a sample costs pmlmd 0.1-0.4 ms, and a node that sits
# just above a threshold would otherwise be sampled 200 times a second for as long as it does.
SHORTEST_INTERVAL = 0.005
FALLING_FAST = 32 * (1 << 20)  # bytes/s; MemAvailable of an idle node moves by far less
# MemAvailable moves in steps: the kernel folds its per-CPU page counts in lazily, and two samples
# 10 ms apart often read the same figure while a worker grows at 200 MB/s, then one 7-8 MiB
# apart (seen here). So a fall is measured against a sample at least this many seconds old.
RATE_SPAN = 0.05

SPAWN = "spawn"
PAUSE = "pause"
CONTINUE = "continue"
TERMINATE = "terminate"
KILL = "kill"
CRITICAL = "critical"

VICTIM_POLICIES = ("newest", "oldest", "largest")
FAST_REFRESH = 0.05  # seconds: near the memory limit, workers are measured at least this often (refresh_due)
MEMORY_METRICS = ("available", "free")

# A worker whose memory grows faster than this is "growing" (noise from page
# cache and allocator churn stays well below it).
GROWTH_THRESHOLD = 1 << 20  # bytes per second
# A worker is on course while its memory stays within its batch's peak (the highest of its finished
# workers) plus this share of it: equal tasks differ by a few pages from run to run.
PEAK_SLACK = 1 / 16
# Taking turns (rule 5), a burner runs TURN_SHARE intervals divided by the number of workers that
# share its place: with one waiting, an interval each; with three, half an interval each.
TURN_SHARE = 2.0
# A worker using less than this share of the node's CPU is not worth pausing for CPU.
CPU_NEGLIGIBLE = 1.0  # percentage points


@dataclass(frozen=True)
class NodeSample:
    time: float  # monotonic seconds
    cpu_pct: float | None  # node-wide utilisation over all cores, 0-100; None until an interval has passed
    mem_total: int  # bytes
    mem_available: int  # bytes (MemAvailable)
    mem_free: int  # bytes (MemFree)
    # monotonic seconds: the span cpu_pct was measured over (/proc/stat read at both ends); None
    # where unknown (then no paused worker's share is taken out of it, see node_cpu)
    cpu_from: float | None = None
    cpu_to: float | None = None


@dataclass(frozen=True)
class Limits:
    cpu_limit: float = 90.0  # percent of all cores
    memfree_limit: float = 20.0  # percent of total memory that must stay free
    memory_metric: str = "available"
    memory_gap: int = 200 << 20
    min_free: int = 300 << 20
    victim: str = "newest"
    max_workers: int = 16
    cpu_margin: float = 10.0  # hysteresis for continue/admit, in percentage points
    interval: float = 0.5  # seconds: the base sampling interval (--interval); also the pause cool-down

    def memory_limit_bytes(self, total: int) -> int:
        return int(total * self.memfree_limit / 100)

    @property
    def margin(self) -> float:
        """cpu_margin as the rules apply it: at most half of cpu_limit. A margin at or above a low
        limit (--cpu-limit 8 on a big node, the default margin 10) would leave no CPU below which
        a worker is continued or admitted beside others: one worker at a time however many fit."""
        return min(self.cpu_margin, self.cpu_limit / 2)


@dataclass(frozen=True)
class WorkerView:
    key: Hashable  # (pid, start time): stable even if a pid is reused
    started: float  # monotonic seconds
    state: str  # RUNNING, PAUSED, TERMINATING or KILLED
    rss: int = 0  # bytes, the worker's whole process group
    rss_growth: float | None = None  # bytes per second over the last refresh
    cpu: float | None = None  # share of the node's CPU, 0-100; None until measured
    paused_at: float | None = None
    cpu_at_pause: float | None = None
    priority: int = 0  # higher runs first and pays last
    batch: Hashable = None  # the Workload (batch) it belongs to
    paused_by: str | None = None  # the rule that paused it ("gap": its memory grew near the limit; "cpu")
    running_since: float | None = None  # monotonic seconds: since it last started or was continued
    cpu_before: float | None = None  # running, continued from a pause: its share of the node when paused


@dataclass
class Finished:
    """What a batch's finished workers measured: the part of its profile that no longer changes."""

    count: int = 0
    rss_sum: float = 0.0  # bytes: the sum of their peak RSS
    peak: int = 0  # bytes: the highest of them
    cpu_sum: float = 0.0  # percent of the node: the sum of their lifetime CPU shares

    def add(self, peak_rss: int, cpu: float) -> None:
        """One more ended worker: ``peak_rss`` bytes at most, ``cpu`` percent of the node over its life."""
        self.count += 1
        self.rss_sum += peak_rss
        self.peak = max(self.peak, peak_rss)
        self.cpu_sum += cpu


@dataclass(frozen=True)
class Workload:
    """What one batch still wants to run; the caller lists batches in admission order."""

    queued: int  # tasks waiting for a worker
    avg_rss: float | None = None  # bytes per worker measured so far (peak)
    avg_cpu: float | None = None  # node CPU share per worker measured so far
    key: Hashable = None  # the batch; spawn decisions name it
    room: int | None = None  # the batch's own cap on more workers, if it has one
    # bytes: the highest peak of the batch's finished workers (its memory profile), None until
    # one finished. A worker below it and growing is on course; admission packs workers by it.
    peak_rss: float | None = None


@dataclass(frozen=True)
class Decision:
    action: str
    worker: Hashable | None = None
    count: int = 0
    batch: Hashable = None  # for spawn: which Workload gets the workers
    rule: str = ""
    reason: str = ""


def workload(key: Hashable, queued: int, room: int | None, finished: Finished, peaks: Iterable[float],
             cpus: Iterable[float]) -> Workload:
    """A batch's Workload: its averages over its finished workers and its live ones, ``peaks`` the
    peak RSS (bytes) of each live worker measured so far, ``cpus`` the CPU share (percent of the
    node) of each running worker measured so far; its profile is the peak of the finished."""
    peaks, cpus = list(peaks), list(cpus)
    rss_n, cpu_n = finished.count + len(peaks), finished.count + len(cpus)
    return Workload(queued=queued, key=key, room=room, peak_rss=finished.peak or None,
                    avg_rss=(finished.rss_sum + sum(peaks)) / rss_n if rss_n else None,
                    avg_cpu=(finished.cpu_sum + sum(cpus)) / cpu_n if cpu_n else None)


# Seconds a queue batch's delivery may wait for admission beyond its credit before it goes back
# to its queue, for a node with room (give_back).
GIVE_BACK_AFTER = 1.0


def intake_credit(held: bool, taking: bool, running: int, admitted: int, holding: int) -> int:
    """How many deliveries a queue batch's intake may hold after a governor step (its prefetch,
    AMQP basic.qos): while it takes messages, the deliveries its ``running`` tasks held before the
    step plus the workers the step ``admitted`` for it (the step's spawns came out of those); held
    by a user, what it is ``holding`` now (nothing more comes, nothing goes back); else none."""
    if held:
        return holding
    if not taking:
        return 0
    return max(running + admitted, 0)


def give_back(queued: Sequence[tuple[int, float | None]], excess: int, now: float) -> list[int]:
    """Which of a queue batch's waiting tasks go back to the broker: ``queued`` is its queue in
    order, (task index, when its delivery came in, monotonic seconds, or None: no delivery);
    ``excess`` how many deliveries it holds beyond its credit. From the back of the queue, up to
    ``excess`` of those that waited GIVE_BACK_AFTER or longer, newest first."""
    out = []
    for index, received in reversed(queued):
        if len(out) >= excess:
            break
        if received is not None and now - received >= GIVE_BACK_AFTER:
            out.append(index)
    return out


def refresh_due(sample: NodeSample, limits: Limits, since_refresh: float, paused: bool) -> bool:
    """Whether the workers are measured again at this sample, ``since_refresh`` seconds after the
    last time: every interval; near the memory limit (below L + G) every FAST_REFRESH, for a
    grower's size; near the CPU limit with workers paused every quarter interval, for turns
    (rule 5) are taken by what a continued worker uses."""
    if since_refresh >= limits.interval:
        return True
    near_memory = free_bytes(sample, limits) < limits.memory_limit_bytes(sample.mem_total) + limits.memory_gap
    if near_memory and since_refresh >= FAST_REFRESH:
        return True
    taking_turns = paused and sample.cpu_pct is not None and sample.cpu_pct > limits.cpu_limit - limits.margin
    return taking_turns and since_refresh >= limits.interval / 4


def node_cpu(sample: NodeSample, workers: Iterable[WorkerView]) -> float | None:
    """The node's CPU use now, in percent: the sample's figure less what workers paused during the
    span it was measured over (``cpu_from`` .. ``cpu_to``) added to it while they still ran, each
    at its share when paused; plus what workers continued during (or since) the span will add, each
    at its share when it was paused, for the part of the span it stood still. Without the first,
    the figure taken right after a pause still holds the paused worker's CPU and a second worker
    would be paused for the first one's; without the second, the figure taken right after a turn
    misses the worker just continued, and a third would be continued into its room. At most 100:
    what a worker continued on a busy node adds, the others lose."""
    cpu = sample.cpu_pct
    if cpu is None or sample.cpu_from is None or sample.cpu_to is None or sample.cpu_to <= sample.cpu_from:
        return cpu
    span = sample.cpu_to - sample.cpu_from
    for w in workers:
        if w.state == PAUSED and w.paused_at is not None and w.paused_at > sample.cpu_from and w.cpu_at_pause:
            cpu -= w.cpu_at_pause * (min(w.paused_at, sample.cpu_to) - sample.cpu_from) / span
        elif (w.state == RUNNING and w.cpu_before and w.running_since is not None
              and w.running_since > sample.cpu_from):
            cpu += w.cpu_before * (min(w.running_since, sample.cpu_to) - sample.cpu_from) / span
    return min(100.0, max(0.0, cpu))


def free_bytes(sample: NodeSample, limits: Limits) -> int:
    return sample.mem_available if limits.memory_metric == "available" else sample.mem_free


def _mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.0f}MiB"


def victim_order(workers: Iterable[WorkerView], policy: str, resource: str) -> list[WorkerView]:
    """Workers in the order they pay: lowest priority first, then by the policy.

    ``resource`` ("rss" or "cpu") is what "largest" measures.
    """

    def key(w: WorkerView):
        if policy == "oldest":
            second = (w.started,)
        elif policy == "largest":
            size = w.rss if resource == "rss" else (w.cpu or 0.0)
            second = (-size, -w.started)
        else:  # newest
            second = (-w.started,)
        return (w.priority, *second, repr(w.key))

    return sorted(workers, key=key)


@dataclass(frozen=True)
class _Situation:
    """One sample's inputs, sorted once for the rules (decide)."""

    sample: NodeSample
    workers: Sequence[WorkerView]
    demands: list[Workload]  # in admission order
    limits: Limits
    free: int  # bytes, by limits.memory_metric
    limit: int  # bytes: L
    cpu: float | None  # percent of the node, less what workers paused within the sample's span used (node_cpu)
    running: list[WorkerView]
    paused: list[WorkerView]
    ending: list[WorkerView]
    held: list[WorkerView]
    seen: str  # "free ..., limit ...": how reasons start
    by_batch: dict  # Workload.key -> Workload (of equal keys, the last)

    @property
    def queued(self) -> int:
        return sum(d.queued for d in self.demands)

    @property
    def victims(self) -> list[WorkerView]:
        """Workers not yet being ended, in the order they pay for memory."""
        return victim_order(self.running + self.paused + self.held, self.limits.victim, "rss")

    def rest(self, w: WorkerView) -> float | None:
        """Bytes ``w`` may still take from free memory before it reaches its batch's peak; None
        without a profile. One started within an interval may take all of it: the node's figure lags
        its growth (it is read before the workers are, and the kernel folds its counters lazily)."""
        demand = self.by_batch.get(w.batch)
        peak = demand.peak_rss if demand is not None else None
        if peak is None:
            return None
        return peak if self.sample.time - w.started < self.limits.interval else max(0.0, peak - w.rss)

    def on_profile(self, w: WorkerView) -> bool:
        """``w`` has not outgrown its batch's peak (within PEAK_SLACK)."""
        if self.rest(w) is None:
            return False
        return w.rss <= self.by_batch[w.batch].peak_rss * (1 + PEAK_SLACK)

    def admit(self, profiled_only: bool = False) -> list[Decision]:
        return _admit(self.demands, self.workers, self.running, self.sample.time, self.free, self.limit,
                      self.limits.memory_gap, self.cpu, self.limits, self.rest, self.seen, profiled_only=profiled_only)


def decide(sample: NodeSample, workers: Sequence[WorkerView], workload: Workload | Sequence[Workload],
           limits: Limits) -> list[Decision]:
    """Return the decisions for one sample: those of the first rule whose condition holds (see the
    module's table). Pure: no I/O, no clock, no randomness.

    ``workload`` is one batch's, or several in admission order (highest priority
    first, FIFO within a priority): a batch is admitted only after those before it.
    """
    paused = [w for w in workers if w.state == PAUSED]
    demands = [workload] if isinstance(workload, Workload) else list(workload)
    free = free_bytes(sample, limits)
    limit = limits.memory_limit_bytes(sample.mem_total)
    s = _Situation(sample=sample, workers=workers, limits=limits, free=free, limit=limit,
                   demands=demands, by_batch={d.key: d for d in demands},
                   cpu=node_cpu(sample, workers), running=[w for w in workers if w.state == RUNNING], paused=paused,
                   ending=[w for w in workers if w.state in ENDING], held=[w for w in workers if w.state == HELD],
                   seen=f"free {_mib(free)}, limit {_mib(limit)}")
    if free < limits.min_free:
        return floor_rule(s)
    if free < limit:
        return memory_rule(s)
    if free < limit + limits.memory_gap:
        return gap_rule(s)
    if s.cpu is not None and s.cpu > limits.cpu_limit:
        return cpu_rule(s)
    return calm_rule(s)


def floor_rule(s: _Situation) -> list[Decision]:
    """1. Below the critical floor F: kill at once, the grace is a luxury no longer there."""
    limits = s.limits
    below = f"{s.seen}, below floor {_mib(limits.min_free)}"
    decisions = [Decision(KILL, w.key, rule="floor", reason=f"{below}: killing worker already told to stop "
                          f"({_mib(w.rss)})")
                 for w in victim_order([w for w in s.ending if w.state == TERMINATING], limits.victim, "rss")]
    decisions += _until_free(s.victims, s.free + sum(w.rss for w in s.ending), max(s.limit, limits.min_free), KILL,
                             "floor", f"{below}: killing {limits.victim} worker")
    if not s.workers and s.queued:
        decisions.append(Decision(CRITICAL, rule="floor", reason=f"{below} with no worker left to terminate"))
    return decisions


def memory_rule(s: _Situation) -> list[Decision]:
    """2. Below the memory limit L: terminate until the projection clears it."""
    return _until_free(s.victims, s.free + sum(w.rss for w in s.ending), s.limit, TERMINATE, "memory",
                       f"{s.seen}: terminating {s.limits.victim} worker to get back above the limit")


def gap_rule(s: _Situation) -> list[Decision]:
    """3. Inside the gap above the limit: admit nothing unmeasured, stop whatever grows off course."""
    limits, limit, seen, running, paused, rest = s.limits, s.limit, s.seen, s.running, s.paused, s.rest
    growing = [w for w in running if (w.rss_growth or 0) > GROWTH_THRESHOLD]
    # A worker growing toward the peak its batch's finished workers reached is on course: it
    # runs on while what every running worker may still add leaves free memory above L.
    on_course = [w for w in growing if s.on_profile(w)]
    projected = s.free - sum(rest(w) or 0.0 for w in running)
    stopped = [w for w in growing if w not in on_course]
    for w in victim_order(on_course, limits.victim, "rss"):
        if projected >= limit:
            break
        stopped.append(w)
        projected += rest(w)
    decisions = [Decision(PAUSE, w.key, rule="gap", reason=f"{seen}, gap {_mib(limits.memory_gap)}: pausing worker "
                          f"whose memory grows {_mib(w.rss_growth)}/s" + ("" if w not in on_course else
                          " (its batch's peak would take free memory below the limit)"))
                 for w in victim_order(stopped, limits.victim, "rss")]
    cpu_within = s.cpu is None or s.cpu <= limits.cpu_limit
    now = s.sample.time
    if not decisions and cpu_within:
        # One paused here on course whose rest now fits (others finished, or their readings
        # caught up) goes on: it would otherwise wait for the whole gap to clear.
        for w in sorted(paused, key=lambda w: (-w.priority, w.paused_at, repr(w.key))):
            if (w.paused_by == "gap" and s.on_profile(w) and now - w.paused_at >= limits.interval
                    and projected - rest(w) >= limit):
                return [Decision(CONTINUE, w.key, rule="gap", reason=f"{seen}: continuing worker paused in the "
                                 f"gap: the {_mib(rest(w))} it may still add to its batch's peak fit")]
    if not decisions and not paused and projected >= limit and cpu_within:
        # The projection holds: batches with a profile are packed into the gap too.
        return s.admit(profiled_only=True)
    stuck = (not decisions and not running and not s.ending and paused
             and all(now - w.paused_at >= limits.interval for w in paused))
    if stuck and cpu_within:
        # A lone worker paused for growing here would only grow on if continued: it stays
        # stopped until headroom returns (rule 5), or is terminated once it has stood an interval.
        if len(paused) == 1 and paused[0].paused_by != "gap":
            decisions.append(Decision(CONTINUE, paused[0].key, rule="gap", reason=f"{seen}: every worker paused "
                                      "in the gap; continuing the last one so the batch makes progress"))
        elif len(paused) == 1:
            w = paused[0]
            decisions.append(Decision(TERMINATE, w.key, rule="gap", reason=f"{seen}: the only worker was paused "
                                      f"for growing ({_mib(w.rss)}) and headroom has not returned: terminating it"))
        else:
            w = victim_order(paused, limits.victim, "rss")[0]
            decisions.append(Decision(TERMINATE, w.key, rule="gap", reason=f"{seen}: every worker paused in the "
                                      f"gap; terminating the {limits.victim} ({_mib(w.rss)}) to make room"))
    return decisions


def cpu_rule(s: _Situation) -> list[Decision]:
    """4. Over the CPU limit C: pause the victims that actually burn CPU."""
    limits, cpu = s.limits, s.cpu
    excess = cpu - limits.cpu_limit
    decisions = []
    covered = 0.0
    burners = [w for w in s.running if (w.cpu or 0.0) >= CPU_NEGLIGIBLE]
    left_running = len(s.running)
    for w in victim_order(burners, limits.victim, "cpu"):
        if covered >= excess:
            break
        alone_fits = w.cpu <= limits.cpu_limit + limits.margin / 2  # half the margin absorbs tick noise
        if left_running == 1 and alone_fits and cpu - covered - w.cpu <= limits.cpu_limit:
            break  # the last runner fits the limit alone and the rest of the node is within it: keep it
        left_running -= 1
        decisions.append(Decision(PAUSE, w.key, rule="cpu", reason=f"cpu {cpu:.0f}% > limit "
                                  f"{limits.cpu_limit:.0f}%: pausing {limits.victim} worker (cpu {w.cpu:.0f}%)"))
        covered += w.cpu
    if not decisions and s.paused:
        # The last runner was kept, within the limit but for tick noise: it may owe a turn.
        return _turn(s.sample, s.running, s.paused, limits, s.seen)
    return decisions


def calm_rule(s: _Situation) -> list[Decision]:
    """5. Within the limits: continue a paused worker, take turns, or admit."""
    limits, seen = s.limits, s.seen
    cpu_now = s.cpu or 0.0
    calm = cpu_now <= limits.cpu_limit - limits.margin
    if not s.paused:
        return s.admit()
    ready = [w for w in s.paused if s.sample.time - w.paused_at >= limits.interval]
    ready.sort(key=lambda w: (-w.priority, w.started, repr(w.key)))
    # Workers that run but sit idle (a sleep, a blocked read) use none of the headroom: they
    # must not keep a paused worker stopped. One measured as negligible does not count.
    busy = [w for w in s.running if w.cpu is None or w.cpu >= CPU_NEGLIGIBLE]
    for w in ready[:1]:
        if not busy or (calm and cpu_now + (w.cpu_at_pause or 0.0) <= limits.cpu_limit):
            why = "nothing else uses the CPU" if not busy else f"cpu {cpu_now:.0f}% leaves room for its {w.cpu_at_pause or 0:.0f}%"
            return [Decision(CONTINUE, w.key, rule="calm", reason=f"{seen}, cpu {cpu_now:.0f}%: continuing oldest "
                             f"paused worker ({why})")]
    # Else turns; paused workers keep their claim on the headroom: admit nothing new.
    return _turn(s.sample, s.running, s.paused, limits, seen)


SEVERITY = {CONTINUE: 0, PAUSE: 1, TERMINATE: 2, KILL: 3}  # which of two verdicts on a worker is the stricter


def decide_batches(sample: NodeSample, workers: Sequence[WorkerView], demands: Sequence[Workload], limits: Limits,
                   stricter: Mapping[Hashable, tuple[Limits, Workload]]) -> list[Decision]:
    """``decide`` for the node (``limits``), narrowed by the batches that asked for stricter
    limits: ``stricter`` maps such a batch (WorkerView.batch, Workload.key) to its own limits and
    its Workload. Each such batch is decided on its own workers under its own limits as well:

    - a worker of it is continued only if both verdicts continue it;
    - of two verdicts on a worker, the stricter stands (continue < pause < terminate < kill);
    - it is admitted no more workers than its own limits admit;
    - a turn (rule "turn": one worker paused for one continued) is a pair, taken whole or not at
      all: the node's turn is dropped when a batch's verdicts break it, a batch's own turn is
      taken when the node has no turn and no verdict on either of its two workers.

    Decisions in the order ``decide`` gives them: node-wide ones (critical), then the verdicts
    on workers, then spawns."""
    decisions = decide(sample, workers, demands, limits)
    if not stricter:
        return decisions
    by_worker = {d.worker: d for d in decisions if d.worker is not None}
    spawns = {d.batch: d for d in decisions if d.action == SPAWN}
    node_turn = any(d.rule == "turn" for d in decisions)
    for batch, (own_limits, workload) in stricter.items():
        views = [w for w in workers if w.batch == batch]
        own = decide(sample, views, [workload], own_limits)
        own_workers = {d.worker: d for d in own if d.worker is not None}
        mine = {w.key for w in views}
        for key, d in list(by_worker.items()):
            own_d = own_workers.get(key)
            if d.action == CONTINUE and key in mine and (own_d is None or own_d.action != CONTINUE):
                del by_worker[key]  # the batch's own limits do not allow it yet
        own_turn = [d for d in own if d.rule == "turn"]
        for key, d in own_workers.items():
            node_d = by_worker.get(key)
            if d.rule == "turn":
                continue  # a pair, taken whole below or not at all
            if d.action != CONTINUE and SEVERITY[d.action] > (SEVERITY[node_d.action] if node_d else -1):
                by_worker[key] = d
        if own_turn and not node_turn and all(d.worker not in by_worker for d in own_turn):
            by_worker.update((d.worker, d) for d in own_turn)
        if batch in spawns:
            own_spawn = sum(d.count for d in own if d.action == SPAWN)
            node_spawn = spawns[batch]
            if own_spawn < node_spawn.count:
                spawns[batch] = dataclasses.replace(node_spawn, count=own_spawn,
                                                    reason=f"{node_spawn.reason}; batch limits allow {own_spawn}")
    # The node's pause in a turn stands only with its continue.
    turn = [d for d in decisions if d.rule == "turn"]
    if turn and not all(by_worker.get(d.worker) is d for d in turn):
        for d in turn:
            if by_worker.get(d.worker) is d:
                del by_worker[d.worker]
    others = [d for d in decisions if d.worker is None and d.action != SPAWN]
    return others + list(by_worker.values()) + [d for d in spawns.values() if d.count > 0]


def _admit(demands: list[Workload], workers: Sequence[WorkerView], running: list[WorkerView], now: float, free: int,
           limit: int, gap: int, cpu: float | None, limits: Limits, rest, seen: str,
           profiled_only: bool = False) -> list[Decision]:
    """Spawn decisions: batches in order, each up to its bounds (rule 5; with ``profiled_only``,
    in the gap band, only batches with a memory profile, packed by it)."""
    if sum(d.queued for d in demands) <= 0:
        return []
    cpu_now = cpu or 0.0
    calm = cpu_now <= limits.cpu_limit - limits.margin
    room = limits.max_workers - len(workers)
    if room <= 0 or (running and not calm):
        return []
    by_batch = {d.key: d for d in demands}

    def expected(w: WorkerView, field: str) -> float:
        demand = by_batch.get(w.batch, demands[0])
        return getattr(demand, field) or 0.0

    young = [w for w in running if w.cpu is None]
    cpu_projected = cpu_now + sum(expected(w, "avg_cpu") for w in young)
    # What running workers may still add: up to their batch's peak where it is known, else young
    # (unmeasured) ones up to their batch's average.
    def still_to_come(w: WorkerView) -> float:
        to_peak = rest(w)
        if to_peak is not None:
            return to_peak
        return max(0.0, expected(w, "avg_rss") - w.rss) if w.cpu is None else 0.0

    free_projected = free - sum(map(still_to_come, running))
    decisions = []
    admitted = 0
    for demand in demands:
        if demand.queued <= 0 or demand.room == 0 or (profiled_only and demand.peak_rss is None):
            continue
        bounds = {"queued": demand.queued, "cap": room}
        if demand.room is not None:
            bounds["batch cap"] = demand.room
        if demand.avg_rss is None or demand.avg_cpu is None:
            bounds["ramp"] = max(1, len(running) + admitted)  # nothing measured yet: double per step
        if demand.peak_rss:
            # Packed by the profile: every one may reach the batch's peak and free memory stays
            # above L (a worker growing past it is paused in the gap, rule 3).
            bounds["memory"] = math.floor((free_projected - limit) / demand.peak_rss)
        else:
            # No worker of it has finished, so nobody knows how far its workers grow: they may
            # allocate after they start, and steps follow each other within milliseconds while
            # workers start. Each is taken to reach at least the gap G (the memory pmlmd has to
            # react in) until it has run an interval; the gap itself and one more stay in reserve.
            size = max(demand.avg_rss or 0.0, float(gap), 1.0)
            unsettled = sum(max(0.0, size - w.rss) for w in running
                            if w.batch == demand.key and now - w.started < limits.interval)
            bounds["memory"] = math.floor((free_projected - unsettled - limit - gap) / size) - 1
        if demand.avg_cpu and demand.avg_cpu >= CPU_NEGLIGIBLE and limits.cpu_limit < 100:
            # (A limit of 100 % is no limit: the node cannot use more, however many run.)
            bounds["cpu"] = math.floor((limits.cpu_limit - cpu_projected) / demand.avg_cpu)
        bound_by = min(bounds, key=bounds.get)
        count = bounds[bound_by]
        if count < 1 and not running and not admitted and not profiled_only:
            count, bound_by = 1, "liveness: nothing else runs"  # one worker may always try
        if count < 1:
            break  # strict priority: who comes later waits for this batch
        decisions.append(Decision(SPAWN, count=count, batch=demand.key, rule="gap" if profiled_only else "calm",
                                  reason=f"{seen}, cpu {cpu_now:.0f}%: admitting {count} (bound by {bound_by})"))
        admitted += count
        room -= count
        free_projected -= count * (demand.peak_rss or max(demand.avg_rss or 0.0, float(gap)))
        cpu_projected += count * (demand.avg_cpu or 0.0)
        if room <= 0:
            break
    return decisions


def _turn(sample: NodeSample, running: list[WorkerView], paused: list[WorkerView], limits: Limits,
          seen: str) -> list[Decision]:
    """Turns (rule 5): within the CPU limit (up to half the margin above it, tick noise) but without
    room for one more, a burner that has run its turn makes way for the worker paused longest, so
    equal workers share the CPU instead of the first ones keeping it. The one continued was paused
    for CPU (a grower waits for headroom) at least an interval ago. A turn is shorter the more wait
    for one (TURN_SHARE), so that none waits much longer than two intervals."""
    cpu_now = sample.cpu_pct or 0.0
    busy = [w for w in running if w.cpu is None or w.cpu >= CPU_NEGLIGIBLE]
    waiting = sorted((w for w in paused if sample.time - w.paused_at >= limits.interval and w.paused_by != "gap"),
                     key=lambda w: (w.paused_at, repr(w.key)))
    turn = limits.interval * TURN_SHARE / (len(waiting) + 1)
    turned = sorted((w for w in busy if w.cpu is not None and w.running_since is not None
                     and sample.time - w.running_since >= turn),
                    key=lambda w: (w.running_since, repr(w.key)))
    if not waiting or not turned or cpu_now > limits.cpu_limit + limits.margin / 2:
        return []
    out, back = turned[0], waiting[0]
    why = (f"{seen}, cpu {cpu_now:.0f}% of limit {limits.cpu_limit:.0f}%: taking turns: worker paused "
           f"{sample.time - back.paused_at:.1f}s continues, worker running {sample.time - out.running_since:.1f}s")
    return [Decision(PAUSE, out.key, rule="turn", reason=f"{why} pauses"),
            Decision(CONTINUE, back.key, rule="turn", reason=f"{why} pauses")]


def held_back(sample: NodeSample, cpu: float | None, node: Limits, batch: Limits, others_run: bool,
              profiled: bool, workers: int = 0) -> str | None:
    """Why a batch with limits ``batch`` (the node's ``node``, made stricter) whose tasks wait,
    and of which nothing runs, starts none at ``sample``, where the node is the reason (one line,
    for ``status``); None when the node holds it back in none of these ways. ``cpu``: the node's
    CPU as decide counts it (node_cpu); ``others_run``: other batches' workers run; ``profiled``:
    a worker of the batch has finished (its memory profile, Workload.peak_rss); ``workers``: how
    many workers the node has (max_workers caps them).

    The rules of decide_batches: a batch is admitted when both the node's verdict and its own
    (its limits, its workers: none) admit it. Memory: free below its floor, its memory limit, or
    (without a profile) the gap above that limit a first worker needs. CPU: above its limit or
    the node's. The node's most workers (max_workers) running already. Or, while other workers
    run, CPU above the node's limit less the margin."""
    free = free_bytes(sample, batch)
    limit = batch.memory_limit_bytes(sample.mem_total)
    metric = "available" if batch.memory_metric == "available" else "free"
    if free < batch.min_free:
        return (f"{metric} memory {_mib(free)} is below the batch's floor {_mib(batch.min_free)} (min_free): "
                "its tasks start once that much is free")
    if free < limit:
        return (f"{metric} memory {_mib(free)} is below the batch's memory limit {_mib(limit)} (memfree_limit "
                f"{batch.memfree_limit:g}% of {_mib(sample.mem_total)}): its tasks start once that much is free")
    if free < limit + batch.memory_gap and not profiled:
        return (f"{metric} memory {_mib(free)} leaves less than the gap {_mib(batch.memory_gap)} above the batch's "
                f"memory limit {_mib(limit)}: a first worker needs that headroom (memory_gap)")
    if cpu is None:
        return None
    if cpu > batch.cpu_limit:
        whose = "the node's" if batch.cpu_limit == node.cpu_limit else "the batch's"
        return f"cpu {cpu:.0f}% is above {whose} cpu limit {batch.cpu_limit:g}%: its tasks start once it is below"
    if workers >= node.max_workers:
        return (f"the node has as many workers as it may (max_workers {node.max_workers}): its tasks start as "
                "others end")
    calm = node.cpu_limit - node.margin
    if others_run and cpu > calm:
        return (f"cpu {cpu:.0f}% is above the node's cpu limit less its margin ({calm:g}%), with other work "
                "running: its tasks start once that work leaves room")
    return None


def quiet(sample: NodeSample, limits: Limits, paused: bool, queued: bool) -> bool:
    """True when ``decide`` would decide nothing, whatever the workers measure: no limit is near
    (free memory at or above L + G and the floor, CPU within C), no worker is paused
    (``paused``) and no batch waits for admission (``queued``). Lets a caller with many
    workers skip building their table."""
    if paused or queued:
        return False
    free = free_bytes(sample, limits)
    limit = limits.memory_limit_bytes(sample.mem_total)
    return (free >= limit + limits.memory_gap and free >= limits.min_free
            and (sample.cpu_pct is None or sample.cpu_pct <= limits.cpu_limit))


def _until_free(victims: list[WorkerView], projected: float, target: float, action: str, rule: str,
                why: str) -> list[Decision]:
    """Victims in order until the memory they release lifts ``projected`` free memory to ``target``."""
    decisions = []
    for w in victims:
        if projected >= target:
            break
        decisions.append(Decision(action, w.key, rule=rule, reason=f"{why} ({_mib(w.rss)})"))
        projected += w.rss
    return decisions


def rate_reference(recent: Sequence[NodeSample], now: float) -> NodeSample | None:
    """The sample a fall of free memory is measured against at ``now`` (seconds, the samples'
    clock): the newest of ``recent`` (oldest first) taken RATE_SPAN or more before ``now``; else
    the oldest, if it is at least SHORTEST_INTERVAL / 2 old; else None (no rate: samples taken
    right after a worker exit would show a fall of zero over no time)."""
    reference = None
    for earlier in recent:
        if now - earlier.time < RATE_SPAN:
            break
        reference = earlier
    if reference is None and recent and now - recent[0].time >= SHORTEST_INTERVAL / 2:
        reference = recent[0]
    return reference


def sampling_pace(limits: Limits, batch_intervals: list[float]) -> Limits:
    """The node's limits with the shortest base interval any batch asks for (``--interval``: a
    batch may sample more often than the node, never less often): the limits the sampling
    schedule (next_interval) follows."""
    fastest = min([limits.interval, *batch_intervals])
    return limits if fastest == limits.interval else dataclasses.replace(limits, interval=fastest)


def within_backlog(decisions: list[Decision], backlog: dict[str, int], by_credit: set[str]) -> list[Decision]:
    """The decisions of a step that follows one cut short (the executor starts workers for a
    limited time per loop turn, then serves its sockets): no batch starts more workers than
    that step admitted and did not start (``backlog``: batch id -> count), so the ramp does not
    speed up by the cut; a batch not in ``backlog`` starts none in this step. Batches in
    ``by_credit`` (queue batches: they start what the broker delivers, admitted by their credit)
    are not capped. Spawn decisions left with no worker are dropped."""
    out = []
    for d in decisions:
        if d.action == SPAWN and d.batch not in by_credit:
            d = dataclasses.replace(d, count=min(d.count, backlog.get(d.batch, 0)))
            if d.count <= 0:
                continue
        out.append(d)
    return out


def next_interval(previous: NodeSample | None, sample: NodeSample, limits: Limits, watching: bool = True,
                  still: bool = False) -> float:
    """How long to wait before the next node sample, in seconds.

    The base interval while far from the limits. While workers run (``watching``), never
    longer than the time the fastest fill (FILL_RATE_MAX) needs to reach the next threshold
    (gap edge, limit, floor): no worker can cross it between two samples, whatever the rate
    measured (two close samples may read the same MemAvailable: the kernel folds its per-CPU
    counters in lazily). When free memory falls since ``previous`` (rate_reference: a sample
    RATE_SPAN old, or None), at most half the time it needs at that rate. Near the CPU limit at
    least four times per base interval (for turns, rule 5). Never below SHORTEST_INTERVAL while
    free memory falls at FALLING_FAST or more, never below twice that otherwise.

    ``still``: every worker stood still at the last refresh (no CPU time, no growth), none is
    paused and no batch waits to be admitted. Up to STILL_STRETCH base intervals then, within the
    same memory bounds: a process that uses no CPU can neither allocate nor burn, one that starts
    to is seen at the next sample, and no fill reaches a threshold before it. A CPU limit is then
    enforced up to STILL_STRETCH intervals late, when a sleeping worker starts to burn.
    """
    base = limits.interval
    longest = base * STILL_STRETCH if still else base
    free = free_bytes(sample, limits)
    limit = limits.memory_limit_bytes(sample.mem_total)
    thresholds = [t for t in (limit + limits.memory_gap, limit, limits.min_free) if t < free]
    interval = longest
    falling = 0.0  # bytes/s, since previous
    if thresholds:
        next_threshold = max(thresholds)
        distance = free - next_threshold
        if watching:
            interval = min(interval, distance / FILL_RATE_MAX)
        if distance < limits.memory_gap:
            interval = min(interval, base / 5)
        if previous is not None and sample.time > previous.time:
            falling = (free_bytes(previous, limits) - free) / (sample.time - previous.time)
            if falling > 0:
                interval = min(interval, distance / falling / 2)
    else:
        interval = base / 5  # already below the floor: watch closely
    if sample.cpu_pct is not None and sample.cpu_pct > limits.cpu_limit - limits.margin:
        interval = min(interval, base / 4)  # often enough for turns (rule 5) to be taken on time
    shortest = SHORTEST_INTERVAL if falling >= FALLING_FAST else 2 * SHORTEST_INTERVAL
    return max(shortest, min(longest, interval))
