"""``python3 -m pmlmd`` starts the daemon."""

import sys

from .daemon import main

sys.exit(main())
