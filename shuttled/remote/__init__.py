"""The remote helper: the program the client uploads and the command that starts it.

Client side of the fallback path (sshd refuses forwarding, or UDP): open a
`session` channel on the master, send CHANNEL_REQUEST "exec" with
`loader_command(len(src), pythons)`, write `src = helper_source()` as channel
data, then wait (bounded) for the helper's hello, MSG_REQUEST_SUCCESS with
string "shuttled-helper 1" || string python version. From then on the session
channel's data carries the RFC 4254 channel messages described in
shuttled/remote/helper.py, both ways; its stderr (EXTENDED_DATA 1) carries
one-line diagnostics. Exit statuses of the session: see the HELPER_* codes.
"""

import functools
import re
import shlex
from pathlib import Path
from typing import Sequence

from shuttled.const import HELPER_NO_PYTHON_EXIT, REMOTE_PYTHONS

# Exit statuses of the remote command. 0, 3 and 70 are the helper's own
# (shuttled/remote/helper.py: EXIT_OK, EXIT_PROTOCOL, EXIT_INTERNAL).
HELPER_EXIT_OK = 0
HELPER_PROTOCOL_EXIT = 3  # the client sent a malformed or out-of-state packet
HELPER_INTERNAL_EXIT = 70  # a bug in the helper (one line on stderr says where)
HELPER_TRUNCATED_EXIT = 96  # stdin closed before the whole source arrived
# HELPER_NO_PYTHON_EXIT (97, shuttled.const): no python 3.8+ among those tried.
MIN_PYTHON = (3, 8)

HELPER_BANNER = "shuttled-helper 1"
# The loader's first output, before it reads the source: a login shell's rc files
# may print banners or junk on stdout before our command runs (sshuttle's users
# met this for years), so the client drops whatever comes before this line. A
# remote that never sends it ran something else than our command (ForceCommand).
HELPER_SYNC = b"<shuttled-helper-loader>\n"

_HERE = Path(__file__).resolve().parent
_WIRE_FILE = _HERE.parent / "tunnel" / "sshmsg.py"
_HELPER_FILE = _HERE / "helper.py"

# One line, no single quotes, no backslashes, no `!`: it survives shlex.quote
# twice and every login shell sshd may hand it to (sh, bash, dash, zsh, ksh,
# and csh/fish, which only see the outer `exec /bin/sh -c '...'`). It reads with
# os.read so that nothing past the source leaves the pipe.
_LOADER = (
    "import os,sys;"
    'os.write(1,b"{sync}"+chr(10).encode());'
    "n={size};b=bytearray();"
    '[b.extend(os.read(0,n-len(b))or(os.write(2,("shuttled: helper source truncated'
    ' at %d of %d bytes"%(len(b),n)+chr(10)).encode()),os._exit({truncated})))'
    "for _ in iter(lambda:len(b)<n,False)];"
    'exec(compile(bytes(b),"<shuttled-helper>","exec"),{{"__name__":"__main__"}})'
)
# Exits 0 only on a Python new enough; parses on Python 2 as well.
_PROBE = "import sys;sys.exit(sys.version_info<(%d,%d))" % MIN_PYTHON
# What a candidate too old says it is, for the error (Python 2 too).
_VERSION = "import sys;print(sys.version.split()[0])"

# What a python candidate may look like: a command name or an absolute path.
_PYTHON_NAME = re.compile(r"[A-Za-z0-9_./+-]+\Z")


@functools.lru_cache(maxsize=1)
def helper_source() -> bytes:
    """The program the loader executes: sshmsg.py's text, then helper.py's."""
    wire = _WIRE_FILE.read_bytes()
    if not wire.endswith(b"\n"):
        wire += b"\n"
    return wire + _HELPER_FILE.read_bytes()


def loader_command(source_len: int, pythons: Sequence[str] = REMOTE_PYTHONS) -> str:
    """The remote command: find a python 3.8+, read `source_len` bytes of stdin, run them.

    Tries each of `pythons` in order: present (`command -v`), runnable and new
    enough (a quick probe, so an old `python` or an inactive pyenv shim is
    skipped); the first that passes is exec'd with the loader, so the helper
    is the session's process itself. With none left it prints one line to
    stderr and exits 97.
    """
    if source_len < 0:
        raise ValueError("negative source length %d" % source_len)
    if not pythons:
        raise ValueError("no python candidates")
    for name in pythons:
        if not _PYTHON_NAME.match(name):
            raise ValueError("unusable python name %r" % name)
    loader = _LOADER.format(
        size=source_len, truncated=HELPER_TRUNCATED_EXIT, sync=HELPER_SYNC.decode().strip()
    )
    message = "shuttled: no Python %d.%d or newer on the remote (tried %s)" % (
        *MIN_PYTHON,
        ", ".join(pythons),
    )
    # Each candidate present but too old adds "; NAME is VERSION" to the message.
    script = (
        "old=; for p in %s; do "
        'if command -v "$p" >/dev/null 2>&1; then '
        'if "$p" -E -S -c %s >/dev/null 2>&1; then exec "$p" -B -E -s -c %s; fi; '
        'old="$old; $p is $("$p" -E -S -c %s 2>/dev/null | head -n 1)"; '
        "fi; done; "
        'echo %s"$old" >&2; exit %d'
        % (
            " ".join(shlex.quote(p) for p in pythons),
            shlex.quote(_PROBE),
            shlex.quote(loader),
            shlex.quote(_VERSION),
            shlex.quote(message),
            HELPER_NO_PYTHON_EXIT,
        )
    )
    return "exec /bin/sh -c " + shlex.quote(script)


__all__ = [
    "HELPER_BANNER",
    "HELPER_EXIT_OK",
    "HELPER_INTERNAL_EXIT",
    "HELPER_NO_PYTHON_EXIT",
    "HELPER_PROTOCOL_EXIT",
    "HELPER_SYNC",
    "HELPER_TRUNCATED_EXIT",
    "helper_source",
    "loader_command",
]
