"""Seeing and steering the running balancer: health state, admin API, metrics, status page."""
