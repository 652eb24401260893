"""``python3 -m pmlmd`` starts the daemon."""

import sys

from .daemon.service import main

sys.exit(main())
