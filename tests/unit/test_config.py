"""Profiles: YAML to frozen dataclasses, every error with file:line, overlaps, authorization."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuttled import config as cfg
from shuttled.config import (
    PROFILE_KEYS,
    Config,
    ConfigErrors,
    DnsSettings,
    LanSettings,
    Profile,
    check_overlaps,
    load_config,
    profile_reference,
)
from shuttled.const import Forward
from shuttled.control import auth
from shuttled.control.auth import may_manage
from shuttled.errors import ConfigError
from shuttled.net import gid_of
from tests.helpers import config_errors, write_config

FULL = """\
work:
  remote: alice@bastion.example.com
  user: nobody
  port: 2222
  identity: keys/work
  jump: jump.example.com
  ssh_options: {Compression: yes, ServerAliveInterval: 5, Ciphers: aes128-gcm@openssh.com}
  subnets: [10.0.0.0/8, "fd00::/8", "10.1.0.0/16:443"]
  exclude: [10.5.0.0/24]
  auto_nets: true
  dns: {mode: split, domains: [Corp.Example.COM., lab], nameservers: [10.0.0.53]}
  remote_hosts: true
  autostart: true
  lan: [eth1, 192.168.7.0/24]
  allow: [group:nogroup, nobody, user:65534]
  kill_switch: true
  forward: direct
  python: /usr/bin/python3.11
  keepalive: 5
  streams: 4
"""


write = write_config
errors_of = config_errors


@pytest.fixture
def shared_key() -> Iterator[Path]:
    """A key file any local user can read (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="shuttled-key-"))
    os.chmod(directory, 0o755)
    key = directory / "id_work"
    key.write_text("not really a key\n")
    os.chmod(key, 0o644)
    yield key
    shutil.rmtree(directory)


def one_error(directory: Path, text: str, name: str = "p.yaml") -> str:
    path = write(directory, name, text)
    errors = errors_of(directory)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:")
    return errors[0]


# --- loading good profiles ------------------------------------------------------------------


def test_every_key_is_parsed_into_typed_values(tmp_path: Path, shared_key: Path) -> None:
    path = write(tmp_path, "work.yaml", FULL.replace("keys/work", str(shared_key)))
    p = load_config(tmp_path).profiles["work"]
    assert p.remote == "alice@bastion.example.com" and p.user == "nobody" and p.port == 2222
    assert p.identity == str(shared_key)
    assert p.jump == "jump.example.com"
    assert p.ssh_options == (
        ("Compression", "yes"),
        ("ServerAliveInterval", "5"),
        ("Ciphers", "aes128-gcm@openssh.com"),
    )
    assert p.subnets == ("10.0.0.0/8", "fd00::/8", "10.1.0.0/16:443")
    assert p.exclude == ("10.5.0.0/24",)
    assert p.dns == DnsSettings("split", ("corp.example.com", "lab"), ("10.0.0.53",))
    assert p.lan == LanSettings(interfaces=("eth1",), sources=("192.168.7.0/24",))
    assert p.allow == ("group:nogroup", "user:nobody", "user:65534")
    assert (p.auto_nets, p.remote_hosts, p.autostart, p.kill_switch) == (True,) * 4
    assert p.forward is Forward.DIRECT and p.python == "/usr/bin/python3.11"
    assert (p.keepalive, p.streams) == (5.0, 4)
    assert p.source == f"{path}:1"


def test_defaults_come_from_the_schema(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "min: {remote: host, subnets: [10.0.0.0/8]}\n")
    p = load_config(tmp_path).profiles["min"]
    assert p.user is None and p.port is None and p.dns == DnsSettings("off")
    assert p.keepalive == 10.0 and p.streams == 1 and p.forward is Forward.AUTO
    assert not p.lan.enabled and p.allow == ()
    for key, spec in PROFILE_KEYS.items():
        if not spec.required and key != "subnets":
            assert getattr(p, key) == spec.default


def test_profiles_map_yml_files_and_profiles_d_are_all_read(tmp_path: Path) -> None:
    write(tmp_path, "a.yml", "profiles:\n  one: {remote: h1, subnets: [10.1.0.0/16]}\n")
    write(tmp_path, "profiles.d/b.yaml", "two: {remote: h2, auto_nets: true}\n")
    write(tmp_path, "empty.yaml", "")
    write(tmp_path, ".hidden.yaml", "broken: [")
    write(tmp_path, "notes.txt", "not: [yaml")
    assert sorted(load_config(tmp_path).profiles) == ["one", "two"]


