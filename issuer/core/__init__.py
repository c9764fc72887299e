"""The issuer's records and its in-process event hub."""
