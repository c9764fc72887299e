"""Helpers of scripts/bench: percentiles, the printed table, the load clients and the floor server."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib import stats  # noqa: E402


def test_percentile_uses_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.percentile(values, 50) == 3.0
    assert stats.percentile(values, 99) == 5.0
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(list(range(1, 101)), 99) == 99


def test_percentile_of_nothing_is_nan_and_bad_p_is_refused():
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_rate_and_rounding_report_missing_values_as_none():
    assert stats.rate(500, 2.0) == 250.0
    assert stats.rounded(stats.rate(1, 0)) is None
    assert stats.rounded(None) is None
    assert stats.rounded(1.26, 1) == 1.3


def test_table_aligns_values_and_prints_missing_as_na():
    text = stats.table([("limit_sign_per_s", 7000.0, "note"), ("crl_lookup_ns", None, "")])
    lines = text.splitlines()
    assert lines[0].split() == ["limit_sign_per_s", "7,000.0", "note"]
    assert lines[1].split() == ["crl_lookup_ns", "n/a"]
    assert lines[0].index("7,000.0") + len("7,000.0") == lines[1].index("n/a") + len("n/a")


def test_propagation_delay_is_per_revocation_and_stream_from_the_command_returning():
    returned = {7: 100.0, 8: 200.0}
    received = [(0, 7, 100.010), (1, 7, 100.030), (0, 8, 200.005), (1, 8, 200.002),
                (0, 5, 50.0),            # an earlier revocation, not one the benchmark made
                (0, 7, 101.0)]           # a repeat: the first arrival counts
    delays = sorted(round(d, 3) for d in stats.propagation_delays(returned, received, streams=2))
    assert delays == [2.0, 5.0, 10.0, 30.0]


def test_propagation_applied_before_the_command_returned_counts_as_zero():
    assert stats.propagation_delays({3: 10.0}, [(0, 3, 9.99)], streams=1) == [0.0]


def test_propagation_refuses_a_stream_that_never_applied_a_revocation():
    with pytest.raises(ValueError, match="seq 8 on stream 1"):
        stats.propagation_delays({7: 1.0, 8: 2.0}, [(0, 7, 1.1), (1, 7, 1.1), (0, 8, 2.1)], streams=2)


def test_rotation_windows_split_calls_by_their_distance_from_preparation_and_activation():
    prepared, activated = 100, 110.5  # prepared: whole seconds as the authority record stores it
    at = [1.0,      # before warm-up: dropped
          50.0,     # quiet
          99.5,     # within the prepare window (its second, +-1 s)
          101.9,    # still in it
          103.0,    # between the windows, too close to both to count as quiet
          109.6,    # within 1 s of the activation
          111.4,    # likewise, after it
          112.0,    # near the activation but outside its window: neither
          114.0]    # quiet again
    lat = [float(i) for i in range(len(at))]
    w = stats.rotation_windows(at, lat, warm_from=10.0, prepared=prepared, activated=activated)
    assert w == {"activate": [5.0, 6.0], "prepare": [2.0, 3.0], "quiet": [1.0, 8.0]}


def test_cfssl_client_reads_sized_and_chunked_answers_on_one_kept_alive_connection():
    import asyncio

    from benchlib.cfsslclient import Connection

    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"a\": \"one\"}",
               b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"b\":\r\n3\r\n 2}\r\n0\r\n\r\n"]
    seen = []

    async def serve(reader, writer):
        for answer in answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            seen.append(await reader.readexactly(length))
            writer.write(answer)
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        conn = Connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            return [await conn.post("/api/v1/cfssl/sign", b'{"x": 1}'), await conn.post("/p", b"{}")]
        finally:
            conn.close()
            server.close()

    assert asyncio.run(main()) == [(200, b'{"a": "one"}'), (400, b'{"b": 2}')]
    assert seen == [b'{"x": 1}', b"{}"]


def test_floor_server_answers_every_item_only_to_clients_whose_certificate_chains_to_the_bundle(tmp_path):
    import json
    import subprocess

    import grpc

    from benchlib import authority
    from tessera import pem, spiffeid, x509svid
    from tessera.v1 import issuer_pb2, issuer_pb2_grpc

    clients_root = authority.root()
    key = x509svid.new_key()
    client = clients_root.sign(key.public_key(), spiffeid.parse("spiffe://example.org/bench/client"), 600)
    (tmp_path / "bundle.pem").write_bytes(pem.certs_pem([clients_root.cert]))
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "benchlib" /
                                                   "floorserver.py"), "--bundle", str(tmp_path / "bundle.pem"),
                               "--out-bundle", str(tmp_path / "roots.pem")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{json.loads(server.stdout.readline())['port']}"
        roots = (tmp_path / "roots.pem").read_bytes()
        request = issuer_pb2.SignX509SVIDsRequest(items=[issuer_pb2.CSRItem(entry_id=e, csr=b"-") for e in "ab"])
        options = [("grpc.ssl_target_name_override", "tessera-issuer")]

        def call(creds):
            with grpc.secure_channel(address, creds, options=options) as channel:
                return issuer_pb2_grpc.IssuerStub(channel).SignX509SVIDs(request, timeout=10)

        answer = call(grpc.ssl_channel_credentials(roots, pem.key_pem(key), pem.certs_pem(client.chain)))
        assert [(i.entry_id, i.status_code) for i in answer.items] == [("a", 0), ("b", 0)]
        leaf = pem.split_der(answer.items[0].cert_chain)[0]  # an SVID-sized chain: leaf and intermediate
        assert str(x509svid.spiffe_id_of(leaf)) == "spiffe://example.org/bench/floor"
        with pytest.raises(grpc.RpcError) as refused:
            call(grpc.ssl_channel_credentials(roots))  # no client certificate
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stdin.close()
        server.wait(10)
