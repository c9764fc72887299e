"""The audit trail: the hash-chain rule, the JSON-lines copy and the evidence report."""
