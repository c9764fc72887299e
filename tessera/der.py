"""The few DER (X.690) pieces Tessera writes and reads by hand: a tag-length-value and its header,
integers, times, object identifiers, extensions, and a signed structure.

Everything cryptographic stays with `cryptography` (it signs, and encodes every extension value);
these cover the CRL's TBSCertList, the leaf's TBSCertificate, the task binding extension's
UTF8String and certificates laid back to back. Both encoders are checked byte for byte against
`cryptography`'s builders in the tests.
"""

from __future__ import annotations

import time as _time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec


def tlv(tag: int, body: bytes) -> bytes:
    """`body` under `tag`, with its definite-form length (short form below 128 octets)."""
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def read_header(buf: bytes, i: int, tag: int) -> tuple[int, int]:
    """(start, end) of the value of the element at `buf[i]`, which must carry `tag`; ValueError if the
    header is malformed (wrong tag, indefinite or over-long length) or the value runs past `buf`."""
    if i + 2 > len(buf) or buf[i] != tag:
        raise ValueError(f"expected DER tag 0x{tag:02x}")
    first = buf[i + 1]
    if first < 0x80:
        length, start = first, i + 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or i + 2 + n > len(buf):
            raise ValueError("bad DER length")
        length, start = int.from_bytes(buf[i + 2:i + 2 + n], "big"), i + 2 + n
    if start + length > len(buf):
        raise ValueError("truncated DER value")
    return start, start + length


def integer(n: int) -> bytes:
    """A non-negative INTEGER: big-endian, with a 0x00 first when the top bit would read as a sign."""
    if n < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def time(t: int) -> bytes:
    """RFC 5280 4.1.2.5 and 5.1.2.4: UTCTime for 1950 through 2049, GeneralizedTime otherwise; seconds, Z."""
    g = _time.gmtime(t)
    if 1950 <= g.tm_year < 2050:
        return b"\x17\x0d" + _time.strftime("%y%m%d%H%M%SZ", g).encode()
    if not 0 < g.tm_year <= 9999:
        raise ValueError(f"time {t} is outside the years 1 to 9999")
    return b"\x18\x0f" + (f"{g.tm_year:04d}" + _time.strftime("%m%d%H%M%SZ", g)).encode()


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (X.690 8.19): the first two arcs as one, each arc in base 128."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39) or min(arcs) < 0:
        raise ValueError(f"not an object identifier: {dotted}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


_CRITICAL = b"\x01\x01\xff"  # BOOLEAN TRUE; critical is DEFAULT FALSE, so a non-critical one leaves it out


def extension(oid_tlv: bytes, value: bytes, critical: bool = False) -> bytes:
    """An Extension: its OID (whole TLV), criticality, and `value` (the extension value's DER) as an OCTET STRING."""
    return tlv(0x30, oid_tlv + (_CRITICAL if critical else b"") + tlv(0x04, value))


# ecdsa-with-SHA256 (RFC 5758 3.2: no parameters): every CA key Tessera signs with is ECDSA.
ECDSA_WITH_SHA256 = tlv(0x30, bytes.fromhex("06082a8648ce3d040302"))
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def signed(tbs: bytes, key: ec.EllipticCurvePrivateKey, algorithm: ec.ECDSA | None = None) -> bytes:
    """A signed structure (a Certificate or a CertificateList): `tbs`, the algorithm, and `key`'s signature over
    `tbs` as a BIT STRING."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an ECDSA key")
    signature = key.sign(tbs, algorithm or _ECDSA_SHA256)
    return tlv(0x30, b"".join([tbs, ECDSA_WITH_SHA256, tlv(0x03, b"\x00" + signature)]))
