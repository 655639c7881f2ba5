#!/usr/bin/env python
"""The documentation's speed page (docs/speed.md), rendered from the benchmark's JSON files in benchmarks/results/.

Every table names the machine it ran on (CPU, cores, the instruction sets it has and lacks, threads, load average),
the library versions and the command that made it; nothing on the page is typed by hand. A test holds the committed
page equal to this script's output. Usage:
    python benchmarks/speed_page.py              # rewrite docs/speed.md
    python benchmarks/speed_page.py --check      # exit 1 if docs/speed.md is not what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "speed.md"

HEADER = """# Speed

Every figure on this page comes from the benchmark's result files in `benchmarks/results/`, each with the command
and the machine that made it (CPU, the instruction sets it has and lacks, cores, threads, load average, library
versions); none is typed by hand. `python benchmarks/speed_page.py` renders this page from them (a test holds the
two equal), and `benchmarks/run_results.sh` runs every CPU measurement behind it (about 10 minutes on 2 cores;
`benchmarks/run_gpu.sh` the GPU table).

## How to read the tables

`tools/benchmark.py` checks every candidate first (each deploy form against its train form, each runtime against
eager PyTorch, each candidate in bf16/fp16 against its float32 self), then times them in interleaved rounds, adding
rounds while a speed-up's spread is wider than `--spread`. Figures are medians; a speed-up is a ratio of medians with
the p25-p75 of its per-round ratios. `%mm` is a model's GFLOP/s as a fraction of a dense 1024^3 matmul of the same
dtype timed in the same rounds. Every runtime gets the same threads (the cores available unless `--threads`) with
spin-waiting off (`OMP_WAIT_POLICY=PASSIVE`: libgomp's default spin-waiting made 2-thread runs on a shared machine
many times slower; onnxruntime's spinning off; OpenVINO one stream, no core pinning), and every baseline its fastest
layout (resnet50: channels_last). Weights are random (speed does not depend on them) except the shipped
Fashion-MNIST model's. bf16 runs several times faster than float32 only on CPUs with AVX512-BF16 or AMX, int8 only
with VNNI or AMX: read each table with its machine line.

## How the deploy forms get their speed

- **Layout.** The RepMLP-ResNets and the CIFAR/Fashion-MNIST models run NHWC inside (the stem makes the input
  channels_last, `repmlp.layers.in_layout`) and give outputs back in the caller's layout; weights are stored
  contiguous, so `state_dict()` saves as it is.
- **Exceptions.** The ResNets' c5 stage runs NCHW (`NCHWStage`); RepMLPNet runs NCHW throughout (its token FCs and
  FFN are batched matmuls over NCHW rows).
- **FC3** runs as `weight @ x^T` per group, so the weight is streamed rather than packed.
- **Conversion** computes every fold in float64 blocks of rows, rounded once into the float32 weight, and shares the
  train form's tensors while it converts (only what survives is cloned).