def test_profiles_map_may_be_empty(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "profiles:\n")
    assert dict(load_config(tmp_path).profiles) == {}


def test_config_is_immutable(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "a: {remote: h, auto_nets: true}\n")
    config = load_config(tmp_path)
    with pytest.raises(TypeError):
        config.profiles["b"] = config.profiles["a"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.profiles["a"].remote = "x"  # type: ignore[misc]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """\
        base: &base {remote: h, subnets: [10.0.0.0/8]}
        other:
          <<: *base
          subnets: [10.9.0.0/16]
        """,
    )
    config = load_config(tmp_path)
    assert config.profiles["other"].subnets == ("10.9.0.0/16",)


# --- dns, lan, allow forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", DnsSettings("off")),  # YAML 1.1 reads this as false
        ("false", DnsSettings("off")),
        ("all", DnsSettings("all")),
        ("true", DnsSettings("all")),
        ("{mode: all, nameservers: ['fd00::0053']}", DnsSettings("all", (), ("fd00::53",))),
        ("{mode: split, domains: corp.example}", DnsSettings("split", ("corp.example",))),
    ],
)
def test_dns_forms(tmp_path: Path, text: str, expected: DnsSettings) -> None:
    write(tmp_path, "a.yaml", f"a: {{remote: h, subnets: [10.0.0.0/8], dns: {text}}}\n")
    assert load_config(tmp_path).profiles["a"].dns == expected


def test_dns_alone_is_something_to_capture(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "a: {remote: h, dns: all}\n")
    assert load_config(tmp_path).profiles["a"].dns.enabled


def test_lan_true_means_every_interface(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "a: {remote: h, subnets: [0/0], lan: true}\n")
    assert load_config(tmp_path).profiles["a"].lan == LanSettings(all_interfaces=True)


def test_unknown_allow_user_is_a_warning_not_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.yaml",
        "a:\n  remote: h\n  subnets: [10.0.0.0/8]\n"
        "  allow: [no-such-user-x, group:no-such-group-x]\n",
    )
    config = load_config(tmp_path)
    assert config.profiles["a"].allow == ("user:no-such-user-x", "group:no-such-group-x")
    assert len(config.warnings) == 2
    assert config.warnings[0].startswith(f"{path}:4: a.allow: no local user")


# --- errors: each names file:line and profile.key ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "line", "expected"),
    [
        (
            "  remote: h\n  subnet: [10.0.0.0/8]\n",
            3,
            "a.subnet: unknown key (did you mean 'subnets'?)",
        ),
        ("  subnets: [10.0.0.0/8]\n", 1, "a.remote: required key is missing"),
        ("  remote: -oProxyCommand=x\n  auto_nets: true\n", 2, "a.remote: '-oProxyCommand=x'"),
        ("  remote: h\n  port: '22'\n  auto_nets: true\n", 3, "a.port: expected an integer"),
        ("  remote: h\n  port: 70000\n  auto_nets: true\n", 3, "a.port: 70000 is not within"),
        ("  remote: h\n  streams: 9\n  auto_nets: true\n", 3, "a.streams: 9 is not within 1-8"),
        ("  remote: h\n  keepalive: 0.5\n  auto_nets: true\n", 3, "a.keepalive: 0.5 is not within"),
        ("  remote: h\n  auto_nets: 'yes please'\n", 3, "a.auto_nets: expected true or false"),
        (
            "  remote: h\n  forward: proxy\n  auto_nets: true\n",
            3,
            "a.forward: expected one of auto, direct, helper",
        ),
        (
            "  remote: h\n  subnets:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n",
            5,
            "a.subnets: subnet '10.0.0.0/33'",
        ),
        ("  remote: h\n  auto_nets: true\n  exclude: [10.0.0.0/8:99999]\n", 4, "a.exclude: subnet"),
        (
            "  remote: h\n  auto_nets: true\n  ssh_options:\n    ControlPath: /tmp/x\n",
            5,
            "a.ssh_options.ControlPath: shuttled manages this option itself",
        ),
        (
            "  remote: h\n  auto_nets: true\n  ssh_options: {batchmode: no}\n",
            4,
            "a.ssh_options.batchmode: shuttled manages",
        ),
        (
            "  remote: h\n  auto_nets: true\n  ssh_options: {Port: [1]}\n",
            4,
            "a.ssh_options.Port: expected a string",
        ),
        ("  remote: h\n  dns: {mode: split}\n", 3, "a.dns: split DNS needs domains"),
        ("  remote: h\n  dns: {domains: [x.example]}\n", 3, "a.dns: needs a mode"),
        (
            "  remote: h\n  dns: {mode: all, domains: [x.example]}\n",
            3,
            "a.dns: domains are only used with mode: split",
        ),
        ("  remote: h\n  dns: sometimes\n", 3, "a.dns: expected one of off, all, split"),
        (
            "  remote: h\n  dns:\n    mode: split\n    domains: [ok.example, -bad.example]\n",
            5,
            "a.dns.domains: '-bad.example' is not a DNS name",
        ),
        (
            "  remote: h\n  dns:\n    mode: split\n    domains: ['*.corp.example']\n",
            5,
            "a.dns.domains: write 'corp.example'",
        ),
        (
            "  remote: h\n  dns:\n    mode: all\n    nameservers: [dns.example]\n",
            5,
            "a.dns.nameservers: 'dns.example' is not an IP address",
        ),
        (
            "  remote: h\n  dns:\n    mode: all\n    resolvers: [10.0.0.1]\n",
            5,
            "a.dns.resolvers: unknown key",
        ),
        ("  remote: h\n", 1, "a: nothing to capture"),
        ("  remote: h\n  auto_nets: true\n  lan: ['a:b']\n", 4, "a.lan: 'a:b' is neither"),
        (
            "  remote: h\n  auto_nets: true\n  allow: [role:admin]\n",
            4,
            "a.allow: 'role:admin': expected user:NAME",
        ),
        ("  remote: h\n  auto_nets: true\n  user: 'bad user'\n", 4, "a.user: 'bad user' is not"),
        ("  remote: h\n  auto_nets: true\n  python: 'python3; rm -rf /'\n", 4, "a.python:"),
    ],
)
def test_each_error_names_file_line_and_key(
    tmp_path: Path, body: str, line: int, expected: str
) -> None:
    error = one_error(tmp_path, "a:\n" + body)
    assert error.startswith(f"{tmp_path / 'p.yaml'}:{line}: {expected}"), error


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (
            "a: {remote: h, auto_nets: true\n",
            1,
            "YAML syntax error: the { opened here is not closed (did not find expected ',' or '}' "
            "at line 2)",
        ),
        (
            "a:\n  remote: h\n  subnets: [10.0.0.0/8\n  dns: all\n",
            3,
            "YAML syntax error: the [ opened here is not closed",
        ),
        (
            'a:\n  remote: "h\n  subnets: [10.0.0.0/8]\n',
            2,
            "YAML syntax error: the quote opened here is not closed",
        ),
        (
            "a:\n  remote: h\n bad: 1\n  subnets: [10.0.0.0/8]\n",
            3,
            "YAML syntax error: did not find expected key",
        ),
        ("- a\n- b\n", 1, "expected a mapping of profile names to profiles, got a list"),
        ("bad name: {remote: h, auto_nets: true}\n", 1, "'bad name': a profile name must match"),
        (f"{'x' * 33}: {{remote: h, auto_nets: true}}\n", 1, f"'{'x' * 33}': a profile name"),
        ("a: [remote, h]\n", 1, "a: a profile must be a mapping of keys, got a list"),
        (
            "a: {remote: h, auto_nets: true}\nb: {remote: h, auto_nets: true}\n"
            "a: {remote: h, auto_nets: true}\n",
            3,
            "key 'a' is given twice",
        ),
        (
            "profiles: {a: {remote: h, auto_nets: true}}\nextra: 1\n",
            1,
            "with a top-level 'profiles' map",
        ),
        ("profiles: [a]\n", 1, "profiles: expected a mapping, got a list"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, line: int, expected: str) -> None:
    error = one_error(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'p.yaml'}:{line}: {expected}"), error


def test_duplicate_profile_across_files_names_both(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "\nwork: {remote: h1, auto_nets: true}\n")
    second = write(tmp_path, "b.yaml", "profiles:\n  work: {remote: h2, auto_nets: true}\n")
    assert errors_of(tmp_path) == [f"{second}:2: work: profile already defined at {first}:2"]


def test_an_invalid_profile_still_counts_for_duplicates(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "work: {remote: h1}\n")
    write(tmp_path, "b.yaml", "work: {remote: h2, auto_nets: true}\n")
    errors = errors_of(tmp_path)
    assert len(errors) == 2 and "already defined" in errors[1]


def test_all_errors_are_reported_at_once_with_a_summary(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        "a:\n  remote: h\n  streams: 0\n  bogus: 1\n  subnets: [x/1]\nb:\n  remote: h\n",
    )
    write(tmp_path, "b.yaml", "c: {remote: h, dns: {mode: split}}\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"5 errors in {tmp_path}"
    assert [ln.split(": ")[0].rsplit("/", 1)[1] for ln in lines[1:]] == [
        "a.yaml:3",
        "a.yaml:4",
        "a.yaml:5",
        "a.yaml:6",
        "b.yaml:1",
    ]
    assert isinstance(info.value, ConfigError)


def test_unreadable_and_non_utf8_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"a: \xff\xfe\n")
    assert "not UTF-8" in errors_of(tmp_path)[0]


def test_missing_config_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path / "nope")


# --- profiles: identity, ssh target, equality ---------------------------------------------------


def test_identity_is_relative_to_the_config_dir_and_tilde_is_left_to_ssh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("k/id", "home/.ssh/id", "abs/id"):
        write(tmp_path, key, "a key\n")
    write(
        tmp_path,
        "a.yaml",
        "a: {remote: h, auto_nets: true, identity: k/id}\n"
        "b: {remote: h, auto_nets: true, identity: ~/.ssh/id}\n"
        f"c: {{remote: h, auto_nets: true, identity: {tmp_path}/abs/id}}\n",
    )
    profiles = load_config(tmp_path).profiles
    assert profiles["a"].identity == str(tmp_path / "k/id")
    assert profiles["b"].identity == "~/.ssh/id"
    assert profiles["c"].identity == f"{tmp_path}/abs/id"


def test_a_missing_identity_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    error = one_error(tmp_path, "p:\n  remote: h\n  auto_nets: true\n  identity: keys/gone\n")
    assert error == (
        f"{tmp_path}/p.yaml:4: p.identity: cannot read {tmp_path}/keys/gone: "
        "no such file or directory"
    )


def test_an_identity_the_profile_user_cannot_read_is_a_config_error(tmp_path: Path) -> None:
    """Read as the profile's user: root could read it, the user's ssh could not."""
    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root")
    write(tmp_path, "keys/root-only", "a key\n")
    os.chmod(tmp_path / "keys/root-only", 0o600)
    error = one_error(
        tmp_path, "p: {remote: h, user: nobody, auto_nets: true, identity: keys/root-only}\n"
    )
    assert error.endswith(f"p.identity: cannot read {tmp_path}/keys/root-only: permission denied")


def test_ssh_target_of_a_user_profile(tmp_path: Path) -> None:
    p = Profile(
        "a",
        "alice@h",
        user="nobody",
        port=2222,
        identity="/k",
        jump="j",
        ssh_options=(("Compression", "yes"),),
        auto_nets=True,
    )
    target = p.ssh_target()
    assert target.ssh_command == ("ssh", "-p", "2222", "-i", "/k", "-J", "j")
    assert target.options == ("Compression=yes",)
    assert target.user is not None and target.user.name == "nobody"
    assert target.batch and target.remote == "alice@h"


def test_ssh_target_of_a_root_profile_uses_keys_from_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "id_ed25519").write_text("key")
    target = Profile("a", "h", auto_nets=True, config_dir=tmp_path).ssh_target()
    assert target.user is None and target.ssh_command == ("ssh",)
    assert target.options == (
        f"UserKnownHostsFile={tmp_path}/ssh/known_hosts",
        f"IdentityFile={tmp_path}/ssh/id_ed25519",
    )


def test_profile_ssh_options_win_over_root_defaults(tmp_path: Path) -> None:
    p = Profile(
        "a",
        "h",
        auto_nets=True,
        config_dir=tmp_path,
        ssh_options=(("UserKnownHostsFile", "/x"),),
        identity="/k",
    )
    assert p.ssh_target().options == ("UserKnownHostsFile=/x",)


def test_profile_equality_ignores_where_it_was_written(tmp_path: Path) -> None:
    a = Profile("a", "h", auto_nets=True, source="x.yaml:1")
    assert a == dataclasses.replace(a, source="y.yaml:9")
    assert a != dataclasses.replace(a, streams=2)
    assert hash(a) == hash(dataclasses.replace(a, source="y.yaml:9"))


def test_config_diff_reports_what_a_reload_changes() -> None:
    a, b, c = (Profile(n, "h", auto_nets=True) for n in "abc")
    old = Config.of(a, b)
    new = Config.of(dataclasses.replace(a, source="moved:3"), dataclasses.replace(b, port=22), c)
    assert old.diff(new) == {"added": ["c"], "removed": [], "changed": ["b"], "unchanged": ["a"]}


# --- overlaps ------------------------------------------------------------------------------------


def net(name: str, *subnets: str, exclude: tuple[str, ...] = ()) -> Profile:
    return Profile(name, "h", subnets=subnets, exclude=exclude)


def test_overlapping_profiles_are_refused_naming_both_and_the_subnets() -> None:
    with pytest.raises(ConfigError) as info:
        check_overlaps([net("a", "10.0.0.0/8"), net("b", "192.168.0.0/16", "10.1.0.0/16")])
    assert str(info.value) == "profiles 'a' and 'b' overlap: 10.0.0.0/8 and 10.1.0.0/16"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("10.0.0.0/8", "11.0.0.0/8"),
        ("10.0.0.0/8:80", "10.0.0.0/8:443"),
        ("10.0.0.0/8:1-1000", "10.0.0.0/16:1001-2000"),
        ("0.0.0.0/0", "::/0"),
        ("10.0.0.0/8", "host.invalid"),  # host names are checked once resolved
    ],
)
def test_disjoint_profiles_are_accepted(a: str, b: str) -> None:
    check_overlaps([net("a", a), net("b", b)])


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0/0", "fd00::/8"),
        ("10.0.0.0/8:1-1000", "10.2.0.0/16:1000-2000"),
        ("10.0.0.0/8:443", "10.1.2.3"),
    ],
)
def test_overlap_counts_ports_only_when_both_ranges_are_disjoint(a: str, b: str) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        check_overlaps([net("a", a), net("b", b)])


def test_excludes_do_not_make_an_overlap_acceptable() -> None:
    with pytest.raises(ConfigError):
        check_overlaps([net("a", "10.0.0.0/8", exclude=("10.5.0.0/16",)), net("b", "10.5.0.0/16")])


def test_every_overlapping_pair_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        check_overlaps([net("a", "10.0.0.0/8"), net("b", "10.1.0.0/16"), net("c", "10.1.2.0/24")])
    assert len(str(info.value).splitlines()) == 3


# --- allows --------------------------------------------------------------------------------------


@pytest.fixture
def admin_gid(monkeypatch: pytest.MonkeyPatch) -> int:
    real = gid_of
    monkeypatch.setattr(auth, "gid_of", lambda name: 4000 if name == "shuttle" else real(name))
    return 4000


def test_allows_root_admins_and_the_allow_list(admin_gid: int) -> None:
    p = Profile("a", "h", auto_nets=True, allow=("user:1234", "group:5678", "user:nobody"))
    assert may_manage(p.allow, 0, [0])
    assert may_manage(p.allow, 1000, [1000, admin_gid])
    assert may_manage(p.allow, 1234, [1234])
    assert may_manage(p.allow, 2000, [2000, 5678])
    assert may_manage(p.allow, 65534, [65534])  # nobody, by name
    assert not may_manage(p.allow, 2000, [2000, 1234])  # a gid equal to an allowed uid is no user
    assert not may_manage(p.allow, 1000, [1000])


def test_allows_nobody_but_admins_without_an_allow_list(admin_gid: int) -> None:
    p = Profile("a", "h", auto_nets=True)
    assert not may_manage(p.allow, 1000, [1000, 1001])
    assert auth.is_admin(1000, [admin_gid]) and not auth.is_admin(1000, [])


def test_reference_documents_every_key() -> None:
    reference, man = profile_reference(), cfg.profile_reference_man()
    for key in PROFILE_KEYS:
        assert f"| `{key}` |" in reference and f".B {key}\n" in man
    assert set(PROFILE_KEYS) == {f.name for f in dataclasses.fields(Profile)} - {
        "name",
        "source",
        "config_dir",
    }
