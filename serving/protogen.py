"""Regenerates the committed gRPC modules in serving/_proto/ from protos/*.proto (`make protos`).

protoc writes `import model_config_pb2`, which only works with serving/_proto on sys.path; the
imports of our own generated modules are rewritten to `from serving._proto import ...` so that the
package imports cleanly. `python -m serving.protogen [--out DIR]`; tests regenerate into a temporary
folder and compare it with the committed one.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent / "_proto"
PACKAGE = "serving._proto"
INIT = '"""Generated from protos/ by `make protos` (serving/protogen.py); do not edit."""\n'


def _fix_imports(text: str, modules: set[str]) -> str:
    def replace(match: re.Match) -> str:
        module, alias = match.group(1), match.group(2)
        if module not in modules:
            return match.group(0)
        return f"from {PACKAGE} import {module} as {alias}"

    return re.sub(r"^import (\w+) as (\w+)$", replace, text, flags=re.MULTILINE)


def generate(out_dir: Path, protos_dir: Path = PROTOS) -> list[Path]:
    """Writes the generated modules (and __init__.py) into out_dir; returns the files written."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    sources = sorted(protos_dir.glob("*.proto"))
    if not sources:
        raise FileNotFoundError(f"no .proto files in {protos_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        argv = [
            "grpc_tools.protoc",
            f"-I{protos_dir}",
            f"-I{well_known}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *(str(s) for s in sources),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(s.name for s in sources)}")
        generated = sorted(Path(raw).iterdir())
        modules = {p.name.removesuffix(".py") for p in generated if p.suffix == ".py"}
        written = []
        for path in generated:
            target = out_dir / path.name
            target.write_text(_fix_imports(path.read_text(), modules))
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text(INIT)
    return [init, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
