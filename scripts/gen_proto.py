"""Generate Python code from proto/ with grpcio-tools (never edit the output by hand).

The one generator: setup.py's build hook calls `generate` when a wheel is built (into the
build tree) or an editable install is made (into the source tree), and running this script
regenerates the source tree by hand. It needs only grpcio-tools and grpclib (for the grpclib
plugin), so it runs in a build environment before Tessera's own dependencies exist.

Writes *_pb2.py, *_pb2_grpc.py (grpcio) and *_grpc.py (grpclib) next to the package that
matches each proto's path: proto/tessera/v1/x.proto -> tessera/v1/. The Workload API proto
has no `package` line (its method paths must be /SpiffeWorkloadAPI/...), so its messages are
global in protobuf's default pool: it lands in tessera/workload/, and a process never imports
it beside the `spiffe` client's own generated module (see spec/workload-api.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GRPCLIB_PLUGIN = "protoc-gen-grpclib_python"


def _grpclib_plugin() -> str:
    # Next to this interpreter in a virtualenv; on PATH in pip's isolated build environment.
    where = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(GRPCLIB_PLUGIN, path=where)
    if found is None:
        raise RuntimeError(f"{GRPCLIB_PLUGIN} not found: install grpclib beside grpcio-tools")
    return found


def generate(out: Path, proto: Path = PROTO) -> list[Path]:
    """Generate the modules for every .proto under `proto` into the package tree rooted at `out`."""
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(proto)) for p in proto.rglob("*.proto"))
    if not files:
        raise RuntimeError(f"no .proto files under {proto}")
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "protoc",
        f"-I{proto}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-grpclib_python={_grpclib_plugin()}",
        f"--grpclib_python_out={out}",
        *files,
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) generating code from {proto}")
    packages = sorted({out / Path(f).parent for f in files})
    for pkg in packages:
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return packages


def main() -> int:
    try:
        generate(ROOT)
    except RuntimeError as e:
        print(f"gen_proto: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
