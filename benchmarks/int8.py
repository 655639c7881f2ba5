"""Int8 against float32 speed: every int8 form of :mod:`repmlp.quantize` timed in interleaved rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repmlp.convert import is_deploy_form
from repmlp.cpu import available_cores
from repmlp.export import export_onnx
from repmlp.onnx_io import onnx_predictor
from repmlp.quantize import (
    compare_outputs,
    compile_frozen,
    data_batches,
    export_graph,
    profile_onnx,
    quantize_pytorch,
)
from repmlp.shipped import shipped_weights
from repmlp.sources import ModelSource, model_source

from .speed_page import int8_speedups
from .timing import format_machine, machine_description, machine_state, timed_round

INT8_FORMS = (
    "pytorch fp32",
    "pytorch fp32 compiled",
    "pytorch int8 dynamic",
    "pytorch int8 static",
    "onnxruntime fp32",
    "onnxruntime int8 dynamic",
    "onnxruntime int8 static",
)
#: Not timed by default: float32 in onnxruntime as exported before the graph layout (FC3 as batched matmuls).
EAGER_LAYOUT_FORM = "onnxruntime fp32 eager layout"


@dataclass
class Int8BenchmarkConfig:
    """What :func:`run_int8_benchmark` times (see tools/benchmark.py --int8)."""

    models: Sequence[str] = ("repmlp_fmnist_mlp.fmnist", "repmlpnet_t224", "repmlp_res50_light_224")
    forms: Sequence[str] = INT8_FORMS
    batch_sizes: Sequence[int] = (1, 8)
    threads: int | None = None  # default: the cores available
    warmup: int = 2
    rounds: int = 10
    calibration_samples: int = 64
    seed: int = 0
    profile: bool = False  # also time each onnxruntime form's operator types (its profiler)


def deploy_model(name: str, seed: int = 0) -> ModelSource:
    """The deploy form of a zoo model by the tools' rule (:func:`repmlp.sources.model_source`): its registered
    weights where it has them (``name.tag`` with a shipped file), else seeded random weights."""
    source = model_source(name, pretrained=shipped_weights(name) is not None, form="deploy", seed=seed)
    if not is_deploy_form(source.model):
        raise ValueError(
            f"{name} keeps training-only modules after conversion (BatchNorms outside RepMLP blocks), so it "
            "has no deploy form to quantize; the int8 benchmark takes the zoo's models (timm.list_models('repmlp*'))"
        )
    return source


def _int8_candidates(
    model: nn.Module,
    forms: Sequence[str],
    x: torch.Tensor,
    calibration: list[torch.Tensor],
    data: str,
    workdir: Path,
    log,
) -> tuple[dict[str, object], dict[str, Path]]:
    """A ``tensor -> logits`` callable per form, all for inputs of ``x``'s shape, and the ONNX file of each
    onnxruntime form (written in ``workdir``)."""
    out: dict[str, object] = {}
    paths: dict[str, Path] = {}
    for form in forms:
        runtime, precision = form.split(" ", 1)
        if form == "pytorch fp32":
            out[form] = model
        elif form == "pytorch fp32 compiled":  # the float32 twin of the int8 graphs: exported, compiled, frozen
            out[form] = compile_frozen(export_graph(model, x), x)
        elif runtime == "pytorch":
            out[form] = quantize_pytorch(model, x, precision.split()[-1], calibration)
        else:
            mode = "none" if precision.startswith("fp32") else precision.split()[-1]
            eager = form == EAGER_LAYOUT_FORM
            path = workdir / f"{mode}{'_eager' * eager}_{x.shape[0]}.onnx"
            report = export_onnx(
                model,
                path,
                batch_size=x.shape[0],
                quantize=mode,
                calibration=calibration,
                check_batches=calibration,
                check_data=data,
                min_agreement=0.0,
                eager_layout=eager,
            )
            log(f"  {form}: {report}")
            out[form], paths[form] = onnx_predictor(path), path
    return out, paths


@torch.no_grad()
def run_int8_benchmark(cfg: Int8BenchmarkConfig, workdir: str | Path, log=print) -> dict:
    """Median ms per batch of every form in ``cfg.forms``, timed in interleaved rounds (order rotated each round),
    with each form's max relative logit error and argmax agreement against the PyTorch float32 deploy form."""
    torch.set_num_threads(cfg.threads or available_cores())  # onnxruntime's sessions take the same count
    machine = {**machine_description(), "start": machine_state()}
    results = []
    models = {name: deploy_model(name, cfg.seed) for name in cfg.models}  # every model refused or built first
    for name, source in models.items():
        model, data = source.model.eval(), source.dataset or "random"
        log(f"{name}: {source.weights}; calibration and check data: {data}")
        for bs in cfg.batch_sizes:
            calibration = data_batches(data, model, bs, max(cfg.calibration_samples, bs), seed=cfg.seed)
            x = calibration[0]
            forms, paths = _int8_candidates(model, cfg.forms, x, calibration, data, Path(workdir), log)
            checks = {form: compare_outputs(model, f, calibration, data) for form, f in forms.items()}
            for f in forms.values():
                for _ in range(cfg.warmup):
                    f(x)
            calls, times = [lambda f=f, x=x: f(x) for f in forms.values()], {form: [] for form in forms}
            for r in range(cfg.rounds):
                for form, (elapsed, _) in zip(forms, timed_round(calls, r)):
                    times[form].append(elapsed)
            for form in forms:
                ms = 1e3 * statistics.median(times[form])
                results.append(
                    dict(
                        model=name,
                        form=form,
                        batch_size=bs,
                        ms=ms,
                        images_per_s=1e3 * bs / ms,
                        max_rel_err=checks[form].max_rel_err,
                        argmax_agreement=checks[form].argmax_agreement,
                        checked_on=checks[form].count,
                    )
                )
                if cfg.profile and form in paths:
                    results[-1]["profile_ms"] = profile_onnx(paths[form], x, cfg.rounds, cfg.threads)
            log(
                f"{name} batch {bs}: "
                + ", ".join(f"{form} {1e3 * statistics.median(t):.2f} ms" for form, t in times.items())
            )
    machine["end"] = machine_state()
    return dict(config=cfg.__dict__, machine=machine, torch=torch.__version__, results=results)


