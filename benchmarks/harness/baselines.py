"""The loss as people compute it without topd_kernels: the baselines of the benchmarks.

    eager          plain PyTorch as users write it: fp32 log_softmax of both, F.kl_div, window step in torch
    torch.compile  the same function under torch.compile
    liger          Liger-Kernel's LigerJSD (beta=1: reverse KL) on fp32 log_softmax outputs; it computes only
                   window 1 without thresholds (the "opd" configuration)

Self-contained on purpose (nothing from topd_kernels): these are what the package is compared with.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _above(x: torch.Tensor, threshold) -> torch.Tensor:
    """x > threshold: None = every position, Quantile(q) (anything with `.q`) = the q-quantile of x."""
    if threshold is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x > (torch.quantile(x, threshold.q) if hasattr(threshold, "q") else threshold)


def eager_window_kl(student_logits, teacher_logits, *, window=8, gamma=0.9, loss_threshold=None,
                    div_threshold=None, suppress_weight=0.0, guidance_weight=0.0):
    """The loss in plain PyTorch, written the way a training script writes it: one sequence, logits
    (N, V), reverse KL, mean over the tokens. The knobs are LossConfig's, with its defaults."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    # reverse KL per token: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)
    kl = F.kl_div(log_p_t, log_p_s, log_target=True, reduction="none").sum(-1)
    if window == 1 and loss_threshold is None and div_threshold is None and guidance_weight == 0:
        return kl.mean()
    with torch.no_grad():  # the weights carry no gradient
        d = kl.detach()
        n = d.numel()
        # near-future window score: discounted mean of d over the next `window` tokens of the sequence
        num = torch.zeros_like(d)
        den = torch.zeros_like(d)
        for j in range(min(window, n)):
            num[: n - j] += gamma ** j * d[j:]
            den[: n - j] += gamma ** j
        w = num / den
        high = _above(d, loss_threshold)
        over = _above(w, div_threshold)
        divergent = high & over
        suppressed = high & ~over
        # guidance: each divergent position adds gamma^j to the weights of the next `window` tokens
        spread = torch.zeros_like(d)
        for j in range(min(window, n)):
            spread[j:] += gamma ** j * divergent[: n - j].float()
        weight = torch.where(suppressed, suppress_weight, 1.0) + guidance_weight * spread
    return (weight * kl).mean()


def compiled_eager(dynamic: Optional[bool], **cfg) -> Callable:
    """torch.compile of `eager_window_kl` with the configuration `cfg`: fn(student, teacher)."""
    def loss(student_logits, teacher_logits):
        return eager_window_kl(student_logits, teacher_logits, **cfg)

    return torch.compile(loss, dynamic=dynamic)


def liger_unavailable(device: torch.device) -> Optional[str]:
    """None when the Liger baseline runs on `device`, else why not."""
    try:
        from liger_kernel.transformers import LigerJSD  # noqa: F401
    except Exception as exc:  # not installed, or failing to import
        return f"liger_kernel not importable ({type(exc).__name__}: {exc}); pip install liger-kernel"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def liger_loss_fn() -> Callable:
    """Liger-Kernel's reverse KL (LigerJSD with beta=1) on fp32 log_softmax outputs: plain OPD."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)  # beta=1: sum_v Q (log Q - log P) with Q the student, mean over rows

    def fn(student_logits, teacher_logits):
        log_q = F.log_softmax(student_logits.float(), dim=-1)
        log_p = F.log_softmax(teacher_logits.float(), dim=-1)
        return jsd(log_q, log_p)

    return fn
