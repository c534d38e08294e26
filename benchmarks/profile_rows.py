#!/usr/bin/env python
"""Profile the Triton row kernels on a GPU: time, achieved bandwidth vs minimal traffic and vs a device copy.

    python benchmarks/profile_rows.py                       # N=8192, V=151936, bf16, every divergence
    python benchmarks/profile_rows.py --divergence jsd --teacher-grad --torch

For each divergence it times the row ops of backend "triton" (and "torch" with --torch), as
`topd_kernels.rows.registry` resolves them, on one packed (1, N, V) row call, with `triton.testing.do_bench`
(median, L2 flushed between runs), and reports achieved bytes/s against the minimal traffic of the call
(`harness.profiling.row_traffic`: forward reads both logits once, backward reads both and writes the
gradient(s)) and against the copy bandwidth of the same device measured in the same run (a large tensor
copy, read + write counted). JSD's forward reads the rows twice by design (see triton_rows.py), so its
fraction of the minimal-traffic bandwidth is at most about one half of a single-pass kernel's. Results go to
benchmarks/results/profile_rows_<device>_<time>.json.

Needs a CUDA device and the compiled (not interpreted) kernels: it stops with status 2 otherwise, and never
reports numbers it did not measure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from harness import header  # benchmarks/, this script's folder, is on sys.path
from harness.configs import DTYPES
from harness.profiling import bandwidth, gpu_row_ops, not_measured, row_inputs, row_traffic
from harness.timing import bench_gpu, copy_bandwidth
from topd_kernels.config import DIVERGENCES, DIVERGENCE_CODES
from topd_kernels.rows.contract import make_row_call

SCRIPT = "profile_rows.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="rows (token positions)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (both models)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype (both models)")
    parser.add_argument("--divergence", choices=DIVERGENCES + ("all",), default="all")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5, help="jsd beta")
    parser.add_argument("--teacher-grad", action="store_true", help="also write the teacher gradient")
    parser.add_argument("--torch", action="store_true", help="also time the torch row backend")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy used as bandwidth ceiling")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    return parser.parse_args(argv)


def profile(ops: dict, rows: tuple, divergences, args, bench, copy_bytes_per_s: float) -> list:
    """Per divergence: {"divergence", "<backend>_forward", "<backend>_backward"} for every {backend: RowOps}
    in `ops`, each a `bench` timing with its bandwidth; rows = (student, teacher, mask, coef) of a row call."""
    student, teacher, mask, coef = rows
    n, vocab = mask.numel(), student.shape[-1]
    traffic = row_traffic(n, vocab, student.element_size(), args.teacher_grad)
    results = []
    for divergence in divergences:
        call = make_row_call(student, teacher, vocab, args.temperature, DIVERGENCE_CODES[divergence], args.beta)
        entry = dict(divergence=divergence)
        for name, row_ops in ops.items():
            stats = row_ops.forward(student, teacher, mask, call)
            if not torch.isfinite(stats).all():
                not_measured(SCRIPT, f"{name} {divergence}: the forward gave non-finite statistics on finite inputs")
            entry[f"{name}_forward"] = bandwidth(
                bench(lambda: row_ops.forward(student, teacher, mask, call)), traffic["forward"], copy_bytes_per_s)
            entry[f"{name}_backward"] = bandwidth(
                bench(lambda: row_ops.backward(student, teacher, stats, coef, call, args.teacher_grad)),
                traffic["backward"], copy_bytes_per_s)
            for key in (f"{name}_forward", f"{name}_backward"):
                r = entry[key]
                print(f"{divergence:>10} {key:<16} {r['median_ms']:8.3f} ms  {r['achieved_GBps']:8.1f} GB/s  "
                      f"{100 * r['fraction_of_copy_bw']:5.1f}% of copy")
        results.append(entry)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = gpu_row_ops(SCRIPT, ["triton", "torch"] if args.torch else ["triton"])
    from topd_kernels.rows import triton_rows

    device = torch.device("cuda")
    env = header.environment(device)

    def bench(fn):
        return bench_gpu(fn, warmup_ms=args.warmup, rep_ms=args.rep)

    copy = copy_bandwidth(device, int(args.copy_gib * 2 ** 30), warmup_ms=args.warmup, rep_ms=args.rep)
    torch.cuda.empty_cache()
    rows = row_inputs(args.n, args.vocab, DTYPES[args.dtype], device)
    divergences = DIVERGENCES if args.divergence == "all" else (args.divergence,)
    results = profile(ops, rows, divergences, args, bench, copy["bytes_per_s"])
    report = dict(
        script=f"benchmarks/{SCRIPT}",
        env=env,
        shape=dict(n=args.n, vocab=args.vocab, dtype=args.dtype, temperature=args.temperature, beta=args.beta,
                   teacher_grad=args.teacher_grad),
        launch=dict(
            autotune=triton_rows._use_autotune(),
            block_override=triton_rows.BLOCK_V_OVERRIDE,
            forward=triton_rows._launch_config(args.vocab, backward=False),
            backward=triton_rows._launch_config(args.vocab, backward=True),
        ),
        copy=dict(copy, GBps=copy["bytes_per_s"] / 1e9),
        traffic_model=row_traffic.__doc__,
        results=results,
    )
    header.finish(env)
    out = header.write_json(args.out or header.result_path("profile_rows", env), report)
    print(f"copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
