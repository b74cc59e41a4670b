"""Regenerate the committed protobuf and gRPC stubs from ``protocol/proto``.

The .proto files live under ``rumor/v1/`` (the protobuf package ``rumor.v1``) while the
Python modules install as ``rumor.protocol.v1``; the generated imports are rewritten to
match. ``make proto`` runs this; ``tests/test_proto_stubs.py`` runs it into a temporary
folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / "proto"
PROTO_DIR = PROTO_ROOT / "rumor" / "v1"
OUT_DIR = HERE / "v1"
_IMPORT = re.compile(r"^from rumor\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into ``out_dir`` and return the files written."""
    from grpc_tools import protoc

    try:
        from importlib.resources import files

        include = str(files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old grpc_tools
        import grpc_tools

        include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "rumor" / "v1").iterdir()):
            if src.suffix not in {".py", ".pyi"}:
                continue
            text = _IMPORT.sub("from rumor.protocol.v1 import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC stubs for the rumor.v1 wire protocol."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.out == OUT_DIR:
        for old in OUT_DIR.glob("*_pb2*.py*"):
            old.unlink()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
