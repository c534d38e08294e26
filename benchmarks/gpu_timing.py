"""GPU timing shared by the benchmark scripts (`bench_kl.py`, `profile_rows.py`, `profile_cuda_backward.py`).

`bench_gpu` is triton.testing.do_bench reported as median with p20 / p80; `copy_bandwidth_gpu` is the
yardstick every bandwidth figure is compared with: a device-to-device copy of a large buffer, timed the
same way, read + write counted.
"""
from __future__ import annotations

import torch

QUANTILES = [0.5, 0.2, 0.8]


def bench_gpu(fn, *, warmup_ms: float, rep_ms: float, grad_to_none=None) -> dict:
    """{median_ms, p20_ms, p80_ms} of `fn` by triton.testing.do_bench (CUDA events, warm-up excluded)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=QUANTILES)
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80)}


def copy_bandwidth_gpu(nbytes: int, *, warmup_ms: float, rep_ms: float, device="cuda") -> dict:
    """Copy bandwidth of `device`: dst.copy_(src) of `nbytes`, timed by `bench_gpu`.

    Returns the timing plus `bytes` (the buffer size) and `bytes_per_s` (2 * bytes: read + write).
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    timing = bench_gpu(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms)
    del src, dst
    nbytes = nbytes // 4 * 4
    return dict(timing, bytes=nbytes, bytes_per_s=2 * nbytes / (timing["median_ms"] * 1e-3))
