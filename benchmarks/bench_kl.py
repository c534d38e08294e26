#!/usr/bin/env python
"""Benchmark of `topd_kernels.fused_window_kl` against the ways people compute the same loss.

Methods (each computes the same loss on the same inputs; unusable ones are listed as "n/a: <why>"):
    topd[auto], topd[triton+cuda], topd[triton], topd[torch]   fused_window_kl with that backend
    eager          plain PyTorch as users write it: fp32 log_softmax of both, F.kl_div, window step in torch
    torch.compile  the same function under torch.compile
    liger          Liger-Kernel's LigerJSD (beta=1: reverse KL) on fp32 log_softmax outputs; it computes only
                   window 1 without thresholds, so it runs in the "opd" configuration only

Configurations (the loss every method in a row group computes):
    topd   window 8, gamma 0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
           suppress_weight 0, guidance_weight 0.5 (TOPD)
    opd    window 1, no thresholds, no guidance: mean reverse KL (plain OPD; what Liger computes)

Figures per method: forward, backward, forward+backward time (median, p20, p80; CUDA:
triton.testing.do_bench, CPU: wall clock, warm-up excluded), inputs rotated among several copies;
peak memory above the inputs (CUDA: the allocator's counters; CPU: benchmarks/memtrack.py); bytes/s
against the minimal traffic (fwd: read both logits; bwd: read both + write the gradient) and as % of the
device copy bandwidth measured in the same run; speedup and memory ratio vs eager; the loss value and its
difference from eager's (checked on the first repetition).

    python benchmarks/bench_kl.py                 # the full sweep (meant for the GPU), bf16
    python benchmarks/bench_kl.py --dtype fp32
    python benchmarks/bench_kl.py --quick         # small CPU set, < 2 minutes on 2 cores
    python benchmarks/bench_kl.py --quick --plot  # also a PNG (needs matplotlib)

Writes a markdown table to stdout (and next to the JSON as .md) and the JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if __name__ == "__main__":
    # Inductor's default cache (/tmp/torchinductor_<user>) is shared by every process of the user; another
    # process rewriting a compiled .so there while this one has it loaded can kill this one (SIGBUS). Run
    # as a script, the benchmark keeps its own cache (git-ignored), unless the caller chose one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "torchinductor_bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
sys.path.insert(0, str(HERE))
from memtrack import measure_peak  # noqa: E402  (benchmarks/ is not a package)
from gpu_timing import bench_gpu, copy_bandwidth_gpu  # noqa: E402

import topd_kernels  # noqa: E402
from topd_kernels import Quantile, backends  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
FULL_N = (1024, 4096, 8192, 16384)
FULL_V = (32000, 128256, 151936)
QUICK_N = (256, 1024)
QUICK_V = (32000,)
TOPD_METHODS = ("topd[auto]", "topd[triton+cuda]", "topd[triton]", "topd[torch]")
ALL_METHODS = TOPD_METHODS + ("eager", "torch.compile", "liger")
MiB = 1024 ** 2


def log(msg: str) -> None:
    print(f"[bench_kl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# The loss configurations and the baselines
# ----------------------------------------------------------------------------------------------------
def make_configs(args) -> dict:
    return {
        "topd": dict(window=args.window, gamma=args.gamma, loss_q=args.loss_q, div_q=args.div_q,
                     suppress_weight=args.suppress_weight, guidance_weight=args.guidance_weight),
        "opd": dict(window=1, gamma=args.gamma, loss_q=None, div_q=None, suppress_weight=0.0,
                    guidance_weight=0.0),
    }


def topd_kwargs(cfg: dict) -> dict:
    """The fused_window_kl keywords of a configuration."""
    return dict(
        window=cfg["window"], gamma=cfg["gamma"],
        loss_threshold=None if cfg["loss_q"] is None else Quantile(cfg["loss_q"]),
        div_threshold=None if cfg["div_q"] is None else Quantile(cfg["div_q"]),
        suppress_weight=cfg["suppress_weight"], guidance_weight=cfg["guidance_weight"],
    )


def eager_window_kl(student_logits, teacher_logits, window=8, gamma=0.9, loss_q=None, div_q=None,
                    suppress_weight=0.0, guidance_weight=0.0):
    """The loss in plain PyTorch, written the way a training script writes it (one sequence, (N, V)).

    Self-contained on purpose (it does not use topd_kernels): this is the baseline.
    """
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    # reverse KL per token: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)
    kl = F.kl_div(log_p_t, log_p_s, log_target=True, reduction="none").sum(-1)
    if window == 1 and loss_q is None and div_q is None and guidance_weight == 0:
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
        high = d > torch.quantile(d, loss_q) if loss_q is not None else torch.ones_like(d, dtype=torch.bool)
        over = w > torch.quantile(w, div_q) if div_q is not None else torch.ones_like(d, dtype=torch.bool)
        divergent = high & over
        suppressed = high & ~over
        # guidance: each divergent position adds gamma^j to the weights of the next `window` tokens
        spread = torch.zeros_like(d)
        for j in range(min(window, n)):
            spread[j:] += gamma ** j * divergent[: n - j].float()
        weight = torch.where(suppressed, suppress_weight, 1.0) + guidance_weight * spread
    return (weight * kl).mean()


def liger_loss_fn():
    """Liger-Kernel's reverse KL (LigerJSD with beta=1) on fp32 log_softmax outputs: plain OPD."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)  # beta=1: sum_v Q (log Q - log P) with Q the student, mean over rows

    def fn(student_logits, teacher_logits):
        log_q = F.log_softmax(student_logits.float(), dim=-1)
        log_p = F.log_softmax(teacher_logits.float(), dim=-1)
        return jsd(log_q, log_p)

    return fn


