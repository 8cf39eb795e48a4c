"""systemd's two sockets in pure Python: sd_notify and the journal's native protocol.

No systemd-python: it has no wheel on PyPI, so `pip install` would build it from source
and fail without gcc, pkg-config, libsystemd-dev and python3-dev (README, Install). Both
protocols are one datagram each, documented as stable (sd_notify(3), systemd.journal-fields
and "Native Journal Protocol"):

- NOTIFY_SOCKET: a path, or "@name" for the abstract namespace; "READY=1" etc. as text.
- /run/systemd/journal/socket: "FIELD=value\\n" lines; a value holding a newline is sent
  as "FIELD\\n", its length (64-bit little-endian), the bytes and "\\n".

A record the journal refuses (too big for one datagram, socket gone) goes to stderr with a
"<N>" priority prefix, which journald reads from a service's stderr (SyslogLevelPrefix=).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "shuttled"

log = logging.getLogger(__name__)


def _notify_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    return value if value.startswith("/") else None  # vsock: and the like: not ours


def notify(message: str) -> None:
    """sd_notify: silently a no-op outside systemd (no NOTIFY_SOCKET)."""
    address = _notify_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:  # the manager went away: nothing to tell
        log.debug("sd_notify failed: %s", exc)


def syslog_priority(level: int) -> int:
    """logging's level as syslog's: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


def journal_field(name: str, value: str) -> bytes:
    data = value.encode(errors="replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


class JournalHandler(logging.Handler):
    """Records as journal entries, with the record's upper-case extras (PROFILE=) as fields."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields: dict[str, str | None] = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        extras = {k: str(v) for k, v in vars(record).items() if k.isupper()}
        return {k: v for k, v in (fields | extras).items() if v}  # an empty field: none

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
            datagram = b"".join(journal_field(k, v) for k, v in fields.items())
            self.sock.sendto(datagram, self.path)
        except OSError:  # too big for one datagram, or no journald: stderr still reaches it
            self._to_stderr(record)
        except Exception:
            self.handleError(record)

    def _to_stderr(self, record: logging.LogRecord) -> None:
        text = self.format(record).replace("\n", " ")
        sys.stderr.write(f"<{syslog_priority(record.levelno)}>{IDENTIFIER}: {text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        self.sock.close()
        super().close()
