"""Run `shuttled` under uvloop, for the bench's uvloop experiment (not a shuttled feature).

    python3 -O bench/uvloop_shim.py SOURCE_DIR run -e ... -r srv NETS...

(SOURCE_DIR holds the shuttled package to run: the bench's snapshot.)

Two things keep shuttled (as of this bench) from running under uvloop unchanged, and this
shim works around both from the outside, without editing shuttled/:

- ``assert isinstance(transport, asyncio.Transport)``: uvloop's transports implement the
  interface without subclassing it; run with ``python -O`` so the asserts are skipped.
- ``LocalConnection.connection_made`` pauses reading until the channel opens; under uvloop
  reading starts anyway, and ``Channel.send`` drops data while the channel is still
  OPENING.  Here such data is queued on the channel and sent once the open is confirmed.
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
