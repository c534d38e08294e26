"""`fused_window_kl` and `WindowKLLoss`: the autograd Function around a backend's row ops and the window step.

Forward:  row ops' statistics (rows.contract.Stat) -> window step -> c_t d_t -> reduction; the statistics
          returned are the window step's and the student's entropy (a row statistic).
Backward: the weights carry no gradient, so d loss / d z = sum_t coef_t dd_t/dz with
          coef_t = c_t * (upstream gradient of loss_t) / denominator; the row ops recompute the
          probabilities from the saved maxima and log-sums and write coef_t dd_t/dz into the gradient
          (for a view such as `logits[:, :-1]`, into the rows of its base's gradient: `_autograd_source`).
Saved for backward: the inputs (references, no copies), the statistics and c: O(N) floats.
With `vocab_parallel_group` the row ops run on this rank's columns and the group combines their statistics
(rows/vocab_parallel.py): the rest is the same on every rank.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import LossConfig, WindowKLStats, config_signature, split_config, value_check
from .layout import flatten_inputs
from .rows import vocab_parallel
from .forms import TopK
from .rows.contract import Stat, make_row_call, make_topk_call, rows_disjoint
from .rows.registry import resolve
from .window import window_step


def _denominator(cfg: LossConfig, mask: torch.Tensor, num_seqs: int):
    """What the summed loss is divided by: None (for "sum" and "none"), a number, or a 0-d float32 tensor on the
    mask's device (the valid count, or a num_items tensor, checked there to be > 0 without a host synchronisation)."""
    if cfg.reduction in ("sum", "none"):
        return None
    if isinstance(cfg.num_items, torch.Tensor):
        num_items = cfg.num_items.to(device=mask.device, dtype=torch.float32)
        value_check(num_items > 0, "num_items: must be > 0")
        return num_items
    if cfg.num_items is not None:
        return float(cfg.num_items)
    if cfg.reduction == "batchmean":
        return float(num_seqs)
    return mask.sum().clamp(min=1).to(torch.float32)


Geometry = Optional[tuple]  # (size, stride, storage offset) of (B, T, V) rows inside a tensor; None: the tensor


def _autograd_source(rows: torch.Tensor) -> tuple:
    """(the tensor handed to the Function for these rows, the rows' geometry inside it).

    A view such as `logits[:, :-1]` whose base needs a gradient is handed over as its base: the backward then
    writes the view's rows straight into the base's gradient (zeros elsewhere), where autograd's slice
    backward would scatter a second N x V gradient into it. Not while compiling (the compiler handles views
    itself), nor for views with overlapping rows (an expanded teacher) or of another dtype.
    """
    base = rows._base if not torch.compiler.is_compiling() else None
    if (base is None or not rows.requires_grad or not base.requires_grad or not base.is_contiguous()
            or base.dtype != rows.dtype or not rows_disjoint(rows)):
        return rows, None
    return base, (tuple(rows.shape), rows.stride(), rows.storage_offset() - base.storage_offset())


