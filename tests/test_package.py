"""Tessera as a package: a wheel built from a clean clone works on its own, with no repo scripts.

One wheel is built (`pip wheel --no-deps`, build isolation: [build-system] requires is all it has)
and installed into a fresh virtualenv outside the repo once per session; the tests then run the
installed programs from a directory outside the repo with PYTHONPATH unset.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

import harness
from harness import REPO, Deployment, openssl_verify

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PROTOS = sorted(p.relative_to(REPO / "proto").with_suffix("") for p in (REPO / "proto").rglob("*.proto"))
BUILD_TIMEOUT = 600


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    return env


def run(argv: list, cwd: Path, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{argv} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def clone(tmp_path_factory) -> Path:
    """A clean clone of the branch's last commit: what a user gets, nothing generated, nothing ignored."""
    src = tmp_path_factory.mktemp("pkg") / "src"
    run(["git", "clone", "--quiet", REPO, src], cwd=src.parent)
    return src


@pytest.fixture(scope="session")
def wheel(clone) -> Path:
    dist = clone.parent / "dist"
    t0 = time.monotonic()
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, clone], cwd=clone.parent)
    print(f"\nwheel built in {time.monotonic() - t0:.1f}s")
    (whl,) = dist.glob("tessera-*.whl")
    return whl


@pytest.fixture(scope="session")
def venv(wheel) -> Path:
    """A fresh virtualenv outside the repo with the wheel (and its dependencies) installed; its bin/."""
    root = wheel.parent.parent / "venv"
    t0 = time.monotonic()
    run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    # This environment's pip installs into the new one (no ensurepip), without byte-compiling.
    run([sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "--quiet", "--no-compile",
         wheel], cwd=root.parent)
    print(f"\nvirtualenv with the wheel installed in {time.monotonic() - t0:.1f}s")
    return root / "bin"


def wheel_files(whl: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(whl) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_wheel_holds_code_generated_from_every_proto_and_its_dependency_floors_fit_that_code(wheel):
    files = wheel_files(wheel)
    for proto in PROTOS:
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_grpc.py"):
            assert f"{proto}{suffix}" in files, f"{proto}{suffix} missing from {wheel.name}"
    # The generated code refuses, at import, runtimes older than the grpcio-tools that made it.
    meta = email.parser.Parser().parsestr(next(v for k, v in files.items() if k.endswith(".dist-info/METADATA"))
                                          .decode())
    floors = {}
    for req in meta.get_all("Requires-Dist"):
        m = re.match(r"([A-Za-z0-9_.-]+)\s*\(?([^;]*)", req)
        low = re.search(r">=\s*([0-9.]+)", m.group(2))
        if low:
            floors[m.group(1).lower()] = tuple(int(x) for x in low.group(1).split("."))
    for name, data in files.items():
        text = data.decode(errors="replace")
        if name.endswith("_pb2.py"):
            gen = tuple(int(x) for x in re.search(r"Protobuf Python Version: ([0-9.]+)", text).group(1).split("."))
            assert floors["protobuf"] >= gen, f"{name} needs protobuf>={gen}, the wheel allows {floors['protobuf']}"
        if name.endswith("_pb2_grpc.py") and "GRPC_GENERATED_VERSION" in text:
            gen = tuple(int(x) for x in re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", text).group(1).split("."))
            assert floors["grpcio"] >= gen, f"{name} needs grpcio>={gen}, the wheel allows {floors['grpcio']}"
    assert not [n for n in files if n.startswith(("tests/", "scripts/", "proto/"))]
    assert f"tessera-{VERSION}.data/data/share/tessera/systemd/tessera-issuer.service" in files


def test_installed_programs_print_the_version_from_pyproject(venv, tmp_path):
    for prog in ("tessera", "tessera-issuer", "tessera-sidecar"):
        r = run([venv / prog, "--version"], cwd=tmp_path, timeout=60)
        assert r.stdout.strip() == f"{prog} {VERSION}"


def test_issuer_sidecar_and_workload_fetch_run_from_the_installed_wheel_alone(venv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(harness, "BIN", venv)  # every daemon and CLI call below is the installed one
    where = run([venv / "python", "-c", "import tessera.v1.admin_pb2 as a, tessera.workload.workload_pb2 as w, "
                 "issuer.main, agent_sidecar.main; print(a.__file__); print(w.__file__)"], cwd=tmp_path, timeout=60)
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv.parent) and not Path(path).is_relative_to(REPO), path

    (tmp_path / "dep").mkdir()
    d = Deployment(tmp_path / "dep")
    try:
        d.start_issuer()
        d.start_sidecar("host-a")
        d.entry("/agent/a", "host-a")
        out = tmp_path / "svid"
        r = run([venv / "tessera-sidecar", "api", "fetch", "--socket", d.socket("host-a"), "--out", out],
                cwd=tmp_path, timeout=60)
        assert r.stdout.strip() == "spiffe://example.org/agent/a"
        v = openssl_verify(out / "bundle.pem", out / "svid.pem", out / "crl.pem")
        assert v.returncode == 0, v.stdout + v.stderr
        assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    finally:
        d.close()


def test_sdist_carries_the_protos_and_builds_the_same_wheel(clone, wheel):
    sdist_dir = clone.parent / "sdist"
    # The PEP 517 hook every front end calls; an sdist needs no build dependency but setuptools.
    run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(sdist_dir)!r})"],
        cwd=clone)
    (sdist,) = sdist_dir.glob("tessera-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"proto/{p}.proto" for p in PROTOS} <= names
    assert {"setup.py", "scripts/gen_proto.py", "pyproject.toml", "config/systemd/tessera-sidecar.service"} <= names
    assert not [n for n in names if n.endswith(("_pb2.py", "_grpc.py"))], "generated code must come from the build"
    dist = clone.parent / "from-sdist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, sdist], cwd=clone.parent)
    (rebuilt,) = dist.glob("tessera-*.whl")
    assert sorted(wheel_files(rebuilt)) == sorted(wheel_files(wheel))


# -- systemd units ---------------------------------------------------------------------------------

UNITS = REPO / "config" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed (Debian package systemd)")


def units_here(tmp_path: Path) -> list[Path]:
    """The units as installed, with ExecStart pointing at this environment's programs (verify checks they
    exist); the template as an instance for an existing user."""
    paths = []
    for unit in sorted(UNITS.glob("*.service")):
        name = unit.name.replace("@.service", "@daemon.service")
        (tmp_path / name).write_text(unit.read_text().replace("/opt/tessera/bin/", f"{harness.BIN}/"))
        paths.append(tmp_path / name)
    return paths


@needs_systemd_analyze
def test_systemd_units_verify_without_a_single_warning(tmp_path):
    paths = units_here(tmp_path)
    assert {p.name for p in paths} == {"tessera-issuer.service", "tessera-sidecar.service",
                                       "tessera-watch@daemon.service"}
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True,
                       timeout=60)
    # verify exits 0 for an unknown key or a bad value and only prints them: any output is a failure.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


@needs_systemd_analyze
def test_systemd_units_are_hardened(tmp_path):
    for path in units_here(tmp_path):
        text = path.read_text()
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                     "UMask=0077", "StateDirectory=", "RestrictAddressFamilies="):
            assert line in text, f"{path.name} lacks {line}"
        assert re.search(r"^User=\S+", text, re.M) and "User=root" not in text, path.name
        # systemd's own exposure score, 0 (locked down) to 10 (unprotected): "OK" is below 3.
        r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", "--threshold=30",
                            str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
