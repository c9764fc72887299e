"""CloudFlare's cfssl as the bench's peer: `cfssl serve` (Debian package golang-cfssl: a Go CA server, plain HTTP,
no storage, no audit) on 127.0.0.1 with a CA made at run time, signing through /api/v1/cfssl/sign.

    with Server(workdir) as server:       # started, answering; stopped on exit
        url = server.url                  # e.g. http://127.0.0.1:PORT

The CA is what Tessera's intermediate is: an ECDSA P-256 key signing with SHA-256. The signing profile is a
one-hour client certificate, as an SVID would be.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SIGN_PATH = "/api/v1/cfssl/sign"


def make_ca(workdir: Path) -> tuple[Path, Path]:
    """A self-signed CA (ECDSA P-256) for cfssl: (certificate PEM, key PEM) files in workdir."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfssl bench CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "ca.pem", workdir / "ca-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path):
        binary = shutil.which("cfssl")
        if binary is None:
            raise RuntimeError("cfssl is not installed: scripts/bench installs it (apt-get install golang-cfssl)")
        workdir.mkdir(parents=True, exist_ok=True)
        cert, key = make_ca(workdir)
        config = workdir / "config.json"
        config.write_text(json.dumps({"signing": {"default": {
            "expiry": "1h", "usages": ["digital signature", "key agreement", "client auth", "server auth"]}}}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "cfssl.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([binary, "serve", "-address", "127.0.0.1", "-port", str(self.port),
                                          "-ca", str(cert), "-ca-key", str(key), "-config", str(config),
                                          "-loglevel", "3"], stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cfssl serve exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                # A GET on the sign endpoint: cfssl answers (405) once it serves.
                urllib.request.urlopen(self.url + SIGN_PATH, timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"cfssl serve did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
