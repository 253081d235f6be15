"""l4lb: a Layer-4 load balancer that tells every backend who the real client is (PROXY protocol)."""

__version__ = "0.1.0"
