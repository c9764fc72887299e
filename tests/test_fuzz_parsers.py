"""Property tests over every parser and rule: each input gives a valid result or the module's
documented error type, nothing else (no KeyError, RecursionError, UnicodeError, TypeError...).

Bounded by the profile in tests/fuzzing.py (TESSERA_FUZZ=long for the nightly run, scripts/fuzz).
"""

from __future__ import annotations

import datetime as dt
import json
import string

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import assume, example, given
from hypothesis import strategies as st

import fuzzing  # noqa: F401 - loads the hypothesis profile
from agent_sidecar import config as sidecar_config
from issuer import config as issuer_config
from issuer.tasks import policy
from tessera import configfile, crl, der, durations, pem, selectors, spiffeid, taskext, x509svid
from tessera.errors import ConfigError, InvalidArgument

# -- shared material: one real CA, made once ---------------------------------------------------

CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_CERT = x509svid.build_ca(CA_KEY, "example.org", dt.timedelta(days=1))
CA_AKI = x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key())
LEAF_KEY = x509svid.new_key()
GOOD_CSR = x509svid.make_csr(LEAF_KEY)
GOOD_CRL = crl.build(CA_CERT, CA_KEY, [crl.Revoked("abc", 1_700_000_000, "keyCompromise")], 7,
                     1_700_000_000, 1_700_000_600)
# Text that looks like what people and peers send: ASCII, control characters, and some Unicode
# (full-width digits, non-ASCII letters, line separators) that regexes treat specially.
TEXT = st.text(alphabet=st.one_of(st.sampled_from(string.printable), st.characters()), max_size=80)


def mutate(base: bytes):
    """`base` with bytes flipped, cut short, or extended: structurally almost valid input."""
    return st.one_of(
        st.binary(max_size=len(base) + 64),
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)).map(
            lambda t: base[:t[0]] + bytes([t[1]]) + base[t[0] + 1:]),
        st.integers(0, len(base)).map(lambda n: base[:n]),
        st.binary(max_size=32).map(lambda tail: base + tail),
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=2, max_size=8).map(
            lambda flips: bytes(_flip(base, flips))),
    )


REFUSED = object()


def outcome(fn, *args, error: type[Exception] = InvalidArgument):
    """fn(*args), or REFUSED when it raised its documented `error` with a message. Any other exception
    propagates and fails the property: that is the bug these tests look for."""
    try:
        return fn(*args)
    except error as e:
        assert str(e), f"{type(e).__name__} without a message"
        return REFUSED


def _flip(base: bytes, flips):
    out = bytearray(base)
    for i, v in flips:
        out[i] = v
    return out


# -- SPIFFE IDs ----------------------------------------------------------------------------------

_SEG = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
_TD = st.text(alphabet=string.ascii_lowercase + string.digits + "._-", min_size=1, max_size=20)
VALID_IDS = st.builds(lambda td, segs: "spiffe://" + td + "".join("/" + s for s in segs), _TD,
                      st.lists(_SEG, max_size=5))
_ID_CHARS = set(string.ascii_letters + string.digits + "._-/:")


@given(st.one_of(TEXT, TEXT.map(lambda t: "spiffe://" + t), VALID_IDS.map(lambda v: v + "\n"),
                 st.builds(lambda v, t: v + t, VALID_IDS, TEXT)))
@example("spiffe://example.org\n")
@example("spiffe://example.org/\udc80")  # a non-UTF-8 argv byte, as Python decodes it
@example("spiffe://example.org/agent\n")
@example("spiffe://example.org/a/b/\n")
def test_spiffe_id_parser_gives_a_canonical_id_or_invalid_argument(value):
    sid = outcome(spiffeid.parse, value)
    if sid is REFUSED:
        return
    # Accepted means: only the characters the standard allows, and it prints back exactly.
    assert str(sid) == value
    assert set(value[len("spiffe://"):]) <= _ID_CHARS, value
    assert spiffeid.parse(str(sid)) == sid


@given(VALID_IDS)
def test_every_well_formed_spiffe_id_is_accepted_and_round_trips(value):
    assert str(spiffeid.parse(value)) == value


