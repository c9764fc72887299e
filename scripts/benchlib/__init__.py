"""Modules of scripts/bench.py: pure statistics, the in-process limit, the sidecar-protocol client."""
