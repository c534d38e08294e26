"""`fused_window_kl` and `WindowKLLoss`: the autograd Function around a backend's row ops and the window step.

Forward:  row ops' statistics (rows.contract.Stat) -> window step -> c_t d_t -> reduction.
Backward: the weights carry no gradient, so d loss / d z = sum_t coef_t dd_t/dz with
          coef_t = c_t * (upstream gradient of loss_t) / denominator; the row ops recompute the
          probabilities from the saved maxima and log-sums and return coef_t dd_t/dz.
Saved for backward: the inputs (references, no copies), the statistics and c: O(N) floats.
"""
from __future__ import annotations

import torch

from .config import LossConfig, WindowKLStats, config_signature, split_config
from .layout import flatten_inputs
from .rows.contract import RowCall, RowOps, Stat, make_row_call
from .rows.registry import resolve
from .window import window_step


def _denominator(cfg: LossConfig, mask: torch.Tensor, num_seqs: int):
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
    def forward(ctx, student, teacher, mask, seq_id, num_seqs, cfg: LossConfig, call: RowCall, ops: RowOps):
        stats = ops.forward(student, teacher, mask, call)
        step = window_step(stats[Stat.KL], mask, seq_id, cfg)
        loss = step.weight * step.kl
        denominator = _denominator(cfg, mask, num_seqs)
        if cfg.reduction != "none":
            loss = loss.sum()
            if denominator is not None:
                loss = loss / denominator
        ctx.save_for_backward(student, teacher, stats, step.weight)
        ctx.call, ctx.ops, ctx.denominator = call, ops, denominator
        ctx.mark_non_differentiable(*step)
        return (loss, *step)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        student, teacher, stats, weight = ctx.saved_tensors
        coef = weight * grad_loss.to(torch.float32)
        if ctx.denominator is not None:
            coef = coef / ctx.denominator
        grad_student, grad_teacher = ctx.ops.backward(student, teacher, stats, coef.contiguous(), ctx.call,
                                                      ctx.needs_input_grad[1])
        return grad_student, grad_teacher, None, None, None, None, None, None


@config_signature
def fused_window_kl(student_logits, teacher_logits, *, mask=None, cu_seqlens=None, return_stats=False,
                    backend="auto", **config):
    """The trajectory-aware on-policy distillation loss (semantics: docs/SPEC.md, `reference.py`).

    Args:
        student_logits: (B, T, Vs) or packed (N, Vs); float32, bfloat16 or float16. Any strides on the
            leading dims (a slice such as `logits[:, :-1]` is read in place, never copied).
        teacher_logits: (B, T, Vt) or (N, Vt); may differ in dtype; gets a gradient if it requires one.
        mask: bool (B, T) or (N,); None = all valid. Invalid rows are not read.
        cu_seqlens: int (S + 1,) sequence boundaries [0, ..., N], packed layout only.
        return_stats: also return a WindowKLStats.
        backend: "auto" | "torch" | "triton" | "triton+cuda" (`topd_kernels.rows.registry`).
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
    rows = flatten_inputs(student_logits, teacher_logits, mask, cu_seqlens, cfg)
    ops = resolve(backend, rows.student.device)
    call = make_row_call(rows.student, rows.teacher, rows.vocab_size, cfg.temperature, cfg.divergence_code,
                         cfg.beta)
    loss, *step = _WindowKLFunction.apply(rows.student, rows.teacher, rows.mask, rows.seq_id, rows.num_seqs,
                                          cfg, call, ops)
    if cfg.reduction == "none":
        loss = loss.reshape(rows.shape)
    if not return_stats:
        return loss
    return loss, WindowKLStats(*(s.reshape(rows.shape) for s in step))


class WindowKLLoss(torch.nn.Module):
    """nn.Module form of `fused_window_kl`, holding its knobs (validated once, at construction).

    forward(student_logits (B, T, Vs) | (N, Vs), teacher_logits, mask=None, cu_seqlens=None)
    returns what `fused_window_kl` returns with this configuration.
    """

    def __init__(self, *, return_stats: bool = False, backend: str = "auto", **config):
        super().__init__()
        cfg, unknown = split_config(config)
        if unknown:
            raise TypeError(f"WindowKLLoss: unexpected keyword argument(s) {sorted(unknown)}")
        self.config = dict(config, return_stats=return_stats, backend=backend)

    def forward(self, student_logits, teacher_logits, mask=None, cu_seqlens=None):
        return fused_window_kl(student_logits, teacher_logits, mask=mask, cu_seqlens=cu_seqlens, **self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
