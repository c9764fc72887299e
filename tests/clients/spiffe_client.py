"""A workload that uses only the unmodified `spiffe` / `spiffe-tls` PyPI packages.

Run in its own process (as a real workload is): the `spiffe` package's protobuf
messages would clash with Tessera's in one process. Prints JSON lines.

  fetch SOCKET                          one X.509 context
  stream SOCKET                         every update until an error
  bundles SOCKET                        every FetchX509Bundles update until an error
  mtls-server SOCKET PORT ALLOWED_ID    accept one mTLS connection, echo a line
  mtls-serve SOCKET PORT ALLOWED_ID     accept mTLS connections one after another, echo a line on each
  mtls-client SOCKET PORT ALLOWED_ID    connect, send a line, print the reply
  mtls-dial SOCKET PORT ALLOWED_ID SECS  mtls-client every SECS seconds from one X509Source, until killed
"""

import json
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat


def out(obj):
    print(json.dumps(obj), flush=True)


def svid_info(s):
    return {
        "spiffe_id": str(s.spiffe_id),
        "serial": format(s.leaf.serial_number, "x"),
        "not_after": s.leaf.not_valid_after_utc.timestamp(),
        "not_before": s.leaf.not_valid_before_utc.timestamp(),
        "svid_pem": "".join(c.public_bytes(Encoding.PEM).decode() for c in s.cert_chain),
        "key_pem": s.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode(),
    }


def context_info(ctx):
    bundles = ctx.x509_bundle_set
    td = ctx.default_svid.spiffe_id.trust_domain
    bundle = bundles.get_bundle_for_trust_domain(td)
    return {
        "event": "update",
        "svids": [svid_info(s) for s in ctx.x509_svids],
        "bundle_pem": "".join(c.public_bytes(Encoding.PEM).decode() for c in bundle.x509_authorities),
        "t": time.time(),
    }


def main():
    from spiffe import WorkloadApiClient

    mode, socket_path = sys.argv[1], sys.argv[2]
    uri = f"unix://{socket_path}"
    if mode == "fetch":
        client = WorkloadApiClient(socket_path=uri)
        try:
            started = time.monotonic()  # connect, attestation and the answer, without Python's start-up
            ctx = client.fetch_x509_context(timeout=15)
            out({**context_info(ctx), "elapsed": time.monotonic() - started})
        except Exception as e:  # noqa: BLE001 - reported to the test
            out({"event": "error", "error": str(e)})
            sys.exit(1)
        return
    if mode == "stream":
        client = WorkloadApiClient(socket_path=uri)
        done = []
        client.stream_x509_contexts(
            on_success=lambda ctx: out(context_info(ctx)),
            on_error=lambda e: (out({"event": "error", "error": str(e), "t": time.time()}), done.append(1)),
            retry_connect=False,
        )
        while not done:
            time.sleep(0.05)
        return
    if mode == "bundles":
        # spiffe 0.3.2 reads only the first FetchX509Bundles message (fetch_x509_bundles); the stream is read here
        # through the package's own stub and parser, unmodified.
        client = WorkloadApiClient(socket_path=uri)
        from spiffe._proto import workload_pb2

        try:
            for resp in client._spiffe_workload_api_stub.FetchX509Bundles(workload_pb2.X509BundlesRequest()):
                bundles = client._create_x509_bundle_set(resp.bundles)
                out({"event": "bundles", "t": time.time(), "bundles": {
                    str(td): "".join(c.public_bytes(Encoding.PEM).decode() for c in b.x509_authorities)
                    for td, b in bundles._bundles.items()}})
        except Exception as e:  # noqa: BLE001
            out({"event": "error", "error": str(e), "t": time.time()})
            sys.exit(1)
        return
    from spiffe import SpiffeId, X509Source
    from spiffetls import ListenOptions, dial, listen
    from spiffetls.mode import ClientTlsMode, ServerTlsMode
    from spiffetls.tlsconfig.authorize import authorize_id

    port, allowed = int(sys.argv[3]), sys.argv[4]
    source = X509Source(socket_path=uri, timeout_in_seconds=15)
    if mode == "mtls-server":
        lst = listen(f"127.0.0.1:{port}", source,
                     ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(allowed))))
        out({"event": "listening"})
        conn, _ = lst.accept()
        try:
            conn.do_handshake()
            data = conn.recv(1024)
            conn.sendall(b"echo:" + data)
            out({"event": "served", "data": data.decode()})
        except Exception as e:  # noqa: BLE001
            out({"event": "error", "error": str(e)})
        finally:
            conn.close()
        return
    if mode == "mtls-serve":
        # One X509Source for the process's life, and each connection gets a TLS context made from it (what listen()
        # makes once): spiffe-tls 0.4.0 reloads a listener's context in place on an update, which pyOpenSSL refuses
        # once the context served a connection ("cannot be mutated again"), so a listener made once keeps its first
        # SVID until it expires.
        import socket

        from OpenSSL import SSL
        from spiffetls.context import create_ssl_context

        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        out({"event": "listening"})
        while True:
            raw, _ = sock.accept()
            conn = SSL.Connection(create_ssl_context(SSL.TLS_SERVER_METHOD, source, authorize_id(SpiffeId(allowed)),
                                                     SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT), raw)
            conn.set_accept_state()
            try:
                conn.do_handshake()
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)
                out({"event": "served", "data": data.decode(), "t": time.time()})
            except Exception as e:  # noqa: BLE001
                out({"event": "error", "error": str(e), "t": time.time()})
            finally:
                conn.close()
    if mode == "mtls-dial":
        every = float(sys.argv[5])
        while True:
            svid = source.svid
            signer = svid.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            try:
                conn = dial(f"127.0.0.1:{port}", source, ClientTlsMode.TLS, authorize_id(SpiffeId(allowed)))
                conn.sendall(b"hello")
                out({"event": "reply", "data": conn.recv(1024).decode(), "signer": signer.hex(), "t": time.time()})
                conn.close()
            except Exception as e:  # noqa: BLE001
                out({"event": "error", "error": str(e), "signer": signer.hex(), "t": time.time()})
            time.sleep(every)
    if mode == "mtls-client":
        try:
            conn = dial(f"127.0.0.1:{port}", source, ClientTlsMode.TLS, authorize_id(SpiffeId(allowed)))
            conn.sendall(b"hello")
            out({"event": "reply", "data": conn.recv(1024).decode()})
        except Exception as e:  # noqa: BLE001
            out({"event": "error", "error": str(e)})
            sys.exit(1)


if __name__ == "__main__":
    main()
