"""The few DER (X.690) pieces Tessera writes and reads by hand: a tag-length-value and its header.

Everything cryptographic stays with `cryptography`; these cover the CRL's TBSCertList, the task
binding extension's UTF8String and certificates laid back to back.
"""

from __future__ import annotations


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