def format_int8_table(report: dict) -> str:
    """The results with speed-ups over onnxruntime float32 and PyTorch (eager) float32 of the same model and batch."""
    rows = report["results"]
    head = (
        f"{'model':26} {'batch':>5} {'form':26} {'ms':>9} {'img/s':>8} {'vs ort fp32':>11} {'vs pt fp32':>10} "
        f"{'max rel err':>11} {'argmax agr':>10}"
    )
    lines = [head, "-" * len(head)]
    for r, ratios in zip(rows, int8_speedups(rows)):
        speedups = ["-" if s is None else f"x{s:.2f}" for s in ratios]
        lines.append(
            f"{r['model'][:26]:26} {r['batch_size']:>5} {r['form']:26} {r['ms']:>9.2f} {r['images_per_s']:>8.1f} "
            f"{speedups[0]:>11} {speedups[1]:>10} {r['max_rel_err']:>11.1e} {r['argmax_agreement']:>10.2%}"
        )
    start, end = report["machine"]["start"], report["machine"]["end"]
    lines.append(format_machine(report["machine"]))
    lines.append(
        f"{start['threads']} threads, OMP_WAIT_POLICY={start['omp_wait_policy']}, load average "
        f"{start['loadavg']} at the start, {end['loadavg']} at the end"
    )
    for r in rows:
        if "profile_ms" in r:
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(r["profile_ms"].items())[:10])
            lines.append(f"{r['model']} batch {r['batch_size']} {r['form']}, ms per run by operator: {top}")
    return "\n".join(lines)
