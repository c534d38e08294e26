"""`fused_window_kl`: the autograd Function around a row backend and the window step.

Forward:  row statistics (4, N) from the row backend -> window step -> c_t d_t -> reduction.
Backward: the weights carry no gradient, so d loss / d z = sum_t coef_t dd_t/dz with
          coef_t = c_t * (upstream gradient of loss_t) and loss_t = c_t d_t / denominator;
          the row backend recomputes the probabilities from the saved log-sum-exps and writes
          coef_t dd_t/dz straight into one preallocated gradient of the logits' dtype.
Saved for backward: the inputs (references, no copies), the (4, N) statistics and c: O(N) floats.
"""
from __future__ import annotations

import dataclasses

import torch

from .api import WindowKLStats, check_config, flatten_inputs
from .backends import RowBackend, resolve
from .window import window_step


def _denominator(cfg, mask: torch.Tensor, num_seqs: int):
    """What the summed loss is divided by, or None (for "sum" and "none")."""
    if cfg.reduction in ("sum", "none"):
        return None
    if cfg.num_items is not None:
        return float(cfg.num_items)
    if cfg.reduction == "batchmean":
        return float(num_seqs)
    return mask.sum().clamp(min=1).to(torch.float32)


class _WindowKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, seq_id, num_seqs, cfg, rows: RowBackend):
        stats = rows.row_forward(student, teacher, cfg.vocab_size, cfg.temperature, cfg.divergence, cfg.beta)
        step = window_step(stats[2], mask, seq_id, cfg)
        loss = step.weight * step.kl
        denominator = _denominator(cfg, mask, num_seqs)
        if cfg.reduction != "none":
            loss = loss.sum()
            if denominator is not None:
                loss = loss / denominator
        ctx.save_for_backward(student, teacher, stats, step.weight)
        ctx.cfg, ctx.rows, ctx.denominator = cfg, rows, denominator
        ctx.mark_non_differentiable(*step)
        return (loss, *step)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        student, teacher, stats, weight = ctx.saved_tensors
        cfg = ctx.cfg
        coef = weight * grad_loss.to(torch.float32)
        if ctx.denominator is not None:
            coef = coef / ctx.denominator
        grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grad_teacher = None
        if ctx.needs_input_grad[1]:
            grad_teacher = torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device)
        ctx.rows.row_backward(student, teacher, stats, coef.contiguous(), cfg.vocab_size, cfg.temperature,
                              cfg.divergence, cfg.beta, grad_student, grad_teacher)
        return grad_student, grad_teacher, None, None, None, None, None


def fused_window_kl(
    student_logits, teacher_logits, *, mask=None, cu_seqlens=None,
    divergence="reverse_kl", beta=0.5, temperature=1.0, window=8, gamma=0.9,
    loss_threshold=None, div_threshold=None, suppress_weight=0.0, guidance_weight=0.0,
    reduction="mean", num_items=None, vocab_size=None, return_stats=False, backend="auto",
):
    """The trajectory-aware on-policy distillation loss (semantics: docs/SPEC.md, `reference.py`).

    Args:
        student_logits: (B, T, Vs) or packed (N, Vs); float32, bfloat16 or float16.
        teacher_logits: (B, T, Vt) or (N, Vt); may differ in dtype; gets a gradient if it requires one.
        mask: bool (B, T) or (N,); None = all valid.
        cu_seqlens: int (S + 1,) sequence boundaries [0, ..., N], packed layout only.
        divergence: "reverse_kl" | "forward_kl" | "jsd" (with beta in (0, 1)).
        temperature, window (k >= 1), gamma (in [0, 1]): see SPEC.
        loss_threshold, div_threshold: None, a float (nats) or Quantile(q).
        suppress_weight (rho in [0, 1]), guidance_weight (lambda >= 0).
        reduction: "mean" | "sum" | "batchmean" | "none"; num_items divides "mean" / "batchmean".
        vocab_size: use only the first vocab_size logits of each row (both models).
        return_stats: also return a WindowKLStats.
        backend: "auto" | "torch" | "triton" | "triton+cuda" (see backends.py).

    Returns:
        float32 loss: a scalar, or (B, T) / (N,) for reduction="none"; with return_stats=True,
        (loss, WindowKLStats) with every statistic in the layout of the mask.
    """
    cfg = check_config(
        divergence=divergence, beta=beta, temperature=temperature, window=window, gamma=gamma,
        loss_threshold=loss_threshold, div_threshold=div_threshold, suppress_weight=suppress_weight,
        guidance_weight=guidance_weight, reduction=reduction, num_items=num_items, vocab_size=vocab_size,
    )
    flat = flatten_inputs(student_logits, teacher_logits, mask, cu_seqlens, cfg)
    rows = resolve(backend, flat.student.device)
    cfg = dataclasses.replace(cfg, vocab_size=flat.vocab_size)
    student, teacher = (x if x.stride(-1) == 1 else x.contiguous() for x in (flat.student, flat.teacher))
    loss, *step = _WindowKLFunction.apply(student, teacher, flat.mask, flat.seq_id, flat.num_seqs, cfg, rows)
    if cfg.reduction == "none":
        loss = loss.reshape(flat.shape)
    if not return_stats:
        return loss
    return loss, WindowKLStats(*(s.reshape(flat.shape) for s in step))
