"""Generate Python stubs for protos/ into services/protos_gen/ (committed).

protoc writes `from epserve.v1 import x_pb2`; we rewrite that to the package path so the stubs
import without touching sys.path. `python -m services.local.codegen --check` exits 1 if the
committed stubs differ from freshly generated ones.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "services" / "protos_gen"
PACKAGE = "services.protos_gen"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # only needed at build time

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out_dir.rglob("*.py*") if p.is_file())
    for path in written:
        text = re.sub(r"^from epserve\.v1 import", f"from {PACKAGE}.epserve.v1 import",
                      path.read_text(), flags=re.M)
        path.write_text(text)
    for pkg in [out_dir, *[d for d in out_dir.rglob("*") if d.is_dir()]]:
        (pkg / "__init__.py").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        if args.check:
            cmp = filecmp.dircmp(fresh, OUT_DIR, ignore=["__pycache__"])
            stale = _differences(cmp)
            if stale:
                print("stale generated stubs: " + ", ".join(stale) + " (run `make protos`)")
                return 1
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"generated stubs in {OUT_DIR.relative_to(ROOT)}")
    return 0


def _differences(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [prefix + n for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        out += _differences(sub, f"{prefix}{name}/")
    return out


if __name__ == "__main__":
    sys.exit(main())
