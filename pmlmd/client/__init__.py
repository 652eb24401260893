"""``pmlmctl``: the command line (``ctl``), the control-socket client (``connection``) and
``pmlmctl run``'s one-batch front end to the engine (``runner``, loaded only by ``run``).

Importing this package loads nothing; ``ctl`` loads the protocol and the connection, not the
engine, D-Bus or systemd (tests/test_cli.py checks it).
"""
