"""The SPIFFE Workload API, generated from proto/tessera/workload/ at build time."""
