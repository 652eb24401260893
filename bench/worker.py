"""Workers for the benchmarks: a memory hog at a known rate, a fixed-size holder, a delayed CPU burner.

Every mode is bounded in memory and in wall time, so a worker nobody stops still ends.

  worker.py hog RATE_MB_S CAP_MB HOLD_S PIDFILE TERMFILE
      grows its resident memory at RATE_MB_S (1 MiB pages touched as it goes, checked every
      millisecond) up to CAP_MB, holds it HOLD_S, exits. Writes its pid to PIDFILE at start; on
      SIGTERM writes time.monotonic() (CLOCK_MONOTONIC, shared by every process) to TERMFILE and exits.
  worker.py hold SIZE_MB HOLD_S
      allocates and touches SIZE_MB at once, holds it HOLD_S, exits 0.
  worker.py burn IDLE_S BURN_S STARTFILE
      sleeps IDLE_S, appends "pid wall-time" to STARTFILE, then burns one CPU until BURN_S of wall
      time have passed (a stopped burner does not extend its life).
  worker.py work IDLE_S CPU_S MAX_S
      sleeps IDLE_S (admitted idle), then burns one CPU until it has used CPU_S of CPU time (a fixed
      amount of work, however often it is stopped), or MAX_S of wall time have passed.
"""
import os
import signal
import sys
import time

MIB = 1 << 20
PAGE = 4096


def touch(size: int) -> bytearray:
    chunk = bytearray(size)
    chunk[::PAGE] = b"\x01" * len(range(0, size, PAGE))
    return chunk


def hog(rate_mb_s: float, cap_mb: int, hold_s: float, pidfile: str, termfile: str) -> None:
    def on_term(signum, frame):
        now = time.monotonic()
        with open(termfile + ".tmp", "w") as f:
            f.write(repr(now))
        os.rename(termfile + ".tmp", termfile)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    chunks = []
    cap = cap_mb * MIB
    rate = rate_mb_s * 1e6  # bytes per second (MB/s, decimal, as the issue states the rates)
    t0 = time.monotonic()
    deadline = t0 + cap / rate + hold_s + 5.0
    have = 0
    while have < cap and time.monotonic() < deadline:
        want = min(cap, int((time.monotonic() - t0) * rate))
        while have + MIB <= want:
            chunks.append(touch(MIB))
            have += MIB
        time.sleep(0.001)
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        time.sleep(0.01)


def hold(size_mb: int, hold_s: float) -> None:
    data = touch(size_mb * MIB)
    time.sleep(hold_s)
    del data


def burn(idle_s: float, burn_s: float, startfile: str) -> None:
    time.sleep(idle_s)
    with open(startfile, "a") as f:
        f.write(f"{os.getpid()} {time.time()!r}\n")
    end = time.time() + burn_s
    x = 0
    while time.time() < end:
        for _ in range(10000):
            x += 1


def work(idle_s: float, cpu_s: float, max_s: float) -> None:
    end = time.monotonic() + max_s
    time.sleep(idle_s)
    x = 0
    while time.process_time() < cpu_s and time.monotonic() < end:
        for _ in range(10000):
            x += 1


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "hog":
        hog(float(args[0]), int(args[1]), float(args[2]), args[3], args[4])
    elif mode == "work":
        work(float(args[0]), float(args[1]), float(args[2]))
    elif mode == "hold":
        hold(int(args[0]), float(args[1]))
    elif mode == "burn":
        burn(float(args[0]), float(args[1]), args[2])
    else:
        sys.exit(f"unknown mode {mode}")
