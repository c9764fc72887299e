"""A load client for cfssl's sign API, run as its own process by scripts/bench.py: the same JSON-lines commands
and results as signclient.py ("run" with batch 1), so the two are driven and counted alike.

Per request a worker POSTs {"certificate_request": CSR PEM} to /api/v1/cfssl/sign over its own keep-alive HTTP/1.1
connection and checks the answer carries a certificate (JSON parsed, "success" true). CSRs (ECDSA P-256, like a
sidecar's) are made before any timed phase and used in turn, as signclient.py does, so each request signs one CSR
and the client's CPU goes to the protocol, not to key generation.

  cfsslclient.py --url http://127.0.0.1:PORT [--csrs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography import x509

from tessera import x509svid

SIGN_PATH = "/api/v1/cfssl/sign"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Connection:
    """One keep-alive HTTP/1.1 connection: a request at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            data = b""
            while size := int((await self.reader.readline()).strip(), 16):
                data += await self.reader.readexactly(size + 2)
                data = data[:-2]
            await self.reader.readline()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(url: str, bodies: list[bytes], concurrency: int, start_at: float, duration: float | None,
              count: int | None) -> dict:
    parts = urlsplit(url)
    ok = errors = 0
    first_error = ""
    lat: list[float] = []
    end = start_at + duration if duration else float("inf")
    remaining = [count if count is not None else -1]
    conns = [Connection(parts.hostname, parts.port) for _ in range(concurrency)]

    async def worker(w: int) -> None:
        nonlocal ok, errors, first_error
        i = w
        conn = conns[w]
        while remaining[0] != 0:
            if remaining[0] > 0:
                remaining[0] -= 1
            t0 = time.time()
            if t0 >= end:
                return
            try:
                status, data = await conn.post(SIGN_PATH, bodies[i % len(bodies)])
                answer = json.loads(data)
                good = status == 200 and answer.get("success") and answer["result"]["certificate"]
            except Exception as e:  # noqa: BLE001 - reported, and the bench fails on errors
                good, answer = False, {"errors": [repr(e)[:300]]}
                conn.close()
                conns[w] = conn = Connection(parts.hostname, parts.port)
            t1 = time.time()
            i += concurrency
            if t1 > end:
                return
            if good:
                ok += 1
                lat.append((t1 - t0) * 1000)
            else:
                errors += 1
                first_error = first_error or str(answer.get("errors"))[:300]

    # Connections opened before the clock starts, as the gRPC clients' channels are.
    for c in conns:
        c.reader, c.writer = await asyncio.open_connection(parts.hostname, parts.port)
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    t_begin = time.time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    for c in conns:
        c.close()
    return {"ok": ok, "errors": errors, "first_error": first_error, "lat_ms": [round(x, 3) for x in lat],
            "elapsed": time.time() - t_begin}


async def main_async(args) -> int:
    pems = [x509.load_der_x509_csr(x509svid.make_csr(x509svid.new_key())).public_bytes(Encoding.PEM).decode()
            for _ in range(args.csrs)]
    bodies = [json.dumps({"certificate_request": p}).encode() for p in pems]
    emit({"ready": True})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            if cmd["batch"] != 1:
                raise SystemExit("cfssl's sign API takes one CSR per request")
            emit(await run(args.url, bodies, cmd["concurrency"], cmd["start_at"], cmd.get("duration"),
                           cmd.get("count")))
        elif cmd["cmd"] == "quit":
            break
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="cfssl serve's base URL")
    p.add_argument("--csrs", type=int, default=512, help="CSRs generated up front and sent in turn")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
