"""The certificate authority: its key and certificate, and the issuer's own serving certificate."""
