"""Prove a deploy form computes the same function as its train form."""

from __future__ import annotations

__all__ = [
    "TOLERANCES",
    "Agreement",
    "EquivalenceReport",
    "ErrorStats",
    "compare_predictors",
    "randomize_bn_stats",
    "verify_conversion",
    "verify_equivalence",
]

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import convert_to_deploy, reparameterizable
from .models import model_input_size
from .ops import is_batch_norm

#: Max relative error (max |y_ref - y| / max |y_ref|) accepted per dtype of the compared run.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}
#: The dtypes a deploy form is run or written in, by the name the tools take (``--dtype``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _first_nonfinite(t: torch.Tensor, offset: int = 0) -> tuple[int, tuple[int, ...] | None]:
    """The number of non-finite elements of ``t`` and the index of the first one (its batch index moved by
    ``offset``), or (0, None)."""
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if not count:
        return 0, None
    index = [int(i) for i in torch.nonzero(bad)[0]]
    if index:
        index[0] += offset
    return count, tuple(index)


@dataclass
class ErrorStats:
    """Per-element error of ``candidate`` against ``reference``.

    A NaN or infinity in either output makes every error NaN, and NaN is never within a tolerance (compare with
    :meth:`within`, or as ``not err <= tol``: ``max(0.0, nan)`` is 0.0, ``nan > tol`` is False). Where the
    non-finite values are is kept: their counts and the index of the first one in each output.
    """

    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    nonfinite: dict[str, int] = field(default_factory=dict, kw_only=True)  # 'reference'/'candidate' -> count
    first_nonfinite: dict[str, tuple[int, ...]] = field(default_factory=dict, kw_only=True)

    @classmethod
    def of(cls, reference: torch.Tensor, candidate: torch.Tensor) -> ErrorStats:
        ref, cand = reference.double(), candidate.double()
        diff = (ref - cand).abs()
        scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        stats = cls(diff.max().item(), (diff.max() / scale).item(), diff.mean().item())
        stats.note_nonfinite(ref, cand)
        return stats

    def note_nonfinite(self, reference: torch.Tensor, candidate: torch.Tensor, offset: int = 0) -> None:
        """Count the non-finite elements of both outputs (batch indices moved by ``offset``); any makes the errors
        NaN."""
        for role, t in (("reference", reference), ("candidate", candidate)):
            count, index = _first_nonfinite(t, offset)
            if count:
                self.nonfinite[role] = self.nonfinite.get(role, 0) + count
                self.first_nonfinite.setdefault(role, index)
        if self.nonfinite:
            self.max_abs_err = self.max_rel_err = self.mean_abs_err = float("nan")

    @property
    def finite(self) -> bool:
        """Both outputs finite everywhere and so the errors too."""
        return not self.nonfinite and all(map(math.isfinite, (self.max_abs_err, self.max_rel_err, self.mean_abs_err)))

    def within(self, tolerance: float) -> bool:
        """Finite, and the max relative error at most ``tolerance``."""
        return self.finite and self.max_rel_err <= tolerance

    def describe_nonfinite(self) -> str:
        """Where the non-finite values are, e.g. 'candidate: 108 non-finite values, the first at [0, 3]'."""
        return "; ".join(
            f"{role}: {count} non-finite value{'s' * (count > 1)}, the first at {list(self.first_nonfinite[role])}"
            for role, count in self.nonfinite.items()
        )


@dataclass
class Agreement(ErrorStats):
    """Two predictors over a dataset: the per-element errors of all their outputs at once (max abs, max abs over the
    largest reference magnitude, mean abs: :meth:`ErrorStats.of` of the concatenated outputs), the share of inputs
    whose argmax agrees (None for outputs that are not (N, classes) logits), and each one's top-1 where labels
    were given."""

    argmax_agreement: float | None
    count: int
    reference_top1: float | None = None
    candidate_top1: float | None = None


