#!/usr/bin/env python
"""Speed of the zoo's models with weights stored channels_last (as before) against contiguous (as now), in one
process, interleaved rounds, medians (repmlp.benchmark.layout). Run with OMP_WAIT_POLICY=PASSIVE on a shared machine:
    OMP_WAIT_POLICY=PASSIVE python tools/bench_weight_layout.py --models repmlp_res50_light_224 repmlp_cifar_mlp
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import repmlp  # noqa: E402, F401  (registers the zoo)
from repmlp.benchmark.layout import compare_weight_layouts, format_layout_table  # noqa: E402
from repmlp.guards import integer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["repmlp_res50_light_224", "repmlp_cifar_mlp"])
    p.add_argument("--batch-sizes", nargs="+", type=integer(1), default=[1, 8])
    p.add_argument("--rounds", type=integer(2), default=15)
    p.add_argument("--threads", type=integer(1), default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_layout_table(compare_weight_layouts(args.models, args.batch_sizes, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
