"""Build hook: the gRPC/protobuf modules are generated from proto/ whenever Tessera is built.

Everything else about the package is in pyproject.toml. A wheel (`pip wheel .`, `pip install .`,
or a wheel built from the sdist, which carries proto/ and scripts/gen_proto.py) gets code
generated into its build tree by the grpcio-tools pinned in [build-system], so it can never be
stale against the protos nor depend on a generated file lying in the checkout. An editable
install (`pip install -e .`) imports the source tree, so there the code is generated in place.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        sys.path.insert(0, str(HERE / "scripts"))
        try:
            from gen_proto import generate  # the one generator, also run by hand
        finally:
            sys.path.pop(0)
        generate(HERE if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
