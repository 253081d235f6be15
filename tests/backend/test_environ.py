"""The policy from L4LB_* variables: values, defaults, and errors naming the variable."""

from __future__ import annotations

import ipaddress

import pytest

from l4lb.backend.environ import policy_from_env, policy_to_env
from l4lb.trust.policy import Mode, PolicyError, ProxyPolicy


@pytest.mark.parametrize(
    ("env", "mode", "trusted", "timeout"),
    [
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.0/8"}, Mode.REQUIRED, ["10.0.0.0/8"], 5.0),
        (
            {"L4LB_TRUSTED_PROXIES": " 10.0.0.0/8, 127.0.0.1  ::1 ", "L4LB_HEADER_TIMEOUT": "2.5"},
            Mode.REQUIRED,
            ["10.0.0.0/8", "127.0.0.1/32", "::1/128"],
            2.5,
        ),
        ({"L4LB_PROXY_MODE": "optional"}, Mode.OPTIONAL, [], 5.0),
        ({"L4LB_PROXY_MODE": "off", "L4LB_TRUSTED_PROXIES": ""}, Mode.OFF, [], 5.0),
    ],
)
def test_values(env: dict[str, str], mode: Mode, trusted: list[str], timeout: float) -> None:
    policy = policy_from_env(env)
    assert policy.mode is mode
    assert list(policy.networks) == [ipaddress.ip_network(t) for t in trusted]
    assert policy.header_timeout == timeout
    assert policy_from_env(policy_to_env(policy)) == policy


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "L4LB_TRUSTED_PROXIES is not set"),
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.1/8"}, "L4LB_TRUSTED_PROXIES: trusted: '10.0.0.1/8'"),
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.0/8", "L4LB_PROXY_MODE": "always"}, "L4LB_PROXY_MODE"),
        (
            {"L4LB_TRUSTED_PROXIES": "10.0.0.0/8", "L4LB_HEADER_TIMEOUT": "5s"},
            "L4LB_HEADER_TIMEOUT",
        ),
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.0/8", "L4LB_HEADER_TIMEOUT": "0"}, "L4LB_HEADER_TIMEOUT"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(")):
        policy_from_env(env)


def test_to_env_round_trip() -> None:
    policy = ProxyPolicy(mode="optional", trusted=["192.0.2.0/24"], header_timeout=1.5)
    assert policy_to_env(policy) == {
        "L4LB_PROXY_MODE": "optional",
        "L4LB_TRUSTED_PROXIES": "192.0.2.0/24",
        "L4LB_HEADER_TIMEOUT": "1.5",
    }
