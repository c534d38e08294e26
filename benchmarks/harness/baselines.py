"""The loss as people compute it without topd_kernels: the baselines of the benchmarks.

    eager          plain PyTorch as users write it: fp32 log_softmax of both, F.kl_div, window step in torch
    torch.compile  the same function under torch.compile
    liger          Liger-Kernel's LigerJSD (beta=1: reverse KL) on fp32 log_softmax outputs; it computes only
                   window 1 without thresholds (the "opd" configuration)
    eager (top-k)  `topk_tail_kl`: the loss against a top-k teacher (token ids and log-probabilities, as an
                   inference server returns them) as the RL / distillation frameworks write it in PyTorch
                   (the "topk<K>" configurations)

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


def topk_tail_kl(student_logits, teacher_ids, teacher_logprobs, mask=None, *, tail_floor=1e-7):
    """Mean reverse KL against a top-k teacher with a tail bucket, in plain PyTorch, written the way the
    frameworks that distil from an inference server's top-k log-probabilities write their loss (verl's
    top-k distillation losses, NeMo-RL's DistillationLossFn, TRL-style trainers fed by a vLLM teacher server):

    1. the student's log_softmax in float32 over the whole vocabulary, materialised (N x V float32, kept
       for the backward);
    2. gathered at the teacher's k ids;
    3. each side's remaining mass as one more category: 1 - sum_j exp(logprob_j), taken as
       -expm1(logsumexp(logprobs)) (so that no 1 - sum is formed), floored at `tail_floor` (no gradient
       through an active floor: clamp's);
    4. reverse KL over the k + 1 categories, sum_c p_c (log p_c - log q_c), and the mean over valid tokens.

    The frameworks' own defaults differ in step 3 (verl's top-k KL drops the tail; NeMo-RL renormalises
    over the k ids unless `zero_outside_topk`); the tail bucket is what their users add to keep a top-k
    reverse KL a divergence, and it is what `topd_kernels.TopK(..., tail="bucket")` computes with the
    loss's defaults (SPEC "Top-k teacher"), so the two losses are equal.

    student_logits (..., V); teacher_ids int (..., k); teacher_logprobs float (..., k), the teacher's log-softmax
    at those ids, -inf in a padding slot (a position needs at least one live slot); mask bool (...) or None.
    """
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    live = teacher_logprobs > float("-inf")
    log_p_k = log_p.gather(-1, torch.where(live, teacher_ids, 0).long())
    log_q_k = teacher_logprobs.float()
    neg_inf = torch.tensor(float("-inf"), device=log_p.device)

    def tail(log_k):
        mass = -torch.expm1(torch.logsumexp(torch.where(live, log_k, neg_inf), dim=-1))
        return mass.clamp(min=tail_floor).log()

    log_p_tail, log_q_tail = tail(log_p_k), tail(log_q_k)
    # the slots' terms (padding slots contribute 0, with no NaN in their gradient), then the tail's
    lp, lq = torch.where(live, log_p_k, 0.0), torch.where(live, log_q_k, 0.0)
    kl = torch.where(live, lp.exp() * (lp - lq), 0.0).sum(-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)
