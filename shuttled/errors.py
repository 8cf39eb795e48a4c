"""Typed errors: each carries a stable code, an exit code and a D-Bus error name."""

from __future__ import annotations

import enum

from shuttled.const import DBUS_NAME, ExitCode


class ShuttledError(Exception):
    """Base of every error we raise on purpose; its message is one line for a human."""

    code = "failed"
    exit_code = ExitCode.FAILED

    @property
    def dbus_name(self) -> str:
        return f"{DBUS_NAME}.Error.{''.join(p.title() for p in self.code.split('_'))}"


class UsageError(ShuttledError):
    code = "usage"
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A profile or argument is invalid; the message names file:line and key."""

    code = "config"


class NotRunningError(ShuttledError):
    code = "not_running"
    exit_code = ExitCode.NOT_RUNNING


class NoSuchProfileError(ShuttledError):
    code = "no_such_profile"
    exit_code = ExitCode.NO_SUCH_PROFILE


class PermissionDeniedError(ShuttledError):
    code = "denied"
    exit_code = ExitCode.DENIED


class TimeoutError_(ShuttledError):
    code = "timeout"
    exit_code = ExitCode.TIMEOUT


class FirewallError(ShuttledError):
    """The kernel refused a rule transaction, or no backend is usable."""

    code = "firewall"


class SshError(ShuttledError):
    """The ssh master could not start or its control socket misbehaved."""

    code = "ssh"


class SshFailure(enum.StrEnum):
    """Why ssh gave up in a way no retry can heal: each needs a person to act."""

    HOST_KEY = "host_key"  # unknown or changed: `shuttled trust`
    AUTH = "auth"  # the server refused every key
    IDENTITY = "identity"  # the profile's key file is missing or unreadable


class SshRefusedError(SshError):
    """ssh exited for a reason that retrying cannot fix (see SshFailure)."""

    def __init__(self, failure: SshFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class ProtocolError(ShuttledError):
    """A malformed or out-of-state message from the master or the remote helper."""

    code = "protocol"


class RemoteError(ShuttledError):
    """The remote side refused something (no python, forwarding prohibited, ...)."""

    code = "remote"
