"""`shuttled trust PROFILE`: the server's host key, shown and written where the
profile's ssh looks for it, so a boot-time (BatchMode) profile can connect.

The key is fetched through the profile's own ssh (port, jump host, HostKeyAlias,
its user's config: tunnel.ssh.learn_host_keys), so it is named the way that ssh
looks it up (`[host]:port`, the alias) and lands in the file that ssh reads (its
UserKnownHostsFile: <config dir>/ssh/known_hosts for root profiles), hashed when
that user's HashKnownHosts says so. Nothing is written before a person said yes
on a terminal, or gave --yes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import shutil
import sys
import tempfile
from pathlib import Path

from shuttled.config import Profile, load_config
from shuttled.const import ExitCode
from shuttled.errors import NoSuchProfileError, SshError, UsageError
from shuttled.tunnel.ssh import (
    SshTarget,
    grant_dir,
    learn_host_keys,
    resolve_home,
    ssh_config,
    user_fs,
)

# known_hosts key types as ssh names them in "... key fingerprint is ..." (sshkey.c)
_KIND = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}


def fingerprint(line: str) -> str:
    """`ED25519 key fingerprint is SHA256:...` of one known_hosts line, as ssh prints it."""
    _, kind, blob = line.split()[:3]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    name = _KIND.get(kind, "ECDSA" if kind.startswith("ecdsa-") else kind.upper())
    return f"{name} key fingerprint is SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def hashed(line: str) -> str:
    """The line with its host name hashed, as HashKnownHosts writes it (hostfile.c)."""
    host, rest = line.split(None, 1)
    salt = os.urandom(20)
    mac = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()} {rest}"


def trust(config_dir: Path, name: str, yes: bool) -> int:
    profile = load_config(config_dir).profiles.get(name)
    if profile is None:
        raise NoSuchProfileError(f"no profile {name!r} in {config_dir}")
    return asyncio.run(_trust(profile, yes))


async def _trust(profile: Profile, yes: bool) -> int:
    target = profile.ssh_target()
    options = await ssh_config(target)
    known = resolve_home(
        options.get("userknownhostsfile", "~/.ssh/known_hosts").split()[0], target.user
    )
    lines = await _fetch(target)
    host = lines[0].split()[0]
    print(f"{profile.name}: the server {host} sent:")
    for line in lines:
        print(f"  {fingerprint(line)}")
    if await _already(known, host, lines):
        print(f"already trusted in {known}: nothing to do")
        return ExitCode.OK
    if not yes and not _confirm(f"trust it for {profile.name}, in {known}? [y/N] "):
        print("nothing written")
        return ExitCode.FAILED
    await _forget(known, host, target)
    _append(known, lines, options.get("hashknownhosts") == "yes", target)
    print(f"written to {known}")
    return ExitCode.OK


async def _fetch(target: SshTarget) -> list[str]:
    scratch = tempfile.mkdtemp(prefix="shuttled-trust-")
    try:
        if target.user is not None and os.geteuid() == 0:
            grant_dir(scratch, target.user.uid)  # the user's ssh writes the scratch file
        lines, last = await learn_host_keys(target, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not lines:
        raise SshError(f"no host key received from {target.remote}: {last}")
    return lines


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to ask on: compare the fingerprint above with the server's "
            "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), then add --yes"
        )
    return input(question).strip().lower() in ("y", "yes")


async def _keygen(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ssh-keygen",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _already(known: Path, host: str, lines: list[str]) -> bool:
    """Every key sent is in `known` for `host` (looked up as ssh does: ssh-keygen -F)."""
    if not known.exists():
        return False
    _, out = await _keygen("-F", host, "-f", str(known))
    present = {tuple(x.split()[1:3]) for x in out.splitlines() if x and not x.startswith("#")}
    return all(tuple(x.split()[1:3]) in present for x in lines)


async def _forget(known: Path, host: str, target: SshTarget) -> None:
    """Remove `host`'s old keys: a replaced key must not stay trusted beside the new."""
    if not known.exists():
        return
    status, _ = await _keygen("-F", host, "-f", str(known))
    if status != 0:
        return
    info = known.stat()
    await _keygen("-R", host, "-f", str(known))
    with contextlib.suppress(OSError):  # ssh-keygen -R rewrote it as root (and kept .old)
        os.chown(known, info.st_uid, info.st_gid)
        os.chmod(known, info.st_mode & 0o777)
    print(f"removed the old key of {host} from {known}")


def _append(known: Path, lines: list[str], hash_names: bool, target: SshTarget) -> None:
    """Append as the profile's user (fs_identity): the file stays theirs."""
    text = "".join(f"{hashed(x) if hash_names else x}\n" for x in lines)
    with user_fs(target.user):
        known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(known, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with os.fdopen(fd, "a") as out:
            out.write(text)
