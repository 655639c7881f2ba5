"""Inference benchmark: train form, deploy form, the authors' deploy form and baselines, side by side.

Protocol: every candidate is warmed up, then timed in interleaved rounds (one forward of each candidate per
round, the order rotated every round) so that load changes on a shared machine hit all candidates alike; a
dense square matmul is timed in the same rounds and gives the machine's FLOP/s under the same conditions.
Reported per candidate and batch size: median ms per batch, images/s, parameters and multiply-accumulates
(fvcore, :mod:`repmlp.flops`), achieved FLOP/s (2 x MACs / time) and its fraction of the matmul's, FC3 weight
bytes per block, peak memory and the max relative error against the train form.

The authors' deploy form is an **emulation**: our deploy-form weights run op for op the way the authors'
inference code runs them (:mod:`repmlp.authors`). Their code itself is not used.
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

from .authors import authors_form
from .convert import convert_to_deploy
from .flops import count_macs, count_params
from .models import load_model, model_input_size
from .verify import ErrorStats, randomize_bn_stats

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMS = ("train", "deploy", "authors")


def fc3_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the FC3 weight of every block (modules named ``fc3``), by module name."""
    return {
        name: m.weight.numel() * m.weight.element_size()
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] == "fc3" and isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        module(x)
        _sync(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    model_kwargs: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None
    batch_sizes: Sequence[int] = (1, 8)
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: Sequence[str] = ()  # forms whose inputs are channels_last ("train", "deploy", "authors", "baseline")
    compile: bool = False
    compile_mode: str | None = None
    threads: int | None = 2
    warmup: int = 2
    rounds: int = 10
    matmul_size: int | None = None
    macs: bool = True
    memory: bool = True
    convert_rounds: int = 3
    seed: int = 0


def build_candidates(cfg: BenchmarkConfig) -> tuple[list[Candidate], dict[str, dict]]:
    """Candidates in fp32 on CPU (checked against their train form) and per-model conversion timings."""
    cands, conversions = [], {}
    for name in cfg.models:
        torch.manual_seed(cfg.seed)
        train = randomize_bn_stats(load_model(name, **cfg.model_kwargs), cfg.seed).eval()
        size = tuple(cfg.input_size or model_input_size(train))
        conversions[name] = time_conversion(train, cfg.convert_rounds) if cfg.convert_rounds else {}
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
    for spec in cfg.baselines:
        torch.manual_seed(cfg.seed)
        module = load_model(spec).eval()
        cands.append(Candidate(spec, "baseline", module, tuple(cfg.input_size or model_input_size(module))))
    for c in cands:
        c.params = count_params(c.module)
        c.fc3_bytes = fc3_weight_bytes(c.module)
        if cfg.macs:
            c.macs = count_macs(c.module, c.input_size)
    return cands, conversions


def time_conversion(train: nn.Module, rounds: int) -> dict[str, float]:
    """Median seconds of :func:`convert_to_deploy` with its copy and in place (on a deep copy made untimed)."""
    with_copy, inplace = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        deploy = convert_to_deploy(train)
        with_copy.append(time.perf_counter() - start)
        del deploy
        victim = copy.deepcopy(train)
        start = time.perf_counter()
        convert_to_deploy(victim, inplace=True)
        inplace.append(time.perf_counter() - start)
        del victim
    return {"with_copy_s": statistics.median(with_copy), "inplace_s": statistics.median(inplace), "rounds": rounds}


def _prepare(c: Candidate, cfg: BenchmarkConfig, device: torch.device) -> nn.Module:
    # Weights keep their format (forms share them): a channels_last input alone makes oneDNN / cuDNN run every
    # conv in NHWC, and our RepMLP blocks partition NHWC maps with one copy each way.
    module = c.module.to(device=device, dtype=DTYPES[cfg.dtype])
    return torch.compile(module, mode=cfg.compile_mode) if cfg.compile else module


@torch.inference_mode()
def run_benchmark(cfg: BenchmarkConfig, log: Callable[[str], None] = print) -> dict:
    """Build, check and time every candidate; returns a JSON-serialisable report."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cands, conversions = build_candidates(cfg)
    modules = [_prepare(c, cfg, device) for c in cands]
    matmul_n = cfg.matmul_size or (1024 if device.type == "cpu" else 8192)
    matmul = matmul_time(device, dtype, matmul_n)
    formats = [torch.channels_last if c.form in cfg.channels_last else torch.contiguous_format for c in cands]
    results, machine = [], {"matmul_n": matmul_n, "matmul_gflops": {}}
    for bs in cfg.batch_sizes:
        inputs = [
            torch.randn(bs, *c.input_size, device=device).to(dtype).contiguous(memory_format=f)
            for c, f in zip(cands, formats)
        ]
        compile_s, compiled_err = [], []
        for c, m, x in zip(cands, modules, inputs):
            start = time.perf_counter()
            y = m(x)
            _sync(device)
            compile_s.append(time.perf_counter() - start)
            compiled_err.append(ErrorStats.of(c.module(x), y).max_rel_err if cfg.compile else None)
            for _ in range(cfg.warmup):
                m(x)
        times, mm = [[] for _ in cands], []
        order = list(range(len(cands))) + [-1]  # -1: the matmul
        for r in range(cfg.rounds):
            for i in order[r % len(order) :] + order[: r % len(order)]:
                call = matmul if i < 0 else (lambda m=modules[i], x=inputs[i]: m(x))
                _sync(device)
                start = time.perf_counter()
                call()
                _sync(device)
                (mm if i < 0 else times[i]).append(time.perf_counter() - start)
        peak_gflops = 2 * matmul_n**3 / statistics.median(mm) / 1e9
        machine["matmul_gflops"][bs] = peak_gflops
        for c, m, x, t, cs, ce in zip(cands, modules, inputs, times, compile_s, compiled_err):
            sec = statistics.median(t)
            gflops = None if c.macs is None else 2 * c.macs * bs / sec / 1e9
            weights = sum(p.numel() * p.element_size() for p in itertools.chain(m.parameters(), m.buffers()))
            results.append(
                dict(
                    model=c.model,
                    form=c.form,
                    batch_size=bs,
                    channels_last=c.form in cfg.channels_last,
                    ms=1e3 * sec,
                    ms_min=1e3 * min(t),
                    images_per_s=bs / sec,
                    params=c.params,
                    macs=c.macs,
                    gflops=gflops,
                    matmul_fraction=None if gflops is None else gflops / peak_gflops,
                    fc3_bytes=sum(c.fc3_bytes.values()),
                    fc3_bytes_per_block=c.fc3_bytes,
                    peak_bytes=weights + peak_forward_bytes(m, x) if cfg.memory else None,
                    max_rel_err=c.max_rel_err,
                    compiled_max_rel_err=ce,
                    first_call_s=cs,
                )
            )
        log(f"batch {bs}: {cfg.rounds} rounds done, dense {matmul_n}^3 matmul {peak_gflops:.1f} GFLOP/s")
    machine.update(torch=torch.__version__, device=_device_name(device), threads=torch.get_num_threads())
    return dict(
        config=_jsonable(asdict(cfg)),
        machine=machine,
        conversion=conversions,
        results=results,
        ratios=speed_ratios(results),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def speed_ratios(results: list[dict]) -> list[dict]:
    """Deploy-form speed-ups (ratio of images/s) over the train form, the authors' form and each baseline."""
    by = {(r["model"], r["form"], r["batch_size"]): r for r in results}
    baselines = sorted({r["model"] for r in results if r["form"] == "baseline"})
    out = []
    for (model, form, bs), r in by.items():
        if form != "deploy":
            continue
        refs = {"train": by.get((model, "train", bs)), "authors": by.get((model, "authors", bs))}
        refs.update({b: by.get((b, "baseline", bs)) for b in baselines})
        for ref_name, ref in refs.items():
            if ref is not None:
                out.append(
                    dict(model=model, batch_size=bs, versus=ref_name, speedup=r["images_per_s"] / ref["images_per_s"])
                )
    return out


def format_table(report: dict) -> str:
    """The results as a fixed-width table, then the speed-ups."""
    head = (
        f"{'model':30} {'form':8} {'fmt':4} {'batch':>5} {'ms':>8} {'img/s':>7} {'params':>8} {'GMACs':>6} "
        f"{'GFLOP/s':>7} {'%mm':>4} {'FC3 MB':>6} {'peak MB':>7} {'rel err':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:

        def fmt(value, spec, scale=1.0):
            return "-" if value is None else format(value * scale, spec)

        layout = "NHWC" if r["channels_last"] else "NCHW"
        lines.append(
            f"{r['model'][:30]:30} {r['form']:8} {layout:4} {r['batch_size']:>5} {r['ms']:>8.1f} "
            f"{r['images_per_s']:>7.1f} {r['params'] / 1e6:>7.2f}M {fmt(r['macs'], '>6.3f', 1e-9)} "
            f"{fmt(r['gflops'], '>7.1f')} {fmt(r['matmul_fraction'], '>4.0%')} {r['fc3_bytes'] / 2**20:>6.1f} "
            f"{fmt(r['peak_bytes'], '>7.0f', 2**-20)} {fmt(r['max_rel_err'], '>7.0e')}"
        )
    mm = report["machine"]["matmul_gflops"]
    lines.append(
        f"dense {report['machine']['matmul_n']}^3 matmul, same rounds: "
        + ", ".join(f"batch {bs}: {g:.1f} GFLOP/s" for bs, g in mm.items())
    )
    for r in report["ratios"]:
        lines.append(f"{r['model']} deploy vs {r['versus']} (batch {r['batch_size']}): x{r['speedup']:.2f}")
    for name, conv in report["conversion"].items():
        if conv:
            lines.append(
                f"{name} conversion: {conv['with_copy_s']:.3f} s with copy, "
                f"{conv['inplace_s']:.3f} s in place (median of {conv['rounds']})"
            )
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of images/s per candidate, one group of bars per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['model']}\n[{r['form']}]" for r in report["results"]))
    sizes = list(dict.fromkeys(r["batch_size"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 + 1.2 * len(labels), 4.5), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        rows = {f"{r['model']}\n[{r['form']}]": r["images_per_s"] for r in report["results"] if r["batch_size"] == bs}
        ax.bar(range(len(labels)), [rows.get(label, 0) for label in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"batch {bs}")
        ax.set_ylabel("images / s")
    cfg = report["config"]
    fig.suptitle(
        f"{report['machine']['device']}, {cfg['dtype']}, threads {report['machine']['threads']}"
        + (f", channels_last: {'/'.join(cfg['channels_last'])}" if cfg["channels_last"] else "")
        + (", compiled" if cfg["compile"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
