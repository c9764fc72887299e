"""Who may hold an identity: registration entries and sidecar attestation."""
