"""A sidecar-protocol load client, run as its own process by scripts/bench.py.

It attests with a join token exactly like a sidecar (AttestSidecar on the bootstrap
port), then calls SignX509SVIDs over mTLS with its sidecar SVID for entries parented
to it. CSRs are generated before any timed phase, so the client's own CPU goes to
gRPC, not to key generation. Calls are spread over --channels connections (worker i
uses channel i mod N), so that several issuer processes behind one port (share_port: the
kernel hands each connection to one of them) share the load. With --sign-address the calls go
to another server instead (the bench's floor server, benchlib/floorserver.py), with the same
client certificate. Commands arrive as JSON lines on stdin; results leave as JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from cryptography import x509

import grpc

from agent_sidecar.issuer_client import IssuerClient, _options
from tessera import chain, der, pem, x509svid
from tessera.configfile import default_bootstrap_address, read_secret_file
from tessera.v1 import issuer_pb2, issuer_pb2_grpc


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class LoadClient:
    def __init__(self, stubs: list[issuer_pb2_grpc.IssuerStub], csrs: list[bytes]):
        self.stubs = stubs
        self.csrs = csrs
        self.entry_ids: list[str] = []
        self.expected_ids: dict[str, str] = {}

    def requests(self, batch: int, n: int = 64) -> list[issuer_pb2.SignX509SVIDsRequest]:
        out, j = [], 0
        for _ in range(n):
            items = []
            for _ in range(batch):
                items.append(issuer_pb2.CSRItem(entry_id=self.entry_ids[j % len(self.entry_ids)],
                                                csr=self.csrs[j % len(self.csrs)]))
                j += 1
            out.append(issuer_pb2.SignX509SVIDsRequest(items=items))
        return out

    async def run(self, batch: int, concurrency: int, start_at: float, duration: float | None,
                  count: int | None, track_signer: bool = False) -> dict:
        """Closed-loop calls from `concurrency` workers. With track_signer, also each timed call's start time
        ("at") and, in "signers", [time, authority id] whenever the leaf's signer differs from the last seen."""
        reqs = self.requests(batch)
        ok = errors = 0
        first_error = ""
        lat: list[float] = []
        at: list[float] = []
        signers: list[list] = []
        last_signer = [b""]
        checked = False
        end = start_at + duration if duration else float("inf")
        remaining = [count if count is not None else -1]

        async def worker(w: int) -> None:
            nonlocal ok, errors, first_error, checked
            i = w
            stub = self.stubs[w % len(self.stubs)]
            while True:
                if remaining[0] == 0:
                    return
                if remaining[0] > 0:
                    remaining[0] -= 1
                t0 = time.time()
                if t0 >= end:
                    return
                try:
                    resp = await stub.SignX509SVIDs(reqs[i % len(reqs)], timeout=60)
                except Exception as e:  # noqa: BLE001 - reported, and the bench fails on errors
                    errors += batch
                    first_error = first_error or repr(e)[:300]
                    i += concurrency
                    continue
                t1 = time.time()
                i += concurrency
                if t1 > end:
                    return
                lat.append((t1 - t0) * 1000)
                if track_signer:
                    at.append(t0)
                    signer = self.signer_of(resp)
                    if signer != last_signer[0]:
                        last_signer[0] = signer
                        leaf = pem.split_der(resp.items[0].cert_chain)[0]
                        signers.append([t1, chain.authority_key_id(leaf)])
                for item in resp.items:
                    if item.status_code == 0 and item.cert_chain:
                        ok += 1
                    else:
                        errors += 1
                        first_error = first_error or f"{item.status_code}: {item.error}"
                if not checked and resp.items and resp.items[0].status_code == 0:
                    checked = True
                    leaf = pem.split_der(resp.items[0].cert_chain)[0]
                    want = self.expected_ids.get(resp.items[0].entry_id)
                    got = str(x509svid.spiffe_id_of(leaf))
                    if want and got != want:
                        errors += 1
                        first_error = first_error or f"certificate names {got}, expected {want}"

        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t_begin = time.time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        out = {"ok": ok, "errors": errors, "first_error": first_error, "lat_ms": [round(x, 3) for x in lat],
               "elapsed": time.time() - t_begin}
        if track_signer:
            out.update(at=[round(x, 4) for x in at], signers=signers)
        return out

    @staticmethod
    def signer_of(resp: issuer_pb2.SignX509SVIDsResponse) -> bytes:
        """The chain after the leaf (the signer's certificate, DER): bytes compared per call, parsed only when
        they change."""
        if not resp.items or not resp.items[0].cert_chain:
            return b""
        blob = resp.items[0].cert_chain
        _, end = der.read_header(blob, 0, 0x30)
        return blob[end:]


async def main_async(args) -> int:
    bundle = tuple(x509.load_pem_x509_certificates(Path(args.bundle).read_bytes()))
    client = IssuerClient((args.issuer,), (default_bootstrap_address(args.issuer),), "tessera-issuer")
    ident = await client.attest(read_secret_file(args.join_token_file, "--join-token-file"), bundle)
    # Calls go to the issuer, or with --sign-address to another server (the bench's floor server) trusted by
    # --sign-bundle, with the same client certificate.
    trusted = Path(args.sign_bundle).read_bytes() if args.sign_bundle else pem.certs_pem(ident.bundle)
    creds = grpc.ssl_channel_credentials(root_certificates=trusted, private_key=pem.key_pem(ident.key),
                                         certificate_chain=pem.certs_pem(ident.chain))
    # A subchannel pool per channel: each its own TCP connection (grpc shares identical ones by default).
    channels = [grpc.aio.secure_channel(args.sign_address or args.issuer, creds,
                                        options=[*_options("tessera-issuer"), ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(args.channels)]
    for ch in channels:
        await ch.channel_ready()
    keys = [x509svid.new_key() for _ in range(args.csrs)]
    load = LoadClient([issuer_pb2_grpc.IssuerStub(ch) for ch in channels], [x509svid.make_csr(k) for k in keys])
    emit({"ready": True, "sidecar_id": ident.sidecar_id})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "entries":
            load.entry_ids = cmd["ids"]
            load.expected_ids = dict(zip(cmd["ids"], cmd["spiffe_ids"]))
            emit({"entries": len(load.entry_ids)})
        elif cmd["cmd"] == "run":
            emit(await load.run(cmd["batch"], cmd["concurrency"], cmd["start_at"], cmd.get("duration"),
                                cmd.get("count"), cmd.get("track_signer", False)))
        elif cmd["cmd"] == "quit":
            break
    for ch in channels:
        await ch.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--issuer", required=True, help="HOST:PORT of the issuer's mTLS API")
    p.add_argument("--bundle", required=True, help="PEM trust bundle")
    p.add_argument("--join-token-file", required=True, help="file holding the join token (mode 0600)")
    p.add_argument("--csrs", type=int, default=512, help="CSRs generated up front and reused in turn")
    p.add_argument("--channels", type=int, default=1, help="connections to the issuer, used in turn by the workers")
    p.add_argument("--sign-address", help="HOST:PORT to call instead of --issuer (attestation stays at --issuer)")
    p.add_argument("--sign-bundle", help="PEM roots that --sign-address's certificate chains to")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
