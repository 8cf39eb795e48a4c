"""Pure helpers the unit and integration tests share: running coroutines, an event loop in a
thread, and recording stand-ins for the product's callback interfaces.

Helpers bound to the namespace lab live in tests/lab; pytest fixtures in the conftest.py
files. Test modules (``test_*.py``) import from these, never from one another
(tests/unit/test_test_layout.py checks that).
"""

from __future__ import annotations

import asyncio
import functools
import re
import textwrap
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest

from shuttled.config import ConfigErrors, load_config
from shuttled.firewall.base import Backend, Capture
from shuttled.tunnel.channels import Channel

T = TypeVar("T")
P = ParamSpec("P")


def run_async(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run `coro` to its end in a fresh event loop; with `timeout`, bounded by it
    (``asyncio.TimeoutError`` past it)."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def async_test(timeout: float) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, None]]:
    """Decorator: the async test body runs through `run_async`, bounded by `timeout`.
    Its signature is kept, so that pytest still sees its fixtures and parameters."""

    def decorate(coro_fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
        @functools.wraps(coro_fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            run_async(coro_fn(*args, **kwargs), timeout)

        return wrapper

    return decorate


class LoopThread:
    """An event loop running in a daemon thread, so that blocking clients in the test's
    thread can talk to asyncio servers on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        """Run `coro()` on the loop; wait for its result in the calling thread."""
        return asyncio.run_coroutine_threadsafe(coro(), self.loop).result(timeout)

    def start_loop(self) -> None:
        self._thread.start()

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RecordingBackend(Backend):
    """A firewall backend that records the captures each transaction installs (``[]`` for
    a removal) in `applied`; nothing reaches a kernel."""

    name = "recorder"
    applied: list[list[Capture]]

    def __init__(self) -> None:
        super().__init__()
        self.applied = []

    @classmethod
    def unsupported_reason(cls) -> str | None:
        return None

    @classmethod
    def instances(cls) -> list[str]:
        return []

    def render(self, captures: Sequence[Capture]) -> str:
        return ""

    def apply(self, captures: Sequence[Capture]) -> None:
        self.applied.append(list(captures))

    def remove(self) -> None:
        self.applied.append([])


class ChannelEvents:
    """A channel's handler that records what the mux tells it: `events` in order ("open",
    ("failed", reason, description), ("stderr", data), "eof", "close"), the bytes in
    `data`, and whether reading is `paused`."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.data = bytearray()
        self.paused = False
        self.channel: Channel | None = None

    def on_open(self, channel: Channel) -> None:
        self.channel = channel
        self.events.append("open")

    def on_open_failed(self, reason: int, description: str) -> None:
        self.events.append(("failed", reason, description))

    def on_data(self, data: memoryview) -> None:
        self.data += data

    def on_extended_data(self, code: int, data: bytes) -> None:
        self.events.append(("stderr", data))

    def on_eof(self) -> None:
        self.events.append("eof")

    def on_close(self) -> None:
        self.events.append("close")

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


# --- the Prometheus text format, read strictly ------------------------------------------------

_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_PROM_SAMPLE = re.compile(
    rf"(?P<name>{_METRIC_NAME})"
    rf"(?:\{{(?P<labels>{_PROM_LABEL.pattern}(?:,{_PROM_LABEL.pattern})*)\}})? "
    r"(?P<value>[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf|NaN))"
)
_PROM_META = re.compile(rf"# (HELP|TYPE) ({_METRIC_NAME}) (.*)")
_PROM_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

PromSeries = tuple[str, tuple[tuple[str, str], ...]]  # name, labels in their order


def parse_prometheus(text: str) -> dict[PromSeries, float]:
    """Every sample of a text exposition (format 0.0.4), read by its grammar and then some:
    AssertionError unless each family has one HELP and one TYPE (counter or gauge) before
    its samples, its samples together, counters end in _total and gauges do not, and no
    series repeats."""
    assert text.endswith("\n") and "\n\n" not in text, "lines end in one newline each"
    samples: dict[PromSeries, float] = {}
    meta: dict[str, dict[str, str]] = {}
    done: set[str] = set()  # families whose samples are behind us
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            found = _PROM_META.fullmatch(line)
            assert found, f"{where}: not a HELP or TYPE line"
            kind, name, rest = found.groups()
            assert name not in done and kind not in meta.setdefault(name, {}), f"{where}: again"
            meta[name][kind] = rest
            if current != name:
                done.add(current)
            current = name
            continue
        found = _PROM_SAMPLE.fullmatch(line)
        assert found, f"{where}: not a sample"
        name = found.group("name")
        assert name == current and set(meta[name]) == {"HELP", "TYPE"}, f"{where}: out of place"
        labels = tuple(
            (key, re.sub(r"\\.", lambda m: _PROM_ESCAPES[m.group(0)], value))
            for key, value in _PROM_LABEL.findall(found.group("labels") or "")
        )
        assert len({k for k, _ in labels}) == len(labels), f"{where}: a label twice"
        assert (name, labels) not in samples, f"{where}: a series twice"
        samples[(name, labels)] = float(found.group("value"))
    for name, lines in meta.items():
        assert lines.get("TYPE") in ("counter", "gauge"), f"{name}: TYPE {lines.get('TYPE')}"
        assert (lines["TYPE"] == "counter") == name.endswith("_total"), f"{name}: _total"
    return samples


def write_config(directory: Path, name: str, text: str) -> Path:
    """One file of a config directory (its text dedented)."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_errors(directory: Path) -> list[str]:
    """Every error load_config finds in the directory (it must find one)."""
    with pytest.raises(ConfigErrors) as info:
        load_config(directory)
    return list(info.value.errors)