# ----------------------------------------------------------------------------------------------------
# Which methods run here
# ----------------------------------------------------------------------------------------------------
def method_availability(device: torch.device) -> dict:
    """name -> {"available": bool, "reason": str, "backend": resolved backend or None}."""
    on_cuda = device.type == "cuda"
    tri_ok, tri_why = backends.triton_available()
    ext_ok, ext_why = backends.cuda_extension_available()
    out = {}
    auto = backends.resolve("auto", device).name
    out["topd[auto]"] = {"available": True, "reason": f"resolves to {auto!r} on {device.type}", "backend": auto}
    out["topd[torch]"] = {"available": True, "reason": "ok", "backend": "torch"}
    if not on_cuda:
        why = "needs CUDA tensors (the Triton interpreter on the CPU is a correctness tool, not benchmarked)"
        if not tri_ok:
            why += f"; {tri_why}"
        out["topd[triton]"] = {"available": False, "reason": why, "backend": None}
        ext = f"the CUDA extension is built ({ext_why})" if ext_ok else f"CUDA extension not built: {ext_why}"
        out["topd[triton+cuda]"] = {"available": False, "backend": None,
                                    "reason": f"needs CUDA tensors; {ext}"}
    else:
        out["topd[triton]"] = {"available": tri_ok, "reason": tri_why, "backend": "triton" if tri_ok else None}
        both = tri_ok and ext_ok
        why = "ok" if both else "; ".join(w for ok, w in ((tri_ok, tri_why), (ext_ok, f"CUDA extension: {ext_why}"))
                                          if not ok)
        out["topd[triton+cuda]"] = {"available": both, "reason": why, "backend": "triton+cuda" if both else None}
    out["eager"] = {"available": True, "reason": "ok", "backend": None}
    out["torch.compile"] = {"available": True, "reason": "ok", "backend": None}
    try:
        import liger_kernel  # noqa: F401

        from liger_kernel.transformers import LigerJSD  # noqa: F401
        if on_cuda:
            out["liger"] = {"available": True, "reason": "ok", "backend": None}
        else:
            out["liger"] = {"available": False, "backend": None,
                            "reason": "Liger-Kernel's Triton kernels need a CUDA device"}
    except Exception as exc:  # not installed, or failing to import
        out["liger"] = {"available": False, "backend": None,
                        "reason": f"liger_kernel not importable ({type(exc).__name__}: {exc}); "
                                  "pip install liger-kernel"}
    return out


