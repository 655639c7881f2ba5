"""Images/s of the training input pipeline alone (JPEG decode, timm's train augmentation, collation, normalisation):
our loader against timm's create_loader, interleaved rounds, medians (benchmarks.pipeline).

Run with OMP_WAIT_POLICY=PASSIVE on a shared machine. Example:
    OMP_WAIT_POLICY=PASSIVE python tools/benchmark_pipeline.py --images 256 --img-size 224 --batch-size 32 \\
        --workers 1 2 --rounds 7 --json output/bench_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.pipeline import format_pipeline_table, run_pipeline_benchmark, write_jpegs
from repmlp.guards import add_overwrite_argument, atomic_write, check_outputs, integer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=integer(1), default=256, help="JPEGs written to a temporary folder (375x500)")
    p.add_argument("--img-size", type=integer(8), default=224)
    p.add_argument("--batch-size", type=integer(1), default=32)
    p.add_argument("--workers", type=integer(0), nargs="+", default=[1, 2], help="loader worker counts")
    p.add_argument("--rounds", type=integer(1), default=7)
    p.add_argument("--json", help="write the report here")
    add_overwrite_argument(p)
    args = p.parse_args(argv)
    try:
        check_outputs({"--json": args.json}, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp), args.images)
        report = run_pipeline_benchmark(
            root,
            args.images,
            args.img_size,
            args.batch_size,
            args.workers,
            args.rounds,
            log=lambda m: print(m, file=sys.stderr),
        )
    print(format_pipeline_table(report))
    print(json.dumps(report["machine"]))
    if args.json:
        text = json.dumps(report, indent=2)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