@given(TEXT)
@example("host-a\n")
def test_sidecar_name_gives_an_id_that_parses_back_or_invalid_argument(name):
    sid = outcome(spiffeid.sidecar_id, "example.org", name)
    if sid is REFUSED:
        return
    assert spiffeid.parse(str(sid)) == sid
    assert spiffeid.sidecar_name(sid) == name


# -- selectors -----------------------------------------------------------------------------------

_SEL_KEYS = st.sampled_from(["uid", "gid", "user", "group", "path", "sha256", "pid", ""])
_SELECTORS = st.one_of(TEXT, st.builds(lambda k, v: f"unix:{k}:{v}", _SEL_KEYS, TEXT),
                       st.builds(lambda v: f"unix:uid:{v}", st.integers(-5, 2**70)))


@given(_SELECTORS)
@example("unix:uid:\uff11\uff10\uff10\uff10")  # full-width digits: no kernel uid reads like that
@example("unix:uid:1000\n")
@example("unix:uid:4294967296")  # past the 32-bit uid range
@example("unix:path:/usr/bin/sleep\n")
@example("unix:path:/usr/bin/\x00sleep")
@example("unix:user:alice\n")
def test_selector_parser_gives_a_canonical_selector_or_invalid_argument(value):
    canon = outcome(selectors.parse_selector, value)
    if canon is REFUSED:
        return
    typ, key, val = canon.split(":", 2)
    assert typ == "unix"
    # A canonical selector is what the sidecar derives from the kernel: it must be able to match one.
    if key in ("uid", "gid"):
        assert val.isascii() and val.isdigit() and int(val) < 2**32, canon
    elif key == "sha256":
        assert len(val) == 64 and all(c in "0123456789abcdef" for c in val), canon
    elif key in ("user", "group"):
        assert val.isascii() and val.isprintable(), canon
    elif key == "path":
        assert val.startswith("/") and "\x00" not in val and "\n" not in val, canon
    assert selectors.parse_selector(canon) == canon  # canonical is a fixed point


@given(st.lists(_SELECTORS, max_size=6), st.frozensets(_SELECTORS, max_size=6))
def test_selector_matching_needs_every_selector_and_at_least_one(entry_sels, workload_sels):
    got = selectors.matches(entry_sels, workload_sels)
    assert got == (bool(entry_sels) and all(s in workload_sels for s in entry_sels))


# -- durations -------------------------------------------------------------------------------------

_DURATIONS = st.one_of(TEXT, st.integers(-10, 2**80), st.builds(
    lambda n, u: f"{n}{u}", st.integers(-5, 10**30), st.sampled_from(["s", "m", "h", "d", "", "w", " d"])))


@given(_DURATIONS)
def test_duration_parser_gives_a_positive_int_or_invalid_argument(value):
    seconds = outcome(durations.parse_duration, value)
    if seconds is REFUSED:
        return
    assert isinstance(seconds, int) and seconds > 0


@given(_DURATIONS)
@example("\uff13\uff10s")  # full-width "30s"
@example("99999999999999d")
@example("1" * 5000 + "s")  # past Python's int-from-string digit limit: a raw ValueError today
def test_duration_parser_takes_only_ascii_digits_and_bounded_values(value):
    seconds = outcome(durations.parse_duration, value)
    if seconds is REFUSED:
        return
    assert str(value).isascii()
    assert seconds <= 100 * 365 * 86400  # more than a century is no lifetime Tessera deals in


@given(st.integers(1, durations.MAX_DURATION))
def test_formatted_durations_parse_back_to_the_same_seconds(seconds):
    assert durations.parse_duration(durations.format_duration(seconds)) == seconds


# -- config files (configfile, issuer/config, agent_sidecar/config) ---------------------------------

_YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**70), st.floats(allow_nan=False),
                          TEXT, st.sampled_from(["10m", "0s", "-1s", "1d", "127.0.0.1:0", "0666", "/tmp"]))
