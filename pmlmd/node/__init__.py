"""Sensing and control of the node: what the kernel says and what it is asked to do.

/proc and cgroup v2 readings, process trees, spawning and signalling workers, systemd scopes
over D-Bus, sd_notify and journald, the agent channel to cooperative workers, the files a
worker's output goes to. Imports core for its types; never the engine, the daemon or a client.
"""
