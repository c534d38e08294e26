"""Profile the Triton row kernels on a GPU: time, achieved bandwidth vs minimal traffic and vs a device copy.

    python benchmarks/profile_rows.py                       # N=8192, V=151936, bf16, every divergence
    python benchmarks/profile_rows.py --divergence jsd --teacher-grad --torch

For each divergence it times `triton_rows.row_forward` and `triton_rows.row_backward` with
`triton.testing.do_bench` (median, L2 flushed between runs) and reports achieved bytes/s against the
minimal traffic of the operation:
    forward:  read both logits rows once                      N * V * (bytes_s + bytes_t)   (+ 16 N stats)
    backward: read both rows, write the gradient(s)           N * V * (bytes_s + bytes_t + bytes_s [+ bytes_t])
and against the copy bandwidth of the same device measured in the same run (a large tensor copy, read +
write counted). JSD's forward reads the rows twice by design (see triton_rows.py), so its fraction of the
minimal-traffic bandwidth is at most about one half of a single-pass kernel's. Results go to
benchmarks/results/profile_rows_<device>_<time>.json.

Needs a CUDA device and the compiled (not interpreted) kernels: it stops with an error otherwise, and never
reports numbers it did not measure.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def _fail(message: str) -> None:
    print(f"profile_rows.py: {message}", file=sys.stderr)
    sys.exit(2)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        _fail("TRITON_INTERPRET=1 is set: the interpreter's timings mean nothing. Unset it.")
    import torch

    if not torch.cuda.is_available():
        _fail("no CUDA device (torch.cuda.is_available() is False): nothing measured, no results written.")
    import triton

    from gpu_timing import bench_gpu, copy_bandwidth_gpu  # benchmarks/ is this script's folder

    try:
        from topd_kernels import torch_rows, triton_rows
    except ImportError:  # run from a checkout that is not pip-installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from topd_kernels import torch_rows, triton_rows

    device = torch.device("cuda")
    dtype = getattr(torch, DTYPES[args.dtype])
    n, V = args.n, args.vocab
    elt = torch.empty((), dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(device)

    def bench(fn):
        return bench_gpu(fn, warmup_ms=args.warmup, rep_ms=args.rep)

    # Copy bandwidth of this device, this run: read + write of a large buffer.
    copy = copy_bandwidth_gpu(int(args.copy_gib * 2 ** 30), warmup_ms=args.warmup, rep_ms=args.rep)
    copy_bytes, copy_bw = 2 * copy.pop("bytes"), copy.pop("bytes_per_s")
    torch.cuda.empty_cache()

    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, V, device=device, dtype=torch.float32, generator=gen).mul_(3.0).to(dtype)
    teacher = torch.randn(n, V, device=device, dtype=torch.float32, generator=gen).mul_(1.8)
    teacher.add_(student.float(), alpha=0.8)
    teacher = teacher.to(dtype)
    coef = torch.randn(n, device=device, generator=gen)
    grad_s = torch.empty_like(student)
    grad_t = torch.empty_like(teacher) if args.teacher_grad else None

    fwd_bytes = n * V * 2 * elt + 4 * n * 4
    bwd_bytes = n * V * (2 * elt + elt * (2 if args.teacher_grad else 1)) + 4 * n * 4 + n * 4

    def row(timing, min_bytes):
        bw = min_bytes / (timing["median_ms"] * 1e-3)
        return dict(timing, min_bytes=min_bytes, achieved_GBps=bw / 1e9, fraction_of_copy_bw=bw / copy_bw)

    divergences = DIVERGENCES if args.divergence == "all" else (args.divergence,)
    results = []
    for divergence in divergences:
        call = (V, args.temperature, divergence, args.beta)
        stats = triton_rows.row_forward(student, teacher, *call)
        torch.cuda.synchronize()
        if not torch.isfinite(stats).all():
            _fail(f"{divergence}: row_forward produced non-finite stats on finite inputs; not timing it.")
        entry = dict(divergence=divergence)
        entry["triton_forward"] = row(bench(lambda: triton_rows.row_forward(student, teacher, *call)),
                                      fwd_bytes)
        entry["triton_backward"] = row(bench(lambda: triton_rows.row_backward(
            student, teacher, stats, coef, *call, grad_s, grad_t)), bwd_bytes)
        if args.torch:
            entry["torch_forward"] = row(bench(lambda: torch_rows.row_forward(student, teacher, *call)),
                                         fwd_bytes)
            entry["torch_backward"] = row(bench(lambda: torch_rows.row_backward(
                student, teacher, stats, coef, *call, grad_s, grad_t)), bwd_bytes)
        results.append(entry)
        for key in ("triton_forward", "triton_backward", "torch_forward", "torch_backward"):
            if key in entry:
                r = entry[key]
                print(f"{divergence:>10} {key:<16} {r['median_ms']:8.3f} ms  {r['achieved_GBps']:8.1f} GB/s  "
                      f"{100 * r['fraction_of_copy_bw']:5.1f}% of copy")

    interpreted = triton_rows._is_interpreted(triton_rows._row_forward_kernel)
    report = dict(
        script="benchmarks/profile_rows.py",
        time_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=props.name, device_capability=list(torch.cuda.get_device_capability(device)),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        shape=dict(n=n, vocab=V, dtype=args.dtype, temperature=args.temperature, beta=args.beta,
                   teacher_grad=args.teacher_grad),
        launch=dict(
            autotune=os.environ.get("TOPD_TRITON_AUTOTUNE", "0") == "1",
            block_override=os.environ.get("TOPD_TRITON_BLOCK_V"),
            forward=triton_rows._launch_config(V, interpreted, backward=False),
            backward=triton_rows._launch_config(V, interpreted, backward=True),
        ),
        copy=dict(copy, bytes=copy_bytes, GBps=copy_bw / 1e9),
        traffic_model=dict(forward="N*V*(bytes_s+bytes_t) + 16N",
                           backward="N*V*(bytes_s+bytes_t+bytes_s[+bytes_t]) + 20N"),
        results=results,
    )
    out = args.out
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        tag = re.sub(r"[^A-Za-z0-9]+", "-", props.name).strip("-").lower()
        out = Path(__file__).resolve().parent / "results" / f"profile_rows_{tag}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