"""


def _cell(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _size(size) -> str:
    return "x".join(map(str, size)) if size else "-"


def _machine(report: dict) -> list[str]:
    m = report["machine"]
    lines = []
    if "instruction_sets" in m:
        sets = m["instruction_sets"]
        has = ", ".join(k for k, v in sets.items() if v) or "none listed"
        lacks = ", ".join(k for k, v in sets.items() if not v) or "none"
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        lines.append(
            f"- Machine: {m['cpu']}{gpu}, {m['available_cores']} cores available; has {has}; lacks {lacks}; "
            f"PyTorch dispatches {m['torch_cpu_capability']}"
        )
    start = m["start"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "onnxruntime", "openvino") if m.get(k))
    versions = versions or f"torch {report.get('torch', '?')}"
    lines.append(
        f"- {start['threads']} threads, OMP_WAIT_POLICY={start['omp_wait_policy']}, load average {start['loadavg']} "
        f"at the start; {versions}"
    )
    return lines


def _command(report: dict) -> list[str]:
    commands = report.get("command", "(command not recorded)").splitlines()
    return [*(f"- Command: `{c}`" for c in commands), ""]  # as text: each takes minutes (docs run fenced blocks)


def _forms_section(name: str, report: dict) -> list[str]:
    cfg = report["config"]
    runtimes = ", ".join(dict.fromkeys(r["runtime"] for r in report["results"]))
    lines = [f"## {name}: {cfg['dtype']}, {runtimes}, {cfg['device']}", "", *_machine(report), *_command(report)]
    lines += [
        "Input layout: what the benchmark feeds (our models turn their inputs channels_last inside where that is "
        "faster; baselines get their fastest layout).",
        "",
    ]
    half = cfg["dtype"] != "fp32"  # then also each candidate's error in that dtype against its float32 self
    lines += [
        "| model | form | runtime | input layout | input | batch | p50 ms | p90 ms | images/s | GMACs | %mm | "
        "max rel err vs train form, fp32 |" + (f" max rel err, {cfg['dtype']} vs fp32 |" if half else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if half else ""),
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['form']} | {r['runtime']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
            f"{_size(r.get('input_size'))} | {r['batch_size']} | {r['ms']:.1f} | {r['ms_p90']:.1f} | "
            f"{r['images_per_s']:.1f} | {_cell(r['macs'], '.2f', 1e-9)} | {_cell(r['matmul_fraction'], '.0%')} | "
            f"{_cell(r['max_rel_err'], '.1e')} |" + (f" {_cell(r.get('dtype_max_rel_err'), '.1e')} |" if half else "")
        )
    if report["ratios"]:
        lines += [
            "",
            "| deploy form | versus | runtime | batch | speed-up | per round p25-p75 | rounds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["ratios"]:
            s = r["per_round"]
            sizes = (
                ""
                if r.get("input_size") == r.get("versus_input_size")
                else (f" (inputs {_size(r.get('input_size'))} vs {_size(r.get('versus_input_size'))})")
            )
            lines.append(
                f"| {r['model']} | {r['versus']}{sizes} | {r['runtime']} | {r['batch_size']} | "
                f"{r['speedup']:.2f}x | {s['p25']:.2f}-{s['p75']:.2f} | {s['rounds']} |"
            )
    profiled = [r for r in report["results"] if r.get("profile_ms")]
    if profiled:
        kinds = list(dict.fromkeys(k for r in profiled for k in r["profile_ms"]))
        lines += [
            "",
            "Where eager PyTorch spends the time (share of the profiled operator time per call):",
            "",
            f"| model | form | batch | {' | '.join(kinds)} |",
            "|---|---|---|" + "---|" * len(kinds),
        ]
        for r in profiled:
            total = sum(r["profile_ms"].values()) or 1.0
            shares = " | ".join(f"{r['profile_ms'].get(k, 0.0) / total:.0%}" for k in kinds)
            lines.append(f"| {r['model']} | {r['form']} | {r['batch_size']} | {shares} |")
    mm = report["machine"].get("matmul_gflops", {})
    if mm:
        rates = ", ".join(f"batch {b}: {g:.1f} GFLOP/s" for b, g in mm.items())
        lines += ["", f"Dense {report['machine']['matmul_n']}^3 matmul in the same rounds: {rates}"]
    return lines


def int8_speedups(rows: list[dict]) -> list[tuple[float | None, float | None]]:
    """Each int8 race row's speed-up against onnxruntime fp32 and PyTorch fp32 at its model and batch (None: no such
    row)."""
    ref = {(r["model"], r["batch_size"], r["form"]): r["ms"] for r in rows}
    bases = [[ref.get((r["model"], r["batch_size"], f)) for f in ("onnxruntime fp32", "pytorch fp32")] for r in rows]
    return [tuple(None if base is None else base / r["ms"] for base in pair) for r, pair in zip(rows, bases)]


def _int8_section(name: str, report: dict) -> list[str]:
    lines = [f"## {name}: int8 against float32", "", *_machine(report), *_command(report)]
    lines += [
        "| model | batch | form | ms | images/s | vs onnxruntime fp32 | vs PyTorch fp32 | max rel err | "
        "argmax agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, speedups in zip(report["results"], int8_speedups(report["results"])):
        vs = ["-" if s is None else f"{s:.2f}x" for s in speedups]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['form']} | {r['ms']:.2f} | {r['images_per_s']:.1f} | "
            f"{vs[0]} | {vs[1]} | {r['max_rel_err']:.1e} | {r['argmax_agreement']:.2%} |"
        )
    return lines


def _accuracy_section(name: str, report: dict) -> list[str]:
    lines = [f"## {name}: top-1 by dtype", "", *_machine(report), *_command(report)]
    lines += ["| model | form | dtype | top-1 % | top-5 % | images |", "|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        lines.append(
            f"| {r['model']} | {r['form']} | {r['dtype']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['count']} |"
        )
    return lines


def render_report(name: str, report: dict) -> str:
    """The section of one JSON: the form benchmark, its --int8 mode, or benchmarks/accuracy.py."""
    if "accuracy" in report:
        lines = _accuracy_section(name, report)
    else:
        lines = _int8_section(name, report) if "ratios" not in report else _forms_section(name, report)
    return "\n".join(lines) + "\n"


def render(results: Path = RESULTS) -> str:
    """The whole page from every ``*.json`` in ``results`` (by file name)."""
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    if not files:
        return HEADER + "\n## Results\n\nNo results recorded yet: run `benchmarks/run_results.sh`.\n"
    sections = [render_report(f.stem, json.loads(f.read_text())) for f in files]
    return HEADER + "\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of benchmark JSON files")
    p.add_argument("--output", type=Path, default=PAGE, help="the page to write")
    p.add_argument("--check", action="store_true", help="only compare: exit 1 if the page differs")
    args = p.parse_args(argv)
    page = render(args.results)
    if args.check:
        same = args.output.is_file() and args.output.read_text() == page
        print(f"{args.output} {'is up to date' if same else 'differs from the results: rerun without --check'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
