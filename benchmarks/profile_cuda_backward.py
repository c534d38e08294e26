#!/usr/bin/env python
"""Bandwidth of the CUDA-extension row backward vs the Triton row backward, on a GPU.

    python benchmarks/profile_cuda_backward.py                      # N=8192, V=151936 and 128256, bf16
    python benchmarks/profile_cuda_backward.py --vocab 151936 --divergence jsd --teacher-grad

Times the backward of backend "triton+cuda" (the CUDA extension) and of backend "triton", as
`topd_kernels.rows.registry` resolves them, on one packed (1, N, V) row call, with triton.testing.do_bench
(median, with 20% / 80% quantiles), and a device-to-device copy of half the backward's bytes as the
yardstick (read + write counted). Bytes counted: `harness.profiling.row_traffic`'s backward (both logits
read + the gradient(s) written, and the O(N) statistics). Writes JSON to benchmarks/results/. Needs a
CUDA device and the built extension; exits with status 2 and a message otherwise.
"""
from __future__ import annotations

import argparse

import torch

from harness import header  # benchmarks/, this script's folder, is on sys.path
from harness.configs import DTYPES
from harness.profiling import bandwidth, gpu_row_ops, row_inputs, row_traffic
from harness.timing import bench_gpu, copy_bandwidth
from topd_kernels.config import DIVERGENCES, DIVERGENCE_CODES
from topd_kernels.rows.contract import make_row_call

SCRIPT = "profile_cuda_backward.py"


def _bench(fn) -> dict:
    return bench_gpu(fn, warmup_ms=25, rep_ms=200)


def compare(cuda_ops, triton_ops, rows: tuple, divergence: str, teacher_grad: bool, bench, copy) -> dict:
    """One vocabulary: the backward of `cuda_ops` and of `triton_ops` timed by `bench` on rows = (student,
    teacher, mask, coef), the largest gradient difference between them, and the copy yardstick from
    copy(nbytes) (a copy_bandwidth result)."""
    student, teacher, mask, coef = rows
    n, vocab = mask.numel(), student.shape[-1]
    call = make_row_call(student, teacher, vocab, 1.0, DIVERGENCE_CODES[divergence], 0.5)
    stats = triton_ops.forward(student, teacher, mask, call)
    nbytes = row_traffic(n, vocab, student.element_size(), teacher_grad)["backward"]
    yardstick = copy(nbytes // 2)
    entry = {"rows": n, "vocab": vocab, "dtype": str(student.dtype).replace("torch.", ""), "divergence": divergence,
             "teacher_grad": teacher_grad, "bytes": nbytes,
             "copy": dict(yardstick, GBps=yardstick["bytes_per_s"] / 1e9)}
    grads = {}
    for key, ops in (("cuda_extension", cuda_ops), ("triton", triton_ops)):
        entry[key] = bandwidth(bench(lambda: ops.backward(student, teacher, stats, coef, call, teacher_grad)),
                               nbytes, yardstick["bytes_per_s"])
        grads[key] = ops.backward(student, teacher, stats, coef, call, teacher_grad)[0]
    entry["max_abs_diff_vs_triton"] = float((grads["cuda_extension"].float() - grads["triton"].float()).abs().max())
    entry["cuda_speedup_vs_triton"] = entry["triton"]["median_ms"] / entry["cuda_extension"]["median_ms"]
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 128256])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--divergence", choices=DIVERGENCES, default="reverse_kl")
    ap.add_argument("--teacher-grad", action="store_true", help="also write the teacher gradient")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/cuda_backward_<gpu>_<time>.json)")
    args = ap.parse_args(argv)

    ops = gpu_row_ops(SCRIPT, ["triton+cuda", "triton"])
    from topd_kernels.rows import cuda_rows

    device = torch.device("cuda")
    env = header.environment(device)
    results = []
    for vocab in args.vocab:
        rows = row_inputs(args.rows, vocab, DTYPES[args.dtype], device)
        entry = compare(ops["triton+cuda"], ops["triton"], rows, args.divergence, args.teacher_grad, _bench,
                        lambda nbytes: copy_bandwidth(device, nbytes, warmup_ms=25, rep_ms=200))
        del rows
        torch.cuda.empty_cache()
        results.append(entry)
        cuda, tri = entry["cuda_extension"], entry["triton"]
        print(f"N={args.rows} V={vocab} {args.dtype} {args.divergence}{' +grad_t' if args.teacher_grad else ''}: "
              f"cuda {cuda['median_ms']:.3f} ms ({cuda['achieved_GBps']:.0f} GB/s, "
              f"{100 * cuda['fraction_of_copy_bw']:.0f}% of copy {entry['copy']['GBps']:.0f} GB/s); "
              f"triton {tri['median_ms']:.3f} ms ({tri['achieved_GBps']:.0f} GB/s)")

    report = {"benchmark": "profile_cuda_backward", "env": env, "extension": cuda_rows.extension_status()[1],
              "results": results}
    header.finish(env)
    print(f"wrote {header.write_json(args.out or header.result_path('cuda_backward', env), report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
