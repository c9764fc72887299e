"""The task binding extension on task SVIDs: encode it for the CA, read it back for verifiers.

OID 2.25.86539311207409726924553800820856048122 (a UUID-derived OID, ITU-T X.667),
always non-critical so standard SPIFFE verifiers, which do not know it, still
accept the certificate. extnValue holds a DER UTF8String whose text is compact
JSON with sorted keys:

    {"entry_id": "...", "owner": "...", "scopes": ["a", "b"], "task_id": "...", "v": 1}

JSON inside a UTF8String keeps the encoding readable with `openssl x509 -text`
and decodable without an ASN.1 schema; `v` versions the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from cryptography import x509

from tessera import der

TASK_OID = x509.ObjectIdentifier("2.25.86539311207409726924553800820856048122")
VERSION = 1
_UTF8STRING = 0x0C


@dataclass(frozen=True)
class TaskBinding:
    """The extension's content; its JSON keys are these field names (and `v`)."""

    task_id: str
    scopes: tuple[str, ...]
    entry_id: str
    owner: str


def encode(binding: TaskBinding) -> x509.UnrecognizedExtension:
    text = json.dumps({"v": VERSION, **asdict(binding)}, sort_keys=True, separators=(",", ":")).encode()
    return x509.UnrecognizedExtension(TASK_OID, der.tlv(_UTF8STRING, text))


def decode_value(value: bytes) -> TaskBinding:
    """The binding from an extnValue; ValueError if it is not one."""
    try:
        start, end = der.read_header(value, 0, _UTF8STRING)
    except ValueError as e:
        raise ValueError(f"task extension is not a DER UTF8String: {e}") from None
    if end != len(value):
        raise ValueError("task extension length does not match its content")
    try:
        data = json.loads(value[start:].decode())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long number, deep nesting
        raise ValueError(f"task extension is not JSON: {e}") from None
    # `type(...) is int`: true and 1.0 equal 1 but are not this layout's version number.
    if not isinstance(data, dict) or type(data.get("v")) is not int or data["v"] != VERSION:
        raise ValueError("task extension has an unknown version")
    # Every field is text but scopes, a list of texts.
    values = {f.name: data.get(f.name) for f in fields(TaskBinding)}
    scopes = values["scopes"]
    if not all(isinstance(v, str) for k, v in values.items() if k != "scopes") or not isinstance(scopes, list) or \
            not all(isinstance(s, str) for s in scopes):
        raise ValueError("task extension is missing fields")
    return TaskBinding(**{**values, "scopes": tuple(scopes)})


def read(cert: x509.Certificate) -> TaskBinding | None:
    """The task a certificate was issued for; None for an identity SVID; ValueError if malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(TASK_OID)
    except x509.ExtensionNotFound:
        return None
    if ext.critical:
        raise ValueError("task extension must not be critical")
    return decode_value(ext.value.value)
