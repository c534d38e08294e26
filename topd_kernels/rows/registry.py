"""The one registry of row backends: what each `backend=` name runs, and whether it can run here.

`resolve` (the loss), `topd_kernels.info` and the benchmarks all ask this module; nothing else decides
what can run where. A backend module is imported only when asked for (triton is a heavy import).

    "torch"        chunked PyTorch forward and backward (`torch_rows.py`); any device.
    "triton"       Triton forward and backward (`triton_rows.py`); CUDA tensors, or CPU tensors when the
                   kernels run in the Triton interpreter (TRITON_INTERPRET=1 set before import).
    "triton+cuda"  Triton forward (and mix), CUDA-extension backward (`cuda_rows.py`); CUDA tensors with the
                   extension built. On CPU tensors (interpreter) the extension runs the host build of
                   its CUDA arithmetic: slow, there to check that arithmetic.
    "auto"         the first of AUTO_ORDER[device type] that can run; any other device type: "torch".

Each backend provides ops for each teacher form (FORMS): "logits" (RowOps) and "topk" (TopKOps: the Triton
top-k kernels `triton_topk.py` for both Triton backends, the extension having no top-k backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .contract import RowOps

FORMS = ("logits", "topk")  # the teacher's forms; every backend has ops for each


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], dict]      # {form: its ops}; imports the backend's modules, raises when they cannot run here
    devices: Callable[[], tuple]  # device types it runs on, once loaded


# Plain import statements (not importlib): a compiler tracing the loss (torch.compile) follows them.
def _torch_ops() -> dict:
    from . import torch_rows

    return {"logits": torch_rows.OPS, "topk": torch_rows.TOPK_OPS}


def _triton_ops() -> dict:
    from . import triton_rows, triton_topk

    return {"logits": triton_rows.OPS, "topk": triton_topk.OPS}


def _triton_cuda_ops() -> dict:
    from . import cuda_rows, triton_rows, triton_topk

    if cuda_rows.UNAVAILABLE:
        raise ImportError(cuda_rows.UNAVAILABLE)
    return {"logits": RowOps("triton+cuda", triton_rows.OPS.forward_op, cuda_rows.OPS.backward_op,
                             triton_rows.OPS.mix_op),
            "topk": triton_topk.OPS}


def _triton_devices() -> tuple:
    from . import triton_rows

    return ("cuda", "cpu") if triton_rows.INTERPRETED else ("cuda",)


BACKENDS = {
    "torch": Backend("torch", _torch_ops, lambda: ("cuda", "cpu")),
    "triton": Backend("triton", _triton_ops, _triton_devices),
    "triton+cuda": Backend("triton+cuda", _triton_cuda_ops, _triton_devices),
}
AUTO_ORDER = {"cuda": ("triton+cuda", "triton", "torch")}


def unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can run on `device`, else the reason it cannot."""
    backend = BACKENDS[name]
    try:
        backend.load()
    except Exception as exc:  # ImportError (triton missing, extension not built), or triton failing to start
        return f"{type(exc).__name__}: {exc}"
    devices = backend.devices()
    if device.type not in devices:
        hint = " (CPU tensors need TRITON_INTERPRET=1 set before import)" if name != "torch" else ""
        return f"runs on {' / '.join(devices)} tensors, not {device.type}{hint}"
    return None


def availability(device: torch.device) -> dict:
    """{backend name: None if it can run on `device`, else why not}, for every registered backend."""
    return {name: unavailable(name, device) for name in BACKENDS}


def auto_backend(device: torch.device) -> str:
    """The name "auto" stands for on `device`."""
    for name in AUTO_ORDER.get(device.type, ()):
        if unavailable(name, device) is None:
            return name
    return "torch"


def resolve(name: str, device: torch.device, form: str = "logits"):
    """The row ops of `backend=name` for tensors on `device` and a teacher of `form` (FORMS), or a ValueError
    naming `backend`.

    Never falls back silently: a named backend that cannot run on `device` is an error.
    """
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {('auto', *BACKENDS)}")
    if name == "auto":
        name = auto_backend(device)
    why = unavailable(name, device)
    if why:
        raise ValueError(f"backend: {name!r} is not available for these tensors: {why}")
    return BACKENDS[name].load()[form]
