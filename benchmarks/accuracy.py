#!/usr/bin/env python
"""Top-1 of the shipped Fashion-MNIST model's deploy form in each dtype (tools/eval.py --dtype), as one JSON for the
speed page: what reduced precision costs in accuracy, beside what it gains in speed. Example:
    python benchmarks/accuracy.py --json benchmarks/results/fmnist_top1_by_dtype.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import machine_description, machine_state  # noqa: E402

MODEL = "repmlp_fmnist_mlp.fmnist"


def evaluate(dtype: str, model: str = MODEL) -> tuple[str, dict]:
    """The eval command for ``dtype`` and its JSON result (Fashion-MNIST's 10,000 test images)."""
    args = ["tools/eval.py", "--model", model, "--pretrained", "--form", "deploy", "--dtype", dtype, "--no-progress"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return "python " + shlex.join(args), json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    rows, commands = [], []
    for dtype in args.dtypes:
        command, result = evaluate(dtype)
        commands.append(command)
        rows.append({"dtype": dtype, **result})
        print(f"{dtype}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% ({result['count']} images)")
    report = {
        "command": "\n".join(commands),
        "machine": {**machine_description(), "start": machine_state()},
        "accuracy": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
