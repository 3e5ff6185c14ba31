"""Generate the Python stubs in icefarm/v1 from protos/ (or check they are fresh with --check)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = Path("icefarm") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every proto file; return the generated files relative to out_root."""
    protos = sorted(PROTO_ROOT.glob("icefarm/v1/*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_root) for p in (out_root / OUT_PACKAGE).iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed stubs are stale"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / OUT_PACKAGE).mkdir(parents=True)
        fresh = generate(tmp_root)
        target = ROOT / OUT_PACKAGE
        committed = sorted(
            p.relative_to(ROOT) for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
        )
        if args.check:
            stale = [str(p) for p in fresh if not (ROOT / p).exists()]
            stale += [str(p) for p in committed if p not in fresh]
            stale += [
                str(p)
                for p in fresh
                if (ROOT / p).exists() and not filecmp.cmp(tmp_root / p, ROOT / p, shallow=False)
            ]
            if stale:
                print("stale generated stubs (run `make protos`): " + ", ".join(sorted(set(stale))))
                return 1
            print("generated stubs are fresh")
            return 0
        for old in committed:
            (ROOT / old).unlink()
        for path in fresh:
            shutil.copyfile(tmp_root / path, ROOT / path)
        print(f"generated {len(fresh)} files in {OUT_PACKAGE}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