def _rows_of(tensor: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The (B, T, V) rows inside `tensor` (a Function input, or a tensor laid out as one)."""
    if geometry is None:
        return tensor
    size, stride, offset = geometry
    return tensor.as_strided(size, stride, tensor.storage_offset() + offset)


def _gradient(source: torch.Tensor, geometry: Geometry) -> tuple:
    """(the gradient of `source`, its rows), for the row backward to write into."""
    grad = torch.empty(source.shape, dtype=source.dtype, device=source.device)
    rows = _rows_of(grad, geometry)
    if rows.numel() != grad.numel():  # the rows cover part of the base: the rest gets no gradient
        grad.zero_()
    return grad, rows


class _WindowKLFunction(torch.autograd.Function):
    """teacher: the logits (or their autograd source), or a TopK's logprobs with its ids in teacher_extra; the
    row ops (RowOps / TopKOps) take the teacher's tensors in that order."""

    @staticmethod
    def forward(ctx, student, teacher, geometries, mask, seq_id, denominator, cfg: LossConfig, call, ops,
                *teacher_extra):
        student_rows, teacher_rows = _rows_of(student, geometries[0]), _rows_of(teacher, geometries[1])
        stats = ops.forward(student_rows, teacher_rows, *teacher_extra, mask, call)
        step = window_step(stats[Stat.KL], mask, seq_id, cfg)
        loss = step.weight * step.kl
        if cfg.reduction != "none":
            loss = loss.sum()
            if denominator is not None:
                loss = loss / denominator
        ctx.save_for_backward(student, teacher, stats, step.weight, *teacher_extra)
        ctx.geometries, ctx.call, ctx.ops, ctx.denominator = geometries, call, ops, denominator
        entropy = stats[Stat.ENTROPY_S]
        ctx.mark_non_differentiable(*step, entropy)
        return (loss, *step, entropy)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        student, teacher, stats, weight, *teacher_extra = ctx.saved_tensors
        geometry_s, geometry_t = ctx.geometries
        coef = weight * grad_loss.to(torch.float32)
        if ctx.denominator is not None:
            coef = coef / ctx.denominator
        grad_student, student_grad_rows = _gradient(student, geometry_s)
        grad_teacher, teacher_grad_rows = _gradient(teacher, geometry_t) if ctx.needs_input_grad[1] else (None, None)
        ctx.ops.backward_into(_rows_of(student, geometry_s), _rows_of(teacher, geometry_t), *teacher_extra, stats,
                              coef.contiguous(), ctx.call, student_grad_rows, teacher_grad_rows)
        return (grad_student, grad_teacher, *[None] * (7 + len(teacher_extra)))


@config_signature
def fused_window_kl(student_logits, teacher_logits, *, mask=None, labels=None, ignore_index=-100, cu_seqlens=None,
                    return_stats=False, backend="auto", vocab_parallel_group=None, **config):
    """The trajectory-aware on-policy distillation loss (semantics: docs/SPEC.md, `reference.py`).

    Args:
        student_logits: (B, T, Vs) or packed (N, Vs); float32, bfloat16 or float16. Any strides on the
            leading dims (a slice such as `logits[:, :-1]` is read in place, never copied).
        teacher_logits: (B, T, Vt) or (N, Vt); may differ in dtype; gets a gradient if it requires one.
            Or a `topd_kernels.TopK` (token ids and log-probabilities, (B, T, k) or (N, k)): a teacher
            given by its top-k log-probabilities (SPEC "Top-k teacher").
        mask: bool or integer 0/1 (B, T) or (N,) (nonzero = valid); None = all valid. Invalid rows are not read.
        labels: instead of mask, the token ids (B, T) or (N,) as a causal LM sees them, with ignore_index: the
            logits at position t predict labels[t + 1], so t counts when labels[t + 1] != ignore_index within
            its sequence; each sequence's last position never counts. Pass the unshifted logits.
        cu_seqlens: int (S + 1,) sequence boundaries [0, ..., N] (a tensor, list or tuple), packed layout only:
            (N, V) or (1, N, V) logits (`cu_seqlens_from_position_ids` makes it from HF position_ids).
        return_stats: also return a WindowKLStats.
        backend: "auto" | "torch" | "triton" | "triton+cuda" (`topd_kernels.rows.registry`).
        vocab_parallel_group: None, or a torch.distributed process group of P ranks across which the
            vocabulary is split (SPEC "Vocabulary-parallel"): rank r holds columns [r V_r, (r + 1) V_r) of
            both logits, the same V_r on every rank (vocab_size counts global columns). Every rank gets the
            loss and statistics of the whole vocabulary and the gradient of its own columns.
        **config: the loss's knobs, `topd_kernels.LossConfig` (divergence, beta, temperature, window,
            gamma, loss_threshold, div_threshold, suppress_weight, guidance_weight, reduction,
            num_items, vocab_size).

    Returns:
        float32 loss: a scalar, or (B, T) / (N,) for reduction="none"; with return_stats=True,
        (loss, WindowKLStats) with every statistic in the layout of the mask.

    Example::

        >>> import torch, topd_kernels
        >>> student = torch.randn(2, 16, 1000, requires_grad=True)
        >>> teacher = torch.randn(2, 16, 1000)
        >>> loss = topd_kernels.fused_window_kl(student, teacher, window=4, guidance_weight=0.5)
        >>> loss.backward()
    """
    cfg, unknown = split_config(config)
    if unknown:
        raise TypeError(f"fused_window_kl: unexpected keyword argument(s) {sorted(unknown)}")
    rows = flatten_inputs(student_logits, teacher_logits, mask, cu_seqlens, cfg,
                          vocab_shards=vocab_parallel.group_size(vocab_parallel_group), labels=labels,
                          ignore_index=ignore_index)
    (student, geometry_s) = _autograd_source(rows.student)
    if isinstance(rows.teacher, TopK):
        topk = rows.teacher
        ops = resolve(backend, rows.student.device, form="topk")
        call = make_topk_call(rows.student, topk.logprobs, topk.token_ids, rows.vocab_size, cfg.temperature,
                              cfg.divergence_code, cfg.beta, topk.tail_code)
        teacher, geometry_t, teacher_extra = topk.logprobs, None, (topk.token_ids,)
    else:
        ops, vocab = resolve(backend, rows.student.device), rows.vocab_size
        if vocab_parallel_group is not None:
            ops, vocab = vocab_parallel.on_shard(ops, vocab_parallel_group, rows.student, rows.teacher, vocab)
        call = make_row_call(rows.student, rows.teacher, vocab, cfg.temperature, cfg.divergence_code, cfg.beta)
        (teacher, geometry_t), teacher_extra = _autograd_source(rows.teacher), ()
    # The Function gets the denominator itself and the knobs without num_items (which may be a tensor).
    denominator = _denominator(cfg, rows.mask, rows.num_seqs)
    cfg = dataclasses.replace(cfg, num_items=None)
    loss, *step = _WindowKLFunction.apply(student, teacher, (geometry_s, geometry_t), rows.mask, rows.seq_id,
                                          denominator, cfg, call, ops, *teacher_extra)
    if cfg.reduction == "none":
        loss = loss.reshape(rows.shape)
    if not return_stats:
        return loss
    return loss, WindowKLStats(*(s.reshape(rows.shape) for s in step))


class WindowKLLoss(torch.nn.Module):
    """nn.Module form of `fused_window_kl`, holding its knobs (validated once, at construction).

    forward(student_logits (B, T, Vs) | (N, Vs), teacher_logits, mask=None, cu_seqlens=None, labels=None,
    num_items=None) returns what `fused_window_kl` returns with this configuration (num_items given per call
    overrides the configured one: the count of a gradient-accumulation step).
    """

    def __init__(self, *, return_stats: bool = False, backend: str = "auto", vocab_parallel_group=None, **config):
        super().__init__()
        cfg, unknown = split_config(config)
        if unknown:
            raise TypeError(f"WindowKLLoss: unexpected keyword argument(s) {sorted(unknown)}")
        self.config = dict(config, return_stats=return_stats, backend=backend,
                           vocab_parallel_group=vocab_parallel_group)

    def forward(self, student_logits, teacher_logits, mask=None, cu_seqlens=None, labels=None, num_items=None):
        config = self.config if num_items is None else dict(self.config, num_items=num_items)
        return fused_window_kl(student_logits, teacher_logits, mask=mask, cu_seqlens=cu_seqlens, labels=labels,
                               **config)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
