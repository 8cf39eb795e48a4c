"""ssh's stderr sorted into failures no retry heals (host key, refused keys, a missing
identity) and the rest, which retry; each with the profile's fix. The stderr texts are
what OpenSSH 9 printed against the lab's sshd with BatchMode=yes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shuttled.config import Profile
from shuttled.errors import SshFailure, SshRefusedError
from shuttled.supervisor import TunnelSpec
from shuttled.tunnel.ssh import SshTarget, refusal

CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
Offending ED25519 key in /tmp/kh:1
Host key for 10.171.1.2 has changed and you have requested strict checking.
Host key verification failed."""


@pytest.mark.parametrize(
    ("stderr", "failure", "message"),
    [
        ("Host key verification failed.", SshFailure.HOST_KEY, "host key for srv is not known"),
        (
            "No ED25519 host key is known for [10.0.0.1]:2222 and you have requested strict "
            "checking.\nHost key verification failed.",
            SshFailure.HOST_KEY,
            "host key for [10.0.0.1]:2222 is not known",
        ),
        (
            CHANGED,
            SshFailure.HOST_KEY,
            "host key for 10.171.1.2 has changed since it was trusted",
        ),
        (
            "root@10.171.1.2: Permission denied (publickey).",
            SshFailure.AUTH,
            "srv refused the keys (Permission denied (publickey))",
        ),
        (
            "Warning: Identity file /k/nope not accessible: No such file or directory.\n"
            "root@10.171.1.2: Permission denied (publickey).",
            SshFailure.IDENTITY,
            "identity file /k/nope: no such file or directory",
        ),
    ],
)
def test_failures_no_retry_heals_are_told_apart(
    stderr: str, failure: SshFailure, message: str
) -> None:
    refused = refusal(stderr.splitlines(), "srv")
    assert refused is not None
    assert (refused.failure, str(refused)) == (failure, message)


@pytest.mark.parametrize(
    "stderr",
    [
        "ssh: connect to host 10.171.1.2 port 1: Connection refused",
        "ssh: connect to host 10.0.0.1 port 22: Connection timed out",
        "ssh: connect to host 10.0.0.1 port 22: No route to host",
        "kex_exchange_identification: read: Connection reset by peer",
        # ssh warns of a missing key but another one logged in: nothing failed for good
        "Warning: Identity file /k/nope not accessible: No such file or directory.",
    ],
)
def test_network_errors_are_left_to_retry(stderr: str) -> None:
    assert refusal(stderr.splitlines(), "srv") is None


def test_a_daemon_profile_names_the_command_that_fixes_each_failure(tmp_path: Path) -> None:
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "id_ed25519").write_text("a key\n")
    profile = Profile("work", "root@srv", subnets=("10.0.0.0/8",), config_dir=tmp_path)
    spec = TunnelSpec("work", SshTarget("srv"), (), remedies=profile.remedies())
    host_key = spec.refused(SshRefusedError(SshFailure.HOST_KEY, "host key for srv is not known"))
    assert host_key == (
        f"host key for srv is not known: run `sudo shuttled --config-dir {tmp_path} trust work`"
    )
    auth = spec.refused(SshRefusedError(SshFailure.AUTH, "srv refused the keys"))
    key = tmp_path / "ssh" / "id_ed25519"
    assert auth.endswith(
        f"add {key}.pub to the server's authorized_keys (`ssh-copy-id -i {key} root@srv`)"
    )


def test_the_default_config_dir_is_left_out_of_the_trust_command() -> None:
    remedies = dict(Profile("work", "srv", subnets=("10.0.0.0/8",)).remedies())
    assert remedies[SshFailure.HOST_KEY] == "run `sudo shuttled trust work`"
