"""The datastore contract and its engines."""
