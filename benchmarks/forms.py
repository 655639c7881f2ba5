"""Inference benchmark: train form, deploy form, the authors' deploy form and baselines, in each runtime.

Protocol: every (form, runtime) pair is built, checked against eager PyTorch (:mod:`repmlp.runtime`) and warmed up,
then timed in interleaved rounds (one call of each per round, the order rotated every round) so that load changes on
a shared machine hit all candidates alike; a dense square matmul is timed in the same rounds and gives the machine's
FLOP/s under the same conditions. Speed-ups are taken per round (the two calls of a round ran seconds apart) and
reported as the median with their spread; rounds are added, up to ``max_rounds``, until every speed-up's
interquartile range is within ``spread`` of its median, and the spread reached is stated either way.

Reported per candidate, runtime and batch size: median (p50) and p90 latency, images/s, process CPU time per call
(less sensitive to other processes than wall time), parameters and multiply-accumulates (fvcore,
:mod:`repmlp.flops`), achieved FLOP/s and its fraction of the matmul's, FC3 weight bytes, peak memory (eager), the
max relative error against the train form and against eager PyTorch, and the build (export/compile) time. The report
records thread count, OpenMP wait policy and load average: with 2 threads on a loaded machine libgomp's default
(spinning) wait policy made runs up to 12x slower here; run with ``OMP_WAIT_POLICY=PASSIVE``.

The authors' deploy form and conversion are **emulations** (:mod:`benchmarks.emulation`): our weights run op
for op the way the authors' code runs and converts them. Their code itself is not used.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from repmlp.convert import convert_to_deploy
from repmlp.cpu import available_cores
from repmlp.flops import count_macs, count_params
from repmlp.models import load_model, model_input_size
from repmlp.runtime import RUNTIMES, RuntimeModel, check_against_eager, in_runtime
from repmlp.sources import model_source
from repmlp.verify import DTYPES, TOLERANCES, ErrorStats

from .emulation import authors_convert, authors_form
from .timing import (
    format_machine,
    machine_description,
    machine_state,
    percentile,
    profile_ops,
    quiet_profiler,
    spread,
    sync,
    timed_round,
)

FORMS = ("train", "deploy", "authors")
GRAPH_RUNTIMES = ("onnxruntime", "openvino")  # exported once per candidate, with a dynamic batch


def sizes_note(ratio: dict) -> str:
    """``, inputs 1x28x28 vs 3x224x224`` where a speed-up compares models of different input sizes, else ``''``."""
    if ratio.get("input_size") == ratio.get("versus_input_size"):
        return ""
    size = lambda s: "x".join(map(str, s))  # noqa: E731
    return f", inputs {size(ratio['input_size'])} vs {size(ratio['versus_input_size'])}"


def fc3_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the FC3 weight of every block (modules named ``fc3``), by module name."""
    return {
        name: m.weight.numel() * m.weight.element_size()
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] == "fc3" and isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def matmul_time(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], None]:
    """A timed-call closure for one dense n x n x n matmul (2 n^3 FLOP)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return lambda: torch.mm(a, b)


@torch.inference_mode()
def peak_forward_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward on top of what existed before (weights and input excluded).

    CUDA: the caching allocator's peak. CPU: the profiler's allocation events (allocations that oneDNN makes
    outside PyTorch's allocator are not seen).
    """
    if x.device.type == "cuda":
        sync(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        module(x)
        sync(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(nbytes for _, nbytes in events), default=0)


@dataclass
class Candidate:
    """One model in one form, ready to time."""

    model: str
    form: str
    module: nn.Module
    input_size: tuple[int, int, int]
    max_rel_err: float | None = None  # against the model's train form
    params: int = 0
    macs: int | None = None  # per image
    fc3_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model} [{self.form}]"


