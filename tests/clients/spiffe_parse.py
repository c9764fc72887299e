"""Load a task SVID with the unmodified `spiffe` package, as a standard SPIFFE consumer would.

  spiffe_parse.py SVID_PEM KEY_PEM BUNDLE_PEM TRUST_DOMAIN

Prints one JSON line: the SPIFFE ID and serial the package read, and whether the
leaf's signature verifies against an authority of the trust domain's bundle.
Runs in its own process: the `spiffe` package's protobufs clash with Tessera's.
"""

import json
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding


def main() -> int:
    from spiffe import TrustDomain, X509Bundle, X509Svid

    svid_path, key_path, bundle_path, td = sys.argv[1:5]
    try:
        svid = X509Svid.load(svid_path, key_path, Encoding.PEM)
        bundle = X509Bundle.load(TrustDomain(td), bundle_path, Encoding.PEM)
        leaf = svid.leaf
        verified = False
        for ca in bundle.x509_authorities:
            try:
                ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes,
                                       ec.ECDSA(leaf.signature_hash_algorithm))
                verified = True
            except Exception:  # noqa: BLE001 - try the next authority
                pass
        print(json.dumps({"spiffe_id": str(svid.spiffe_id), "serial": format(leaf.serial_number, "x"),
                          "verified": verified}))
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
