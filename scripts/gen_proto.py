"""Generate Python code from proto/ with grpcio-tools (never edit the output by hand).

Writes *_pb2.py, *_pb2_grpc.py (grpcio) and *_grpc.py (grpclib) next to the
package that matches each proto's path: proto/tessera/v1/x.proto -> tessera/v1/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"


def main() -> int:
    files = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--plugin=protoc-gen-grpclib_python={plugin}",
        f"--grpclib_python_out={ROOT}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("proto generation failed", file=sys.stderr)
        return rc
    for pkg in {Path(f).parent for f in files}:
        init = ROOT / pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
