"""A memory hog for tests: grows its resident memory in steps, holds it, then exits.

Usage: hog.py TOTAL_MB [STEP_MB] [STEP_SECONDS] [HOLD_SECONDS]
Allocates STEP_MB every STEP_SECONDS (touching every page, so it is really
resident) until TOTAL_MB, holds for HOLD_SECONDS, exits 0. Bounded in size and in
time; a paused hog simply resumes where it was.
"""
import sys
import time

total_mb = int(sys.argv[1])
step_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 25
step_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
hold_s = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
chunks = []
page = 4096
while len(chunks) * step_mb < total_mb:
    chunk = bytearray(step_mb << 20)
    chunk[::page] = b"\x01" * len(range(0, len(chunk), page))
    chunks.append(chunk)
    time.sleep(step_s)
time.sleep(hold_s)
