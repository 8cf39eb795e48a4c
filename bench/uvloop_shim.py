"""Run `shuttled` under uvloop, for the bench's uvloop experiment (not a shuttled feature).

    python3 -O bench/uvloop_shim.py SOURCE_DIR run -e ... -r srv NETS...

(SOURCE_DIR holds the shuttled package to run: the bench's snapshot.)

shuttled runs under uvloop unchanged now. The shim was written for two blockers, both
since fixed in shuttled/:

- transports were checked with ``isinstance(transport, asyncio.Transport)``, which
  uvloop's transports fail (they implement the interface without subclassing it);
  shuttled casts instead (tunnel/proxy.py, tunnel/channels.py, dns/listeners.py);
- data that arrived while a connection's channel was still opening was dropped, since
  uvloop starts reading despite ``pause_reading()`` in ``connection_made``;
  ``LocalConnection`` (tunnel/proxy.py) keeps it and sends it once the channel opens.

What is left below no longer changes what runs: every sender holds its data until its
channel is open, so the two ``Channel`` patches always fall through to the originals,
and ``-O`` only turns shuttled's asserts off. Both can go; until they do, this contender
runs the same code as ``shuttled``, under uvloop, without asserts.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(
    0, sys.argv.pop(1) if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent)
)

import uvloop

from shuttled.tunnel import channels

_send = channels.Channel.send
_on_confirm = channels.Channel._on_confirm


def _send_even_while_opening(self: channels.Channel, data: Any) -> None:
    if self.state is channels.State.OPENING and data and not (self.close_sent or self.eof_sent):
        self._queue(memoryview(bytes(data)))
        return
    _send(self, data)


def _confirm_then_drain(
    self: channels.Channel, remote_id: int, window: int, max_packet: int
) -> None:
    _on_confirm(self, remote_id, window, max_packet)
    if self._pending_size and self.state is channels.State.OPEN and not self.close_sent:
        self._drain_pending()


def main() -> None:
    channels.Channel.send = _send_even_while_opening  # type: ignore[method-assign]
    channels.Channel._on_confirm = _confirm_then_drain  # type: ignore[method-assign]
    uvloop.install()
    sys.argv = ["shuttled", *sys.argv[1:]]
    runpy.run_module("shuttled", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