def build_method(name: str, cfg_name: str, cfg: dict, compile_dynamic: Optional[bool]) -> Callable:
    if name.startswith("topd["):
        backend = name[5:-1]
        kw = topd_kwargs(cfg)
        return lambda s, t: topd_kernels.fused_window_kl(s, t, backend=backend, **kw)
    if name == "eager":
        return functools.partial(eager_window_kl, **cfg)
    if name == "torch.compile":
        def loss(s, t):
            return eager_window_kl(s, t, **cfg)
        return torch.compile(loss, dynamic=compile_dynamic)
    if name == "liger":
        return liger_loss_fn()
    raise ValueError(name)


def applies(name: str, cfg_name: str) -> Optional[str]:
    """None if `name` runs in configuration `cfg_name`, else why not."""
    if name == "liger" and cfg_name != "opd":
        return "Liger-Kernel computes only window 1 without thresholds or guidance: see the opd rows"
    return None


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _summary(ms: list) -> dict:
    ms = sorted(ms)
    q = lambda p: float(torch.quantile(torch.tensor(ms, dtype=torch.float64), p))  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": len(ms)}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        or "can't allocate memory" in str(exc).lower())


class Timer:
    """Times fwd, bwd and fwd+bwd of a loss function over rotating input copies."""

    def __init__(self, device: torch.device, args):
        self.device, self.args = device, args

    # CPU: wall clock. Synchronous, so each repetition times its forward and its backward separately:
    # fwd = t1 - t0, bwd = t2 - t1, fwd+bwd = t2 - t0, one forward+backward per repetition.
    def _cpu(self, fn: Callable, copies: list, nxt: Callable) -> dict:
        a = self.args
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
        out = {k: _summary(v) for k, v in series.items()}
        for k, v in series.items():
            out[k]["ms"] = [round(x, 3) for x in v]
            out[k]["method"] = "wall clock, fwd and bwd of the same repetition"
        return out

    def _cuda(self, fn: Callable, grad_to_none) -> dict:
        timing = bench_gpu(fn, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms, grad_to_none=grad_to_none)
        return dict(timing, reps=None)

    def time_all(self, fn: Callable, copies: list) -> dict:
        nxt = itertools.cycle(range(len(copies))).__next__
        students = [s for s, _ in copies]

        def clear():
            for s in students:
                s.grad = None

        def fwd(i):
            s, t = copies[i]
            return fn(s, t)

        def fwd_bwd(i):
            s, t = copies[i]
            fn(s, t).backward()

        if self.device.type == "cpu":
            return self._cpu(fn, copies, nxt)
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
            log(f"  backward with retain_graph failed ({type(exc).__name__}: {exc}); timing with events")
            losses = nb = None
            clear()
            res["bwd"] = self._cuda_events_bwd(fwd, nxt, clear)
        clear()
        return res

    def _cuda_events_bwd(self, fwd, nxt, clear) -> dict:
        ms = []
        n_warm, n = 3, max(10, self.args.cuda_event_reps)
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
        out = _summary(ms)
        out["method"] = "cuda events, fresh forward per repetition"
        return out


