"""Shared helpers for tests that talk to real peers over real sockets."""
