"""Parameter count of every model config, per component: the sizes docs/MODEL.md quotes.

    .venv/bin/python scripts/model_sizes.py [--configs configs/model/*.yaml] [--record docs/benchmarks/model_sizes.md]

Each config is built on the meta device (no weights allocated, so the 7B config takes a second), and counted through
`model.components.component_summary`, the component map provenance and the audit use. One line per config and
component, then one JSON object as the last line: {config name: {"params": total, component: params, ...}}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script

from model.info import describe  # noqa: E402


def sizes(config_path: str) -> dict:
    info = describe(config_path)
    parts = {c["component"]: c["params"] for c in info["components"]}
    return {"params": sum(parts.values()), **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", metavar="YAML",
                        default=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/model").glob("*.yaml")),
                        help="model configs to count (default: every configs/model/*.yaml)")
    add_record_argument(parser)
    args = parser.parse_args()
    result = {}
    for path in args.configs:
        s = sizes(str(ROOT / path) if not Path(path).is_absolute() else path)
        result[Path(path).stem] = s
        print(f"{Path(path).stem:<8}{s['params']:>15,}")
        for name, n in s.items():
            if name != "params":
                print(f"  {name:<18}{n:>13,}  {n / s['params']:6.1%}")
    finish(result, args.record)


if __name__ == "__main__":
    main()
