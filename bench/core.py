"""The benchmark scenarios, run one after the other; peers run in the same process, interleaved per trial.

Safety: memory limits are set relative to the free memory measured right before each trial; hogs
are capped (the memory scenario 500 MiB, goodput at most 1.5 GiB at once); every process started is ended, also on failure
(``Tree.kill`` takes the whole process tree); CPU burners are bounded in wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WORKER = str(BENCH / "worker.py")
PROBE = str(BENCH / "probe.py")
PY = sys.executable
MIB = 1 << 20
ENV = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "PMLM_SOCKET")}
ENV["PYTHONPATH"] = str(ROOT) + (os.pathsep + ENV["PYTHONPATH"] if ENV.get("PYTHONPATH") else "")
PMLMCTL = [PY, "-m", "pmlmd.client.ctl"]


# ---------------------------------------------------------------- helpers

def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def metric(kind: str = "available") -> int:
    m = meminfo()
    if kind == "available":
        return m["MemAvailable"]
    return m["MemFree"] + m["Buffers"] + m["Cached"] + m.get("SwapCached", 0)


def pct_of_total(nbytes: int) -> str:
    return f"{100.0 * nbytes / meminfo()['MemTotal']:.5f}"


def stats(values: list[float]) -> dict:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0}
    p99 = v[min(len(v) - 1, max(0, int(round(0.99 * len(v) + 0.5)) - 1))]
    return {"n": len(v), "median": statistics.median(v), "p50": statistics.median(v), "p99": p99,
            "min": v[0], "max": v[-1]}


def fmt(x, digits=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def mmm(s: dict, digits=1) -> str:
    """median (min–max)"""
    if not s or not s.get("n"):
        return "–"
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def count_named(pid: int, name: str) -> int:
    n = 0
    for p in descendants(pid):
        try:
            if p.name() == name:
                n += 1
        except psutil.NoSuchProcess:
            pass
    return n


def discard_cgroups(kind: str, key: str) -> None:
    """Kill what is left in the worker cgroups of a pmlmd or pmlmctl run that was killed, and remove them."""
    from pmlmd.node import cgroup

    subtree = cgroup.existing(cgroup.subtree_name(kind, key))
    if subtree is not None:
        subtree.discard()


class Tree:
    """A started process whose whole tree is killed on exit (with SIGCONT, so nothing stays stopped)."""

    def __init__(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("env", ENV)
        self.proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.pid = self.proc.pid
        self.known: dict[int, float] = {}

    def remember(self) -> None:
        for p in descendants(self.pid):
            try:
                self.known[p.pid] = p.create_time()
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        self.remember()
        for sig in (signal.SIGKILL,):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        for pid, created in self.known.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    for sig in (signal.SIGKILL, signal.SIGCONT):
                        try:
                            os.killpg(pid, sig)
                        except (ProcessLookupError, PermissionError):
                            pass
                        p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        discard_cgroups("pmlmctl", str(self.pid))  # a pmlmctl run's workers' cgroups (cgroup backend)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def wait_memory_back(kind: str, target: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(kind) < target and time.monotonic() < deadline:
        time.sleep(0.02)


class Daemon:
    """pmlmd as an ordinary process on a private socket and state dir (no NOTIFY_SOCKET: readiness by ping)."""

    def __init__(self, base: Path, config: str):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.socket = str(base / "ctl.sock")
        (base / "pmlmd.toml").write_text(config)
        self.log = open(base / "pmlmd.log", "a")
        self.tree = Tree([PY, "-m", "pmlmd", "--config", str(base / "pmlmd.toml"), "--socket", self.socket,
                          "--state-dir", str(base / "state"), "--log-target", "console"],
                         stdout=self.log, stderr=self.log)
        self.pid = self.tree.pid
        from pmlmd.client.connection import Client, Unreachable
        deadline = time.monotonic() + 30
        try:
            while True:
                if self.tree.proc.poll() is not None:
                    raise RuntimeError("pmlmd exited: " + (base / "pmlmd.log").read_text()[-2000:])
                try:
                    self.client = Client(self.socket)
                    self.client.call("ping")
                    break
                except Unreachable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:  # no __exit__ will run for a daemon that never answered: end it here
            self.tree.kill()
            self.log.close()
            raise

    def ctl(self, *args, timeout=600) -> subprocess.CompletedProcess:
        return subprocess.run([*PMLMCTL, "--socket", self.socket, *args], capture_output=True, text=True,
                              timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)

    def submit(self, *args) -> str:
        r = self.ctl("submit", *args)
        if r.returncode != 0:
            raise RuntimeError(f"submit failed: {r.stderr}")
        return r.stdout.strip().splitlines()[-1]

    def batch(self, batch_id: str) -> dict:
        return self.client.call("status", batch=batch_id)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        self.tree.kill()
        discard_cgroups("pmlmd", os.path.realpath(self.base / "state"))
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


DAEMON_RELAXED = """
[daemon]
scope_backend = "none"
[limits]
cpu_limit = 100
cpu_margin = 0
memfree_limit = 5
max_workers = {max_workers}
"""


def parallel_version() -> str | None:
    if not shutil.which("parallel"):
        return None
    out = subprocess.run(["parallel", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else None


def need_parallel() -> None:
    if not shutil.which("parallel"):
        raise RuntimeError("GNU parallel is not installed (Debian: apt-get install parallel; .ci/run installs it)")


# ---------------------------------------------------------------- scenario 1: memory reaction

def mem_trial(tmp: Path, variant: dict, rate: float, headroom: int, trial: int) -> dict:
    kind = variant["metric"]
    d = tmp / f"mem-{variant['name']}-{int(rate)}-{trial}"
    d.mkdir(parents=True)
    pidfile, termfile, out = str(d / "pid"), str(d / "term"), str(d / "probe.json")
    start_value = metric(kind)
    action = start_value - headroom  # the free-memory level at which the tool is set to act
    cap_mb = (headroom + 300 * MIB) // MIB
    hog = [PY, WORKER, "hog", str(rate), str(cap_mb), "3", pidfile, termfile]
    probe = subprocess.Popen([PY, PROBE, "--metric", kind, "--threshold", str(action), "--out", out, "--pidfile",
                              pidfile, "--termfile", termfile, "--timeout", str(cap_mb * 1.05e6 / (rate * 1e6) + 6),
                              "--until-reaction"], env=ENV)
    try:
        if variant["tool"] == "pmlmd":
            gap = variant["gap"]
            cmd = [*PMLMCTL, "run", "-n", "1", "-j", "1", "--retries", "0", "--interval", str(variant["interval"]),
                   "--memfree-limit", pct_of_total(action - gap), "--memory-gap", str(gap), "--min-free", "100M",
                   "--term-grace", "5", "--trace", str(d / "trace.jsonl"), "--", *hog]
        else:
            # GNU parallel at its best (its source, suspend_young_if_not_enough_mem): below 2X free it
            # stops every job and continues the oldest n+1 of them, n = int(1/(2 - free/X)); its only
            # job is always continued, so a second, older job (a sleep) goes first, and the hog is held
            # stopped once free < X: X is the level this trial sets.
            cmd = ["parallel", "--memsuspend", str(action), "-j", "2", ":::", "sleep 60", " ".join(hog)]
        with Tree(cmd) as tree:
            probe.wait(timeout=60)
            tree.remember()
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    r = json.loads(Path(out).read_text())
    reaction = min([t for t in (r["stop"], r["term"]) if t is not None], default=None)
    how = None if reaction is None else ("stopped (T or frozen)" if reaction == r["stop"] else "SIGTERM")
    latency = (reaction - r["cross"]) * 1000 if reaction is not None and r["cross"] is not None else None
    wait_memory_back(kind, start_value - 50 * MIB)
    # The limit L the tool keeps: pmlmd's is G below where it pauses; parallel's is where it holds.
    limit = action - (variant["gap"] if variant["tool"] == "pmlmd" else 0)
    past_limit = None if r.get("lowest") is None else (limit - r["lowest"]) / MIB
    return {"latency_ms": latency, "how": how, "crossed": r["cross"] is not None, "reacted": reaction is not None,
            "undone": r.get("undone", 0), "past_limit_mib": past_limit}


def scenario_memory(ctx) -> dict:
    need_parallel()
    headroom = 200 * MIB
    trials = 2 if ctx.quick else 20
    rates = [1000.0] if ctx.quick else [200.0, 1500.0]
    variants = [
        {"name": "pmlmd-0.5", "tool": "pmlmd", "label": "pmlmctl run, interval 0.5 s (default): pause at L+G",
         "interval": 0.5, "gap": 200 * MIB, "metric": "available"},
        {"name": "pmlmd-0.05", "tool": "pmlmd", "label": "pmlmctl run, interval 0.05 s: pause at L+G",
         "interval": 0.05, "gap": 200 * MIB, "metric": "available"},
        {"name": "pmlmd-term", "tool": "pmlmd", "label": "pmlmctl run, interval 0.5 s, --memory-gap 0: SIGTERM at L",
         "interval": 0.5, "gap": 0, "metric": "available"},
        {"name": "parallel", "tool": "parallel", "label": "GNU parallel --memsuspend X -j 2 (a sleep, then the hog)",
         "metric": "parallel"},
    ]
    raw = {}
    for rate in rates:
        for trial in range(trials):
            for v in variants:  # interleaved, so drifts of the machine hit every tool alike
                raw.setdefault((v["name"], rate), []).append(mem_trial(ctx.tmp, v, rate, headroom, trial))
        log(f"  memory: rate {rate:g} MB/s done")
    rows = []
    for rate in rates:
        base = stats([t["latency_ms"] for t in raw[("parallel", rate)]])
        for v in variants:
            ts = raw[(v["name"], rate)]
            s = stats([t["latency_ms"] for t in ts])
            hows = sorted({t["how"] for t in ts if t["how"]})
            ratio = (base["p50"] / s["p50"]) if s.get("n") and base.get("n") and s["p50"] > 0 else None
            rows.append({"rate MB/s": f"{rate:g}", "tool": v["label"], "trials": len(ts),
                         "reacted": sum(t["reacted"] for t in ts), "reaction": ", ".join(hows) or "–",
                         "p50 ms": fmt(s.get("p50")), "p99 ms": fmt(s.get("p99")),
                         "min–max ms": f"{fmt(s.get('min'))}–{fmt(s.get('max'))}" if s.get("n") else "–",
                         "parallel p50 / this p50": fmt(ratio, 1) if ratio else "–",
                         "deepest below L, MiB": _below(max((t["past_limit_mib"] for t in ts if t["past_limit_mib"] is not None),
                                                                  default=None)), "_stats": s, "_raw": ts})
    return {"title": "1. Reaction latency, memory", "rows": rows,
            "notes": [f"headroom {headroom // MIB} MiB: each tool is set to act when its free-memory figure falls "
                      f"{headroom // MIB} MiB below its value at the start of the trial; hog capped at headroom + 300 MiB",
                      f"{trials} trials per tool and rate, tools interleaved; p99 by nearest rank (with 20 trials: the maximum); "
                      "latency over the trials that reacted (a hog that stops growing inside pmlmd's gap band, above the "
                      "limit, is by design not paused)",
                      "deepest below L: the lowest free memory the probe saw until 0.3 s after the reaction, against the "
                      "limit the tool keeps (pmlmd: L, G below where it pauses; parallel: the level it holds the hog at); "
                      "'never' when it stayed above"]}


def _below(mib: float | None) -> str:
    return "–" if mib is None else "never" if mib <= 0 else fmt(mib)


# ---------------------------------------------------------------- scenario 2: CPU reaction

def read_trace(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def cpu_trial(tmp: Path, interval: float, trial: int) -> dict:
    d = tmp / f"cpu-{interval}-{trial}"
    d.mkdir(parents=True)
    startfile, trace = d / "starts", d / "trace.jsonl"
    idle = 1.5 if interval >= 0.5 else 0.6
    cmd = [*PMLMCTL, "run", "-n", "2", "-j", "2", "--cpu-limit", "75", "--retries", "0", "--interval", str(interval),
           "--trace", str(trace), "--", PY, WORKER, "burn", str(idle), "4", str(startfile)]
    pause_t = None
    with Tree(cmd) as tree:
        deadline = time.monotonic() + idle + 8
        while time.monotonic() < deadline and tree.proc.poll() is None:
            pauses = [r for r in read_trace(trace) if r.get("event") == "decision" and r.get("decision") == "pause"]
            if pauses:
                pause_t = pauses[0]["t"]
                break
            time.sleep(0.02)
    starts = [float(line.split()[1]) for line in startfile.read_text().splitlines()] if startfile.exists() else []
    if len(starts) < 2 or pause_t is None:
        return {"latency_ms": None}
    crossed = sorted(starts)[1]  # the second burner starts: node CPU goes from ~50 % to ~100 %
    return {"latency_ms": (pause_t - crossed) * 1000}


def scenario_cpu(ctx) -> dict:
    trials = 1 if ctx.quick else 10
    rows = []
    for interval in ([0.05] if ctx.quick else [0.5, 0.05]):
        s = stats([cpu_trial(ctx.tmp, interval, i)["latency_ms"] for i in range(trials)])
        rows.append({"tool": f"pmlmctl run, interval {interval:g} s", "trials": trials, "paused in": s.get("n", 0),
                     "p50 ms": fmt(s.get("p50")), "p99 ms": fmt(s.get("p99")),
                     "min–max ms": f"{fmt(s.get('min'))}–{fmt(s.get('max'))}" if s.get("n") else "–", "_stats": s})
    rows.append({"tool": "GNU parallel --load", "trials": 0, "paused in": "–", "p50 ms": "never pauses",
                 "p99 ms": "–", "min–max ms": "–"})
    return {"title": "2. Reaction latency, CPU", "rows": rows,
            "notes": ["two burners (2 cores), --cpu-limit 75; both are admitted idle and start burning after a "
                      "fixed delay; latency = pmlmd's first pause decision (trace) - the second burner's own "
                      "burn-start timestamp (wall clock)"]}


def fairness_trial(tmp: Path, trial: int, n: int, cpu_s: float, interval: float) -> dict:
    d = tmp / f"fairness-{trial}"
    d.mkdir(parents=True)
    trace, report = d / "trace.jsonl", d / "report.json"
    limit = 100.0 / (os.cpu_count() or 1)  # room for one burner
    cmd = [*PMLMCTL, "run", "-n", str(n), "-j", str(n), "--cpu-limit", f"{limit:g}", "--interval", str(interval),
           "--trace", str(trace), "--report", str(report), "--", PY, WORKER, "work", "1.5", str(cpu_s), str(cpu_s * n * 4)]
    t0 = time.monotonic()
    cpu: dict[int, float] = {}  # worker pid -> its CPU seconds at the last look (every 50 ms)
    at_first_end: dict[int, float] | None = None
    with Tree(cmd) as tree:
        deadline = t0 + cpu_s * n * 4 + 30
        while tree.proc.poll() is None and time.monotonic() < deadline:
            live = {}
            for p in descendants(tree.pid):
                try:
                    if p.cmdline()[2:3] == ["work"]:
                        live[p.pid] = cpu_seconds(p.pid)
                except (psutil.NoSuchProcess, OSError):
                    pass
            if at_first_end is None and len(cpu) == n and len(live) < n:
                at_first_end = dict(cpu)  # the last look before the first worker ended
            cpu.update(live)
            time.sleep(0.05)
        code = tree.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    makespan = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"pmlmctl run exited {code}")
    share = min(at_first_end.values()) / max(at_first_end.values()) if at_first_end else None
    rows = read_trace(trace)
    rep = json.loads(report.read_text())
    ends = sorted(datetime.datetime.fromisoformat(a["end"]).timestamp() for t in rep["tasks"] for a in t["attempts"])
    paused_since: dict[int, float] = {}
    longest = 0.0
    pids = set()
    for r in rows:
        if r.get("event") != "decision" or r.get("pid") is None:
            continue
        pids.add(r["pid"])
        if r["decision"] == "pause":
            paused_since.setdefault(r["pid"], r["t"])
        elif r["decision"] == "continue" and r["pid"] in paused_since:
            longest = max(longest, r["t"] - paused_since.pop(r["pid"]))
    return {"makespan_s": makespan, "longest_pause_s": longest, "end_spread_s": ends[-1] - ends[0],
            "workers_paused": len(pids), "least_share": share}


def scenario_fairness(ctx) -> dict:
    n, cpu_s, trials = (3, 0.6, 1) if ctx.quick else (4, 2.0, 3)
    rows = []
    for interval in ([0.2] if ctx.quick else [0.5, 0.2]):
        ts = [fairness_trial(ctx.tmp / f"i{interval}", i, n, cpu_s, interval) for i in range(trials)]
        rows.append({"tool": f"pmlmctl run, interval {interval:g} s", "trials": trials,
                     "makespan s": mmm(stats([t["makespan_s"] for t in ts]), 1),
                     "longest pause s": mmm(stats([t["longest_pause_s"] for t in ts]), 2),
                     "÷ interval": fmt(stats([t["longest_pause_s"] for t in ts])["max"] / interval, 1),
                     "first to last end s": mmm(stats([t["end_spread_s"] for t in ts]), 2),
                     "least ÷ most CPU at first end": mmm(stats([t["least_share"] for t in ts]), 2), "_raw": ts})
    return {"title": "2b. CPU fairness: equal burners, room for one", "rows": rows,
            "notes": [f"{n} burners of {cpu_s:g} CPU-seconds each, admitted idle (they sleep 1.5 s first), -j {n}, "
                      "--cpu-limit 100/cores (one core's worth); "
                      "longest pause = longest time from a pause decision to the continue of the same worker "
                      "(trace); first to last end: how far apart the equal workers finish; least ÷ most CPU at "
                      "first end: each worker's CPU time (/proc/PID/stat, read every 50 ms) just before the first "
                      "one ended, the least over the most; GNU parallel and xargs have no CPU limit to share"]}


# ---------------------------------------------------------------- scenario 3: overhead

def measure_window(pid: int, window: float) -> dict:
    c0 = cpu_seconds(pid)
    t0 = time.monotonic()
    peak = rss_bytes(pid)
    while time.monotonic() - t0 < window:
        time.sleep(0.25)
        peak = max(peak, rss_bytes(pid))
    cpu = cpu_seconds(pid) - c0
    elapsed = time.monotonic() - t0
    return {"cpu_s": cpu, "window_s": elapsed, "cpu_pct": 100 * cpu / elapsed, "rss_mib": peak / MIB}


def wait_count(pid: int, name: str, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if count_named(pid, name) >= n:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"only {count_named(pid, name)} of {n} {name} workers started within {timeout}s")


def scenario_overhead(ctx) -> dict:
    need_parallel()
    window = 1.5 if ctx.quick else 20.0
    counts = [10] if ctx.quick else [100, 500]
    sleep_s = str(int(window + 90))
    rows = []

    def row(tool, n, m, ramp=None):
        rows.append({"supervisor": tool, "sleeping workers": n, "CPU s in window": fmt(m["cpu_s"], 2),
                     "window s": fmt(m["window_s"], 1), "CPU %": fmt(m["cpu_pct"], 2),
                     "CPU s per 60 s": fmt(m["cpu_pct"] * 0.6, 2), "RSS MiB": fmt(m["rss_mib"], 1),
                     "ramp-up s": fmt(ramp, 1), "_m": m})

    with Daemon(ctx.tmp / "overhead-daemon", DAEMON_RELAXED.format(max_workers=1100)) as d:
        time.sleep(1.0)
        row("pmlmd daemon", 0, measure_window(d.pid, window))
        for n in counts:
            bid = d.submit("-n", str(n), "-j", str(n), "--", "sleep", sleep_s)
            ramp = wait_count(d.pid, "sleep", n, 120)
            time.sleep(1.0)
            row("pmlmd daemon", n, measure_window(d.pid, window), ramp)
            d.client.call("cancel", batch=bid)
            deadline = time.monotonic() + 30
            while count_named(d.pid, "sleep") and time.monotonic() < deadline:
                time.sleep(0.2)
    for n in counts:
        with Tree([*PMLMCTL, "run", "-n", str(n), "-j", str(n), "--cpu-limit", "100", "--", "sleep", sleep_s]) as t:
            ramp = wait_count(t.pid, "sleep", n, 120)
            time.sleep(1.0)
            row("pmlmctl run", n, measure_window(t.pid, window), ramp)
        with Tree(["parallel", "-j", str(n), "-N0", "sleep", sleep_s, ":::", *map(str, range(n))]) as t:
            ramp = wait_count(t.pid, "sleep", n, 120)
            time.sleep(1.0)
            row("GNU parallel", n, measure_window(t.pid, window), ramp)
    for r in rows:
        peer = next((p for p in rows if p["supervisor"] == "GNU parallel" and p["sleeping workers"] == r["sleeping workers"]), None)
        if peer and peer["_m"]["cpu_s"] > 0:
            r["CPU ÷ parallel"] = fmt(r["_m"]["cpu_s"] / peer["_m"]["cpu_s"], 2)
        else:
            r["CPU ÷ parallel"] = "–"
    return {"title": "3. Overhead of the supervisor", "rows": rows,
            "notes": [f"window {window:g} s per configuration (one window each), after all workers run; CPU = utime+stime "
                      "of the supervisor process (all threads) from /proc/PID/stat; RSS = peak VmRSS in the window"]}


# ---------------------------------------------------------------- scenario 4: throughput

def scenario_throughput(ctx) -> dict:
    need_parallel()
    n = 100 if ctx.quick else 2000
    widths = (4,) if ctx.quick else (4, 16)
    trials = 1 if ctx.quick else 3
    seq = "\n".join(map(str, range(n))) + "\n"
    results: dict[tuple[str, int], list[float]] = {}
    daemon_cpu: dict[int, list[float]] = {}  # ms of pmlmd's CPU per task
    with Daemon(ctx.tmp / "throughput-daemon", DAEMON_RELAXED.format(max_workers=1100)) as d:
        def tools(j: int) -> dict:
            return {
                "pmlmctl run --cpu-limit 100 --cpu-margin 0": [*PMLMCTL, "run", "-n", str(n), "-j", str(j),
                                                               "--cpu-limit", "100", "--cpu-margin", "0", "--", "/bin/true"],
                "pmlmctl run (default limits)": [*PMLMCTL, "run", "-n", str(n), "-j", str(j), "--", "/bin/true"],
                "pmlmd daemon (submit --wait)": [*PMLMCTL, "--socket", d.socket, "submit", "--wait", "-n", str(n),
                                                 "-j", str(j), "--", "/bin/true"],
                # -u: no output grouping (no temporary files per job); /bin/true writes nothing to group.
                "GNU parallel -u": ["parallel", "-u", "-j", str(j), "-N0", "/bin/true"],
                "xargs -P": ["xargs", "-P", str(j), "-n", "1", "/bin/true"],
            }
        for trial in range(trials):
            for j in widths:
                for name, cmd in tools(j).items():
                    uses_stdin = name.startswith(("GNU parallel", "xargs"))
                    daemon_before = cpu_seconds(d.pid)
                    t0 = time.monotonic()
                    r = subprocess.run(cmd, input=seq if uses_stdin else None,
                                       stdin=None if uses_stdin else subprocess.DEVNULL,
                                       capture_output=True, text=True, env=ENV, timeout=900)
                    elapsed = time.monotonic() - t0
                    if r.returncode != 0:
                        raise RuntimeError(f"{name} failed ({r.returncode}): {r.stderr[-1000:]}")
                    results.setdefault((name, j), []).append(n / elapsed)
                    if name.startswith("pmlmd daemon"):
                        daemon_cpu.setdefault(j, []).append((cpu_seconds(d.pid) - daemon_before) / n * 1000)
    rows = []
    for j in widths:
        par = stats(results[("GNU parallel -u", j)])["median"]
        xa = stats(results[("xargs -P", j)])["median"]
        for (name, width), v in results.items():
            if width != j:
                continue
            s = stats(v)
            cpu = stats(daemon_cpu[j]) if name.startswith("pmlmd daemon") else None
            rows.append({"tool": name, "tasks": n, "-j/-P": j, "trials": trials,
                         "tasks/s median (min–max)": mmm(s, 0), "÷ GNU parallel": fmt(s["median"] / par, 2),
                         "÷ xargs": fmt(s["median"] / xa, 2),
                         "daemon CPU ms/task": mmm(cpu, 2) if cpu else "", "_stats": s})
    return {"title": "4. Tiny-task throughput (/bin/true)", "rows": rows,
            "notes": ["wall time of the whole command, Python start-up of pmlmctl included (~0.1-0.2 s)",
                      "the daemon's limits: cpu_limit 100, cpu_margin 0, memfree_limit 5; root's batch",
                      "daemon CPU per task: pmlmd's utime + stime over the submit, divided by the tasks"]}


# ---------------------------------------------------------------- scenario 5: goodput

def task_peak(job: list[str]) -> int:
    """Bytes: the peak RSS of one task run alone (wait4's ru_maxrss)."""
    proc = subprocess.Popen(job, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed alone ({proc.returncode})")
    return usage.ru_maxrss * 1024


def goodput_trial(tmp: Path, tool: str, trial: int, ntasks: int, size_mb: int, hold_s: float, headroom: int, j: int) -> dict:
    d = tmp / f"goodput-{tool}-{trial}"
    d.mkdir(parents=True)
    start_avail = metric("available")
    limit = start_avail - headroom
    out, stopfile = d / "probe.json", d / "stop"
    probe = subprocess.Popen([PY, PROBE, "--metric", "available", "--threshold", str(limit), "--out", str(out),
                              "--stopfile", str(stopfile), "--period", "0.002", "--timeout", "600"], env=ENV)
    job = [PY, WORKER, "hold", str(size_mb), str(hold_s)]
    report = d / "report.json"
    try:
        if tool == "pmlmd":
            cmd = [*PMLMCTL, "run", "-n", str(ntasks), "-j", str(j), "--memfree-limit", pct_of_total(limit),
                   "--min-free", "100M", "--report", str(report), "--", *job]
            stdin = None
        elif tool == "parallel":
            cmd = ["parallel", "--memfree", str(metric("parallel") - headroom), "-j", str(j), "-N0", " ".join(job)]
            stdin = subprocess.PIPE
        else:  # "xargs" with -P j (naive), "ideal" with -P k (as many as fit the headroom, see scenario_goodput)
            cmd = ["xargs", "-P", str(j), "-n", "1", "sh", "-c", " ".join(job)]
            stdin = subprocess.PIPE
        t0 = time.monotonic()
        with Tree(cmd, stdin=stdin) as tree:
            if stdin:
                tree.proc.stdin.write("\n".join(map(str, range(ntasks))).encode() + b"\n")
                tree.proc.stdin.close()
            code = tree.proc.wait(timeout=600)
            makespan = time.monotonic() - t0
    finally:
        stopfile.write_text("")
        probe.wait(timeout=10)
    r = json.loads(out.read_text())
    res = {"makespan_s": makespan, "exit": code, "below_s": r["below_s"], "breaches": r["breaches"],
           "deepest_mib": max(0, limit - r["lowest"]) / MIB}
    if tool == "pmlmd" and report.exists():
        rep = json.loads(report.read_text())
        res["terminated"] = rep["counts"]["terminated"]
        res["requeued"] = rep["counts"]["requeued"]
        res["succeeded"] = rep["counts"]["succeeded"]
    wait_memory_back("available", start_avail - 50 * MIB, 2)
    return res


def scenario_goodput(ctx) -> dict:
    need_parallel()
    headroom = 400 * MIB
    ntasks, size_mb, hold_s, j = (4, 128, 0.3, 4) if ctx.quick else (12, 128, 1.0, 12)
    trials = 1 if ctx.quick else 3
    # The ideal packing: as many at a time as fit the headroom at the peak one task reaches alone.
    peak = task_peak([PY, WORKER, "hold", str(size_mb), "0"])
    k = max(1, headroom // peak)
    tools = {"pmlmd": f"pmlmctl run -j {j} (default gap 200M)", "parallel": f"GNU parallel --memfree -j {j}",
             "ideal": f"xargs -P {k} (ideal packing: {headroom // MIB} MiB / {peak / MIB:.0f} MiB a task)",
             "xargs": f"xargs -P {j} (naive)"}
    raw: dict[str, list[dict]] = {}
    for trial in range(trials):
        for tool in tools:
            width = k if tool == "ideal" else j
            raw.setdefault(tool, []).append(goodput_trial(ctx.tmp, tool, trial, ntasks, size_mb, hold_s, headroom,
                                                          width))
    rows = []
    ideal = stats([t["makespan_s"] for t in raw["ideal"]])["median"]
    for tool, label in tools.items():
        ts = raw[tool]
        mk = stats([t["makespan_s"] for t in ts])
        rows.append({"tool": label, "trials": trials, "makespan s": mmm(mk, 1),
                     "÷ ideal": fmt(mk["median"] / ideal, 2),
                     "time below limit s": mmm(stats([t["below_s"] for t in ts]), 2),
                     "breaches": mmm(stats([t["breaches"] for t in ts]), 0),
                     "deepest below limit MiB": mmm(stats([t["deepest_mib"] for t in ts]), 0),
                     "terminated / requeued": ("/".join(str(int(statistics.median([t.get(k, 0) for t in ts])))
                                               for k in ("terminated", "requeued")) if tool == "pmlmd" else "n/a (not reported)"),
                     "_raw": ts})
    return {"title": "5. Goodput under memory overload", "rows": rows,
            "notes": [f"{ntasks} tasks x {size_mb} MiB held {hold_s:g} s = {ntasks * size_mb} MiB, against a headroom of "
                      f"{headroom // MIB} MiB (limit = MemAvailable at trial start - headroom; GNU parallel: its own "
                      "free figure - headroom); time below the limit sampled every 2 ms by a separate process"]}


# ---------------------------------------------------------------- scenario 6: scale

def time_status(client, duration: float, period: float = 0.05, stop=None) -> list[float]:
    lat = []
    t_end = time.monotonic() + duration
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        client.call("status")
        lat.append((time.perf_counter() - t0) * 1000)
        if stop and stop():
            break
        time.sleep(period)
    return lat


def scenario_scale(ctx) -> dict:
    ntasks, nsleep = (200, 50) if ctx.quick else (10000, 1000)
    rows = []
    with Daemon(ctx.tmp / "scale-daemon", DAEMON_RELAXED.format(max_workers=1100)) as d:
        # 10,000 tasks in one batch
        rss0 = rss_bytes(d.pid)
        t0 = time.monotonic()
        bid = d.submit("-n", str(ntasks), "-j", "16", "--", "/bin/true")
        lat, peak = [], rss_bytes(d.pid)
        while True:
            lat += time_status(d.client, 0.5)
            peak = max(peak, rss_bytes(d.pid))
            st = d.batch(bid)
            if st.get("ended") is not None:
                break
            if time.monotonic() - t0 > 900:
                raise RuntimeError("10,000-task batch did not finish in 900 s")
        elapsed = time.monotonic() - t0
        s = stats(lat)
        rows.append({"load": f"{ntasks} x /bin/true, -j 16", "wall s": fmt(elapsed, 1),
                     "tasks/s": fmt(ntasks / elapsed, 0), "daemon RSS MiB (start → peak)": f"{rss0 / MIB:.1f} → {peak / MIB:.1f}",
                     "status p50 ms": fmt(s["p50"], 2), "status p99 ms": fmt(s["p99"], 2), "status calls": s["n"], "_stats": s})
        # 1,000 concurrent sleeping workers
        bid = d.submit("-n", str(nsleep), "-j", str(nsleep), "--", "sleep", "300")
        t0 = time.monotonic()
        lat = []
        while count_named(d.pid, "sleep") < nsleep:
            lat += time_status(d.client, 0.5)
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"only {count_named(d.pid, 'sleep')} of {nsleep} sleepers started")
        ramp = time.monotonic() - t0
        steady = time_status(d.client, 2.0 if ctx.quick else 15.0)
        cli = []
        for _ in range(3 if ctx.quick else 10):
            c0 = time.monotonic()
            r = d.ctl("status")
            cli.append((time.monotonic() - c0) * 1000)
            assert r.returncode == 0, r.stderr
        s, sr, sc = stats(steady), stats(lat), stats(cli)
        rows.append({"load": f"{nsleep} concurrent sleep workers", "wall s": f"ramp-up {ramp:.1f}", "tasks/s": "–",
                     "daemon RSS MiB (start → peak)": f"{rss_bytes(d.pid) / MIB:.1f}",
                     "status p50 ms": f"{s['p50']:.2f} (ramp-up {sr.get('p50', 0):.2f})",
                     "status p99 ms": f"{s['p99']:.2f} (ramp-up {sr.get('p99', 0):.2f})", "status calls": s["n"] + sr.get("n", 0),
                     "CLI `pmlmctl status` wall ms": mmm(sc, 0), "_stats": s, "_ramp": sr, "_cli": sc})
        d.client.call("cancel", batch=bid)
        deadline = time.monotonic() + 30
        while count_named(d.pid, "sleep") and time.monotonic() < deadline:
            time.sleep(0.2)
    return {"title": "6. Scale (daemon)", "rows": rows,
            "notes": ["status latency: pmlmd.client.connection.Client.call('status') in the bench process, every 50 ms, "
                      "while the load runs; CLI: wall time of a whole `pmlmctl status` process (Python start-up included)",
                      "daemon: max_workers 1100, cpu_limit 100, cpu_margin 0, memfree_limit 5, scope_backend none"]}


# ---------------------------------------------------------------- scenario 7: reads next to a big batch

READERS = 6
READER = """
import sys, time
from pmlmd.client.connection import Client
socket, batch, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
n = 0
with Client(socket) as c:
    while time.time() < until:
        c.call("list"); c.call("status"); c.call("status", batch=batch)
        n += 3
print(n)
"""
PINGER = """
import sys, time, json
from pmlmd.client.connection import Client
# argv: socket, until [, period (default 0.01 s) [, start: wall time of the first ping]]
lat = []
period = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
with Client(sys.argv[1]) as c:
    if len(sys.argv) > 4:
        time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
    until = float(sys.argv[2])
    while time.time() < until:
        t = time.perf_counter(); c.call("ping"); lat.append((time.perf_counter() - t) * 1000)
        time.sleep(period)
print(json.dumps(lat))
"""
def reads_window(d, big: str, seconds: float, readers: int) -> dict:
    """The governor's decisions on a stream of short tasks, and ping latency, while ``readers`` clients read."""
    burner = d.submit("-n", "100000", "-j", "4", "--", "sleep", "0.05")
    time.sleep(1.0)  # the stream of admissions is under way
    start = time.time()
    until = start + seconds
    procs = [subprocess.Popen([PY, "-c", READER, d.socket, big, str(until)], stdout=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(readers)]
    pinger = subprocess.Popen([PY, "-c", PINGER, d.socket, str(until)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        served = sum(int(p.communicate(timeout=seconds + 120)[0] or 0) for p in procs)
        pings = json.loads(pinger.communicate(timeout=seconds + 60)[0] or "[]")
    finally:
        for p in procs + [pinger]:
            if p.poll() is None:
                p.kill()
                p.wait()
    events = list(d.client.stream("events", batch=burner, follow=False))
    latencies = [float(e["latency_ms"]) for e in events if e.get("event") == "decision" and e.get("latency_ms") is not None
                 and start <= e.get("time", 0) <= until]
    d.client.call("cancel", batch=burner)
    return {"decisions": stats(latencies), "pings": stats(pings), "served": served}


def scenario_reads(ctx) -> dict:
    ntasks, seconds = (5000, 3.0) if ctx.quick else (1_000_000, 20.0)
    rows = []
    with Daemon(ctx.tmp / "reads-daemon", DAEMON_RELAXED.format(max_workers=64)) as d:
        rss0, t0 = rss_bytes(d.pid), time.monotonic()
        big = d.submit("-n", str(ntasks), "-j", "1", "--", "sleep", "600")
        submit_s, grew = time.monotonic() - t0, rss_bytes(d.pid) - rss0
        for readers in (0, READERS):
            r = reads_window(d, big, seconds, readers)
            dec, ping = r["decisions"], r["pings"]
            rows.append({"readers": f"{readers} x (list, status, status ID) in a loop",
                         "requests served": r["served"],
                         "governor decisions": dec.get("n", 0),
                         "sample→signal p50 ms": fmt(dec.get("p50"), 2), "sample→signal p99 ms": fmt(dec.get("p99"), 2),
                         "sample→signal max ms": fmt(dec.get("max"), 2),
                         "ping p50 ms": fmt(ping.get("p50"), 2), "ping max ms": fmt(ping.get("max"), 1),
                         "_decisions": dec, "_pings": ping})
        t0 = time.monotonic()
        d.client.call("cancel", batch=big)
        while d.batch(big).get("ended") is None:
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"the batch of {ntasks} tasks did not end within 300 s of its cancel")
            time.sleep(0.05)
        ended_s, after = time.monotonic() - t0, rss_bytes(d.pid) - rss0
    cost = (f"the batch of {ntasks} tasks: submit (pmlmctl submit, start to exit) {submit_s:.2f} s, the daemon's RSS "
            f"+{grew / 2**20:.1f} MiB after it; cancel to ended (its report of every task encoded and stored) "
            f"{ended_s:.2f} s, RSS +{after / 2**20:.1f} MiB after that")
    return {"title": "7. Reads next to a big batch (daemon)", "rows": rows, "_cost": {
                "submit_s": submit_s, "rss_after_submit": grew, "cancel_to_ended_s": ended_s, "rss_after_end": after},
            "notes": [f"one batch of {ntasks} tasks (`sleep 600`, -j 1) in the daemon; a second batch of short tasks "
                      "(`sleep 0.05`, -j 4), so the governor admits workers all along; "
                      f"{seconds:g} s windows without and with {READERS} reader processes; sample→signal: the "
                      "latency_ms of each governor decision on the second batch (from the sample to the signal: "
                      "here the spawns); ping: a seventh client every 10 ms", cost]}


# ---------------------------------------------------------------- scenario 8: tasks from a queue

def load_test_broker():
    """tests/broker.py, the private RabbitMQ the tests use, loaded from its file (not copied here;
    the tests directory stays off sys.path)."""
    import importlib.util
    path = ROOT / "tests" / "broker.py"
    spec = importlib.util.spec_from_file_location("pmlm_bench_test_broker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_run(cmd: list[str], stdin_text: str | None) -> float:
    """Wall seconds of a whole command (raises if it fails)."""
    t0 = time.monotonic()
    r = subprocess.run(cmd, input=stdin_text, stdin=None if stdin_text is not None else subprocess.DEVNULL,
                       capture_output=True, text=True, env=ENV, timeout=900)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed ({r.returncode}): {r.stderr[-1000:]}")
    return elapsed


def queue_trial(nodes: list, url: str, queue: str, n: int, j: int, broker_pid: int | None) -> dict:
    """One queue batch (``submit --amqp --until-empty``) on each of ``nodes`` taking the ``n`` tasks
    already on ``queue``: wall from the first submit until the bench sees every batch ended."""
    cpu0 = [cpu_seconds(d.pid) for d in nodes]
    broker0 = cpu_seconds(broker_pid) if broker_pid else None
    t0 = time.monotonic()
    batches = [d.submit("--amqp", url, "--queue", queue, "--until-empty", "-j", str(j), "--", "/bin/true")
               for d in nodes]
    pending = dict(zip(range(len(nodes)), batches))
    final: dict[int, dict] = {}
    while pending:
        for i, bid in list(pending.items()):
            st = nodes[i].batch(bid)
            if st.get("ended") is not None:
                final[i] = st
                del pending[i]
        if not pending:
            break
        if time.monotonic() - t0 > 900:
            raise RuntimeError(f"queue batches on {len(pending)} of {len(nodes)} nodes did not end in 900 s")
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    cpu = sum(cpu_seconds(d.pid) - c for d, c in zip(nodes, cpu0))
    intakes = [final[i].get("intake") or {} for i in range(len(nodes))]
    acked = [it.get("acked", 0) for it in intakes]
    problems = []
    if sum(acked) != n:
        problems.append(f"acked {sum(acked)} of {n}")
    for i in range(len(nodes)):
        it, st = intakes[i], final[i]
        for k in ("returned", "dead_lettered"):
            if it.get(k):
                problems.append(f"node {i + 1}: {k} {it[k]}")
        if st.get("state") != "finished" or st.get("exit_status") not in (0, None):
            problems.append(f"node {i + 1}: batch {st.get('state')}, exit {st.get('exit_status')}")
    return {"wall_s": elapsed, "cpu_s": cpu, "acked": acked, "problems": problems,
            "broker_cpu_s": (cpu_seconds(broker_pid) - broker0) if broker_pid else None,
            "consumed": [it.get("consumed", 0) for it in intakes]}


LATENCY_REF = ["-n", "100000", "-j", "4", "--", "sleep", "0.05"]  # the reference batch, as in reads_window
LATENCY_J = 8  # the second batch's -j (queue or request)
# The second batch's tasks: `sleep 0.01` (from the queue: command `sleep`, each message "0.01"). Not
# /bin/true: next to the reference batch the governor admits /bin/true one at a time (bound by cpu: a
# task that ends within a few ms is measured at a large CPU share) and, once a node sample is high,
# not at all, so the queue batch ran no task and the intake idled.
LATENCY_TINY_ARG = "0.01"


# The daemon keeps only its last RECENT_EVENTS (2000) events for a request without follow: with a second
# batch running they span a few seconds, so the decisions are followed live, by a client of their own.
DECISIONS = """
import sys, json
from pmlmd.client.connection import Client
socket, batch, start, until = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
lat = []
with Client(socket) as c:
    for e in c.stream("events", batch=batch, follow=True):
        t = e.get("time", 0)
        if t > until:
            break
        if e.get("event") == "decision" and e.get("latency_ms") is not None and t >= start:
            lat.append(float(e["latency_ms"]))
print(json.dumps(lat))
"""


def node_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole node, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # idle and iowait are not busy


def wait_batches_ended(d, batches: list[str], timeout: float = 60.0) -> None:
    """Until every batch has ended and the daemon has no child left (raises after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while any(d.batch(b).get("ended") is None for b in batches) or descendants(d.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"batches {batches} not ended, or workers left, {timeout:g} s after cancel")
        time.sleep(0.05)


def latency_window(d, seconds: float, warmup: float, second: list[str] | None, broker=None,
                   queue: str | None = None) -> dict:
    """The governor's decision latencies on the reference batch over ``seconds``, with ``second``
    (submit arguments) running next to it on the same daemon, or alone; pings every 50 ms from a
    separate client. Both batches are cancelled at the end and waited for."""
    ref = d.submit(*LATENCY_REF)
    batches = [ref]
    try:
        other = d.submit(*second) if second else None
        if other:
            batches.append(other)
        start = time.time() + warmup  # the streams of admissions are under way by then
        until = start + seconds
        helpers = [subprocess.Popen([PY, "-c", code, d.socket, *args], stdout=subprocess.PIPE, text=True, env=ENV)
                   for code, args in ((DECISIONS, (ref, str(start), str(until))),
                                      (PINGER, (str(until), "0.05", str(start))))]
        try:
            time.sleep(max(0.0, start - time.time()))
            cpu0, node0 = cpu_seconds(d.pid), node_cpu_ticks()
            other0 = d.batch(other) if other else {}
            latencies, pings = (json.loads(h.communicate(timeout=seconds + warmup + 60)[0] or "[]") for h in helpers)
        finally:
            for h in helpers:
                if h.poll() is None:
                    h.kill()
                    h.wait()
        cpu, node1 = cpu_seconds(d.pid) - cpu0, node_cpu_ticks()
        late = time.time() - until  # how long after the window's end the helpers' ends were seen
        other1 = d.batch(other) if other else {}
        intake0, intake1 = other0.get("intake") or {}, other1.get("intake") or {}
        left = broker.count(queue) if queue else None
    finally:
        for b in batches:
            d.client.call("cancel", batch=b)
        wait_batches_ended(d, batches)
    problems = []
    done = ((other1.get("counts") or {}).get("succeeded", 0) - (other0.get("counts") or {}).get("succeeded", 0)
            if other else None)
    if left == 0:
        problems.append("the queue ran dry before the window's end")
    if other and not done:
        problems.append("the second batch ran no task in the window")
    for k in ("returned", "dead_lettered"):
        if intake1.get(k):
            problems.append(f"intake {k} {intake1[k]}")
    return {"decisions": stats(latencies), "latencies": latencies, "pings": stats(pings), "ping_values": pings,
            "daemon_cpu_pct": 100.0 * cpu / (seconds + late),
            "node_cpu_pct": 100.0 * (node1[0] - node0[0]) / max(1, node1[1] - node0[1]),
            "acked_in_window": intake1.get("acked", 0) - intake0.get("acked", 0) if queue else None,
            "done_in_window": done, "queue_left": left, "problems": problems}


def intake_latency(ctx, broker) -> dict:
    """Reaction latency with an intake running: (a) the reference batch alone, (b) next to a queue
    batch consuming tiny tasks, and (full runs only) (c) next to the same tiny tasks in the request,
    which tells the intake's share from that of the extra spawning; interleaved."""
    t_start = time.monotonic()
    seconds, warmup = (2.0, 0.5) if ctx.quick else (10.0, 1.0)
    trials = 1 if ctx.quick else 3
    nmsg = 500 if ctx.quick else 5000
    conds = ["alone", "queue"] + ([] if ctx.quick else ["request"])
    queues = [f"bench-latency-{t}" for t in range(trials)]
    lines = (LATENCY_TINY_ARG + "\n") * nmsg
    for q in queues:  # every queue filled before the daemon starts, so no fill overlaps a window
        timed_run([*PMLMCTL, "enqueue", "--amqp", broker.url, "--queue", q, "--tasks-file", "-"], lines)
    raw: dict[str, list[dict]] = {c: [] for c in conds}
    with Daemon(ctx.tmp / "latency-daemon", DAEMON_RELAXED.format(max_workers=64)) as d:
        time.sleep(0.3)
        for trial in range(trials):
            for c in conds:
                second = {"alone": None,
                          "queue": ["--amqp", broker.url, "--queue", queues[trial], "-j", str(LATENCY_J), "--",
                                    "sleep"],
                          "request": ["-n", "100000", "-j", str(LATENCY_J), "--", "sleep", LATENCY_TINY_ARG]}[c]
                r = latency_window(d, seconds, warmup, second, broker, queues[trial] if c == "queue" else None)
                raw[c].append(r)
                dec = r["decisions"]
                log(f"  queue latency: trial {trial + 1}, {c}: {dec.get('n', 0)} decisions, median "
                    f"{fmt(dec.get('median'), 2)} ms, max {fmt(dec.get('max'), 2)} ms, daemon CPU "
                    f"{r['daemon_cpu_pct']:.0f} %, node CPU {r['node_cpu_pct']:.0f} %"
                    + (f", tasks done {r['done_in_window']}" if second else "")
                    + (f", acked {r['acked_in_window']}, {r['queue_left']} left" if c == "queue" else "")
                    + (f", PROBLEMS {r['problems']}" if r["problems"] else ""))
    labels = {"alone": "(a) reference batch alone",
              "queue": f"(b) + a queue batch consuming (submit --amqp -j {LATENCY_J} -- sleep; "
                       f"messages \"{LATENCY_TINY_ARG}\")",
              "request": f"(c) + the same tasks in the request (-n 100000 -j {LATENCY_J} -- sleep {LATENCY_TINY_ARG})"}

    def worst(s):  # p99 by nearest rank, or the maximum under 100 values
        if not s.get("n"):
            return None
        return s["p99"] if s["n"] >= 100 else s["max"]

    def ratio(a, b):
        return fmt(a / b, 2) if a is not None and b else "–"

    dec = {c: stats([x for r in raw[c] for x in r["latencies"]]) for c in conds}
    ping = {c: stats([x for r in raw[c] for x in r["ping_values"]]) for c in conds}
    rows, problems = [], []
    for c in conds:
        row = {"condition": labels[c], "windows": len(raw[c]),
               "decisions (per window)": f"{dec[c].get('n', 0)} ("
                                         + "; ".join(str(r["decisions"].get("n", 0)) for r in raw[c]) + ")",
               "sample→signal median ms": fmt(dec[c].get("median"), 2),
               "p99 ms (max under 100)": fmt(worst(dec[c]), 2), "max ms": fmt(dec[c].get("max"), 2),
               "window medians ms": "; ".join(fmt(r["decisions"].get("median"), 2) for r in raw[c]),
               "pings": ping[c].get("n", 0), "ping median ms": fmt(ping[c].get("median"), 2),
               "ping p99 ms (max under 100)": fmt(worst(ping[c]), 2), "ping max ms": fmt(ping[c].get("max"), 1),
               "daemon CPU % of a core (per window)": "; ".join(f"{r['daemon_cpu_pct']:.0f}" for r in raw[c]),
               "node CPU % (per window)": "; ".join(f"{r['node_cpu_pct']:.0f}" for r in raw[c])}
        if c != "alone":
            row["÷ (a): median; p99"] = (f"{ratio(dec[c].get('median'), dec['alone'].get('median'))}; "
                                         f"{ratio(worst(dec[c]), worst(dec['alone']))}")
            row["÷ (a) ping: median; p99"] = (f"{ratio(ping[c].get('median'), ping['alone'].get('median'))}; "
                                              f"{ratio(worst(ping[c]), worst(ping['alone']))}")
            row["tasks done in window"] = "; ".join(str(r["done_in_window"]) for r in raw[c])
        if c == "queue":
            row["acked in window (left on queue)"] = "; ".join(f"{r['acked_in_window']} ({r['queue_left']})"
                                                               for r in raw[c])
        problems += [f"{labels[c]}, trial {i + 1}: {p}" for i, r in enumerate(raw[c]) for p in r["problems"]]
        row["_decisions"] = dec[c]
        row["_pings"] = ping[c]
        row["_raw"] = [{k: v for k, v in r.items() if k not in ("latencies", "ping_values")} for r in raw[c]]
        rows.append(row)
    return {"rows": rows, "problems": problems, "seconds": seconds, "trials": trials, "nmsg": nmsg, "conds": conds,
            "warmup": warmup, "took_s": time.monotonic() - t_start}


def scenario_queue(ctx) -> dict:
    title = "8. Many nodes: tasks from a queue"
    brokerlib = load_test_broker()
    if not brokerlib.available():
        return {"title": title, "rows": [{"result": f"skipped: {brokerlib.RABBITMQ_SERVER} or {brokerlib.EPMD} is "
                                                    "not installed (Debian package rabbitmq-server)"}], "notes": []}
    try:
        import pika  # noqa: F401  (the intake and `pmlmctl enqueue` need it)
    except ImportError:
        return {"title": title, "rows": [{"result": "skipped: pika is not installed (Debian package python3-pika)"}],
                "notes": []}
    need_parallel()
    n = 100 if ctx.quick else 2000
    j = 16
    trials = 1 if ctx.quick else 3
    seq = "\n".join(map(str, range(n))) + "\n"
    config = DAEMON_RELAXED.format(max_workers=1100)
    raw: dict[str, list[dict]] = {k: [] for k in ("enqueue", "queue1", "queue3", "request", "parallel", "xargs")}
    broker = brokerlib.Broker()
    t_broker = time.monotonic()
    try:
        broker.start()
        broker_start_s = time.monotonic() - t_broker
        beam = broker.beam_pid()
        with contextlib.ExitStack() as stack:
            nodes = [stack.enter_context(Daemon(ctx.tmp / f"node-{i + 1}", config)) for i in range(3)]
            time.sleep(0.5)
            for trial in range(trials):  # interleaved, so drifts of the machine hit every way alike
                for key, used in (("queue1", nodes[:1]), ("queue3", nodes)):
                    queue = f"bench-{trial}-{key}"
                    enq = timed_run([*PMLMCTL, "enqueue", "--amqp", broker.url, "--queue", queue, "--tasks-file", "-"],
                                    seq)
                    raw["enqueue"].append({"wall_s": enq})
                    r = queue_trial(used, broker.url, queue, n, j, beam)
                    left = broker.count(queue)
                    if left:
                        r["problems"].append(f"{left} messages left on the queue")
                    raw[key].append(r)
                    log(f"  queue: trial {trial + 1}, {len(used)} node(s): {r['wall_s']:.2f} s, acked {r['acked']}"
                        + (f", PROBLEMS {r['problems']}" if r["problems"] else ""))
                c0 = cpu_seconds(nodes[0].pid)
                wall = timed_run([*PMLMCTL, "--socket", nodes[0].socket, "submit", "--wait", "-n", str(n), "-j", str(j),
                                  "--", "/bin/true"], None)
                raw["request"].append({"wall_s": wall, "cpu_s": cpu_seconds(nodes[0].pid) - c0})
                raw["parallel"].append({"wall_s": timed_run(["parallel", "-j", str(j), "-N0", "/bin/true"], seq)})
                raw["xargs"].append({"wall_s": timed_run(["xargs", "-P", str(j), "-n", "1", "/bin/true"], seq)})
                log(f"  queue: trial {trial + 1} done")
        lat = intake_latency(ctx, broker)  # the three nodes are closed by now
    finally:
        broker.close()

    def rate(key):
        return stats([n / t["wall_s"] for t in raw[key]])

    par, xa = rate("parallel")["median"], rate("xargs")["median"]
    req = rate("request")["median"]
    plain_cpu = [t["cpu_s"] / n * 1000 for t in raw["request"]]
    labels = {"queue1": f"pmlmd, 1 node: queue (submit --amqp --until-empty -j {j})",
              "queue3": f"pmlmd, 3 nodes: queue (each submit --amqp --until-empty -j {j})",
              "request": f"pmlmd, 1 node: tasks in the request (submit --wait -n {n} -j {j})",
              "parallel": f"GNU parallel -j {j}", "xargs": f"xargs -P {j}"}
    rows = []
    problems = []
    for key, label in labels.items():
        ts = raw[key]
        s = rate(key)
        row = {"way": label, "tasks": n, "trials": len(ts), "tasks/s median (min–max)": mmm(s, 0),
               "wall s median (min–max)": mmm(stats([t["wall_s"] for t in ts]), 2),
               "÷ tasks in the request": fmt(s["median"] / req, 2), "÷ GNU parallel": fmt(s["median"] / par, 2),
               "÷ xargs": fmt(s["median"] / xa, 2)}
        if key in ("queue1", "queue3", "request"):
            cpu = [t["cpu_s"] / n * 1000 for t in ts]
            row["daemon CPU ms/task (all nodes)"] = mmm(stats(cpu), 2)
            if key != "request":
                row["intake cost ms/task"] = mmm(stats([c - p for c, p in zip(cpu, plain_cpu)]), 2)
                row["broker CPU ms/task"] = mmm(stats([t["broker_cpu_s"] / n * 1000 for t in ts
                                                       if t["broker_cpu_s"] is not None]), 2)
                row["acked per node, each trial"] = "; ".join("/".join(map(str, t["acked"])) for t in ts)
                problems += [f"{label}, trial {i + 1}: {p}" for i, t in enumerate(ts) for p in t["problems"]]
        row["_stats"] = s
        row["_raw"] = ts
        rows.append(row)
    enq = stats([n / t["wall_s"] for t in raw["enqueue"]])
    rows.append({"way": f"pmlmctl enqueue of the {n} tasks (timed apart, not in the figures above)", "tasks": n,
                 "trials": len(raw["enqueue"]), "tasks/s median (min–max)": mmm(enq, 0),
                 "wall s median (min–max)": mmm(stats([t["wall_s"] for t in raw["enqueue"]]), 2), "_stats": enq})
    notes = [f"{n} x /bin/true, -j {j} on each node, {trials} trial(s) interleaved (1 node, 3 nodes, tasks in the "
             "request, GNU parallel, xargs); each queue run has a queue of its own, filled first by `pmlmctl "
             "enqueue` (timed apart)",
             "a node is a pmlmd of its own (own socket and state dir; cpu_limit 100, cpu_margin 0, memfree_limit 5, "
             f"max_workers 1100, scope_backend none); the 3 \"nodes\" share this machine's {os.cpu_count()} cores, so "
             "the 3-node figure shows the protocol's overhead, not scale-out",
             "queue wall: from the first `pmlmctl submit` (its Python start-up included) until the bench, polling "
             "each batch's status every 0.1 s, sees every batch ended; tasks in the request: the wall time of "
             "`pmlmctl submit --wait` (which polls every 0.25 s); GNU parallel and xargs: the whole command, "
             "inputs on stdin",
             "daemon CPU: utime+stime of the pmlmd processes (all threads, the intake's included) from /proc/PID/stat "
             "across the run, summed over the nodes used, ÷ tasks; intake cost = that − the same daemon's per-task "
             "CPU for the tasks-in-the-request batch of the same trial; broker CPU: the broker's Erlang VM "
             "(beam.smp) over the consuming run",
             f"a private RabbitMQ (tests/broker.py, started in {broker_start_s:.1f} s, closed at the end)"]
    if problems:
        notes.append("PROBLEMS: " + "; ".join(problems))
    lat_notes = [
        f"reaction latency with an intake running: one more daemon (max_workers 64, otherwise as the nodes), "
        f"started after the three nodes were closed; a reference batch `submit {' '.join(LATENCY_REF)}` (as in "
        f"7) so the governor admits workers all along; {lat['seconds']:g} s windows, {lat['trials']} trial(s), "
        "conditions interleaved: " + ", ".join(lat["conds"]) + f"; each window starts {lat['warmup']:g} s after "
        f"the submits and ends with both batches cancelled and waited for; this part took {lat['took_s']:.0f} s "
        "(queue fills included)",
        "sample→signal: the latency_ms of each governor decision on the reference batch inside the window (from "
        "the node sample to the signal/spawn it caused), followed live by a client of its own (`events --follow` "
        "for that batch: the daemon keeps only its last 2000 events for a plain `events`, a few seconds' worth "
        "here), pooled over the windows; p99 by nearest rank, the "
        "maximum when under 100; ping: a separate client, a `ping` every 50 ms; ÷ (a): this condition's figure "
        "÷ the reference batch alone's",
        f"queue batch: `submit --amqp URL --queue Q -j {LATENCY_J} -- sleep` (not --until-empty: cancelled), "
        f"its queue (one per trial) filled beforehand with {lat['nmsg']} messages \"{LATENCY_TINY_ARG}\" (so "
        f"each task is `sleep {LATENCY_TINY_ARG}`) by `pmlmctl enqueue`, before "
        "the daemon started; acked in window from the batch's intake counters at the window's start and end; "
        "left on queue: ready messages at the window's end (the queue must not run dry)"
        + ("" if ctx.quick else "; (c), tasks in the request, has the same spawning without an intake"),
        f"the second batch runs `sleep {LATENCY_TINY_ARG}`, not /bin/true: next to the reference batch the "
        "governor admitted /bin/true one at a time (bound by cpu: a task that ends within milliseconds is "
        "measured at a large CPU share) and, after a high node sample, not at all, so the intake idled",
        "daemon CPU: utime+stime of pmlmd (all threads) over the window, % of one core; node CPU: busy share of "
        "all cores over the window from /proc/stat (everything on the machine, the tasks and the broker included)"]
    if lat["problems"]:
        lat_notes.append("PROBLEMS: " + "; ".join(lat["problems"]))
    return {"title": title, "rows": rows, "notes": notes,
            "tables": [{"caption": "Reaction latency with an intake running", "rows": lat["rows"],
                        "notes": lat_notes}]}


# ---------------------------------------------------------------- driver

SCENARIOS = {"memory": scenario_memory, "cpu": scenario_cpu, "fairness": scenario_fairness,
             "overhead": scenario_overhead, "throughput": scenario_throughput, "goodput": scenario_goodput,
             "scale": scenario_scale,
             "reads": scenario_reads, "queue": scenario_queue}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "mem_total_gib": round(meminfo()["MemTotal"] / (1 << 30), 1),
            "mem_available_gib_at_start": round(meminfo()["MemAvailable"] / (1 << 30), 1),
            "kernel": platform.release(), "python": platform.python_version(), "parallel": parallel_version(),
            "xargs": subprocess.run(["xargs", "--version"], capture_output=True, text=True).stdout.splitlines()[0]}


def md_table(rows: list[dict], notes: list[str]) -> list[str]:
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out + [""] + [f"- {n}" for n in notes]


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [f"# pmlmd benchmarks, {result['date']}{' (--quick)' if result['quick'] else ''}", "",
           f"{m['cpu']}, {m['cores']} cores, {m['mem_total_gib']} GiB ({m['mem_available_gib_at_start']} GiB available "
           f"at start), Linux {m['kernel']}, Python {m['python']}, {m['parallel']}, {m['xargs']}", ""]
    for name, sc in result["scenarios"].items():
        out.append(f"## {sc.get('title', name)}")
        out.append("")
        if "error" in sc:
            out += [f"FAILED: {sc['error']}", ""]
            continue
        out += md_table(sc["rows"], sc.get("notes", []))
        for t in sc.get("tables", []):  # further tables of the same scenario, each with its notes
            out += ["", f"### {t['caption']}", ""] + md_table(t["rows"], t.get("notes", []))
        out.append(f"- took {sc['seconds']:.0f} s")
        out.append("")
    out.append(f"Total: {result['seconds']:.0f} s")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="every scenario tiny (CI smoke test; no timing asserts)")
    p.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="run only this scenario (repeatable)")
    p.add_argument("--out-dir", default=str(BENCH / "results"))
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # GNU parallel -j 500 needs file handles
    names = a.only or list(SCENARIOS)
    t_all = time.monotonic()
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S"), "quick": a.quick, "machine": machine(),
              "scenarios": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="pmlm-bench-") as tmp:
        class Ctx:
            pass
        ctx = Ctx()
        ctx.quick = a.quick
        for name in names:
            ctx.tmp = Path(tmp) / name
            ctx.tmp.mkdir()
            log(f"== {name}")
            t0 = time.monotonic()
            try:
                sc = SCENARIOS[name](ctx)
            except Exception as e:  # report and go on with the next scenario; exit status says it failed
                import traceback
                traceback.print_exc()
                sc = {"title": name, "error": f"{type(e).__name__}: {e}", "rows": []}
                failed = True
            sc["seconds"] = time.monotonic() - t0
            log(f"   {name}: {sc['seconds']:.1f} s")
            result["scenarios"][name] = sc
    result["seconds"] = time.monotonic() - t_all
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result["date"] + ("-quick" if a.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / (stem + '.json')} and .md")
    return 1 if failed else 0
