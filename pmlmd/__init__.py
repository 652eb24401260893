"""pmlmd: Process & Load Manager daemon.

Runs batches of worker processes and keeps the node inside a CPU-usage limit and a
free-memory limit by pausing, continuing, terminating and admitting workers.
"""

__version__ = "0.1.0"
