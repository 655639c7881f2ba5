"""Print the zoo's model table (markdown): parameters and MACs of the train and deploy forms (fvcore)."""

from __future__ import annotations

import argparse
import sys
import warnings

import timm

import repmlp  # noqa: F401  (registers the zoo)
from repmlp.flops import count_macs, count_params

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("patterns", nargs="*", default=["repmlp*"], help="timm name patterns (default: repmlp*)")
    args = p.parse_args(argv)
    names = sorted({n for pattern in args.patterns for n in timm.list_models(pattern)})
    if not names:
        raise SystemExit(f"no registered model matches {args.patterns}")
    print("| model | input | params train | params deploy | MACs train | MACs deploy |")
    print("|---|---|---|---|---|---|")
    for name in names:
        train, deploy = timm.create_model(name), timm.create_model(name, deploy=True)
        size = tuple(train.pretrained_cfg["input_size"])
        print(
            f"| {name} | {'x'.join(map(str, size))} | {count_params(train) / 1e6:.2f}M | "
            f"{count_params(deploy) / 1e6:.2f}M | {count_macs(train, size) / 1e6:.1f}M | "
            f"{count_macs(deploy, size) / 1e6:.1f}M |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
