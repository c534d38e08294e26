"""Timing: a loss's forward, backward and forward+backward (`Timer`), CUDA kernels (`bench_gpu`), and the
copy bandwidth every bandwidth figure is compared with (`copy_bandwidth`).

CPU: wall clock, warm-up excluded. CUDA: triton.testing.do_bench, reported as median with p20 / p80.
The copy yardstick is dst.copy_(src) of a large buffer, timed the same way, read + write counted.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

import torch

from . import log

QUANTILES = [0.5, 0.2, 0.8]


def summary(ms: list) -> dict:
    """{median_ms, p20_ms, p80_ms, reps} of a list of times in ms."""
    q = torch.quantile(torch.tensor(ms, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    median, p20, p80 = (float(x) for x in q)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": len(ms)}


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error (CUDA's, or the CPU allocator's)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def bench_gpu(fn: Callable, *, warmup_ms: float, rep_ms: float, grad_to_none=None) -> dict:
    """{median_ms, p20_ms, p80_ms} of `fn` by triton.testing.do_bench (CUDA events, warm-up excluded)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=QUANTILES)
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80)}


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, *, warmup_ms: float = 25,
                   rep_ms: float = 100) -> dict:
    """Copy bandwidth of `device`: dst.copy_(src) of `nbytes` (default 1 GiB on CUDA, 256 MiB on the CPU).

    Returns {bytes (the buffer size), median_ms, p20_ms, p80_ms, bytes_per_s (2 * bytes: read + write)};
    CUDA: timed by `bench_gpu`; CPU: wall clock of 10 copies after 2 warm-up copies.
    """
    nbytes = int(nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))) // 4 * 4
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        timing = bench_gpu(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms)
    else:
        for _ in range(2):
            dst.copy_(src)
        ms = []
        for _ in range(10):
            t0 = time.perf_counter()
            dst.copy_(src)
            ms.append((time.perf_counter() - t0) * 1e3)
        timing = summary(ms)
        timing.pop("reps")
    del src, dst
    return dict(timing, bytes=nbytes, bytes_per_s=2 * nbytes / (timing["median_ms"] * 1e-3))


class Timer:
    """Times fwd, bwd and fwd+bwd of a loss function fn(student, teacher) over rotating input copies.

    `settings`: anything with the attributes cpu_warmup, cpu_min_reps, cpu_max_reps, cpu_budget_s
    (CPU: repetitions and seconds per figure) and warmup_ms, rep_ms, cuda_event_reps (CUDA), such as
    bench_kl's parsed arguments.
    """

    def __init__(self, device: torch.device, settings):
        self.device, self.settings = device, settings

    def time_all(self, fn: Callable, copies: list) -> dict:
        """{"fwd", "bwd", "fwd_bwd": summary + "method"} of fn over copies [(student leaf, teacher), ...];
        every student's .grad is None afterwards."""
        nxt = itertools.cycle(range(len(copies))).__next__
        if self.device.type == "cpu":
            return self._cpu(fn, copies, nxt)
        students = [s for s, _ in copies]

        def clear():
            for s in students:
                s.grad = None

        def fwd(i):
            s, t = copies[i]
            return fn(s, t)

        def fwd_bwd(i):
            fwd(i).backward()

        res = {"fwd": self._cuda(lambda: fwd(nxt()), None),
               "fwd_bwd": self._cuda(lambda: fwd_bwd(nxt()), students)}
        res["fwd"]["method"] = res["fwd_bwd"]["method"] = "do_bench"
        clear()
        # backward alone: the graphs of every copy are built once and replayed with retain_graph
        try:
            losses = [fwd(i) for i in range(len(copies))]
            nb = itertools.cycle(losses).__next__
            res["bwd"] = self._cuda(lambda: nb().backward(retain_graph=True), students)
            res["bwd"]["method"] = "do_bench, graphs kept (retain_graph) and replayed"
            del losses, nb
        except Exception as exc:
            if is_oom(exc):
                raise
            # fall back: a fresh forward per repetition, backward timed with CUDA events
            log("timing", f"backward with retain_graph failed ({type(exc).__name__}: {exc}); timing with events")
            losses = nb = None
            clear()
            res["bwd"] = self._cuda_events_bwd(fwd, nxt, clear)
        clear()
        return res

    # CPU: wall clock. Synchronous, so each repetition times its forward and its backward separately:
    # fwd = t1 - t0, bwd = t2 - t1, fwd+bwd = t2 - t0, one forward+backward per repetition.
    def _cpu(self, fn: Callable, copies: list, nxt: Callable) -> dict:
        a = self.settings
        series = {"fwd": [], "bwd": [], "fwd_bwd": []}
        spent, r = 0.0, 0
        while True:
            s, t = copies[nxt()]
            s.grad = None
            t0 = time.perf_counter()
            loss = fn(s, t)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            del loss
            s.grad = None
            if r >= a.cpu_warmup:
                series["fwd"].append((t1 - t0) * 1e3)
                series["bwd"].append((t2 - t1) * 1e3)
                series["fwd_bwd"].append((t2 - t0) * 1e3)
                spent += t2 - t0
            r += 1
            n = len(series["fwd"])
            if n >= a.cpu_min_reps and (n >= a.cpu_max_reps or spent >= a.cpu_budget_s):
                break
        out = {}
        for k, v in series.items():
            out[k] = dict(summary(v), ms=[round(x, 3) for x in v],
                          method="wall clock, fwd and bwd of the same repetition")
        return out

    def _cuda(self, fn: Callable, grad_to_none) -> dict:
        timing = bench_gpu(fn, warmup_ms=self.settings.warmup_ms, rep_ms=self.settings.rep_ms,
                           grad_to_none=grad_to_none)
        return dict(timing, reps=None)

    def _cuda_events_bwd(self, fwd, nxt, clear) -> dict:
        ms = []
        n_warm, n = 3, max(10, self.settings.cuda_event_reps)
        for r in range(n_warm + n):
            clear()
            loss = fwd(nxt())
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss.backward()
            b.record()
            torch.cuda.synchronize()
            if r >= n_warm:
                ms.append(a.elapsed_time(b))
            del loss
        return dict(summary(ms), method="cuda events, fresh forward per repetition")
