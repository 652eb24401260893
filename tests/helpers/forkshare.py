"""A worker whose children share its memory: allocates 100 MiB, forks 5 children that hold it.

Usage: forkshare.py SECONDS. The children sleep SECONDS (bounded by the caller), the parent
waits for them. Counted per process (RSS summed) it looks like 600 MiB; it uses 100 MiB.
"""
import os, sys, time
data = bytearray(100 << 20)
data[::4096] = b"\x01" * len(range(0, len(data), 4096))
kids = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        time.sleep(float(sys.argv[1]))
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
