"""uvicorn's worker processes get the protocol class by pickle: it must survive the trip."""

from __future__ import annotations

import multiprocessing
import pickle
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from l4lb.backend.uvicorn import proxy_protocol_http
from l4lb.trust.policy import ProxyPolicy

ROOT = Path(__file__).resolve().parents[2]


def test_made_class_pickles_by_its_policy() -> None:
    cls: Any = proxy_protocol_http(mode="optional", trusted=["192.0.2.0/24"], header_timeout=2)
    clone: Any = pickle.loads(pickle.dumps(cls))
    assert clone is not cls
    assert clone.policy == cls.policy == ProxyPolicy("optional", ["192.0.2.0/24"], 2)
    assert clone.http_protocol_class is cls.http_protocol_class
    assert clone.__name__ == cls.__name__
    assert clone.__mro__[1] is cls.__mro__[1]  # the same named base


def _policy_of(cls: Any) -> str:
    return repr(cls.policy)


def test_made_class_crosses_to_a_spawned_process() -> None:
    # uvicorn's --workers and --reload use the "spawn" start method: a fresh interpreter.
    cls = proxy_protocol_http(trusted=["198.51.100.0/24"], http="h11")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        text = pool.apply(_policy_of, (cls,))
    assert text == repr(ProxyPolicy("required", ["198.51.100.0/24"]))


def test_tls_class_refuses_to_pickle_with_a_reason() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cls = proxy_protocol_http(trusted=["127.0.0.1/32"], ssl=context)
    with pytest.raises(pickle.PicklingError, match="SSLContext does not pickle"):
        pickle.dumps(cls)


def _import(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from uvicorn.importer import import_from_string\n"
        "cls = import_from_string('l4lb.backend.uvicorn:ProxyProtocolHTTP')\n"
        "print(cls.__name__, cls.policy.mode, [str(n) for n in cls.policy.networks],"
        " cls.http_protocol_class.__name__)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_environment_class_by_import_string() -> None:
    out = _import({"L4LB_TRUSTED_PROXIES": "10.0.0.0/8,127.0.0.1", "L4LB_HTTP": "h11"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 2)[:2] == ["ProxyProtocolHTTP", "required"]
    assert "['10.0.0.0/8', '127.0.0.1/32'] H11Protocol" in out.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "L4LB_TRUSTED_PROXIES is not set"),
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.0/33"}, "'10.0.0.0/33' is not a CIDR block"),
        ({"L4LB_TRUSTED_PROXIES": "10.0.0.0/8", "L4LB_HTTP": "nope"}, "L4LB_HTTP='nope'"),
    ],
)
def test_environment_class_bad_settings_exit_with_one_line(
    env: dict[str, str], message: str
) -> None:
    out = _import(env)
    assert out.returncode == 1
    assert message in out.stderr and "l4lb.backend.uvicorn:ProxyProtocolHTTP" in out.stderr
    assert "Traceback" not in out.stderr