# Mapping keys are strings here; keys of other types have their own test below.
_YAML_VALUES = st.recursive(_YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


def _write(tmp_path_factory, data) -> str:
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_bytes(data if isinstance(data, bytes) else yaml.safe_dump(data).encode())
    return str(p)


@given(st.one_of(TEXT.map(lambda t: t.encode("utf-8", "replace")), _YAML_VALUES.map(lambda v: yaml.safe_dump(v).encode())))
def test_yaml_loader_gives_a_section_or_config_error(tmp_path_factory, data):
    outcome(configfile.load_yaml, _write(tmp_path_factory, data), error=ConfigError)


@given(st.binary(max_size=200))
@example(b"\x80")
def test_yaml_loader_takes_any_bytes(tmp_path_factory, data):
    outcome(configfile.load_yaml, _write(tmp_path_factory, data), error=ConfigError)


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deeply_nested_yaml_is_a_config_error(tmp_path, opener):
    # One depth, not a search: each failing example takes PyYAML seconds, and shrinking them took minutes.
    path = tmp_path / "c.yaml"
    path.write_text(opener * 1200)
    with pytest.raises(ConfigError):
        configfile.load_yaml(path)


_ISSUER_KEYS = ["trust_domain", "data_dir", "listen_address", "bootstrap_address", "admin_socket", "admin_uids",
                "default_x509_ttl", "sidecar_svid_ttl", "join_token_ttl", "ca_ttl", "server_name",
                "resync_interval", "max_workers", "signing_workers", "log_level", "audit_file",
                "metrics_address", "crl_validity", "policy", "unknown_key"]
_ISSUER_BASE = {"trust_domain": "example.org", "data_dir": "/tmp/x", "listen_address": "127.0.0.1:0"}
_SIDECAR_KEYS = ["issuer_address", "issuer_bootstrap_address", "trust_bundle", "join_token", "data_dir",
                 "socket_path", "socket_mode", "server_name", "exe_hash_max_bytes", "log_level",
                 "metrics_address", "output_dir", "crl_check_interval", "unknown_key"]
_SIDECAR_BASE = {"issuer_address": "127.0.0.1:1", "trust_bundle": "/tmp/b.pem", "data_dir": "/tmp/d",
                 "socket_path": "/tmp/s.sock"}


def _config_docs(keys, base):
    return st.builds(lambda over, drop: {**{k: v for k, v in base.items() if k not in drop}, **over},
                     st.dictionaries(st.sampled_from(keys), _YAML_VALUES, max_size=4),
                     st.sets(st.sampled_from(list(base)), max_size=1))


@given(_config_docs(_ISSUER_KEYS, _ISSUER_BASE))
def test_issuer_config_gives_a_config_or_config_error(tmp_path_factory, doc):
    outcome(issuer_config.load, _write(tmp_path_factory, doc), error=ConfigError)


@given(_config_docs(_SIDECAR_KEYS, _SIDECAR_BASE))
def test_sidecar_config_gives_a_config_or_config_error(tmp_path_factory, doc):
    outcome(sidecar_config.load, _write(tmp_path_factory, doc), error=ConfigError)


@pytest.mark.parametrize("doc", [{"policy": {"": None, 0: None}}])
def test_config_with_a_non_string_key_is_a_config_error(tmp_path_factory, doc):
    with pytest.raises(ConfigError):
        issuer_config.load(_write(tmp_path_factory, {**_ISSUER_BASE, **doc}))


# -- policy (tiers and CEL rules) ------------------------------------------------------------------

_CEL = st.one_of(TEXT, st.sampled_from([
    "true", "false", "1", "'x'", "context.env == 'prod'", "has(context.env) && context.env == 'prod'",
    "ttl > 60", "size(scopes) > 1", "scopes.exists(s, s.startsWith('db:'))", "entry.owner == 'alice'",
    "1/0 == 1", "time > timestamp('2020-01-01T00:00:00Z')", "context.x.y.z", "int(context.n) > 3",
    "((((((((((true))))))))))", "[" * 50, "x" * 300]))
_RULE = st.fixed_dictionaries({"name": TEXT, "effect": st.sampled_from(list(policy.EFFECTS) + ["maybe"]),
                               "condition": st.one_of(_CEL, st.booleans(), st.integers()), "reason": TEXT})
_TIER = st.fixed_dictionaries({"max_task_ttl": _YAML_SCALARS, "max_identity_ttl": _YAML_SCALARS},
                              optional={"approval": _YAML_SCALARS, "other": _YAML_SCALARS})
_POLICY_DOCS = st.fixed_dictionaries({}, optional={
    "tiers": st.dictionaries(st.one_of(TEXT, st.sampled_from(["low", "high"])), _TIER, max_size=3),
    "rules": st.lists(st.one_of(_RULE, _YAML_VALUES), max_size=3),
    "approval_timeout": _YAML_SCALARS})


@given(_POLICY_DOCS)
def test_policy_loader_gives_a_policy_or_config_error(doc):
    outcome(policy.load_section, configfile.Section(doc, "policy.", "config"), error=ConfigError)


_CONTEXT = st.dictionaries(TEXT, TEXT, max_size=4)


@given(st.lists(_RULE.filter(lambda r: r["effect"] in policy.EFFECTS), min_size=1, max_size=3),
       st.lists(TEXT, max_size=3), st.integers(-10, 10**6), _CONTEXT)
def test_policy_evaluation_decides_for_any_request(rules, scopes, ttl, context):
    for i, r in enumerate(rules):
        r["name"] = f"r{i}"  # names must be unique; the rule's content is what is fuzzed
    pol = outcome(policy.load_section, configfile.Section({"rules": rules}, "policy.", "config"), error=ConfigError)
    assume(pol is not REFUSED)
    entry = {"id": "e1", "state": "active", "expires_at": 2e9, "tier": "low", "scopes": ["*"],
             "spiffe_id": "spiffe://example.org/a", "owner": "alice"}
    req = policy.TaskRequest(entry=entry, sidecar={"id": "s"}, workload={"uid": 1}, task_id="t",
                             scopes=tuple(scopes), ttl=ttl, context=context, now=1.7e9)
    d = policy.evaluate(pol, req)
    assert d.effect in policy.EFFECTS and d.reason
    if d.effect != "deny":
        assert 0 < d.ttl <= ttl


# -- CSRs ----------------------------------------------------------------------------------------

def _other_csr(key) -> bytes:
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)


