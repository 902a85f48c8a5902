"""The package as installed: committed stubs current, typing marker shipped."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import embark_client

HERE = Path(__file__).resolve().parent
GEN_STUBS = HERE.parent / "gen_stubs.sh"
COMMITTED = HERE.parent / "src" / "embark_client" / "_pb"
GENERATED = ("embark_pb2.py", "embark_pb2.pyi", "embark_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    """Fails when proto/proto changed without `gen_stubs.sh` being rerun."""
    out = tmp_path / "stubs"
    subprocess.run(
        ["bash", str(GEN_STUBS), str(out)],
        check=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120,
    )  # fmt: skip
    stale = [name for name in GENERATED if (out / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run PYTHON={sys.executable} {GEN_STUBS}"


def test_the_installed_package_is_typed_and_carries_its_stubs() -> None:
    package = resources.files("embark_client")
    assert package.joinpath("py.typed").is_file()
    assert package.joinpath("_pb/embark_pb2.pyi").is_file()
    # The tests run the installed package, not the source tree.
    assert "site-packages" in str(Path(embark_client.__file__).resolve())


def test_the_stubs_import_inside_the_package_only() -> None:
    """The generated gRPC module imports its messages relatively, so no
    top-level `embark` package is needed (or shadowed)."""
    import embark_client._pb.embark_pb2_grpc  # noqa: F401

    assert "embark_client._pb.embark_pb2" in sys.modules
    assert "embark" not in sys.modules
