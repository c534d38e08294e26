#!/usr/bin/env python
"""Benchmark of `topd_kernels.fused_window_kl` against the ways people compute the same loss.

Methods (each computes the same loss on the same inputs; unusable ones are listed as "n/a: <why>"):
    topd[auto], topd[torch], topd[triton], topd[triton+cuda]   fused_window_kl with that backend; what can
                   run here is what topd_kernels.rows.registry says
    eager, torch.compile, liger                                  the baselines (benchmarks/harness/baselines.py)

Configurations (the loss every method in a row group computes; benchmarks/harness/configs.py):
    topd     window 8, gamma 0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
             suppress_weight 0, guidance_weight 0.5 (TOPD; the knob flags below change it)
    opd      window 1, no thresholds, no guidance: mean reverse KL (plain OPD; what Liger computes)
    topk<K>  opd's loss against a top-K teacher (K = 32, 128 by default): the teacher's log-softmax at its K
             most likely ids (int32 ids, float32 log-probabilities, tail "bucket"), as an inference server
             returns them. topd[...] = fused_window_kl(student, TopK(ids, logprobs)); eager = the PyTorch
             top-k + tail loss as the frameworks write it (baselines.topk_tail_kl); torch.compile and liger
             do not apply. The fused full-logits path is the opd rows of the same shape.

Figures per method: forward, backward, forward+backward time (median, p20, p80; CUDA:
triton.testing.do_bench, CPU: wall clock, warm-up excluded), inputs rotated among several copies;
peak memory above the inputs (CUDA: the allocator's counters; CPU: benchmarks/harness/memtrack.py); the bytes
the teacher side costs per token (V x element size for logits, K x 8 for int32 ids + float32 log-probabilities);
bytes/s against the minimal traffic (fwd: read the student and the teacher side; bwd: read both + write the
gradient) and as % of the device copy bandwidth measured in the same run; speedup and memory ratio vs eager;
the loss value and its difference from eager's (checked on the first repetition). The report adds a table of
the top-k teacher against the full logits, per shape.

    python benchmarks/bench_kl.py                 # the full sweep (meant for the GPU), bf16
    python benchmarks/bench_kl.py --dtype fp32
    python benchmarks/bench_kl.py --N 1024 --V 32000,151936 --configs opd,topk32,topk128  # top-k vs full logits
    python benchmarks/bench_kl.py --quick         # small CPU set, a few minutes on 2 cores (mostly compiling)
    python benchmarks/bench_kl.py --quick --plot  # also a PNG (needs matplotlib)

Writes a markdown table to stdout (and next to the JSON as .md) and the JSON to --out.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    # Inductor's default cache (/tmp/torchinductor_<user>) is shared by every process of the user; another
    # process rewriting a compiled .so there while this one has it loaded can kill this one (SIGBUS). Run
    # as a script, the benchmark keeps its own cache (git-ignored), unless the caller chose one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(HERE.parent / ".cache" / "torchinductor_bench"))

import torch  # noqa: E402

import harness  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import topd_kernels  # noqa: E402
from harness import baselines, configs, header, report  # noqa: E402
from harness.configs import (CONFIG_NAMES, DTYPES, FULL_N, FULL_V, QUICK_N, QUICK_V, TOPD, config_json,  # noqa: E402
                             loss_configs, make_inputs, teacher_bytes_per_token, teacher_for, teacher_form, topk_k)
from harness.memtrack import mem_available_bytes, measure_memory  # noqa: E402
from harness.timing import Timer, copy_bandwidth, is_oom  # noqa: E402
from topd_kernels import Quantile  # noqa: E402
from topd_kernels.rows import registry  # noqa: E402

TOPD_METHODS = ("topd[auto]",) + tuple(f"topd[{name}]" for name in registry.BACKENDS)
ALL_METHODS = TOPD_METHODS + ("eager", "torch.compile", "liger")
log = functools.partial(harness.log, "bench_kl")


# ----------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------
def method_availability(device: torch.device) -> dict:
    """name -> {"available": bool, "reason": str, "backend": the backend it runs, or None}.

    The topd methods are what `topd_kernels.rows.registry` says for `device`; topd[auto] is the backend
    the registry picks there."""
    auto = registry.auto_backend(device)
    out = {"topd[auto]": {"available": True, "reason": f"resolves to {auto!r} on {device.type}", "backend": auto}}
    for name, why in registry.availability(device).items():
        out[f"topd[{name}]"] = {"available": why is None, "reason": why or "ok", "backend": None if why else name}
    out["eager"] = {"available": True, "reason": "ok", "backend": None}
    out["torch.compile"] = {"available": True, "reason": "ok", "backend": None}
    why = baselines.liger_unavailable(device)
    out["liger"] = {"available": why is None, "reason": why or "ok", "backend": None}
    return out


def build_method(name: str, cfg: dict, compile_dynamic: Optional[bool], form: str = "logits") -> Callable:
    """The loss function fn(student, teacher) of method `name` in configuration `cfg` (LossConfig keywords),
    the teacher being of `form` ("logits", or "topk": a topd_kernels.TopK, see configs.teacher_form)."""
    if name.startswith("topd["):
        backend = name[len("topd["):-1]
        return lambda s, t: topd_kernels.fused_window_kl(s, t, backend=backend, **cfg)
    if form == "topk":
        if name == "eager":  # the frameworks' loss: mean reverse KL with the tail bucket (the opd knobs)
            if cfg != configs.OPD:
                raise ValueError(f"the top-k baseline computes only the opd loss {configs.OPD}, not {cfg}")
            return lambda s, t: baselines.topk_tail_kl(s, t.token_ids, t.logprobs)
        raise ValueError(f"{name}: no top-k teacher form")
    if name == "eager":
        return functools.partial(baselines.eager_window_kl, **cfg)
    if name == "torch.compile":
        return baselines.compiled_eager(compile_dynamic, **cfg)
    if name == "liger":
        return baselines.liger_loss_fn()
    raise ValueError(name)


def applies(name: str, cfg_name: str) -> Optional[str]:
    """None if `name` runs in configuration `cfg_name`, else why not."""
    if topk_k(cfg_name):
        if name == "liger":
            return "Liger-Kernel has no top-k teacher loss"
        if name == "torch.compile":
            return "the top-k baseline is timed eagerly, as the frameworks run it (eager rows)"
        return None
    if name == "liger" and cfg_name != "opd":
        return "Liger-Kernel computes only window 1 without thresholds or guidance: see the opd rows"
    return None


def estimate_extra_bytes(method: str, n: int, v: int, elt: int) -> int:
    """A generous upper estimate of what one fwd+bwd allocates above the inputs (CPU OOM guard)."""
    row = n * v
    if method in ("eager", "liger"):
        return row * (7 * 4 + elt)
    if method == "torch.compile":
        return row * (4 * 4 + elt)
    return row * (elt + 2 * 4)  # the gradient + a chunk or two of float32 work


# ----------------------------------------------------------------------------------------------------
# One shape
# ----------------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def run_shape(n, v, dtype_name, cfgs, avail, methods, timer, args, device, bw) -> list:
    """The rows of one shape: every (configuration, method), run or with the reason it did not run."""
    dtype = DTYPES[dtype_name]
    elt = torch.finfo(dtype).bits // 8
    pair = 2 * n * v * elt
    n_copies = 1 if pair >= args.rotate_bytes else max(2, min(args.max_copies, math.ceil(args.rotate_bytes / pair)))
    rows = []
    base = dict(N=n, V=v, dtype=dtype_name)
    grad_bytes = n * v * elt

    def traffic_of(teacher_bytes: int) -> dict:
        """Minimal traffic: fwd reads the student and the teacher side; bwd reads both and writes the gradient."""
        fwd = n * v * elt + teacher_bytes
        return {"fwd": fwd, "bwd": fwd + grad_bytes, "fwd_bwd": 2 * fwd + grad_bytes}

    def na_rows(status, reason):
        return [dict(base, config=c, method=m, teacher=teacher_form(c), status=status, reason=reason)
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
        form = teacher_form(cfg_name)
        k = form.get("k")
        if k is not None and k > v:
            rows += [dict(base, config=cfg_name, method=m, teacher=form, status="n/a",
                          reason=f"top-{k} teacher needs k <= V = {v}") for m in methods]
            continue
        # the teacher side of this configuration, for every copy: the logits, or their top-k
        cfg_copies = [(s, teacher_for(cfg_name, t)) for s, t in copies]
        teacher_bytes = n * teacher_bytes_per_token(cfg_copies[0][1])
        traffic = traffic_of(teacher_bytes)
        for m in methods:
            row = dict(base, config=cfg_name, method=m, teacher=form, n_copies=n_copies, grad_bytes=grad_bytes,
                       teacher_bytes_per_token=teacher_bytes // n, traffic_bytes=traffic)
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
                                              build_method(m, cfg, args.compile_dynamic, form["form"]))
                else:
                    fn = build_method(m, cfg, args.compile_dynamic, form["form"])
                s, t = cfg_copies[0]
                # first repetition: the loss value (and, for compile, the compile time)
                tc = time.perf_counter()
                loss = fn(s, t)
                row["first_call_s"] = time.perf_counter() - tc
                row["loss"] = float(loss.detach().double())
                loss = None
                tracker = "profiler" if m == "torch.compile" else "dispatch"
                row["memory"] = measure_memory(fn, *cfg_copies[0], device, tracker)
                row.update(timer.time_all(fn, cfg_copies))
                row["status"] = "ok"
            except Exception as exc:
                failure = ("OOM" if is_oom(exc) else "error",
                           f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
            # (outside the except clause: the traceback, and the tensors its frames hold, are gone)
            loss = fn = None
            if failure:
                for st, _ in cfg_copies:
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
                row["memory"]["peak_step_bytes"] / report.MiB, row["loss"]))
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
        del cfg_copies
    del copies
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------
def quantile(text: str) -> Optional[Quantile]:
    """A threshold flag's value: Quantile(float(text)), or None for "none"."""
    return None if text.lower() == "none" else Quantile(float(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small CPU set: N in {256, 1024}, V=32000, fp32 and bf16, every configuration "
                        "(a few minutes on 2 cores, most of it torch.compile compiling)")
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp32, fp16 (default bf16; --quick: fp32,bf16)")
    p.add_argument("--N", default=None, help="comma list of token counts (overrides the set)")
    p.add_argument("--V", default=None, help="comma list of vocabulary sizes (overrides the set)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list of methods to run")
    p.add_argument("--configs", default=",".join(CONFIG_NAMES),
                   help="comma list of loss configurations: topd, opd, topk<K> (opd's loss against a top-K teacher)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/bench_kl_<device>_<dtypes>[_quick].json)")
    p.add_argument("--plot", nargs="?", const="", default=None,
                   help="also write a PNG (default: next to the JSON, .png)")
    p.add_argument("--no-table-file", action="store_true", help="do not write the .md table next to the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch.set_num_threads(THREADS) (0: torch's default; the header records it). On a "
                        "loaded machine 1 avoids threads waiting on each other")
    knobs = p.add_argument_group("the topd configuration", "LossConfig knobs; each flag sets the field it names")
    knobs.add_argument("--window", type=int, default=TOPD["window"])
    knobs.add_argument("--gamma", type=float, default=TOPD["gamma"])
    knobs.add_argument("--loss-q", dest="loss_threshold", type=quantile, default=TOPD["loss_threshold"],
                       metavar="Q", help="loss_threshold = Quantile(Q); none: no threshold (default 0.8)")
    knobs.add_argument("--div-q", dest="div_threshold", type=quantile, default=TOPD["div_threshold"],
                       metavar="Q", help="div_threshold = Quantile(Q); none: no threshold (default 0.5)")
    knobs.add_argument("--suppress-weight", type=float, default=TOPD["suppress_weight"])
    knobs.add_argument("--guidance-weight", type=float, default=TOPD["guidance_weight"])
    timing = p.add_argument_group("timing")
    timing.add_argument("--warmup-ms", type=int, default=25, help="CUDA do_bench warm-up")
    timing.add_argument("--rep-ms", type=int, default=100, help="CUDA do_bench repetition time")
    timing.add_argument("--cuda-event-reps", type=int, default=20)
    timing.add_argument("--cpu-warmup", type=int, default=1)
    timing.add_argument("--cpu-min-reps", type=int, default=3)
    timing.add_argument("--cpu-max-reps", type=int, default=20)
    timing.add_argument("--cpu-budget-s", type=float, default=1.0, help="CPU: time per figure beyond the minimum reps")
    timing.add_argument("--rotate-bytes", type=float, default=float(1 << 30),
                        help="rotate among enough input copies to cover this many bytes (2..--max-copies copies)")
    timing.add_argument("--max-copies", type=int, default=8)
    timing.add_argument("--copy-bytes", type=float, default=None,
                        help="size of the copy-bandwidth measurement (default 1 GiB on CUDA, 256 MiB on the CPU)")
    timing.add_argument("--compile-dynamic", default="auto", choices=["auto", "true", "false"],
                        help="torch.compile(dynamic=...): auto = False on CUDA, True with --quick on the CPU")
    return p.parse_args(argv)


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
    try:
        cfgs = loss_configs([c for c in args.configs.split(",") if c],
                            **{knob: getattr(args, knob) for knob in TOPD})
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"the configurations: {exc}")
    if args.compile_dynamic == "auto":
        args.compile_dynamic = True if (args.quick and device.type == "cpu") else False
    else:
        args.compile_dynamic = args.compile_dynamic == "true"

    if args.threads < 0:
        raise SystemExit(f"--threads: must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (
        header.RESULTS / f"bench_kl_{device.type}_{'-'.join(dtypes)}{'_quick' if args.quick else ''}.json")

    t_start = time.perf_counter()
    env = header.environment(device)
    avail = method_availability(device)
    for m in methods:
        if not avail[m]["available"]:
            log(f"{m}: n/a: {avail[m]['reason']}")
    bw = copy_bandwidth(device, args.copy_bytes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    bw = {key: bw[key] for key in ("bytes", "median_ms", "bytes_per_s")}
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
        "settings": config_json(vars(args)),
        "shapes": {"N": list(ns), "V": list(vs), "dtypes": dtypes},
        "configs": {c: config_json(cfg) for c, cfg in cfgs.items()},
        "teachers": {c: teacher_form(c) for c in cfgs},
        "methods": {m: avail[m] for m in methods},
        "copy_bandwidth": bw,
        "results": results,
        "loss_check": {"max_abs_diff": max(diffs) if diffs else 0.0, "compared": len(diffs),
                       "reference": "eager (same config, shape, dtype; the first method that ran where eager "
                                    "did not: row's loss_reference), first repetition"},
        "wall_s": time.perf_counter() - t_start,
    }
    header.finish(env)
    table = report.markdown(result)
    print(table)
    log(f"wrote {header.write_json(out, result)}")
    if not args.no_table_file:
        out.with_suffix(".md").write_text(table)
        log(f"wrote {out.with_suffix('.md')}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        msg = report.plot(result, png, ALL_METHODS)
        log(msg if msg else f"wrote {png}")
    log(f"done in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
