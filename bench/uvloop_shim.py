"""Run `shuttled` under uvloop, for the bench's uvloop experiment (not a shuttled feature).

    python3 bench/uvloop_shim.py SOURCE_DIR run -e ... -r srv NETS...

(SOURCE_DIR holds the shuttled package to run: the bench's snapshot.)

shuttled runs under uvloop unchanged now. The shim was written for two blockers, both
since fixed in shuttled/:

- transports were checked with ``isinstance(transport, asyncio.Transport)``, which
  uvloop's transports fail (they implement the interface without subclassing it);
  shuttled casts instead (tunnel/proxy.py, tunnel/channels.py, dns/listeners.py);
- data that arrived while a connection's channel was still opening was dropped, since
  uvloop starts reading despite ``pause_reading()`` in ``connection_made``;
  ``LocalConnection`` (tunnel/proxy.py) keeps it and sends it once the channel opens.

The shim only installs uvloop's event loop and runs the `shuttled` command.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(
    0, sys.argv.pop(1) if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent)
)

import uvloop


def main() -> None:
    uvloop.install()
    sys.argv = ["shuttled", *sys.argv[1:]]
    runpy.run_module("shuttled", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