@torch.no_grad()
def compare_predictors(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
) -> Agreement:
    """Run two predictors (tensor -> tensor: models, onnxruntime sessions, int8 modules) on the same batches and
    compare per element; batches are input tensors or (inputs, labels) pairs (then top-1s are counted too)."""
    max_abs = scale = abs_sum = 0.0
    elements = seen = agree = ref_correct = cand_correct = 0
    logits = labelled = True
    nonfinite = ErrorStats(0.0, 0.0, 0.0)  # where the outputs are not finite (then every error is NaN)
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        ref, cand = reference(x).double(), candidate(x).double()
        nonfinite.note_nonfinite(ref, cand, seen)
        diff = (ref - cand).abs()
        max_abs, scale = max(max_abs, diff.max().item()), max(scale, ref.abs().max().item())  # NaN: see nonfinite
        abs_sum, elements, seen = abs_sum + diff.sum().item(), elements + diff.numel(), seen + ref.shape[0]
        logits, labelled = logits and ref.dim() == 2, labelled and y is not None
        if logits:
            agree += (ref.argmax(1) == cand.argmax(1)).sum().item()
        if logits and labelled:
            y = y.to(ref.device)
            ref_correct += (ref.argmax(1) == y).sum().item()
            cand_correct += (cand.argmax(1) == y).sum().item()
    if not seen:
        raise ValueError("compare_predictors: no batches to compare")
    top1 = labelled and logits
    nan = float("nan")
    return Agreement(
        nan if nonfinite.nonfinite else max_abs,
        nan if nonfinite.nonfinite else max_abs / max(scale, torch.finfo(torch.float64).tiny),
        nan if nonfinite.nonfinite else abs_sum / max(elements, 1),
        agree / seen if logits else None,
        seen,
        100 * ref_correct / seen if top1 else None,
        100 * cand_correct / seen if top1 else None,
        nonfinite=nonfinite.nonfinite,
        first_nonfinite=nonfinite.first_nonfinite,
    )


@dataclass
class EquivalenceReport(ErrorStats):
    """Outcome of :func:`verify_equivalence`."""

    argmax_agreement: float | None
    tolerance: float
    dtype: str
    passed: bool
    per_block: dict[str, ErrorStats] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} ({self.dtype}): max abs err {self.max_abs_err:.3e}, "
            f"max rel err {self.max_rel_err:.3e} (tolerance {self.tolerance:.0e}), "
            f"mean abs err {self.mean_abs_err:.3e}"
            + ("" if self.argmax_agreement is None else f", argmax agreement {self.argmax_agreement:.4%}")
        ]
        if self.nonfinite:
            lines.append(f"  non-finite outputs (never within a tolerance): {self.describe_nonfinite()}")
            block = self.first_nonfinite_block()
            if block is not None:
                lines.append(
                    f"  first block with a non-finite output: {block} ({self.per_block[block].describe_nonfinite()})"
                )
        lines += [
            f"  {name}: max abs {s.max_abs_err:.3e}, max rel {s.max_rel_err:.3e}" for name, s in self.per_block.items()
        ]
        return "\n".join(lines)

    def first_nonfinite_block(self) -> str | None:
        """The first compared block (in the model's order) with a non-finite output, where blocks were compared."""
        return next((name for name, s in self.per_block.items() if s.nonfinite), None)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _default_input_size(model: nn.Module) -> tuple[int, ...]:
    if getattr(model, "img_size", None) is None and "input_size" not in (getattr(model, "pretrained_cfg", None) or {}):
        raise ValueError(
            "verify_equivalence: pass `inputs` or `input_size`; the model has no img_size or "
            "pretrained_cfg['input_size'] to take it from"
        )
    return model_input_size(model)


def _outermost(names: list[str]) -> list[str]:
    """Drop names nested inside another listed module (a block's own parts)."""
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def _record_outputs(model: nn.Module, names: list[str], store: dict) -> list:
    modules = dict(model.named_modules())

    def hook(name):
        return lambda _m, _i, out: store.__setitem__(name, out.detach())

    return [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]


