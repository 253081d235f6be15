"""The PROXY policy from environment variables, for servers started by another program's command.

``uvicorn --workers N``, ``gunicorn -w N`` and ``--reload`` start fresh processes that import the
protocol or worker class by name; the environment is what reaches all of them unchanged:

``L4LB_TRUSTED_PROXIES``
    The balancers allowed to send a header: CIDR blocks separated by commas or spaces
    (``"10.0.0.0/8, 127.0.0.1/32"``). Needed under ``required``.
``L4LB_PROXY_MODE``
    ``required`` (the default), ``optional`` or ``off``, as ``accept_proxy`` in the balancer.
``L4LB_HEADER_TIMEOUT``
    Seconds to wait for the header (default 5).

Errors name the variable and what to write instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from l4lb.trust.policy import Mode, PolicyError, ProxyPolicy

__all__ = ["HEADER_TIMEOUT", "MODE", "TRUSTED", "policy_from_env", "policy_to_env"]

TRUSTED = "L4LB_TRUSTED_PROXIES"
MODE = "L4LB_PROXY_MODE"
HEADER_TIMEOUT = "L4LB_HEADER_TIMEOUT"


def policy_from_env(environ: Mapping[str, str] | None = None) -> ProxyPolicy:
    """The :class:`~l4lb.trust.policy.ProxyPolicy` the variables describe.

    Raises :class:`~l4lb.trust.policy.PolicyError` naming the variable on a bad value, and when
    ``required`` (the default) has no trusted balancer: that would refuse every connection.
    """
    env = os.environ if environ is None else environ
    trusted = env.get(TRUSTED, "").replace(",", " ").split()
    mode = env.get(MODE, Mode.REQUIRED.value).strip() or Mode.REQUIRED.value
    timeout_text = env.get(HEADER_TIMEOUT, "").strip()
    try:
        timeout = float(timeout_text) if timeout_text else 5.0
    except ValueError:
        raise PolicyError(
            f"{HEADER_TIMEOUT}={timeout_text!r}: expected a number of seconds, e.g. 5"
        ) from None
    try:
        policy = ProxyPolicy(mode=mode, trusted=trusted, header_timeout=timeout)
    except PolicyError as err:
        text = str(err)
        name = (
            MODE
            if text.startswith("mode")
            else TRUSTED
            if text.startswith("trusted")
            else HEADER_TIMEOUT
        )
        raise PolicyError(f"{name}: {text}") from None
    if policy.mode is Mode.REQUIRED and not policy.networks:
        raise PolicyError(
            f"{TRUSTED} is not set: with {MODE}=required every connection would be refused; "
            f"name the balancers, e.g. {TRUSTED}=10.0.0.0/8"
        )
    return policy


def policy_to_env(policy: ProxyPolicy) -> dict[str, str]:
    """The variables that make :func:`policy_from_env` return ``policy`` (without its
    ``options``, which keep their defaults)."""
    return {
        MODE: str(policy.mode),
        TRUSTED: ",".join(str(network) for network in policy.networks),
        HEADER_TIMEOUT: f"{policy.header_timeout:g}",
    }
