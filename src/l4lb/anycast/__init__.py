"""Anycast: announce this node's VIPs over BGP while it can serve them.

- :mod:`~l4lb.anycast.state`: the enums (why a VIP is or is not announced, BGP session states);
- :mod:`~l4lb.anycast.exabgp`: ExaBGP as a child process, driven through its process API;
- :mod:`~l4lb.anycast.bridge`: the helper ExaBGP runs as its API process (a pipe to l4lb);
- :mod:`~l4lb.anycast.second_chance`: nftables rules that hand unknown mid-flow segments to
  the other nodes instead of answering them with a reset;
- :mod:`~l4lb.anycast.announcer`: the policy (announce only what can serve, drain before
  withdraw) and the watchdog that withdraws when the event loop hangs.

docs/scale-out.md describes the fleet these pieces make.
"""
