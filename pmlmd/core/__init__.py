"""Policy and the types everything else shares; no I/O, no clock reads.

The governor (which workers to pause, continue, terminate, admit), the worker lifecycle (a
worker's states and transitions), batches and their reports, the limit options, and the wire
types of the control protocol (requests, replies, events). Every input arrives in the arguments,
the time included, so tests drive it with tables and a fake clock.
"""
