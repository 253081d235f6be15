"""l4lb: a Layer-4 load balancer that tells every backend who the real client is.

It uses the PROXY protocol (v1 text, v2 binary) as HAProxy specified it.
"""

__version__ = "0.1.0"