RSA_CSR = _other_csr(rsa.generate_private_key(65537, 1024))
ED_CSR = _other_csr(ed25519.Ed25519PrivateKey.generate())
P521_CSR = _other_csr(ec.generate_private_key(ec.SECP521R1()))


@given(st.one_of(mutate(GOOD_CSR), mutate(RSA_CSR), mutate(ED_CSR), st.just(P521_CSR)))
@example(b"")
@example(GOOD_CSR.replace(bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("008648ce3d030107")))  # unknown curve
@example(GOOD_CSR.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1))  # CSR version 2: InvalidVersion, no ValueError
@example(RSA_CSR)
@example(ED_CSR)
def test_csr_gives_an_ec_key_or_invalid_argument(data):
    key = outcome(x509svid.csr_public_key, data)
    if key is REFUSED:
        return
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1))


# -- certificates: the SPIFFE ID in a leaf ------------------------------------------------------------

def _leaf_with_sans(uris: list[str]) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(CA_CERT.subject)
         .public_key(LEAF_KEY.public_key()).serial_number(1).not_valid_before(now)
         .not_valid_after(now + dt.timedelta(hours=1)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=True)
    return b.sign(CA_KEY, hashes.SHA256())


_URIS = st.lists(st.one_of(VALID_IDS, TEXT.filter(str.isascii), st.just("spiffe://Example.org/x")), max_size=3)


@given(_URIS)
@example(["spiffe://example.org/a b"])
@example(["https://example.org/"])
def test_spiffe_id_of_a_certificate_gives_an_id_or_value_error(uris):
    try:
        cert = _leaf_with_sans(uris)
    except ValueError:
        assume(False)
    # Documented ValueError: the verifier and the issuer's peer check catch that.
    sid = outcome(x509svid.spiffe_id_of, cert, error=ValueError)
    if sid is REFUSED:
        return
    assert [str(sid)] == uris