@dataclass
class BenchmarkConfig:
    """What to run (see tools/benchmark.py for the command line)."""

    models: Sequence[str] = ("repmlp_res50_light_g4_224", "repmlp_res50_light_224", "repmlp_res50_bottleneck_224")
    baselines: Sequence[str] = ("resnet50",)
    forms: Sequence[str] = FORMS
    runtimes: Sequence[str] = ("eager",)
    model_kwargs: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None
    batch_sizes: Sequence[int] = (1, 8, 32)
    device: str = "cpu"
    dtype: str = "fp32"
    # forms given channels_last inputs ("train", "deploy", "authors", "baseline"): by default the baselines, whose
    # fastest layout it is (resnet50); our zoo models turn their inputs channels_last themselves where that is faster
    channels_last: Sequence[str] = ("baseline",)
    threads: int | None = None  # default: the cores available (repmlp.cpu.available_cores)
    warmup: int = 2
    rounds: int = 10
    max_rounds: int | None = None  # default: 3 x rounds
    spread: float = 0.1  # target (p75 - p25) / median of every per-round speed-up
    matmul_size: int | None = None
    macs: bool = True
    memory: bool = True
    convert_rounds: int = 3
    conversion_only: bool = False  # time the conversions (and the authors'), no forward passes
    profile: bool = False  # also the milliseconds per operator kind of every eager candidate (timing.profile_ops)
    seed: int = 0


def build_candidates(cfg: BenchmarkConfig) -> tuple[list[Candidate], dict[str, dict]]:
    """Candidates in fp32 on CPU (checked against their train form) and per-model conversion timings."""
    cands, conversions = [], {}
    for name in cfg.models:
        with torch.inference_mode(False):  # built as users build it (ordinary tensors), and converted so
            train = model_source(name, model_kwargs=cfg.model_kwargs, seed=cfg.seed).model.eval()
            conversions[name] = time_conversion(train, cfg.convert_rounds) if cfg.convert_rounds else {}
        size = tuple(cfg.input_size or model_input_size(train))
        if cfg.conversion_only:
            continue
        deploy = convert_to_deploy(train)
        forms = {"train": train, "deploy": deploy}
        if "authors" in cfg.forms:
            forms["authors"] = authors_form(train, deploy)
        x = torch.randn(1, *size, generator=torch.Generator().manual_seed(cfg.seed))
        with torch.inference_mode():
            y_train = train(x)
            for form in cfg.forms:
                if forms.get(form) is not None:
                    err = 0.0 if form == "train" else ErrorStats.of(y_train, forms[form](x)).max_rel_err
                    cands.append(Candidate(name, form, forms[form], size, err))
    for spec in () if cfg.conversion_only else cfg.baselines:
        torch.manual_seed(cfg.seed)
        module = load_model(spec).eval()
        cands.append(Candidate(spec, "baseline", module, tuple(cfg.input_size or model_input_size(module))))
    for c in cands:
        c.params = count_params(c.module)
        c.fc3_bytes = fc3_weight_bytes(c.module)
        if cfg.macs:
            c.macs = count_macs(c.module, c.input_size)
    return cands, conversions


def time_conversion(train: nn.Module, rounds: int) -> dict:
    """Median seconds of :func:`convert_to_deploy` with its copy and in place (on a deep copy made untimed), and of the
    authors' conversion (emulated, :func:`repmlp.authors.authors_convert`) where it applies, interleaved; the
    speed-up over the authors' per round."""
    times: dict[str, list[float]] = {"with_copy": [], "inplace": [], "authors": []}
    can_race = True
    for r in range(rounds):
        order = ["with_copy", "inplace", "authors"] if can_race else ["with_copy", "inplace"]
        for kind in order[r % len(order) :] + order[: r % len(order)]:
            victim = copy.deepcopy(train) if kind == "inplace" else train
            start = time.perf_counter()
            try:
                out = {
                    "with_copy": convert_to_deploy,
                    "authors": authors_convert,
                    "inplace": lambda m: convert_to_deploy(m, inplace=True),
                }[kind](victim)
            except ValueError:  # the authors' conversion does not apply to this architecture
                can_race = False
                continue
            times[kind].append(time.perf_counter() - start)
            del out, victim
    report = {f"{kind}_s": statistics.median(t) for kind, t in times.items() if t}
    report["rounds"] = rounds
    if times["authors"] and len(times["authors"]) == len(times["with_copy"]):
        report["speedup_vs_authors"] = spread([a / o for a, o in zip(times["authors"], times["with_copy"])])
    return report


