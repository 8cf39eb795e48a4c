"""Private dbus-daemons of the system type, shared by the D-Bus tests."""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .env import which

# Debian's /usr/share/dbus-1/system.conf, cut to what matters: deny by default, then the
# policy file included (ours, exactly as it is installed) decides who may own and call.
SYSTEM_LIKE_POLICY = """\
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
"""
# Anyone may own any name and call anything: for stand-ins of other services.
OPEN_POLICY = """\
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
"""


def bus_config(socket: Path, default_policy: str, include: Path | None = None) -> str:
    """A system-type bus listening on `socket` that every uid may connect to; then
    `default_policy` (SYSTEM_LIKE_POLICY, OPEN_POLICY) and the policy file `include`."""
    included = "" if include is None else f"  <include>{include}</include>\n"
    return f"""\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
{default_policy}  </policy>
{included}</busconfig>
"""


@dataclass
class Bus:
    address: str
    pid: int


@contextlib.contextmanager
def private_bus(
    default_policy: str, include: Path | None = None, *, prefix: str, stderr: int | None = None
) -> Iterator[Bus]:
    """A private dbus-daemon (bus_config) on a socket every uid can reach; killed by PID
    after. `stderr` is the daemon's (subprocess.DEVNULL to hide it)."""
    tool = which("dbus-daemon")
    if tool is None:
        raise FileNotFoundError("dbus-daemon")
    # Not pytest's tmp_path: it is 0700, and unprivileged clients must reach the socket.
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o755)
    config = tmp / "bus.conf"
    config.write_text(bus_config(tmp / "bus", default_policy, include))
    proc = subprocess.Popen(
        [tool, f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        address = proc.stdout.readline().strip() if ready else ""
        assert address, f"dbus-daemon did not start (exit {proc.poll()})"
        yield Bus(address, proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
