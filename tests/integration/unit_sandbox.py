"""Run a command under what systemd/shuttled.service imposes, without systemd:
`python3 unit_sandbox.py UNIT -- ARGV...`.

The lab has no systemd as PID 1 (no systemd-run), so the parts of the unit that
decide whether the daemon can work are applied here by hand, read from the unit:
CapabilityBoundingSet (PR_CAPBSET_DROP; root then gets only those at exec),
NoNewPrivileges, UMask, MemoryDenyWriteExecute (PR_SET_MDWE, the kernel's own
version of it), SystemCallFilter with SystemCallErrorNumber=EPERM (libseccomp, the
groups expanded by `systemd-analyze syscall-filter`), ProtectProc=invisible (a
proc mount with hidepid=invisible) and ProtectKernelTunables (/proc/sys read-only),
in a mount namespace of the command's own. Not applied: the file-system views
(ProtectSystem, ProtectHome, PrivateTmp, PrivateDevices), which the tests' temp
directories would not pass anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 24, 38, 65, 1
CAP_LAST = 40
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unit_service(path: str) -> dict[str, list[str]]:
    """[Service] settings; a key given several times keeps every value."""
    values: dict[str, list[str]] = {}
    section = ""
    with open(path) as fh:
        for raw in fh:
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values.setdefault(key, []).append(value)
    return values


CAP_NAMES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]


def syscall_groups() -> dict[str, list[str]]:
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= expand(groups.get(item, []), groups) if item.startswith("@") else {item}
    return out


def allowed_syscalls(filters: list[str]) -> set[str]:
    """systemd's semantics: the first line sets an allow list, `~` lines remove."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for spec in filters:
        deny = spec.startswith("~")
        names = expand(spec.lstrip("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


def install_seccomp(allowed: set[str]) -> None:
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = seccomp.seccomp_init(SCMP_ACT_ERRNO | errno.EPERM)
    for name in sorted(allowed):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:
            seccomp.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0)
    _check(seccomp.seccomp_load(ctx), "seccomp_load")


def private_proc(protect_proc: str, tunables_ro: bool) -> None:
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    options = f"hidepid={protect_proc}".encode() if protect_proc != "default" else None
    _check(
        libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
        "mount proc",
    )
    if tunables_ro:
        _check(libc.mount(b"/proc/sys", b"/proc/sys", None, MS_BIND | MS_REC, None), "bind")
        _check(
            libc.mount(None, b"/proc/sys", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
            "remount /proc/sys read-only",
        )


def main() -> None:
    unit, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    service = unit_service(unit)
    private_proc(
        service.get("ProtectProc", ["default"])[-1],
        service.get("ProtectKernelTunables", ["no"])[-1] == "yes",
    )
    allowed = allowed_syscalls(service.get("SystemCallFilter", []))
    keep = {CAP_NAMES.index(n) for n in " ".join(service["CapabilityBoundingSet"]).split()}
    for cap in range(CAP_LAST + 1):
        if cap not in keep:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    if "UMask" in service:
        os.umask(int(service["UMask"][-1], 8))
    if service.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        _check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
    if service.get("NoNewPrivileges", ["no"])[-1] == "yes":
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if allowed:
        install_seccomp(allowed)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