@dataclass
class _Entry:
    """A candidate in a runtime at one batch size, with its timings."""

    cand: Candidate
    module: nn.Module  # the candidate's module on the device, in the benchmark's dtype
    runtime: str
    call: RuntimeModel
    x: torch.Tensor
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _pairs(entries: list[_Entry]) -> list[tuple[str, _Entry, _Entry]]:
    """(versus, deploy entry, reference entry): the deploy form in each runtime against the train form, the authors'
    form and each baseline in the same runtime, and against its own eager run."""
    by = {(e.cand.model, e.cand.form, e.runtime): e for e in entries}
    baselines = sorted({e.cand.model for e in entries if e.cand.form == "baseline"})
    pairs = []
    for (model, form, runtime), e in by.items():
        if form != "deploy":
            continue
        refs = {"train": by.get((model, "train", runtime)), "authors": by.get((model, "authors", runtime))}
        refs.update({b: by.get((b, "baseline", runtime)) for b in baselines})
        if runtime != "eager":
            refs["deploy eager"] = by.get((model, "deploy", "eager"))
        pairs += [(versus, e, ref) for versus, ref in refs.items() if ref is not None]
    return pairs


def _round_ratios(pair: tuple[str, _Entry, _Entry]) -> list[float]:
    _, deploy, ref = pair
    return [r / d for r, d in zip(ref.times, deploy.times)]


def _widest_spread(pairs: list) -> float:
    widest = 0.0
    for pair in pairs:
        s = spread(_round_ratios(pair))
        widest = max(widest, (s["p75"] - s["p25"]) / s["median"])
    return widest


def _time_rounds(
    entries: list[_Entry], matmul: Callable[[], None], cfg: BenchmarkConfig, device: torch.device
) -> tuple[list[float], int]:
    """Interleaved rounds until ``cfg.rounds`` are done and every speed-up's spread is within ``cfg.spread`` (or
    ``max_rounds`` are done); returns the matmul's times and the rounds run."""
    pairs, mm = _pairs(entries), []
    max_rounds = cfg.max_rounds or 3 * cfg.rounds
    r = 0
    calls = [lambda e=e: e.call(e.x) for e in entries] + [matmul]
    while r < cfg.rounds or (r < max_rounds and pairs and _widest_spread(pairs) > cfg.spread):
        *timed, (elapsed, _) = timed_round(calls, r, device)
        mm.append(elapsed)
        for e, (elapsed, cpu) in zip(entries, timed):
            e.times.append(elapsed)
            e.cpu.append(cpu)
        r += 1
    return mm, r


