"""Peak memory of a region: what a loss allocates above its inputs (`measure_peak`, `measure_memory`).

CPU tensors have no allocator statistics like `torch.cuda.max_memory_allocated`, and sampling the
process RSS is unreliable (the allocator keeps freed pages, other threads allocate, pages are touched
lazily). So on the CPU we track tensor storages ourselves:

`StorageTracker` is a `TorchDispatchMode`: every aten op run while it is active passes through it. Each
output tensor whose storage is new (not the storage of one of the op's inputs, i.e. not a view or an
in-place result, and not seen before) is counted as allocated, with its `nbytes`; a `weakref.finalize` on
the storage object (PyTorch keeps one Python object per live storage) subtracts it when the storage is
freed. `peak_bytes` is the largest total of live counted storages seen, so memory that existed before
the region (the inputs) is never counted, and neither is anything freed before the peak.

It sees everything that goes through the dispatcher: eager ops, autograd's backward ops (on the CPU the
autograd engine runs on the calling thread, so the mode is active there too), gradient accumulation,
and tensors that custom kernels allocate with `torch.empty`. A custom op (the row backends are
`torch.library` ops) reaches a dispatch mode as one call whose body would run with the mode switched
off; the tracker runs that body with itself active, so the op's temporaries count too. It does not see
memory allocated by code
that bypasses the dispatcher — notably the kernels that `torch.compile` (Inductor) generates, which
allocate their buffers directly. For those use `ProfilerTracker`, which reads the CPU allocator's
allocation/free events from `torch.profiler` (`profile_memory=True`) and replays them in order.

On CUDA, `cuda_peak` uses the caching allocator's own counters.
"""
from __future__ import annotations

import functools
import gc
import json
import operator
import os
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# the dispatch keys below a dispatch mode's: where StorageTracker sends the body of a custom op
_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


def _tensors(obj) -> list:
    return [leaf for leaf in tree_leaves(obj) if isinstance(leaf, torch.Tensor)]


def _storages(obj) -> list:
    out = []
    for tensor in _tensors(obj):
        try:
            out.append(tensor.untyped_storage())
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, wrapper)
            pass
    return out


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages allocated while active (see the module docstring).

    Usage::

        with StorageTracker() as tr:
            loss = f(x); loss.backward()
        tr.peak_bytes   # peak of storages created inside the block and alive at the same time
        tr.live_bytes   # those still alive now (e.g. x.grad)

    `device` (default: every device except meta) restricts what is counted.
    """

    def __init__(self, device: Optional[str] = None):
        super().__init__()
        self.device = device
        self.live_bytes = 0
        self.peak_bytes = 0
        self.n_allocs = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> counted bytes, for live storages

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _release(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)

    def _count(self, st) -> None:
        if st.device.type == "meta" or (self.device is not None and st.device.type != self.device):
            return
        key = id(st)
        nbytes = st.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._sizes[key] = nbytes
            self.n_allocs += 1
            # The finalizer holds no reference to the storage, only its key.
            weakref.finalize(st, self._release, key)
        elif old != nbytes:  # resize_ of a storage we track
            self._sizes[key] = nbytes
        else:
            return
        self.live_bytes += nbytes - (old or 0)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("aten", "prim", "prims"):
            out = func(*args, **kwargs)
        else:  # a custom op: run its body below this mode's dispatch key, with this mode active
            keys = functools.reduce(operator.or_, map(torch._C._dispatch_keys, _tensors((args, kwargs))))
            with self:
                out = func.redispatch(keys & _BELOW_PYTHON, *args, **kwargs)
        inputs = {id(s) for s in _storages((args, kwargs))}
        for st in _storages(out):
            key = id(st)
            if key in inputs and key not in self._sizes:
                continue  # a view of / in-place result on a storage made outside the region
            self._count(st)
        return out


@dataclass
class ProfilerTracker:
    """Peak bytes allocated (net of frees) in a region, replayed from `torch.profiler`'s memory events.

    Counts every allocation of the CPU allocator in the region, including those that bypass the
    dispatcher (Inductor-generated kernels). Slower than `StorageTracker`; use it where that one is
    blind. Usage: ``with ProfilerTracker() as tr: ...``, then `tr.peak_bytes`, `tr.live_bytes`.
    """

    device: str = "cpu"
    peak_bytes: int = 0
    live_bytes: int = 0
    n_allocs: int = 0
    _prof: object = field(default=None, repr=False)

    def __enter__(self) -> "ProfilerTracker":
        acts = [torch.profiler.ProfilerActivity.CPU]
        self._prof = torch.profiler.profile(activities=acts, profile_memory=True, record_shapes=False)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        # The allocator's records are the "[memory]" events: +bytes on allocation, -bytes on free, with
        # the block's address. They are exported only in the Chrome trace. A free is counted only when
        # its block was allocated inside the region (the profiler also reports frees of blocks it saw
        # allocated in an earlier profiling session).
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self._prof.export_chrome_trace(path)
            with open(path) as fh:
                trace = json.load(fh)
        finally:
            os.unlink(path)
        want = 0 if self.device == "cpu" else 1  # the trace's "Device Type": 0 CPU, 1 CUDA
        events = [e for e in trace.get("traceEvents", [])
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == want]
        events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
        live = peak = 0
        blocks: dict[int, int] = {}
        for e in events:
            nbytes, addr = int(e["args"]["Bytes"]), e["args"].get("Addr")
            if nbytes > 0:
                blocks[addr] = blocks.get(addr, 0) + nbytes
                live += nbytes
                self.n_allocs += 1
            elif addr in blocks:
                live -= blocks.pop(addr)
            peak = max(peak, live)
        self.peak_bytes, self.live_bytes = peak, live
        self._prof = None


@contextmanager
def cuda_peak(device=None) -> Iterator[dict]:
    """Peak CUDA bytes allocated above what was allocated on entry: ``with cuda_peak() as m: ...;
    m["peak_bytes"], m["live_bytes"]`` (filled on exit)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out: dict = {}
    try:
        yield out
    finally:
        torch.cuda.synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["live_bytes"] = torch.cuda.memory_allocated(device) - base


