"""`python3 -m tests.lab.cleanup`: remove labs left behind by a crashed or killed run.

Only labs recorded in /run/shuttled-lab whose owning process is gone are touched.
"""

from __future__ import annotations

import sys

from .core import cleanup_stale


def main() -> int:
    cleaned = cleanup_stale(verbose=True)
    print(f"{len(cleaned)} stale lab(s) cleaned" if cleaned else "no stale labs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
