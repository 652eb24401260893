"""``pmlmd``, the long-running service: the control socket, users and quotas, the state file.

``service`` holds the daemon (``main`` is /usr/sbin/pmlmd); ``store`` the SQLite state,
``config`` pmlmd.toml, ``outbox`` what waits for clients that do not read.
"""
