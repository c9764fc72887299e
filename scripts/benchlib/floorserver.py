"""The floor under unary signing on this host, run as its own process by scripts/bench.py.

A grpc.aio server (grpcio's Python server, as the issuer's) serving the Issuer service's SignX509SVIDs over mTLS as
the issuer does: client certificates are checked against the issuer's trust bundle, so the bench's load clients
call it with the sidecar SVIDs they attested for. It answers every item at once with one fixed certificate chain of
an SVID's size, and does nothing else: no authorization, no signing, no storage, no audit. What it sustains under
the bench's unary load is what grpcio, the load clients and the wire cost on this host, with no issuer work at all:
a ceiling for any issuer that serves unary calls through grpcio here.

  floorserver.py --bundle ISSUER_BUNDLE.pem --out-bundle FILE
Prints one JSON line, {"port": N}, once listening on 127.0.0.1; stops when stdin closes. Its own serving
certificate is under a throwaway root, written to --out-bundle for the clients (--sign-bundle of signclient.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: benchlib importable

import grpc  # noqa: E402

from benchlib import authority  # noqa: E402
from tessera import pem, spiffeid, x509svid  # noqa: E402
from tessera.v1 import issuer_pb2, issuer_pb2_grpc  # noqa: E402

SERVER_NAME = "tessera-issuer"


class Floor(issuer_pb2_grpc.IssuerServicer):
    def __init__(self, chain_der: bytes):
        self.chain_der = chain_der

    async def SignX509SVIDs(self, request, context):
        return issuer_pb2.SignX509SVIDsResponse(items=[
            issuer_pb2.SignedSVID(entry_id=item.entry_id, cert_chain=self.chain_der) for item in request.items])


async def serve(args) -> int:
    # The answer: a leaf and its intermediate, as the issuer's SVID chains are.
    signer = authority.intermediate()
    chain_der = signer.sign_der(x509svid.new_key().public_key(), spiffeid.parse("spiffe://example.org/bench/floor"),
                                3600)[0]
    root = authority.root()
    key = x509svid.new_key()
    serving = root.sign(key.public_key(), spiffeid.parse("spiffe://example.org/bench/floor-server"), 3600,
                        dns_names=[SERVER_NAME])
    Path(args.out_bundle).write_bytes(pem.certs_pem([root.cert]))
    creds = grpc.ssl_server_credentials([(pem.key_pem(key), pem.certs_pem(serving.chain))],
                                        root_certificates=Path(args.bundle).read_bytes(),
                                        require_client_auth=True)
    server = grpc.aio.server(options=[("grpc.keepalive_time_ms", 20000), ("grpc.max_concurrent_streams", 1000)])
    issuer_pb2_grpc.add_IssuerServicer_to_server(Floor(chain_der), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    await server.stop(1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="the issuer's trust bundle (PEM): client certificates chain to it")
    p.add_argument("--out-bundle", required=True, help="where to write this server's root (PEM) for the clients")
    return asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
