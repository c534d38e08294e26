"""The loss's knobs, in one place: `LossConfig` (every keyword of `fused_window_kl` that is not a tensor),
`Quantile`, the divergence codes, and the statistics it returns.

`LossConfig(**knobs)` validates itself (SPEC "Bad input"): a ValueError / TypeError naming the argument.
The functional API, the module, the reference and the benchmarks all take their keywords from it;
`config_signature` writes them into a function's signature, so `help(fused_window_kl)` lists them.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

# The divergence selects code inside every kernel; these codes are the only table of them (the CUDA
# extension's enum is checked against it by a test).
DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
REVERSE_KL, FORWARD_KL, JSD = DIVERGENCE_CODES.values()
DIVERGENCES = tuple(DIVERGENCE_CODES)
# A top-k teacher's tail (SPEC "Top-k teacher"), likewise a code inside the kernels.
TAIL_CODES = {"bucket": 0, "renormalize": 1}
BUCKET, RENORMALIZE = TAIL_CODES.values()
REDUCTIONS = ("mean", "sum", "batchmean", "none")


@dataclass(frozen=True)
class Quantile:
    """A threshold given as the q-quantile (linear interpolation, as `torch.quantile`) of the thresholded
    quantity over the valid positions of the call; with a `torch.distributed` process group `group`, over the
    valid positions of this call on every rank of the group (every rank then uses the same threshold).

    The quantile is per call: gradient-accumulation micro-batches each take their own (a group makes ranks
    agree, not micro-batches)."""

    q: float
    group: object = None

    def __post_init__(self):
        if isinstance(self.q, bool) or not isinstance(self.q, (int, float)):
            raise TypeError(f"Quantile: q must be a number in [0, 1], got {type(self.q).__name__}")
        if not 0.0 <= float(self.q) <= 1.0:
            raise ValueError(f"Quantile: q must be in [0, 1], got {self.q}")
        if self.group is not None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("Quantile: group given while torch.distributed is not initialised")
            if not isinstance(self.group, dist.ProcessGroup):
                raise TypeError(f"Quantile: group must be a torch.distributed process group, got "
                                f"{type(self.group).__name__}")


Threshold = Union[None, float, Quantile]


class WindowKLStats(NamedTuple):
    """Per-token statistics, in the layout of the mask, detached; 0 / False at invalid positions."""

    kl: torch.Tensor            # d_t, float32
    window_score: torch.Tensor  # w_t, float32
    high_loss: torch.Tensor     # bool
    divergent: torch.Tensor     # bool
    weight: torch.Tensor        # c_t, float32
    entropy: torch.Tensor       # the student's entropy -sum_v p_s log p_s at temperature tau, float32


def _number(name: str, value, *, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def value_check(ok: torch.Tensor, message: str) -> None:
    """A check of tensor values (SPEC "Bad input"): a ValueError(message) when `ok` is False, read on the CPU; on
    an accelerator, or while compiling, a device-side assertion instead, so the hot path never synchronises."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def _num_items(value):
    """A positive number, or a 0-d tensor (its value is checked where it is used, on its device)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"num_items: expected a number or a 0-d real tensor, got {value.dtype} "
                            f"{tuple(value.shape)}")
        return value
    if _number("num_items", value) <= 0:
        raise ValueError(f"num_items: must be > 0, got {value}")
    return value


def _threshold(name: str, value) -> Threshold:
    if value is None or isinstance(value, Quantile):
        return value
    return float(_number(name, value))


@dataclass(frozen=True)
class LossConfig:
    """Every keyword of the loss that is not a tensor, with its default (semantics: docs/SPEC.md).

    divergence       "reverse_kl" | "forward_kl" | "jsd"
    beta             jsd's mixture weight of the teacher, in (0, 1)
    temperature      tau > 0: both models' logits are divided by it
    window           k >= 1: positions in the near-future window score
    gamma            discount in [0, 1] inside the window and the guidance spread
    loss_threshold   None, a float (nats) or Quantile(q): the test on d_t for "high-loss"
    div_threshold    None, a float (nats) or Quantile(q): the test on w_t for "divergent"
    suppress_weight  rho in [0, 1]: the weight of a high-loss position that is not divergent
    guidance_weight  lambda >= 0: extra weight spread forward from each divergent position
    reduction        "mean" | "sum" | "batchmean" | "none"
    num_items        divides "mean" / "batchmean" instead of the valid count (gradient accumulation): a
                     positive number or a 0-d tensor (read on the device: no host synchronisation)
    vocab_size       use only the first vocab_size logits of each row (both models)

    Constructing one validates it: a ValueError / TypeError naming the argument.
    """

    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    window: int = 8
    gamma: float = 0.9
    loss_threshold: Threshold = None
    div_threshold: Threshold = None
    suppress_weight: float = 0.0
    guidance_weight: float = 0.0
    reduction: str = "mean"
    num_items: Union[None, float, torch.Tensor] = None
    vocab_size: Optional[int] = None

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown divergence {self.divergence!r}; expected one of {DIVERGENCES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: unknown reduction {self.reduction!r}; expected one of {REDUCTIONS}")
        if _number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if _number("window", self.window, integer=True) < 1:
            raise ValueError(f"window: must be >= 1, got {self.window}")
        if not 0.0 <= _number("gamma", self.gamma) <= 1.0:
            raise ValueError(f"gamma: must be in [0, 1], got {self.gamma}")
        _number("beta", self.beta)
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta: must be in (0, 1) for jsd, got {self.beta}")
        if not 0.0 <= _number("suppress_weight", self.suppress_weight) <= 1.0:
            raise ValueError(f"suppress_weight: must be in [0, 1], got {self.suppress_weight}")
        if _number("guidance_weight", self.guidance_weight) < 0:
            raise ValueError(f"guidance_weight: must be >= 0, got {self.guidance_weight}")
        if self.num_items is not None:
            if self.reduction not in ("mean", "batchmean"):
                raise ValueError(f"num_items: only with reduction 'mean' or 'batchmean', not {self.reduction!r}")
            _num_items(self.num_items)
        if self.vocab_size is not None and _number("vocab_size", self.vocab_size, integer=True) < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        for name in ("loss_threshold", "div_threshold"):
            object.__setattr__(self, name, _threshold(name, getattr(self, name)))

    @property
    def divergence_code(self) -> int:
        return DIVERGENCE_CODES[self.divergence]


KNOBS = tuple(f.name for f in dataclasses.fields(LossConfig))


def split_config(kwargs: dict) -> tuple[LossConfig, dict]:
    """(LossConfig of the knobs in kwargs, the other keywords)."""
    knobs = {k: v for k, v in kwargs.items() if k in KNOBS}
    return LossConfig(**knobs), {k: v for k, v in kwargs.items() if k not in KNOBS}


def config_signature(fn):
    """Decorator: replace `fn`'s `**config` by the LossConfig knobs (keyword-only, with their defaults) in
    its visible signature, so that help() and IDEs show them; the knobs are still passed as **config."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    knobs = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
             for f in dataclasses.fields(LossConfig)]
    fn.__signature__ = sig.replace(parameters=params + knobs)
    return fn
