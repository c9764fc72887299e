"""Signing X.509-SVIDs: the signer and its worker-process pool."""
