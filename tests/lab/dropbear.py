"""A real Dropbear server in the lab's srv namespace, beside OpenSSH's sshd.

Dropbear (the sshd of OpenWrt and many small boxes) has no AuthorizedKeysFile option:
it reads ``~/.ssh/authorized_keys`` of the login user, and it will not read root's
here (that is the machine's own). So a Dropbear logs in one lab user; the lab's root
key and the user's own key are both authorized in that user's home, so the lab's
``ssh_cmd`` (as root) and the user's own ``ssh`` both reach it.

Its host key is made with dropbearkey in the lab's temp dir and added to the lab's
known_hosts and to every lab user's copy (``[addr]:port``), so StrictHostKeyChecking
holds; both ssh configs learn the aliases ``srv-dropbear-<port>`` and
``srv6-dropbear-<port>``. The server runs in the foreground (``-F``, log on stderr
into ``logs/dropbear-<port>.log``) as a tracked child: stopped by PID with the lab,
and the per-connection children it forks die with the namespace sweep.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

from .core import WAIT_PORT_TIMEOUT, Lab, LabError, LabUser, _wait_port
from .env import which
from .netns import kill_pids, terminate_popen

DROPBEAR_PORT = 2022


@dataclasses.dataclass(frozen=True)
class DropbearServer:
    """One running Dropbear: where it listens, whom it logs in, how ssh names it."""

    port: int
    user: LabUser
    alias: str  # srv-dropbear-<port> (IPv4); alias6 is the same over IPv6
    alias6: str
    host_key: str
    proc: subprocess.Popen[Any]

    @property
    def remote(self) -> str:
        """``user@alias``: works with the lab's root ``ssh_cmd`` and the user's own ssh."""
        return f"{self.user.name}@{self.alias}"

    def connection_pids(self) -> list[int]:
        """The per-connection children Dropbear forked (one per ssh connection)."""
        return _children(self.proc.pid)


def start_dropbear(
    lab: Lab, user: LabUser, *, port: int = DROPBEAR_PORT, forwarding: bool = True
) -> DropbearServer:
    """Start Dropbear on srv:``port`` (both families) logging in ``user``.

    ``forwarding=False`` passes ``-j``: Dropbear then answers direct-tcpip with
    "administratively prohibited", as OpenSSH does with AllowTcpForwarding no.
    """
    dropbear, keygen = which("dropbear"), which("dropbearkey")
    if dropbear is None or keygen is None:
        raise LabError("dropbear not found (Debian: apt-get install dropbear-bin)")
    key = Path(lab.tmpdir, f"dropbear_ed25519_host_key-{port}")
    if not key.exists():  # a restart on the same port keeps its host key
        subprocess.run(
            [keygen, "-t", "ed25519", "-f", str(key)], check=True, capture_output=True, timeout=30
        )
    _authorize_in_home(user, [Path(lab.identity + ".pub"), Path(user.identity + ".pub")])
    alias, alias6 = _make_known(lab, port, _public_key(keygen, key))
    # -s -g: no password logins; -k: no remote forwarding; -m: no motd.
    argv = [dropbear, "-F", "-E", "-s", "-g", "-k", "-m", "-r", str(key), "-p", str(port)]
    argv += ["-P", str(Path(lab.tmpdir, f"dropbear-{port}.pid"))]
    if not forwarding:
        argv.append("-j")
    name = f"dropbear-{port}"
    proc = lab.popen("srv", argv, name=name)
    with lab.netns("srv"):
        for addr in (lab.srv_v4, lab.srv_v6):
            what, tail = f"dropbear :{port}", lambda: lab.log_tail(name)
            _wait_port(addr, port, WAIT_PORT_TIMEOUT, what=what, proc=proc, log_tail=tail)
    return DropbearServer(port, user, alias, alias6, str(key), proc)


def restart_dropbear(lab: Lab, server: DropbearServer) -> DropbearServer:
    """Stop ``server`` and every connection it serves (by PID: the per-connection
    children die with it, as on a reboot of the box), then start it again on the
    same port with the same host key."""
    children = server.connection_pids()
    terminate_popen(server.proc, 3.0)
    kill_pids(children)
    forwarding = "-j" not in server.proc.args
    return start_dropbear(lab, server.user, port=server.port, forwarding=forwarding)


def _make_known(lab: Lab, port: int, pubkey: str) -> tuple[str, str]:
    """Trust the host key for ``[srv]:port`` and name the server in every ssh config
    of the lab (root's and its users'); returns the IPv4 and IPv6 aliases."""
    names = f"[{lab.srv_v4}]:{port},[{lab.srv_v6}]:{port}"
    alias, alias6 = f"srv-dropbear-{port}", f"srv6-dropbear-{port}"
    hosts = f"\nHost {alias}\n    HostName {lab.srv_v4}\n    Port {port}\n"
    hosts += f"\nHost {alias6}\n    HostName {lab.srv_v6}\n    Port {port}\n"
    for known in [lab.known_hosts, *(str(Path(u.home, ".ssh", "known_hosts")) for u in lab.users)]:
        _append_once(known, f"{names} {pubkey}\n")
    # Appended after "Host *": that block sets no HostName or Port, so these apply.
    for config in [lab.ssh_config, *(u.ssh_config for u in lab.users)]:
        _append_once(config, hosts)
    return alias, alias6


def _public_key(keygen: str, key: Path) -> str:
    """``type base64`` of the host key, from ``dropbearkey -y``."""
    out = subprocess.run(
        [keygen, "-y", "-f", str(key)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    for line in out.splitlines():
        if line.startswith("ssh-"):
            return " ".join(line.split()[:2])
    raise RuntimeError(f"dropbearkey -y printed no public key for {key}: {out!r}")


def _append_once(path: str, text: str) -> None:
    with open(path, "a+") as fh:
        fh.seek(0)
        if text not in fh.read():
            fh.write(text)


def _authorize_in_home(user: LabUser, pubkeys: list[Path]) -> None:
    """Dropbear's only place for keys: ~/.ssh/authorized_keys, owned by the user and
    writable by nobody else (it checks the file, ~/.ssh and ~ like StrictModes)."""
    path = Path(user.home, ".ssh", "authorized_keys")
    keys = "".join(p.read_text() for p in pubkeys)
    old = path.read_text() if path.exists() else ""
    path.write_text(old + "".join(k for k in keys.splitlines(True) if k not in old))
    os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o600)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found
