"""Speak the issuer's sidecar protocol directly, as a sidecar would (for tests and benchmarks)."""

from __future__ import annotations


import grpc

from agent_sidecar.issuer_client import IdentityStore
from tessera import pem, x509svid
from tessera.v1 import issuer_pb2, issuer_pb2_grpc

OPTIONS = [("grpc.ssl_target_name_override", "tessera-issuer")]


def mtls_stub(address: str, bundle_pem: bytes, key_pem: bytes, cert_pem: bytes) -> issuer_pb2_grpc.IssuerStub:
    creds = grpc.ssl_channel_credentials(bundle_pem, key_pem, cert_pem)
    return issuer_pb2_grpc.IssuerStub(grpc.secure_channel(address, creds, options=OPTIONS))


def sidecar_credentials(deployment, sidecar: str) -> grpc.ChannelCredentials:
    """The real credentials a running sidecar saved in its data dir."""
    ident = IdentityStore(deployment.sidecar_dir(sidecar) / "data").load()
    return grpc.ssl_channel_credentials(deployment.bundle_path.read_bytes(), pem.key_pem(ident.key),
                                        pem.certs_pem(ident.chain))


def sidecar_stub(deployment, sidecar: str) -> issuer_pb2_grpc.IssuerStub:
    """A stub holding the real credentials of a running sidecar."""
    return issuer_pb2_grpc.IssuerStub(grpc.secure_channel(f"127.0.0.1:{deployment.port}",
                                                          sidecar_credentials(deployment, sidecar), options=OPTIONS))


def aio_sidecar_channel(deployment, sidecar: str) -> grpc.aio.Channel:
    """An asyncio channel holding the real credentials of a running sidecar (for many calls at once)."""
    return grpc.aio.secure_channel(f"127.0.0.1:{deployment.port}", sidecar_credentials(deployment, sidecar),
                                   options=OPTIONS)


def bootstrap_stub(deployment) -> issuer_pb2_grpc.IssuerStub:
    creds = grpc.ssl_channel_credentials(deployment.bundle_path.read_bytes())
    return issuer_pb2_grpc.IssuerStub(grpc.secure_channel(deployment.bootstrap_address, creds, options=OPTIONS))


def attest(deployment, token: str, key=None) -> issuer_pb2.SidecarSVIDResponse:
    key = key or x509svid.new_key()
    return bootstrap_stub(deployment).AttestSidecar(
        issuer_pb2.AttestSidecarRequest(join_token=token, csr=x509svid.make_csr(key)), timeout=10)


def attested_stub(deployment, name: str) -> issuer_pb2_grpc.IssuerStub:
    """Attest a new sidecar `name` like a sidecar does (join token + CSR); an mTLS stub holding its SVID."""
    key = x509svid.new_key()
    resp = attest(deployment, deployment.token(name), key)
    return mtls_stub(f"127.0.0.1:{deployment.port}", deployment.bundle_path.read_bytes(), pem.key_pem(key),
                     pem.certs_pem(pem.split_der(resp.svid_chain)))


def sign(stub, entry_id: str) -> issuer_pb2.SignedSVID:
    key = x509svid.new_key()
    resp = stub.SignX509SVIDs(issuer_pb2.SignX509SVIDsRequest(
        items=[issuer_pb2.CSRItem(entry_id=entry_id, csr=x509svid.make_csr(key))]), timeout=10)
    return resp.items[0]
