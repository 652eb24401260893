"""The bench's sampler: a separate process reading /proc/meminfo (and a watched pid's state) every ~1 ms.

  probe.py --metric available|parallel --threshold BYTES --out FILE [--pidfile F --termfile F]
           [--period S] [--timeout S] [--until-reaction] [--stopfile F]

metric "available" is MemAvailable (what pmlmd uses by default); "parallel" is what GNU parallel
computes: MemFree + Buffers + Cached + SwapCached. Times are time.monotonic() (CLOCK_MONOTONIC).
Writes JSON: cross (first sample below the threshold), stop (first sample seeing the watched pid
in state T, or its cgroup v2 frozen: cgroup.events "frozen 1", as pmlmd's cgroup backend pauses, and
not continued while memory still falls: a stop is containment only if, within HOLD seconds after it,
the pid is not seen running again with the figure more than SLACK below its value at the stop; GNU
parallel's --memsuspend stops every job and at once continues those it keeps running, a blink that
is not scored), term (the hog's SIGTERM-handler time), below_s (time spent below the threshold),
breaches (how often it went below), lowest (lowest value seen), samples.
"""
import argparse
import json
import os
import time

HOLD = 0.3  # seconds a stop is watched before it counts (with --until-reaction)
SLACK = 16 << 20  # bytes the figure may fall after a stop that was undone, and it still counts


def open_cgroup_events(pid: int) -> int | None:
    """The cgroup.events of the pid's own cgroup v2 (not the root), or None."""
    with open(f"/proc/{pid}/cgroup") as f:
        relative = next((line[3:].strip() for line in f if line.startswith("0::")), "/")
    if relative == "/":
        return None
    with open("/proc/self/mountinfo") as f:
        mount = next((line.split()[4] for line in f if " - cgroup2 " in line), None)
    if mount is None:
        return None
    try:
        return os.open(os.path.join(mount, relative.lstrip("/"), "cgroup.events"), os.O_RDONLY)
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--metric", choices=("available", "parallel"), default="available")
    p.add_argument("--threshold", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pidfile")
    p.add_argument("--termfile")
    p.add_argument("--stopfile")
    p.add_argument("--period", type=float, default=0.001)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--until-reaction", action="store_true")
    a = p.parse_args()
    keys = (b"MemAvailable:",) if a.metric == "available" else (b"MemFree:", b"Buffers:", b"Cached:", b"SwapCached:")
    fd = os.open("/proc/meminfo", os.O_RDONLY)
    pid = None
    stat_fd = events_fd = None
    cross = stop = term = None
    at_stop = None  # the figure when the stop was seen
    undone = 0  # stops seen and then undone while memory kept falling
    below_s = 0.0
    breaches = 0
    lowest = None
    samples = 0
    was_below = False
    last = time.monotonic()
    deadline = last + a.timeout
    while True:
        now = time.monotonic()
        data = os.pread(fd, 8192, 0)
        value = 0
        for line in data.split(b"\n"):
            if line.startswith(keys):
                value += int(line.split()[1]) * 1024
        samples += 1
        below = value < a.threshold
        if below:
            below_s += now - last if was_below else 0.0
            if not was_below:
                breaches += 1
            if cross is None:
                cross = now
        was_below = below
        last = now
        lowest = value if lowest is None else min(lowest, value)
        if pid is None and a.pidfile and os.path.exists(a.pidfile):
            try:
                pid = int(open(a.pidfile).read())
                stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
                events_fd = open_cgroup_events(pid)
            except (ValueError, OSError):
                pid = None
        if stat_fd is not None:
            try:
                s = os.pread(stat_fd, 512, 0)
                stopped = bool(s) and (s[s.rindex(b")") + 2:s.rindex(b")") + 3] in (b"T", b"t") or (
                    events_fd is not None and b"frozen 1" in os.pread(events_fd, 256, 0)))
                if stop is None and stopped:
                    stop, at_stop = now, value
                elif stop is not None and not stopped and now - stop < HOLD and value < at_stop - SLACK:
                    stop, at_stop, undone = None, None, undone + 1  # continued while still growing
            except (OSError, ValueError):
                stat_fd = None
        if term is None and a.termfile and os.path.exists(a.termfile):
            try:
                term = float(open(a.termfile).read())
            except (ValueError, OSError):
                pass
        if a.until_reaction and ((stop is not None and now - stop >= HOLD) or term is not None):
            break
        if now > deadline or (a.stopfile and os.path.exists(a.stopfile)):
            break
        time.sleep(a.period)
    with open(a.out, "w") as f:
        json.dump({"cross": cross, "stop": stop, "term": term, "below_s": below_s, "breaches": breaches,
                   "lowest": lowest, "samples": samples, "threshold": a.threshold, "metric": a.metric,
                   "undone": undone}, f)


if __name__ == "__main__":
    main()
