#!/usr/bin/env python
"""Issue 2's measurement: extra memory of one forward+backward of the loss on the CPU.

For N=4096 tokens, V=32000, float32 logits (one N x V float32 tensor = 500 MiB):
    fused_window_kl(..., backend="torch") with the default arguments,
    fused_window_kl(..., backend="torch") with window 8 + Quantile thresholds + guidance (TOPD),
    plain PyTorch eager (benchmarks/bench_kl.py's baseline) for the same two losses,
report the peak memory allocated during forward+backward beyond the inputs and the returned gradient
(the gradient of the student logits, which any implementation must produce), as a % of one N x V float32
tensor. Target for topd_kernels: <= 25%. Plain eager is expected near 500%.

Measured with benchmarks/memtrack.py: StorageTracker (a TorchDispatchMode counting live tensor
storages) and, as a cross-check, ProfilerTracker (the CPU allocator's events from torch.profiler).

    python benchmarks/memory_cpu.py                 # writes benchmarks/results/memory_cpu.json
    python benchmarks/memory_cpu.py --N 1024 --out /tmp/m.json --trackers dispatch
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import topd_kernels  # noqa: E402
from bench_kl import environment, eager_window_kl, make_configs, make_inputs, parse_args as bench_args, topd_kwargs  # noqa: E402
from memtrack import measure_peak  # noqa: E402

TARGET_PCT = 25.0


def cases(topd_cfg: dict) -> list:
    """(name, kind, loss function) for every measured case."""
    kw = topd_kwargs(topd_cfg)
    return [
        ("topd[torch] default args", "topd",
         lambda s, t: topd_kernels.fused_window_kl(s, t, backend="torch")),
        ("topd[torch] window 8 + Quantile thresholds + guidance", "topd",
         lambda s, t: topd_kernels.fused_window_kl(s, t, backend="torch", **kw)),
        # eager equivalents: defaults are window 8 with no thresholds and no guidance, i.e. every weight is 1
        ("eager, same loss as default args", "eager",
         lambda s, t: eager_window_kl(s, t, window=1)),
        ("eager, window 8 + Quantile thresholds + guidance", "eager",
         lambda s, t: eager_window_kl(s, t, **topd_cfg)),
    ]


def measure(fn, s, t, tracker: str) -> dict:
    s.grad = None
    gc.collect()

    def step():
        fn(s, t).backward()

    m = measure_peak(step, torch.device("cpu"), tracker)
    grad_bytes = s.grad.numel() * s.grad.element_size() if s.grad is not None else 0
    loss = float(fn(s, t).detach())
    s.grad = None
    return {"peak_bytes": m["peak_bytes"], "kept_bytes": m["live_bytes"], "grad_bytes": grad_bytes,
            "extra_bytes": m["peak_bytes"] - grad_bytes, "seconds": m["seconds"], "loss": loss}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--trackers", default="dispatch,profiler",
                   help="comma list: dispatch (StorageTracker), profiler (ProfilerTracker)")
    p.add_argument("--out", default=str(HERE / "results" / "memory_cpu.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    trackers = [x for x in args.trackers.split(",") if x]
    topd_cfg = make_configs(bench_args([]))["topd"]

    device = torch.device("cpu")
    s, t = make_inputs(args.N, args.V, torch.float32, device, args.seed)
    s.requires_grad_(True)
    unit = args.N * args.V * 4  # one N x V float32 tensor
    rows = []
    t0 = time.perf_counter()
    for name, kind, fn in cases(topd_cfg):
        row = {"case": name, "kind": kind}
        for tr in trackers:
            print(f"[memory_cpu] {name}: {tr} ...", file=sys.stderr, flush=True)
            m = measure(fn, s, t, tr)
            m["extra_pct"] = 100.0 * m["extra_bytes"] / unit
            m["peak_pct_incl_grad"] = 100.0 * m["peak_bytes"] / unit
            row[tr] = m
        main_m = row[trackers[0]]
        row["extra_pct"] = main_m["extra_pct"]
        if kind == "topd":
            row["target_pct"] = TARGET_PCT
            row["meets_target"] = bool(max(row[tr]["extra_pct"] for tr in trackers) <= TARGET_PCT)
        rows.append(row)

    result = {
        "schema": "topd_kernels.memory_cpu/1",
        "env": environment(device),
        "N": args.N, "V": args.V, "dtype": "fp32",
        "unit_bytes": unit,
        "unit": "one N x V float32 tensor",
        "measure": "peak bytes allocated during forward+backward above the inputs, minus the student "
                   "gradient (kept after the call); extra_pct = that / unit_bytes * 100",
        "trackers": trackers,
        "topd_config": topd_cfg,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    lines = [f"CPU memory, N={args.N} V={args.V} fp32: one N x V fp32 tensor = {unit / 2**20:.0f} MiB; "
             f"extra = peak during fwd+bwd beyond the inputs and the returned gradient",
             "",
             "| case | " + " | ".join(f"extra % ({tr})" for tr in trackers)
             + " | extra MiB | peak incl. gradient | target | loss |",
             "|---|" + "---|" * len(trackers) + "---|---|---|---|"]
    for r in rows:
        m = r[trackers[0]]
        target = "" if "target_pct" not in r else (
            f"<= {r['target_pct']:.0f}%: {'yes' if r['meets_target'] else 'NO'}")
        lines.append(f"| {r['case']} | " + " | ".join(f"{r[tr]['extra_pct']:.1f}%" for tr in trackers)
                     + f" | {m['extra_bytes'] / 2**20:.1f} | {m['peak_pct_incl_grad']:.1f}% | {target} "
                     f"| {m['loss']:.6f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    result["table"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[memory_cpu] wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
