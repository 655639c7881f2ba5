"""Inference speed of RepMLP models: train form, deploy form, the authors' deploy form (emulated) and baselines, in
eager PyTorch, torch.compile and onnxruntime.

Candidates are checked against eager PyTorch in every runtime, then timed in interleaved rounds (medians; p50/p90
latency) with a dense matmul in the same rounds; speed-ups are stated with their per-round spread, and rounds are
added (up to --max-rounds) until that spread is within --spread. Prints a table, the speed-ups, the conversion race
against the authors' conversion (emulated) and the machine's state (threads, OMP_WAIT_POLICY, load average);
optionally writes JSON and a PNG chart. Weights are random (BN statistics randomised): speed does not depend on them,
and every deploy and authors' form is checked against its train form. Inputs are NCHW unless --channels-last.

A fair race: every runtime (PyTorch, onnxruntime, OpenVINO) gets the same threads (--threads, default the cores
available) with spin-waiting off (OMP_WAIT_POLICY=PASSIVE unless set, by tools/benchmark.py: libgomp's default
spin-waiting made 2-thread runs up to 12x slower under load; onnxruntime's spinning off; OpenVINO one stream, no
pinning); baselines run in their fastest layout (channels_last, --channels-last); speed-ups between models of
different input sizes name them; the output and JSON name the CPU and its instruction sets (AVX2, AVX-512,
AVX512-BF16, AMX, VNNI) and the command. --dtype bf16 or fp16 times every candidate in that dtype (onnxruntime:
float32 only; OpenVINO: its precision hint, refused where the CPU lacks it), each against the dense matmul of the
same dtype (%mm). --profile adds where each eager candidate spends its time (matmul, conv, copy/layout,
elementwise, pool). Example:
    python tools/benchmark.py --batch-sizes 1 8 32 --runtime eager compile onnxruntime --json output/bench_cpu.json
benchmarks/run_results.sh runs every command whose JSON the speed page (docs/speed.md) is made from.

With --int8: int8 against float32 instead (repmlp.int8): PyTorch eager and compiled float32, PyTorch int8 (PT2E,
compiled), onnxruntime float32 and int8 (dynamic, static), each checked against the PyTorch float32 deploy form;
default models the shipped Fashion-MNIST model (its weights and test images), repmlpnet_t224, repmlp_res50_light_224:
    python tools/benchmark.py --int8 --batch-sizes 1 8 --rounds 15 --json output/bench_int8.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks.forms import DTYPES, FORMS, BenchmarkConfig, format_table, plot, run_benchmark
from benchmarks.int8 import (
    EAGER_LAYOUT_FORM,
    INT8_FORMS,
    Int8BenchmarkConfig,
    format_int8_table,
    run_int8_benchmark,
)
from repmlp.guards import (
    add_overwrite_argument,
    atomic_write,
    check_outputs,
    integer,
    number,
)
from repmlp.runtime import RUNTIMES

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def parse_args(argv: list[str] | None = None) -> tuple[BenchmarkConfig | Int8BenchmarkConfig, dict[str, str | None]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchmarkConfig()
    p.add_argument(
        "--models",
        nargs="+",
        help="timm names or package.module:factory of models with RepMLP blocks (timed in --forms); default "
        f"{' '.join(d.models)} (with --int8: {' '.join(Int8BenchmarkConfig.models)})",
    )
    p.add_argument("--int8", action="store_true", help="time int8 against float32 forms (see above)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="time each eager candidate's operator kinds too (with --int8: each onnxruntime form's operator types)",
    )
    p.add_argument(
        "--int8-forms",
        nargs="+",
        choices=(*INT8_FORMS, EAGER_LAYOUT_FORM),
        default=list(INT8_FORMS),
        metavar="FORM",
        help=f"with --int8: the forms to time, of {INT8_FORMS} and {EAGER_LAYOUT_FORM!r} (exported as before the "
        "graph layout: FC3 as batched matmuls)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(d.baselines),
        help="models timed as they are: timm names or package.module:factory (default: resnet50)",
    )
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="forms of --models to time")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help='JSON kwargs for every --models factory, e.g. \'{"img_size": 64, "partition": 4}\'',
    )
    p.add_argument(
        "--input-size", type=integer(1), nargs=3, metavar=("C", "H", "W"), help="input size (default: each model's own)"
    )
    p.add_argument("--batch-sizes", type=integer(1), nargs="+", default=list(d.batch_sizes))
    p.add_argument("--device", default=d.device, help="cpu or cuda[:i]")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    p.add_argument(
        "--channels-last",
        nargs="*",
        choices=(*FORMS, "baseline", "none"),
        help="run these forms on channels_last inputs (default: baseline, resnet50's fastest layout; no value: all "
        "forms and baselines; none: NCHW inputs for all)",
    )
    p.add_argument(
        "--runtime",
        dest="runtimes",
        nargs="+",
        default=list(d.runtimes),
        choices=RUNTIMES,
        help="runtimes to run every candidate in (outputs checked against eager PyTorch first)",
    )
    p.add_argument(
        "--threads", type=integer(1), help="CPU threads of every runtime (default: the cores available to this process)"
    )
    p.add_argument("--warmup", type=integer(0), default=d.warmup, help="untimed calls per candidate after the first")
    p.add_argument("--rounds", type=integer(1), default=d.rounds, help="timed, interleaved rounds (at least)")
    p.add_argument(
        "--max-rounds",
        type=integer(1),
        help="rounds at most while a speed-up's spread is wider than --spread (default 3 x --rounds)",
    )
    p.add_argument(
        "--spread",
        type=number(0),
        default=d.spread,
        help="target interquartile range of every per-round speed-up, relative to its median",
    )
    p.add_argument("--matmul-size", type=integer(1), help="n of the reference n^3 matmul (default 1024 CPU, 8192 CUDA)")
    p.add_argument("--no-macs", dest="macs", action="store_false", help="skip fvcore MAC counts")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument(
        "--convert-rounds",
        type=integer(0),
        default=d.convert_rounds,
        help="time the train -> deploy conversion this many times per model (0: skip)",
    )
    p.add_argument(
        "--conversion-only",
        action="store_true",
        help="only race the conversion against the authors' (emulated), --convert-rounds times per model",
    )
    p.add_argument("--seed", type=integer(0), default=d.seed)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--png", help="write a bar chart of images/s here")
    add_overwrite_argument(p)
    args = p.parse_args(argv)
    outputs = {"json": args.json, "png": args.png, "overwrite": args.overwrite}
    if args.conversion_only and args.png:
        p.error("--png charts the forms' images/s, which --conversion-only does not measure; write --json")
    if args.int8:
        if args.png:
            p.error("--png charts the form benchmark; with --int8 write --json")
        cfg = Int8BenchmarkConfig(
            models=tuple(args.models or Int8BenchmarkConfig.models),
            forms=tuple(args.int8_forms),
            batch_sizes=tuple(args.batch_sizes),
            threads=args.threads,
            warmup=args.warmup,
            rounds=args.rounds,
            seed=args.seed,
            profile=args.profile,
        )
        return cfg, outputs
    del args.json, args.png, args.int8, args.int8_forms, args.overwrite
    args.models = args.models or list(d.models)
    if args.input_size:
        args.input_size = tuple(args.input_size)
    if args.channels_last is None:
        args.channels_last = d.channels_last
    elif not args.channels_last:
        args.channels_last = (*FORMS, "baseline")
    elif "none" in args.channels_last:
        args.channels_last = ()
    return BenchmarkConfig(**vars(args)), outputs


def main(argv: list[str] | None = None) -> int:
    cfg, outputs = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    policy = "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "unset")
    command = shlex.join([policy, "python", "tools/benchmark.py", *argv])
    try:  # refused before the (long) measurement
        check_outputs({"--json": outputs["json"], "--png": outputs["png"]}, overwrite=outputs["overwrite"])
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if isinstance(cfg, Int8BenchmarkConfig):
        try:
            with tempfile.TemporaryDirectory() as workdir:
                report = run_int8_benchmark(cfg, workdir, log)
        except ValueError as err:  # a model it cannot quantize, refused before any timing
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(format_int8_table(report))
    else:
        try:
            report = run_benchmark(cfg, log=log)
        except ValueError as err:  # a runtime, dtype or device this machine cannot run, refused before any timing
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(format_table(report))
    report = {"command": command, **report}  # the JSON says what made it (benchmarks/speed_page.py prints it)
    if outputs["json"]:
        text = json.dumps(report, indent=1)
        atomic_write(outputs["json"], lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {outputs['json']}")
    if outputs["png"]:
        png = io.BytesIO()
        plot(report, png)  # to memory: matplotlib takes the format from a file name, the temporary one has none
        atomic_write(outputs["png"], lambda tmp: Path(tmp).write_bytes(png.getvalue()))
        print(f"wrote {outputs['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
