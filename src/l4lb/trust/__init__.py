"""The trust boundary: who may send a PROXY header, and policy on the real client address.

:mod:`l4lb.trust.policy` holds the ``accept_proxy`` rules shared by the balancer and
:mod:`l4lb.backend`; the CIDR sets and per-client limits live beside it.
"""

from l4lb.trust.policy import Decision, HeaderGate, Mode, PolicyError, ProxyPolicy, Reason

__all__ = ["Decision", "HeaderGate", "Mode", "PolicyError", "ProxyPolicy", "Reason"]