@torch.no_grad()
def verify_equivalence(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: torch.Tensor | None = None,
    input_size: tuple[int, ...] | None = None,
    batch_size: int = 2,
    dtype: torch.dtype | None = None,
    per_block: bool = False,
    tolerance: float | None = None,
    seed: int = 0,
) -> EquivalenceReport:
    """Run ``reference`` and ``candidate`` in eval mode on the same inputs and compare per element.

    Args:
        reference: usually the train form.
        candidate: usually the deploy form.
        inputs: inputs to use; default: seeded standard normal of ``(batch_size, *input_size)``.
        input_size: (C, H, W) for random inputs; default: ``reference.pretrained_cfg['input_size']``.
        batch_size: batch of random inputs.
        dtype: run both models on copies in this dtype; default: as they are. Running a float32 pair in float64
            still compares float32 weights, so the tolerance stays float32's; to measure the conversion's own
            error, convert in float64 with :func:`verify_conversion`.
        per_block: also compare the outputs of every outermost re-parameterizable block (RepMLP block,
            conv-BN, ...) the two models share by name.
        tolerance: max relative error allowed; default: ``TOLERANCES`` of the least precise of the run's dtype
            and the two models' parameter dtypes.
        seed: seed of the random inputs.

    Returns:
        The report; ``passed`` when both outputs are finite and the max relative error is within tolerance
        (a NaN or infinity anywhere is a FAIL that says where, and with ``per_block`` the first block it came from).
        Models stored in different dtypes (a bfloat16 deploy form against its float32 train form) each run on the
        inputs cast to their own dtype.
    """
    stored = [next(m.parameters()).dtype for m in (reference, candidate)]
    if dtype is not None:
        reference, candidate = copy.deepcopy(reference).to(dtype), copy.deepcopy(candidate).to(dtype)
    param = next(reference.parameters())
    run_dtype, device = dtype or param.dtype, param.device
    if inputs is None:
        size = tuple(input_size or _default_input_size(reference))
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.randn((batch_size, *size), generator=gen, dtype=torch.float64)
    inputs = inputs.to(device=device, dtype=run_dtype)
    ref_dtype, cand_dtype = (next(m.parameters()).dtype for m in (reference, candidate))  # each in its own dtype
    names = _outermost([n for n, _ in reparameterizable(reference) if n]) if per_block else []
    ref_blocks, cand_blocks = {}, {}
    hooks = _record_outputs(reference, names, ref_blocks) + _record_outputs(candidate, names, cand_blocks)
    modes = reference.training, candidate.training
    try:
        reference.eval(), candidate.eval()
        with _no_tf32():
            stats = compare_predictors(
                lambda x: reference(x.to(ref_dtype)), lambda x: candidate(x.to(cand_dtype)), [inputs]
            )
    finally:
        for h in hooks:
            h.remove()
        reference.train(modes[0]), candidate.train(modes[1])
    tol = max(TOLERANCES.get(d, 1e-5) for d in (run_dtype, *stored)) if tolerance is None else tolerance
    blocks = {n: ErrorStats.of(ref_blocks[n], cand_blocks[n]) for n in names if n in ref_blocks and n in cand_blocks}
    return EquivalenceReport(
        stats.max_abs_err,
        stats.max_rel_err,
        stats.mean_abs_err,
        stats.argmax_agreement,
        tol,
        " against ".join(dict.fromkeys(str(d).replace("torch.", "") for d in (cand_dtype, ref_dtype))),
        stats.within(tol),
        blocks,
        nonfinite=stats.nonfinite,
        first_nonfinite=stats.first_nonfinite,
    )


@torch.no_grad()
def verify_conversion(train: nn.Module, dtype: torch.dtype = torch.float64, **kwargs) -> EquivalenceReport:
    """Convert a copy of ``train`` made in ``dtype`` and compare the two in ``dtype``.

    In float64 this measures the conversion's algebra alone (tolerance 1e-10), free of the float32 rounding of
    stored weights. ``train`` itself is never cast or converted.

    Args:
        train: the train-form model.
        dtype: dtype of the copy, the conversion and the comparison.
        **kwargs: passed to :func:`verify_equivalence` (``inputs``, ``input_size``, ``batch_size``, ...).
    """
    twin = copy.deepcopy(train).to(dtype)
    return verify_equivalence(twin, convert_to_deploy(twin), **kwargs)


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (frozen ones included) random affine parameters and running statistics (in place).

    Freshly initialised BNs are identities (mean 0, var 1, gamma 1, beta 0), which would hide errors in
    BN folding; tests and the convert tool's embedded default use this instead.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if is_batch_norm(m):
            targets = [(m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0)]
            if m.weight is not None:
                targets += [(m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3)]
            for t, lo, hi in targets:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    return model
