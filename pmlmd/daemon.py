"""pmlmd: the long-running service. Until it lands, batches run with ``pmlmctl run``."""

import sys


def main() -> int:
    print("pmlmd: the daemon is not part of this release yet; run a batch in the foreground with "
          "'pmlmctl run -- COMMAND' (see pmlmctl run --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