# -- DER helpers and PEM/DER certificates -----------------------------------------------------------

@given(st.binary(max_size=64), st.integers(0, 70), st.integers(0, 255))
def test_der_header_reader_gives_bounds_inside_the_buffer_or_value_error(buf, i, tag):
    got = outcome(der.read_header, buf, i, tag, error=ValueError)
    if got is REFUSED:
        return
    start, end = got
    assert i + 2 <= start <= end <= len(buf)


@given(st.integers(0, 255), st.binary(max_size=70000))
def test_der_tlv_reads_back_its_own_value(tag, body):
    enc = der.tlv(tag, body)
    start, end = der.read_header(enc, 0, tag)
    assert enc[start:end] == body and end == len(enc)


CERT_DER = CA_CERT.public_bytes(serialization.Encoding.DER)


@given(st.one_of(mutate(CERT_DER), mutate(CERT_DER + CERT_DER)))
@example(CERT_DER.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03", 1))  # X.509 "v4": InvalidVersion
def test_split_der_gives_certificates_or_value_error(blob):
    certs = outcome(pem.split_der, blob, error=ValueError)
    if certs is REFUSED:
        return
    assert pem.der_concat(certs) == blob


KEY_DER = pem.key_pkcs8_der(LEAF_KEY)
RSA_KEY_DER = pem.key_pkcs8_der(rsa.generate_private_key(65537, 1024))


@given(st.one_of(mutate(KEY_DER), mutate(RSA_KEY_DER)))
@example(b"")
def test_key_from_der_gives_pem_or_value_error(data):
    out = outcome(pem.key_pem_from_der, data, error=ValueError)
    if out is REFUSED:
        return
    assert out.startswith(b"-----BEGIN PRIVATE KEY-----")


# -- the task extension ------------------------------------------------------------------------------

_BINDINGS = st.builds(taskext.TaskBinding, TEXT, st.lists(TEXT, max_size=4).map(tuple), TEXT, TEXT)
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), TEXT),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                     max_leaves=8)


@given(_BINDINGS)
def test_task_binding_round_trips_through_its_extension(binding):
    assert taskext.decode_value(taskext.encode(binding).value) == binding


def _utf8(text: bytes) -> bytes:
    return der.tlv(0x0C, text)


@given(st.one_of(
    st.binary(max_size=100),
    _BINDINGS.map(lambda b: taskext.encode(b).value).flatmap(mutate),
    _JSON.map(lambda j: _utf8(json.dumps(j).encode())),
    _JSON.map(lambda j: _utf8(json.dumps({"v": 1, "task_id": j, "entry_id": "e", "owner": "o",
                                                         "scopes": []}).encode())),
))
@example(_utf8(b"[" * 100_000))  # nesting past Python's recursion limit
@example(_utf8(b'{"v": true, "task_id": "t", "entry_id": "e", "owner": "o", "scopes": []}'))
@example(_utf8(b'{"v": 1' + b"0" * 5000 + b"}"))
def test_task_extension_gives_a_binding_or_value_error(value):
    b = outcome(taskext.decode_value, value, error=ValueError)
    if b is REFUSED:
        return
    assert isinstance(b, taskext.TaskBinding)
    assert taskext.decode_value(taskext.encode(b).value) == b


# -- CRLs -------------------------------------------------------------------------------------------

@given(st.one_of(mutate(GOOD_CRL), mutate(crl.pem(crl.load(GOOD_CRL)))))
@example(GOOD_CRL)
def test_crl_accept_gives_a_crl_or_crl_error(data):
    got = outcome(crl.accept, data, [CA_CERT], {}, error=crl.CrlError)
    if got is REFUSED:
        return
    # Only a CRL the CA signed is ever taken.
    assert crl.verify(got.crl, [CA_CERT]) is CA_CERT and got.signer is CA_CERT
