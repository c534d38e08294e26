"""Input forms other than a logits tensor (SPEC "Input forms"): `TopK`, a teacher given as top-k
log-probabilities, as an inference server returns them.

A form only holds and checks its tensors; how the loss computes with it lives in the row contract
(`rows/contract.py`, "Top-k teacher rows") and its backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TAIL_CODES, value_check

PROBABILITY_SLACK = 1e-3  # SPEC: a row's non-padding probabilities may sum to at most 1 + 1e-3


@dataclass(frozen=True)
class TopK:
    """The teacher as k (token id, log-probability) slots per position (SPEC "Top-k teacher").

    token_ids: int32 / int64 (..., k), the ids in [0, V) of the student's vocabulary, distinct within a
        position, in any order; a slot whose log-probability is -inf is padding (its id is ignored).
    logprobs: float (..., k), log-probabilities normalised over the teacher's whole vocabulary (at the
        temperature the caller wants: `temperature` scales the student only). Gets no gradient.
        The leading dims are the student's: (B, T) or (N,).
    tail: "bucket" (default: the student's and the teacher's remaining mass form one more category, which
        keeps a top-k reverse KL a divergence) or "renormalize" (the k slots only, each side renormalised).

    Example::

        >>> import torch, topd_kernels
        >>> student = torch.randn(2, 16, 1000, requires_grad=True)
        >>> values, ids = torch.randn(2, 16, 1000).log_softmax(-1).topk(32, dim=-1)
        >>> loss = topd_kernels.fused_window_kl(student, topd_kernels.TopK(ids, values))
        >>> loss.backward()
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    tail: str = "bucket"

    def __post_init__(self):
        ids, logprobs = self.token_ids, self.logprobs
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"TopK: token_ids must be an int32 / int64 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
            raise TypeError(f"TopK: logprobs must be a floating tensor, got "
                            f"{getattr(logprobs, 'dtype', type(logprobs).__name__)}")
        if ids.shape != logprobs.shape or ids.dim() < 2:
            raise ValueError(f"TopK: token_ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must have "
                             f"one shape (leading dims of the student, k)")
        if ids.shape[-1] < 1:
            raise ValueError("TopK: k (the last dim) must be >= 1")
        if ids.device != logprobs.device:
            raise ValueError(f"TopK: token_ids on {ids.device}, logprobs on {logprobs.device}")
        if self.tail not in TAIL_CODES:
            raise ValueError(f"TopK: tail must be one of {tuple(TAIL_CODES)}, got {self.tail!r}")
        if logprobs.requires_grad:
            raise ValueError("TopK: logprobs must not require grad (no gradient reaches a top-k teacher); "
                             "pass logprobs.detach()")

    @property
    def k(self) -> int:
        return self.token_ids.shape[-1]

    @property
    def tail_code(self) -> int:
        return TAIL_CODES[self.tail]


def check_topk_values(topk: TopK, vocab_size: int) -> None:
    """The checks of SPEC "Bad input" that read the slots' values: every live id in [0, vocab_size), no id
    repeated among a position's live slots, live probabilities summing to at most 1 + 1e-3. A ValueError on
    the CPU; on an accelerator a device-side assertion (never a host synchronisation)."""
    ids, logprobs = topk.token_ids.reshape(-1, topk.k), topk.logprobs.reshape(-1, topk.k)
    live = logprobs > float("-inf")
    in_range = ((ids >= 0) & (ids < vocab_size)) | ~live
    # Distinct: sort each row's live ids (padding slots get distinct negative stand-ins) and compare neighbours.
    slots = torch.arange(topk.k, device=ids.device, dtype=torch.int64)
    ordered = torch.sort(torch.where(live, ids.to(torch.int64), -1 - slots), dim=-1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).all(-1)
    mass = torch.where(live, logprobs.to(torch.float32).exp(), 0.0).sum(-1)
    value_check(in_range.all(), f"TopK: token_ids outside [0, {vocab_size}) at a non-padding slot")
    value_check(distinct.all(), "TopK: token_ids repeated among the non-padding slots of a position")
    value_check((mass <= 1 + PROBABILITY_SLACK).all(),
                f"TopK: the probabilities of a position sum to more than 1 + {PROBABILITY_SLACK} (logprobs must be "
                f"log-probabilities over the teacher's whole vocabulary)")
