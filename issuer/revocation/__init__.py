"""Revocation: the kill switch, its log and the signed CRL."""
