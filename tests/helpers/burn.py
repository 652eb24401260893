"""A CPU burner for tests: spins until it has used SECONDS of CPU time (or WALL_CAP of wall time).

Usage: burn.py CPU_SECONDS [DELAY_SECONDS] [WALL_CAP_SECONDS]
Sleeps DELAY first (a worker whose CPU use starts late), then burns. Bounded both
in CPU time and in wall time, so a stuck test can never leave it spinning.
"""
import sys
import time

cpu_seconds = float(sys.argv[1])
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
wall_cap = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
start = time.monotonic()
time.sleep(delay)
while time.process_time() < cpu_seconds and time.monotonic() - start < wall_cap:
    for _ in range(10000):
        pass
