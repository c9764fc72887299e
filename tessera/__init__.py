"""Code shared by the issuer, the sidecar and the operator CLI."""