TRACKERS = {"dispatch": StorageTracker, "profiler": ProfilerTracker}


def measure_peak(fn: Callable[[], object], device: torch.device, tracker: str = "dispatch") -> dict:
    """Run `fn()` once and return {"peak_bytes", "live_bytes", "tracker", "seconds"}: peak bytes
    allocated during the call above what existed before it, and the bytes still alive after it (what
    `fn` kept: e.g. gradients written to `.grad`). The result of `fn` is dropped before `live_bytes` is
    read, so `fn` must store what it wants kept. `tracker` on the CPU: "dispatch" (StorageTracker) or
    "profiler" (ProfilerTracker); on CUDA the allocator's counters are used whatever it says."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        with cuda_peak(device) as m:
            res = fn()
            del res
        return {**m, "tracker": "cuda_allocator", "seconds": time.perf_counter() - t0}
    if tracker not in TRACKERS:
        raise ValueError(f"tracker: unknown tracker {tracker!r}; expected one of {tuple(TRACKERS)}")
    tr = TRACKERS[tracker](device=device.type)
    with tr:
        res = fn()
        del res
    return {"peak_bytes": tr.peak_bytes, "live_bytes": tr.live_bytes, "tracker": tracker,
            "seconds": time.perf_counter() - t0}


def measure_memory(fn: Callable, student: torch.Tensor, teacher: torch.Tensor, device: torch.device,
                   tracker: str = "dispatch") -> dict:
    """Peak bytes above the inputs of a loss fn(student, teacher), student a leaf that requires grad:
    of the forward with its graph kept (peak_fwd_bytes; saved_bytes: what the graph keeps), and of
    forward+backward (peak_step_bytes, the gradient included: it is written during the call;
    kept_after_step_bytes: what is alive after it, the gradient). student.grad is None on return."""
    student.grad = None
    keep = []
    f = measure_peak(lambda: keep.append(fn(student, teacher)), device, tracker)
    keep.clear()
    gc.collect()
    b = measure_peak(lambda: fn(student, teacher).backward(), device, tracker)
    student.grad = None
    return {"peak_fwd_bytes": int(f["peak_bytes"]), "saved_bytes": int(f["live_bytes"]),
            "peak_step_bytes": int(b["peak_bytes"]), "kept_after_step_bytes": int(b["live_bytes"]),
            "tracker": b["tracker"]}


def mem_available_bytes() -> Optional[int]:
    """The kernel's MemAvailable (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
