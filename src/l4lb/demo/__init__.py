"""The demo: ``l4lb demo`` (the balancer and two demo backends) and ``l4lb demo-backend``."""