def copy_bandwidth(device: torch.device, args) -> dict:
    """Device copy bandwidth, read + write counted: bytes/s of dst.copy_(src) on a big tensor."""
    nbytes = int(args.copy_bytes) if args.copy_bytes else ((1 << 30) if device.type == "cuda" else (256 << 20))
    if device.type == "cuda":
        copy = copy_bandwidth_gpu(nbytes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        return {key: copy[key] for key in ("bytes", "median_ms", "bytes_per_s")}
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append((time.perf_counter() - t0) * 1e3)
    ms = _summary(ts)["median_ms"]
    del src, dst
    return {"bytes": nbytes, "median_ms": ms, "bytes_per_s": 2 * nbytes / (ms * 1e-3)}


# ----------------------------------------------------------------------------------------------------
# One shape
# ----------------------------------------------------------------------------------------------------
def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_extra_bytes(method: str, n: int, v: int, elt: int) -> int:
    """A generous upper estimate of what one fwd+bwd allocates above the inputs (CPU OOM guard)."""
    row = n * v
    if method in ("eager", "liger"):
        return row * (7 * 4 + elt)
    if method == "torch.compile":
        return row * (4 * 4 + elt)
    return row * (elt + 2 * 4)  # the gradient + a chunk or two of float32 work


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    student = (2.0 * torch.randn(n, v, device=device, generator=g)).to(dtype)
    teacher = (student.float() + torch.randn(n, v, device=device, generator=g)).to(dtype)
    return student, teacher


_COMPILED: dict = {}


def run_shape(n, v, dtype_name, cfgs, avail, methods, timer, args, device, bw) -> list:
    dtype = DTYPES[dtype_name]
    elt = torch.finfo(dtype).bits // 8
    pair = 2 * n * v * elt
    n_copies = 1 if pair >= args.rotate_bytes else max(2, min(args.max_copies, math.ceil(args.rotate_bytes / pair)))
    rows = []
    base = dict(N=n, V=v, dtype=dtype_name)
    grad_bytes = n * v * elt
    traffic = {"fwd": 2 * n * v * elt, "bwd": 3 * n * v * elt, "fwd_bwd": 5 * n * v * elt}

    def na_rows(status, reason):
        return [dict(base, config=c, method=m, status=status, reason=reason)
                for c in cfgs for m in methods]

    avail_mem = mem_available_bytes() if device.type == "cpu" else None
    if avail_mem is not None and n_copies * pair > 0.5 * avail_mem:
        n_copies = max(1, int(0.5 * avail_mem // pair))
        if n_copies == 0 or pair > 0.5 * avail_mem:
            return na_rows("OOM", f"predicted: inputs need {pair / 2**30:.1f} GiB, "
                                  f"{avail_mem / 2**30:.1f} GiB available (not run on the CPU)")
    try:
        s0, t0 = make_inputs(n, v, dtype, device, args.seed)
        copies = [(s0.clone().requires_grad_(True), t0.clone()) for _ in range(n_copies - 1)]
        copies.insert(0, (s0.requires_grad_(True), t0))
        del s0, t0
    except Exception as exc:
        if is_oom(exc):
            copies = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return na_rows("OOM", f"allocating {n_copies} input copies: {exc}".splitlines()[0])
        raise

    for cfg_name, cfg in cfgs.items():
        eager_row = None
        if "torch.compile" in methods and not args.compile_dynamic:
            torch._dynamo.reset()  # a fresh compile per shape (no recompile limit, no stale graphs)
        for m in methods:
            row = dict(base, config=cfg_name, method=m, n_copies=n_copies, grad_bytes=grad_bytes,
                       traffic_bytes=traffic)
            rows.append(row)
            a = avail[m]
            if m == "topd[auto]" and f"topd[{a['backend']}]" in methods:
                row.update(status="alias", reason=f"auto resolves to {a['backend']!r} on {device.type}: "
                                                  f"see topd[{a['backend']}] (not run twice)")
                continue
            if not a["available"]:
                row.update(status="n/a", reason=a["reason"])
                continue
            why = applies(m, cfg_name)
            if why:
                row.update(status="n/a", reason=why)
                continue
            if a["backend"]:
                row["backend"] = a["backend"]
            if avail_mem is not None:
                need = estimate_extra_bytes(m, n, v, elt)
                avail_mem = mem_available_bytes()
                if need > 0.85 * avail_mem:
                    row.update(status="OOM", reason=f"predicted: needs ~{need / 2**30:.1f} GiB above the inputs, "
                                                     f"{avail_mem / 2**30:.1f} GiB available (not run on the CPU)")
                    continue
            log(f"N={n} V={v} {dtype_name} {cfg_name:4s} {m}")
            failure = None
            loss = fn = None
            try:
                if m == "torch.compile" and args.compile_dynamic:
                    # dynamic shapes: one compiled function per configuration serves every N (and V)
                    fn = _COMPILED.setdefault((cfg_name, dtype_name),
                                              build_method(m, cfg_name, cfg, args.compile_dynamic))
                else:
                    fn = build_method(m, cfg_name, cfg, args.compile_dynamic)
                s, t = copies[0]
                # first repetition: the loss value (and, for compile, the compile time)
                tc = time.perf_counter()
                loss = fn(s, t)
                row["first_call_s"] = time.perf_counter() - tc
                row["loss"] = float(loss.detach().double())
                loss = None
                tracker = "profiler" if m == "torch.compile" else "dispatch"
                row["memory"] = measure_memory(fn, copies[0], device, tracker)
                row.update(timer.time_all(fn, copies))
                row["status"] = "ok"
            except Exception as exc:
                failure = ("OOM" if is_oom(exc) else "error",
                           f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
            # (outside the except clause: the traceback, and the tensors its frames hold, are gone)
            loss = fn = None
            if failure:
                for st, _ in copies:
                    st.grad = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row.update(status=failure[0], reason=failure[1])
                row.pop("memory", None)
                log(f"  {failure[0]}: {failure[1]}")
                continue
            # derived figures
            row["bytes_per_s"], row["pct_of_copy_bw"] = {}, {}
            for k in ("fwd", "bwd", "fwd_bwd"):
                bps = traffic[k] / (row[k]["median_ms"] * 1e-3)
                row["bytes_per_s"][k] = bps
                row["pct_of_copy_bw"][k] = 100.0 * bps / bw["bytes_per_s"]
            if m == "eager":
                eager_row = row
            log("  fwd {:.2f} ms  bwd {:.2f} ms  fwd+bwd {:.2f} ms  peak {:.1f} MiB  loss {:.6f}".format(
                row["fwd"]["median_ms"], row["bwd"]["median_ms"], row["fwd_bwd"]["median_ms"],
                row["memory"]["peak_step_bytes"] / MiB, row["loss"]))
        # ratios against eager (same configuration, same shape); the loss is compared with eager's, or
        # with the first method that ran when eager did not (e.g. OOM)
        done = [r for r in rows if r.get("config") == cfg_name and r.get("status") == "ok"]
        ref = eager_row or (done[0] if done else None)
        for row in done:
            if eager_row is None:
                row["speedup_vs_eager"] = row["memory_ratio_vs_eager"] = None
            else:
                row["speedup_vs_eager"] = {k: eager_row[k]["median_ms"] / row[k]["median_ms"]
                                           for k in ("fwd", "bwd", "fwd_bwd")}
                em = eager_row["memory"]["peak_step_bytes"]
                row["memory_ratio_vs_eager"] = row["memory"]["peak_step_bytes"] / em if em else None
            row["loss_reference"] = ref["method"]
            row["loss_abs_diff_vs_eager"] = abs(row["loss"] - ref["loss"])
    del copies
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_memory(fn, copy, device, tracker) -> dict:
    """Peak bytes above the inputs: of the forward (with the graph kept), and of forward+backward
    (the gradient included: it is written during the call and kept)."""
    s, t = copy
    s.grad = None
    keep = []

    def fwd():
        keep.append(fn(s, t))

    f = measure_peak(fwd, device, tracker)
    keep.clear()
    gc.collect()

    def step():
        fn(s, t).backward()

    b = measure_peak(step, device, tracker)
    s.grad = None
    return {"peak_fwd_bytes": int(f["peak_bytes"]), "saved_bytes": int(f["live_bytes"]),
            "peak_step_bytes": int(b["peak_bytes"]), "kept_after_step_bytes": int(b["live_bytes"]),
            "tracker": b["tracker"]}


# ----------------------------------------------------------------------------------------------------
# Environment, output
# ----------------------------------------------------------------------------------------------------
def _cmd(argv) -> Optional[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    env = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "topd_kernels": getattr(topd_kernels, "__version__", None),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("triton", "liger_kernel", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            try:
                from importlib.metadata import version

                env[mod] = version(mod.replace("_", "-"))
            except Exception:
                env[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_bytes"] = props.total_memory
        env["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        name = None
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        env["device_name"] = f"CPU: {name or platform.processor() or 'unknown'}"
        env["driver"] = "n/a (CPU)"
    return env


def _fmt_t(r: dict) -> str:
    return f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"


def _opt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [
        f"### fused_window_kl benchmark — {env['device_name']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, driver {env['driver']}, "
        f"commit {(env['git_commit'] or 'unknown')[:12]}{' (dirty)' if env['git_dirty'] else ''}, "
        f"{env['timestamp_utc']}. Device copy bandwidth (read+write): "
        f"{result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s."
        + (f" Load average (1 min) at start / end: {env['loadavg_start'][0]:.1f} / {env['loadavg_end'][0]:.1f} "
           f"on {env['cpu_count']} cores." if env.get("loadavg_start") and env.get("loadavg_end") else ""),
        "",
        "Times in ms: median (p20–p80). Peak: memory above the inputs during fwd+bwd, the gradient included. "
        "GB/s: minimal traffic of fwd+bwd (read both logits twice, write the gradient) / median time. "
        "×eager: eager time / this time; mem×: this peak / eager peak. Δloss: |loss − eager's loss| (where eager "
        "did not run: − the loss of the first method that did).",
        "",
        "| N | V | dtype | loss | method | fwd ms | bwd ms | fwd+bwd ms | peak MiB | ×eager fwd+bwd | mem× | "
        "GB/s (% copy) | Δloss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    not_run = {}
    for r in result["results"]:
        if r["status"] in ("n/a", "alias"):
            # unusable here for every shape: listed once below the table, with the reason
            not_run.setdefault((r["method"], r["status"], r.get("reason", "")), set()).add(r["config"])
            continue
        head = f"| {r['N']} | {r['V']} | {r['dtype']} | {r['config']} | {r['method']} |"
        if r["status"] != "ok":
            label = "OOM" if r["status"] == "OOM" else f"{r['status']}: {r.get('reason', '')}"
            lines.append(f"{head} {label} | | | | | | | |")
            continue
        sp = r.get("speedup_vs_eager")
        mr = r.get("memory_ratio_vs_eager")
        dl = r.get("loss_abs_diff_vs_eager")
        lines.append(
            f"{head} {_fmt_t(r['fwd'])} | {_fmt_t(r['bwd'])} | {_fmt_t(r['fwd_bwd'])} | "
            f"{r['memory']['peak_step_bytes'] / MiB:.1f} | "
            f"{_opt(sp and sp['fwd_bwd'], '.2f')} | {_opt(mr, '.3f')} | "
            f"{r['bytes_per_s']['fwd_bwd'] / 1e9:.1f} ({r['pct_of_copy_bw']['fwd_bwd']:.0f}%) | "
            f"{_opt(dl, '.1e')} |")
    if not_run:
        lines += ["", "Not run here (every shape):"]
        for (m, st, why), cfg_set in sorted(not_run.items()):
            lines.append(f"- {m} ({', '.join(sorted(cfg_set))}): {st}: {why}")
    trackers = sorted({r["memory"]["tracker"] + f" ({r['method']})" for r in result["results"]
                       if r["status"] == "ok" and r["method"] == "torch.compile"}
                      | {r["memory"]["tracker"] for r in result["results"]
                         if r["status"] == "ok" and r["method"] != "torch.compile"})
    if trackers:
        lines += ["", "Peak memory measured with: " + ", ".join(trackers) + " (benchmarks/memtrack.py)."]
    compiles = [f"{r['N']}/{r['dtype']}/{r['config']}: {r['first_call_s']:.1f} s" for r in result["results"]
                if r["status"] == "ok" and r["method"] == "torch.compile"]
    if compiles:
        lines += ["", "torch.compile first call (compile included, excluded from the times): " + "; ".join(compiles)]
    lc = result["loss_check"]
    lines += ["", f"Loss check (first repetition, every method vs eager, same config and shape): "
                  f"max |Δloss| = {lc['max_abs_diff']:.3e} over {lc['compared']} method rows."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib (or the package's `bench` extra); no plot written"
    rows = [r for r in result["results"] if r["status"] == "ok"]
    vs = sorted({r["V"] for r in rows})
    dts = sorted({r["dtype"] for r in rows})
    if not vs:
        return "no successful rows to plot"
    cols = [(v, d) for v in vs for d in dts]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(ALL_METHODS)}  # one colour per method
    fig, axes = plt.subplots(2, len(cols), figsize=(5 * len(cols), 8), squeeze=False)
    for j, (v, d) in enumerate(cols):
        sel = [r for r in rows if r["V"] == v and r["dtype"] == d]
        for key in sorted({(r["config"], r["method"]) for r in sel}):
            pts = sorted((r["N"], r) for r in sel if (r["config"], r["method"]) == key)
            ns = [p[0] for p in pts]
            style = "-" if key[0] == "topd" else "--"  # solid: topd config, dashed: opd config
            label = f"{key[1]} ({key[0]})"
            kw = dict(marker="o", label=label, color=color.get(key[1]))
            axes[0][j].plot(ns, [p[1]["fwd_bwd"]["median_ms"] for p in pts], style, **kw)
            axes[1][j].plot(ns, [p[1]["memory"]["peak_step_bytes"] / MiB for p in pts], style, **kw)
        axes[0][j].set_title(f"V={v} {d}: fwd+bwd time")
        axes[0][j].set_ylabel("ms (median)")
        axes[1][j].set_title(f"V={v} {d}: peak memory above inputs")
        axes[1][j].set_ylabel("MiB")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("N (tokens)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fused_window_kl — {result['env']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------------
def _finite(obj):
    """JSON has no NaN / inf: such a number becomes its string ("nan", "inf") so it is visible, not lost."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small CPU set: N in {256, 1024}, V=32000, fp32 and bf16 (< 2 min on 2 cores)")
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp32, fp16 (default bf16; --quick: fp32,bf16)")
    p.add_argument("--N", default=None, help="comma list of token counts (overrides the set)")
    p.add_argument("--V", default=None, help="comma list of vocabulary sizes (overrides the set)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list of methods to run")
    p.add_argument("--configs", default="topd,opd", help="comma list of loss configurations: topd, opd")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_kl_<device>_<dtypes>[_quick].json)")
    p.add_argument("--plot", nargs="?", const="", default=None,
                   help="also write a PNG (default: next to the JSON, .png)")
    p.add_argument("--no-table-file", action="store_true", help="do not write the .md table next to the JSON")
    p.add_argument("--seed", type=int, default=0)
    # the TOPD configuration
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--loss-q", type=float, default=0.8, help="loss_threshold = Quantile(q)")
    p.add_argument("--div-q", type=float, default=0.5, help="div_threshold = Quantile(q)")
    p.add_argument("--suppress-weight", type=float, default=0.0)
    p.add_argument("--guidance-weight", type=float, default=0.5)
    # timing
    p.add_argument("--warmup-ms", type=int, default=25, help="CUDA do_bench warm-up")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA do_bench repetition time")
    p.add_argument("--cuda-event-reps", type=int, default=20)
    p.add_argument("--cpu-warmup", type=int, default=1)
    p.add_argument("--cpu-min-reps", type=int, default=3)
    p.add_argument("--cpu-max-reps", type=int, default=20)
    p.add_argument("--cpu-budget-s", type=float, default=1.0, help="CPU: time per figure beyond the minimum reps")
    p.add_argument("--rotate-bytes", type=float, default=float(1 << 30),
                   help="rotate among enough input copies to cover this many bytes (2..--max-copies copies)")
    p.add_argument("--max-copies", type=int, default=8)
    p.add_argument("--copy-bytes", type=float, default=None,
                   help="size of the copy-bandwidth measurement (default 1 GiB on CUDA, 256 MiB on the CPU)")
    p.add_argument("--compile-dynamic", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile(dynamic=...): auto = False on CUDA, True with --quick on the CPU")
    args = p.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.quick:
        ns, vs = QUICK_N, QUICK_V
        dtypes = ["fp32", "bf16"]
        args.rotate_bytes = min(args.rotate_bytes, float(256 << 20))
        args.cpu_warmup, args.cpu_budget_s = 0, min(args.cpu_budget_s, 0.5)  # the first call warmed up
    else:
        ns, vs, dtypes = FULL_N, FULL_V, ["bf16"]
    if args.N:
        ns = tuple(int(x) for x in args.N.split(","))
    if args.V:
        vs = tuple(int(x) for x in args.V.split(","))
    if args.dtype:
        dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: unknown {d!r}; expected {sorted(DTYPES)}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in ALL_METHODS:
            raise SystemExit(f"--methods: unknown {m!r}; expected {ALL_METHODS}")
    all_cfgs = make_configs(args)
    cfgs = {c: all_cfgs[c] for c in args.configs.split(",") if c}
    if args.compile_dynamic == "auto":
        args.compile_dynamic = True if (args.quick and device.type == "cpu") else False
    else:
        args.compile_dynamic = args.compile_dynamic == "true"

    out = Path(args.out) if args.out else (
        HERE / "results" / f"bench_kl_{device.type}_{'-'.join(dtypes)}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    env = environment(device)
    avail = method_availability(device)
    for m in methods:
        if not avail[m]["available"]:
            log(f"{m}: n/a: {avail[m]['reason']}")
    bw = copy_bandwidth(device, args)
    log(f"{env['device_name']}: copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (read+write)")
    timer = Timer(device, args)
    results = []
    shapes = [(n, v, d) for d in dtypes for v in vs for n in ns]
    for i, (n, v, d) in enumerate(shapes):
        log(f"shape {i + 1}/{len(shapes)}: N={n} V={v} {d}")
        results += run_shape(n, v, d, cfgs, avail, methods, timer, args, device, bw)

    diffs = [r["loss_abs_diff_vs_eager"] for r in results
             if r.get("status") == "ok" and r["method"] != r.get("loss_reference")]
    result = {
        "schema": "topd_kernels.bench_kl/1",
        "env": env,
        "settings": {k: v for k, v in vars(args).items()},
        "shapes": {"N": list(ns), "V": list(vs), "dtypes": dtypes},
        "configs": {c: {**cfg} for c, cfg in cfgs.items()},
        "methods": {m: avail[m] for m in methods},
        "copy_bandwidth": bw,
        "results": results,
        "loss_check": {"max_abs_diff": max(diffs) if diffs else 0.0, "compared": len(diffs),
                       "reference": "eager (same config, shape, dtype; the first method that ran where eager "
                                    "did not: row's loss_reference), first repetition"},
        "wall_s": None,
    }
    result["wall_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
    table = markdown(result)
    print(table)
    out.write_text(json.dumps(_finite(result), indent=1, allow_nan=False, default=str) + "\n")
    log(f"wrote {out}")
    if not args.no_table_file:
        out.with_suffix(".md").write_text(table)
        log(f"wrote {out.with_suffix('.md')}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        msg = plot(result, png)
        log(msg if msg else f"wrote {png}")
    log(f"done in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
