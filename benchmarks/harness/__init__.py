"""What the benchmark scripts share (`bench_kl.py`, `memory_cpu.py`, `profile_rows.py`,
`profile_cuda_backward.py`). Run as a script, each has benchmarks/ on sys.path, so this package imports
as `harness` (the tests put benchmarks/ there too).

    configs    the shapes, the named loss configurations (LossConfig keywords), the teacher's form in each
               (logits, or a top-k TopK), the inputs
    baselines  the loss as others compute it: eager PyTorch, torch.compile of it, Liger-Kernel, and the
               PyTorch top-k + tail loss of the distillation frameworks
    timing     CPU wall-clock and CUDA (do_bench / events) timing, the copy-bandwidth yardstick
    memtrack   peak-memory trackers (CPU: tensor storages or profiler events; CUDA: allocator counters)
    header     the environment every result file starts with, and writing the JSON
    report     the markdown table and the plot of a bench_kl result
    profiling  what the GPU row profilers share: the backends' row ops, inputs, traffic, bandwidth
"""
import sys
import time


def log(tag: str, msg: str) -> None:
    """One progress line on stderr: `[tag HH:MM:SS] msg`."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
