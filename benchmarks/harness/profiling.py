"""What the GPU row profilers (`profile_rows.py`, `profile_cuda_backward.py`) share: the row ops of the
backends they time (as `topd_kernels.rows.registry` resolves them), their inputs, the minimal traffic of
a row call, and the bandwidth figures of a timing.
"""
from __future__ import annotations

import sys
from typing import NoReturn

import torch

from topd_kernels.rows import registry
from topd_kernels.rows.contract import NUM_STATS

from .configs import make_inputs


def not_measured(script: str, why: str) -> NoReturn:
    """Stop `script` with status 2: nothing was measured, no result written."""
    print(f"{script}: {why}; nothing measured, no results written", file=sys.stderr)
    raise SystemExit(2)


def gpu_row_ops(script: str, names) -> dict:
    """{name: RowOps} of the backends `names` on the GPU, or `not_measured` when one cannot be timed there:
    no CUDA device, the registry says it cannot run, or its kernels run in the Triton interpreter (the
    registry lets a backend other than "torch" run on CPU tensors only then), where timings mean nothing."""
    if not torch.cuda.is_available():
        not_measured(script, "no CUDA device (torch.cuda.is_available() is False)")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for name in names:
        why = registry.unavailable(name, gpu)
        if why:
            not_measured(script, f"backend {name!r} cannot run here: {why}")
        if name != "torch" and registry.unavailable(name, cpu) is None:
            not_measured(script, f"backend {name!r} runs its kernels in the Triton interpreter "
                                 "(TRITON_INTERPRET=1): its timings mean nothing; unset it")
    return {name: registry.resolve(name, gpu) for name in names}


def row_inputs(n: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple:
    """(student (1, n, V), teacher (1, n, V), mask (n,) all True, coef (n,) float32): a packed row call."""
    student, teacher = make_inputs(n, vocab, dtype, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    coef = torch.randn(n, device=device, generator=g)
    return student[None], teacher[None], torch.ones(n, dtype=torch.bool, device=device), coef


def row_traffic(n: int, vocab: int, elt: int, teacher_grad: bool) -> dict:
    """Minimal bytes of a row call on n rows of V logits of `elt` bytes (both models):
    forward   read both logits and the mask, write the statistics      N V (2 elt) + N + 4 NUM_STATS N
    backward  read both logits, the statistics and coef, write the
              gradient(s)                                              N V (3 or 4 elt) + 4 NUM_STATS N + 4 N
    """
    stats = 4 * NUM_STATS * n
    return {"forward": n * vocab * 2 * elt + n + stats,
            "backward": n * vocab * elt * (4 if teacher_grad else 3) + stats + 4 * n}


def bandwidth(timing: dict, min_bytes: int, copy_bytes_per_s: float) -> dict:
    """The timing with min_bytes, achieved_GBps (min_bytes / median) and fraction_of_copy_bw."""
    achieved = min_bytes / (timing["median_ms"] * 1e-3)
    return dict(timing, min_bytes=min_bytes, achieved_GBps=achieved / 1e9,
                fraction_of_copy_bw=achieved / copy_bytes_per_s)
