"""Entry point of `shuttled`: typed errors become one line on stderr and an exit code."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shuttled.cli import parse, run_spec, setup_logging
from shuttled.const import ExitCode
from shuttled.errors import ShuttledError, UsageError
from shuttled.firewall.lockdown import LockdownFile, load_at_boot


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what}: must run as root (firewall rules); try sudo")


def _cleanup(force: bool, everything: bool, state_dir: Path) -> int:
    from shuttled.dns.resolved import cleanup_links
    from shuttled.firewall import cleanup_all, live_owners
    from shuttled.tunnel.ssh import cleanup_control_dirs

    _need_root("cleanup")
    owners = live_owners()
    if owners and not force:
        raise UsageError(
            f"not cleaning up: {', '.join(owners)} running; their rules are "
            f"what protects their traffic (--force removes them anyway)"
        )
    # Links first: deleting one is also what undoes its systemd-resolved settings.
    removed = (
        cleanup_links() + cleanup_all(live=force, lockdown=everything) + cleanup_control_dirs()
    )
    if everything:  # or the boot unit would lock down again
        LockdownFile(state_dir).save("", {})
    for item in removed:
        print(f"removed {item}")
    return ExitCode.OK


def _lockdown(state_dir: Path) -> int:
    """At boot, before any interface is up: the kill switch of every wanted profile."""
    _need_root("lockdown")
    held = load_at_boot(state_dir)
    print(f"locked down: {', '.join(held)}" if held else "nothing to lock down")
    return ExitCode.OK


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check(config_dir: Path) -> int:
    """Like `sshd -t`: the profiles validated, nothing touched; exit 2 on an error."""
    from shuttled.config import check_config

    errors, warnings, count = check_config(config_dir)
    for line in [*(f"warning: {w}" for w in warnings), *errors]:
        print(line, file=sys.stderr)
    if errors:
        print(_count(len(errors), "error") + f" in {config_dir}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"configuration OK: {_count(count, 'profile')}")
    return ExitCode.OK


def _dispatch(argv: Sequence[str]) -> int:
    args = parse(argv)
    setup_logging(args.verbose, args.quiet)
    if args.command == "run":
        from shuttled.run import run

        spec = run_spec(args)
        if args.check:  # nothing captured: no root needed
            from shuttled.doctor import check

            return asyncio.run(check(spec, args.json))
        _need_root("run")
        return asyncio.run(run(spec, args.method))
    if args.command == "cleanup":
        return _cleanup(args.force, args.all, args.state_dir)
    if args.command == "check":
        return _check(args.config_dir)
    if args.command == "lockdown":
        return _lockdown(args.state_dir)
    if args.command == "install-service":
        from shuttled.install import install_service

        return install_service(args.root.absolute(), args.uninstall)
    if args.command == "trust":
        from shuttled.trust import trust

        _need_root("trust")  # the daemon's config and its root profiles' known_hosts
        return trust(args.config_dir, args.profile, args.yes)
    from shuttled.daemon import main as daemon_main

    _need_root("daemon")
    return daemon_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except ShuttledError as exc:
        print(f"shuttled: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