def _in_dtype(
    cands: list[Candidate], device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[list[nn.Module], list[float]]:
    """The candidates' modules moved and cast (in place) to the benchmark's device and dtype, and the max relative
    error of each against itself in float32 on the CPU; RuntimeError where one of our forms exceeds the dtype's
    tolerance (:data:`repmlp.verify.TOLERANCES`) or gives non-finite outputs."""
    modules, errors = [], []
    for c in cands:
        x = torch.randn(2, *c.input_size, generator=torch.Generator().manual_seed(seed))
        reference = c.module(x) if dtype != torch.float32 or device.type != "cpu" else None
        module = c.module.to(device=device, dtype=dtype)
        err = 0.0 if reference is None else ErrorStats.of(reference, module(x.to(device, dtype)).cpu()).max_rel_err
        if c.form != "baseline" and not err <= TOLERANCES[dtype]:
            raise RuntimeError(f"{c.label} in {dtype} differs from its float32 self: max rel err {err:.2e}")
        modules.append(module)
        errors.append(err)
    return modules, errors


@torch.inference_mode()
def run_benchmark(cfg: BenchmarkConfig, log: Callable[[str], None] = print) -> dict:
    """Build, check and time every candidate in every runtime; returns a JSON-serialisable report."""
    for runtime in cfg.runtimes:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtimes must be among {RUNTIMES}, got {runtime!r}")
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if device.type != "cpu" and set(GRAPH_RUNTIMES) & set(cfg.runtimes):
        raise ValueError(f"{' and '.join(GRAPH_RUNTIMES)} run on the CPU here; time them with --device cpu")
    torch.set_num_threads(cfg.threads or available_cores())  # the threads of every runtime (repmlp.runtime)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    machine = {**machine_description(device), "start": machine_state()}
    cands, conversions = build_candidates(cfg)
    modules, cast_errors = _in_dtype(cands, device, dtype, cfg.seed)
    matmul_n = cfg.matmul_size or (1024 if device.type == "cpu" else 8192)
    matmul = matmul_time(device, dtype, matmul_n)
    machine.update(matmul_n=matmul_n, matmul_gflops={}, rounds={}, widest_spread={}, after={})
    formats = [torch.channels_last if c.form in cfg.channels_last else torch.contiguous_format for c in cands]
    sessions: dict[tuple[int, str], RuntimeModel] = {}  # graph runtimes: one per candidate serves every batch size
    results, ratios = [], []
    for bs in () if cfg.conversion_only else cfg.batch_sizes:
        entries = []
        for i, (c, m, f) in enumerate(zip(cands, modules, formats)):
            x = torch.randn(bs, *c.input_size, device=device).to(dtype).contiguous(memory_format=f)
            for runtime in cfg.runtimes:
                if (i, runtime) in sessions:
                    call = sessions[(i, runtime)]
                    call.max_rel_err = check_against_eager(m, call, x, dtype=dtype)
                else:
                    call = in_runtime(m, runtime, x, dtype=dtype)
                    if runtime in GRAPH_RUNTIMES:
                        sessions[(i, runtime)] = call
                for _ in range(cfg.warmup):
                    call(x)
                entries.append(_Entry(c, m, runtime, call, x))
        mm, rounds = _time_rounds(entries, matmul, cfg, device)
        peak_gflops = 2 * matmul_n**3 / statistics.median(mm) / 1e9
        machine["matmul_gflops"][bs], machine["rounds"][bs] = peak_gflops, rounds
        machine["after"][bs] = machine_state()
        pairs = _pairs(entries)
        machine["widest_spread"][bs] = _widest_spread(pairs) if pairs else None
        for e in entries:
            m, c = e.call, e.cand
            sec = statistics.median(e.times)
            gflops = None if c.macs is None else 2 * c.macs * bs / sec / 1e9
            weights = sum(
                p.numel() * p.element_size() for p in itertools.chain(e.module.parameters(), e.module.buffers())
            )
            peak = weights + peak_forward_bytes(e.module, e.x) if cfg.memory and e.runtime == "eager" else None
            profile = cfg.profile and e.runtime == "eager" and device.type == "cpu"
            results.append(
                dict(
                    model=c.model,
                    form=c.form,
                    runtime=e.runtime,
                    batch_size=bs,
                    input_size=list(c.input_size),
                    dtype=cfg.dtype,
                    channels_last=c.form in cfg.channels_last,
                    ms=1e3 * sec,
                    ms_p90=1e3 * percentile(e.times, 90),
                    ms_min=1e3 * min(e.times),
                    cpu_ms=1e3 * statistics.median(e.cpu),
                    images_per_s=bs / sec,
                    params=c.params,
                    macs=c.macs,
                    gflops=gflops,
                    matmul_fraction=None if gflops is None else gflops / peak_gflops,
                    fc3_bytes=sum(c.fc3_bytes.values()),
                    fc3_bytes_per_block=c.fc3_bytes,
                    peak_bytes=peak,
                    max_rel_err=c.max_rel_err,
                    dtype_max_rel_err=cast_errors[cands.index(c)],
                    runtime_max_rel_err=m.max_rel_err,
                    build_s=m.build_s,
                    profile_ms=profile_ops(lambda e=e: e.call(e.x)) if profile else None,
                )
            )
        for versus, deploy, ref in pairs:
            per_round = spread(_round_ratios((versus, deploy, ref)))
            ratios.append(
                dict(
                    model=deploy.cand.model,
                    runtime=deploy.runtime,
                    batch_size=bs,
                    versus=versus,
                    input_size=list(deploy.cand.input_size),
                    versus_input_size=list(ref.cand.input_size),
                    speedup=statistics.median(ref.times) / statistics.median(deploy.times),
                    per_round=per_round,
                )
            )
        log(
            f"batch {bs}: {rounds} rounds done, dense {matmul_n}^3 matmul {peak_gflops:.1f} GFLOP/s, "
            f"load average {machine['after'][bs]['loadavg']}"
        )
    machine.update(device=machine.get("gpu", machine["cpu"]), threads=torch.get_num_threads())
    if "onnxruntime" in cfg.runtimes:
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
    if "openvino" in cfg.runtimes:
        import openvino

        machine["openvino"] = openvino.get_version()
    return dict(config=_jsonable(asdict(cfg)), machine=machine, conversion=conversions, results=results, ratios=ratios)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def format_table(report: dict) -> str:
    """The results as a fixed-width table, then the speed-ups with their per-round spread, conversions, machine."""
    head = (
        f"{'model':28} {'form':8} {'runtime':11} {'fmt':4} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'img/s':>7} {'params':>8} {'GMACs':>6} {'GFLOP/s':>7} {'%mm':>4} {'FC3 MB':>6} {'peak MB':>7} "
        f"{'rel err':>7} {'vs eager':>8} {'build s':>7}"
    )
    lines = [head, "-" * len(head)]

    def fmt(value, spec, scale=1.0):
        return "-" if value is None else format(value * scale, spec)

    for r in report["results"]:
        layout = "NHWC" if r["channels_last"] else "NCHW"
        lines.append(
            f"{r['model'][:28]:28} {r['form']:8} {r['runtime']:11} {layout:4} {r['batch_size']:>5} {r['ms']:>8.1f} "
            f"{r['ms_p90']:>8.1f} {r['images_per_s']:>7.1f} {r['params'] / 1e6:>7.2f}M {fmt(r['macs'], '>6.3f', 1e-9)} "
            f"{fmt(r['gflops'], '>7.1f')} {fmt(r['matmul_fraction'], '>4.0%')} {r['fc3_bytes'] / 2**20:>6.1f} "
            f"{fmt(r['peak_bytes'], '>7.0f', 2**-20)} {fmt(r['max_rel_err'], '>7.0e')} "
            f"{fmt(r['runtime_max_rel_err'], '>8.0e')} {r['build_s']:>7.1f}"
        )
    machine = report["machine"]
    if machine["matmul_gflops"]:
        lines.append(
            f"dense {machine['matmul_n']}^3 matmul, same rounds: "
            + ", ".join(f"batch {bs}: {g:.1f} GFLOP/s" for bs, g in machine["matmul_gflops"].items())
        )
    for r in report["ratios"]:
        s = r["per_round"]
        lines.append(
            f"{r['model']} deploy vs {r['versus']} [{r['runtime']}] (batch {r['batch_size']}{sizes_note(r)}): "
            f"x{r['speedup']:.2f}; per round median x{s['median']:.2f}, p25-p75 {s['p25']:.2f}-{s['p75']:.2f}, "
            f"min-max {s['min']:.2f}-{s['max']:.2f}, {s['rounds']} rounds"
        )
    for name, conv in report["conversion"].items():
        if conv:
            line = (
                f"{name} conversion: {conv['with_copy_s']:.3f} s with copy, {conv['inplace_s']:.3f} s in place "
                f"(median of {conv['rounds']})"
            )
            if "speedup_vs_authors" in conv:
                s = conv["speedup_vs_authors"]
                line += (
                    f"; the authors' (emulated) {conv['authors_s']:.3f} s: x{s['median']:.2f} per round "
                    f"(min-max {s['min']:.2f}-{s['max']:.2f})"
                )
            lines.append(line)
    for r in report["results"]:
        if r.get("profile_ms"):
            total = sum(r["profile_ms"].values())
            kinds = ", ".join(f"{kind} {ms:.1f} ({ms / total:.0%})" for kind, ms in r["profile_ms"].items())
            lines.append(f"{r['model']} [{r['form']}] batch {r['batch_size']}, ms per call by operator kind: {kinds}")
    start = machine["start"]
    lines.append(format_machine(machine))
    lines.append(
        f"{machine['device']}, torch {machine['torch']}, {start['threads']} threads, "
        f"OMP_WAIT_POLICY={start['omp_wait_policy']}, load average {start['loadavg']} at start, "
        + ", ".join(f"{s['loadavg']} after batch {bs}" for bs, s in machine["after"].items())
    )
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of images/s per candidate and runtime, one group of bars per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict) -> str:
        return f"{r['model']}\n[{r['form']}, {r['runtime']}]"

    labels = list(dict.fromkeys(label(r) for r in report["results"]))
    sizes = list(dict.fromkeys(r["batch_size"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 + 1.2 * len(labels), 4.5), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        rows = {label(r): r["images_per_s"] for r in report["results"] if r["batch_size"] == bs}
        ax.bar(range(len(labels)), [rows.get(name, 0) for name in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"batch {bs}")
        ax.set_ylabel("images / s")
    cfg, start = report["config"], report["machine"]["start"]
    fig.suptitle(
        f"{report['machine']['device']}, {cfg['dtype']}, threads {start['threads']}, "
        f"OMP_WAIT_POLICY={start['omp_wait_policy']}"
        + (f", channels_last inputs: {'/'.join(cfg['channels_last'])}" if cfg["channels_last"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
