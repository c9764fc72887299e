"""The Tessera sidecar: attests local processes and serves them SPIFFE identities."""
