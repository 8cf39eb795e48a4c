"""DNS names shared between profiles are refused like shared subnets; profiles as
TunnelSpecs keep their DNS, auto_nets and remote_hosts settings."""

from __future__ import annotations

import pytest

from shuttled.config import DnsSettings, Profile, check_overlaps, domain_overlaps
from shuttled.daemon import spec_for
from shuttled.errors import ConfigError


def dns(name: str, mode: str, *domains: str, subnet: str | None = None) -> Profile:
    return Profile(
        name=name, remote="h", subnets=(subnet,) if subnet else (), dns=DnsSettings(mode, domains)
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("split", "corp.example"), ("split", "lab.example")),
        (("split", "corp.example"), ("split", "xcorp.example")),
        (("split", "corp.example"), ("off",)),
        (("all",), ("off",)),
    ],
)
def test_profiles_with_separate_names_are_accepted(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    check_overlaps([dns("a", *a), dns("b", *b)])


@pytest.mark.parametrize(
    ("a", "b", "detail"),
    [
        (("split", "corp.example"), ("split", "corp.example"), "corp.example and corp.example"),
        (
            ("split", "eu.corp.example"),
            ("split", "x.test", "corp.example"),
            "eu.corp.example and corp.example",
        ),
        (("all",), ("split", "lab.example"), "every name and lab.example"),
        (("all",), ("all",), "every name and every name"),
    ],
)
def test_overlapping_names_are_refused_naming_both(
    a: tuple[str, ...], b: tuple[str, ...], detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_overlaps([dns("a", *a, subnet="10.1.0.0/16"), dns("b", *b, subnet="10.2.0.0/16")])
    assert str(info.value) == f"profiles 'a' and 'b' overlap in DNS: {detail}"


def test_domain_overlaps_are_by_whole_labels() -> None:
    assert domain_overlaps(["corp.example"], ["a.corp.example", "acorp.example"]) == [
        ("corp.example", "a.corp.example")
    ]


def test_spec_carries_the_profiles_dns_and_learning() -> None:
    profile = Profile(
        name="w",
        remote="h",
        auto_nets=True,
        remote_hosts=True,
        dns=DnsSettings("split", ("corp.example",), ("10.0.0.53",)),
    )
    spec = spec_for(profile)
    assert (spec.dns, spec.dns_mode, spec.dns_domains, spec.dns_upstream) == (
        True,
        "split",
        ("corp.example",),
        ("10.0.0.53",),
    )
    assert spec.auto_nets and spec.remote_hosts
    plan = spec.dns_plan()
    assert plan is not None and plan.mode == "split" and plan.domains == ("corp.example",)


def test_remote_hosts_alone_is_split_dns_without_domains() -> None:
    plan = spec_for(
        Profile(name="w", remote="h", subnets=("10.0.0.0/8",), remote_hosts=True)
    ).dns_plan()
    assert plan is not None and (plan.mode, plan.domains) == ("split", ())
    assert spec_for(Profile(name="w", remote="h", subnets=("10.0.0.0/8",))).dns_plan() is None
