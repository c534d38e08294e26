"""Bandwidth of the CUDA-extension row backward vs the Triton row backward, on a GPU.

    python benchmarks/profile_cuda_backward.py                      # N=8192, V=151936 and 128256, bf16
    python benchmarks/profile_cuda_backward.py --vocab 151936 --divergence jsd --teacher-grad

Times `cuda_rows.row_backward` and `triton_rows.row_backward` with triton.testing.do_bench (median, with
20% / 80% quantiles), and a device-to-device copy of the same size as the yardstick. Bytes counted: both
logits read + the gradient(s) written (N * V * (size_s + size_t + size_s [+ size_t])); the copy counts
read + write. Writes JSON to benchmarks/results/. Needs a CUDA device and the built extension; exits
with status 2 and a message otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch

from gpu_timing import bench_gpu, copy_bandwidth_gpu  # benchmarks/ is this script's folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fail(msg: str) -> None:
    print(f"profile_cuda_backward: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _bench(fn) -> dict:
    return bench_gpu(fn, warmup_ms=25, rep_ms=200)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 128256])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--divergence", choices=["reverse_kl", "forward_kl", "jsd"], default="reverse_kl")
    ap.add_argument("--teacher-grad", action="store_true", help="also write the teacher gradient")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cuda_backward_<gpu>_<time>.json)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        _fail("needs a CUDA device (torch.cuda.is_available() is False); nothing measured")
    from topd_kernels import cuda_rows

    built, why = cuda_rows.extension_status()
    if not built:
        _fail(f"the CUDA extension is not built: {why}")
    try:
        import triton
    except Exception as exc:  # noqa: BLE001
        _fail(f"needs triton for do_bench: {exc}")
    try:
        from topd_kernels import triton_rows
        triton_error = None
    except Exception as exc:  # noqa: BLE001
        triton_rows, triton_error = None, f"{type(exc).__name__}: {exc}"
    from topd_kernels import torch_rows

    dtype = DTYPES[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    n, div, beta, tau = args.rows, args.divergence, 0.5, 1.0
    props = torch.cuda.get_device_properties(0)
    results = []
    for V in args.vocab:
        torch.manual_seed(0)
        s = (torch.randn(n, V, device="cuda", dtype=dtype) * 3)
        t = (0.6 * torch.randn(n, V, device="cuda", dtype=dtype) * 3 + 0.8 * s)
        coef = torch.full((n,), 1.0 / n, device="cuda")
        forward = triton_rows.row_forward if triton_rows is not None else torch_rows.row_forward
        stats = forward(s, t, V, tau, div, beta)
        gs = torch.empty_like(s)
        gt = torch.empty_like(t) if args.teacher_grad else None
        n_out = 2 if args.teacher_grad else 1
        bytes_moved = n * V * esize * (2 + n_out)

        def ext():
            cuda_rows.row_backward(s, t, stats, coef, V, tau, div, beta, gs, gt)

        entry = {"rows": n, "vocab": V, "dtype": args.dtype, "divergence": div, "teacher_grad": args.teacher_grad,
                 "bytes": bytes_moved}
        r = _bench(ext)
        r["GBps"] = bytes_moved / (r["median_ms"] * 1e-3) / 1e9
        entry["cuda_extension"] = r
        if triton_rows is not None:
            ts = torch.empty_like(s)
            tt = torch.empty_like(t) if args.teacher_grad else None

            def tri():
                triton_rows.row_backward(s, t, stats, coef, V, tau, div, beta, ts, tt)

            r = _bench(tri)
            r["GBps"] = bytes_moved / (r["median_ms"] * 1e-3) / 1e9
            entry["triton"] = r
            ext(), tri()
            torch.cuda.synchronize()
            entry["max_abs_diff_vs_triton"] = float((gs.float() - ts.float()).abs().max())
            entry["cuda_speedup_vs_triton"] = entry["triton"]["median_ms"] / entry["cuda_extension"]["median_ms"]
            del ts, tt
        else:
            entry["triton"] = {"error": triton_error}
        # yardstick: a plain copy of the same number of bytes (read + write counted)
        r = copy_bandwidth_gpu(bytes_moved // 2, warmup_ms=25, rep_ms=200)
        r["GBps"] = r.pop("bytes_per_s") / 1e9
        entry["copy"] = r
        entry["cuda_fraction_of_copy_bw"] = entry["cuda_extension"]["GBps"] / r["GBps"]
        del s, t, gs, gt, stats
        torch.cuda.empty_cache()
        results.append(entry)
        tri_txt = (f"triton {entry['triton']['median_ms']:.3f} ms ({entry['triton']['GBps']:.0f} GB/s)"
                   if "median_ms" in entry["triton"] else f"triton: {triton_error}")
        print(f"N={n} V={V} {args.dtype} {div}{' +grad_t' if args.teacher_grad else ''}: "
              f"cuda {entry['cuda_extension']['median_ms']:.3f} ms ({entry['cuda_extension']['GBps']:.0f} GB/s, "
              f"{100 * entry['cuda_fraction_of_copy_bw']:.0f}% of copy {entry['copy']['GBps']:.0f} GB/s); {tri_txt}")

    report = {
        "benchmark": "profile_cuda_backward",
        "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name, "sm": f"{props.major}{props.minor}", "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda_runtime_torch": torch.version.cuda,
        "extension": why, "python": platform.python_version(), "results": results,
    }
    out = args.out
    if out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        gpu = "".join(c if c.isalnum() else "_" for c in props.name).strip("_")
        out = os.path.join(here, "results", f"cuda_backward_{gpu}_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
