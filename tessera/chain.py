"""The path from a leaf to a bundle root, as Tessera's hierarchy allows it: leaf <- intermediate <- root,
or leaf <- root (SVIDs signed before intermediates existed, still held by upgraded stores).

A root is a trust anchor: being in the bundle is all it needs. An intermediate is checked here
as any path validator would: a CA (basicConstraints cA; keyCertSign when keyUsage is present),
within its validity, with the root's name as issuer and the root's signature. The leaf is only
matched to its issuer by name and signature; its own validity, revocation and SPIFFE ID are the
caller's rules (the verifier and the sidecar word those refusals themselves).
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature


class ChainError(ValueError):
    """No acceptable path from the certificate to a bundle root."""


def authority_key_id(obj: x509.Certificate | x509.CertificateRevocationList) -> str | None:
    """The signer a certificate or CRL names in its authority key identifier (hex), unverified; None if absent."""
    try:
        kid = obj.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        return None
    return kid.hex() if kid else None


def signers(certs: Sequence[x509.Certificate]) -> frozenset[str]:
    """The ids of every authority above a chain (leaf first): the leaf's signer, and the intermediate's root.
    A taint naming any of them (an intermediate, or a root with everything under it) reaches the chain."""
    return frozenset(a for a in (authority_key_id(c) for c in certs) if a)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `cert` (issuer name and signature)."""
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def check_intermediate(cert: x509.Certificate, roots: Iterable[x509.Certificate],
                       now: dt.datetime | None = None, dates: bool = True) -> x509.Certificate:
    """The bundle root that signed the CA certificate `cert`; ChainError saying why if it may not sign.

    `dates=False` for checking the signer of a CRL: the CRL is authentic if the key the root certified
    signed it, whatever the time (a host whose clock lags the issuer's must still take a new
    intermediate's CRL); the dates matter to the certificates an intermediate signs, and `path` checks them.
    """
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        raise ChainError("intermediate has no basicConstraints") from None
    if not bc.ca:
        raise ChainError("intermediate is not a CA certificate")
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise ChainError("intermediate may not sign certificates (keyUsage)")
    except x509.ExtensionNotFound:
        pass
    now = now or dt.datetime.now(dt.timezone.utc)
    if dates and not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ChainError("intermediate is expired or not yet valid")
    for root in roots:
        if issued_by(cert, root):
            return root
    raise ChainError("intermediate is not signed by a bundle root")


def path(leaf: x509.Certificate, roots: Sequence[x509.Certificate], intermediates: Iterable[x509.Certificate] = (),
         now: dt.datetime | None = None) -> tuple[x509.Certificate, ...]:
    """(leaf, root) or (leaf, intermediate, root); ChainError if neither exists among what is given."""
    for root in roots:
        if issued_by(leaf, root):
            return (leaf, root)
    reason = "certificate does not chain to the trust bundle"
    for ca in intermediates:
        if ca.subject != leaf.issuer or not issued_by(leaf, ca):
            continue
        try:
            return (leaf, ca, check_intermediate(ca, roots, now))
        except ChainError as e:
            reason = f"certificate's issuer does not chain to the trust bundle: {e}"
    raise ChainError(reason)
