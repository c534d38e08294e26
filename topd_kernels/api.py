"""Argument checking and the flat layout every implementation works on.

`check_config` validates the keyword configuration (SPEC "Bad input") into a `LossConfig`;
`flatten_inputs` validates the tensors and views them as rows: logits (N, V*), mask (N,), and a
sequence id per row, for both the batched (B, T, V) and the packed (N, V) + cu_seqlens layouts.
Nothing here reads tensor values on an accelerator (no host synchronisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Quantile:
    """A threshold given as the q-quantile (linear interpolation, as `torch.quantile`) of the
    thresholded quantity over the valid positions of the call."""

    q: float

    def __post_init__(self):
        if isinstance(self.q, bool) or not isinstance(self.q, (int, float)):
            raise TypeError(f"Quantile: q must be a number in [0, 1], got {type(self.q).__name__}")
        if not 0.0 <= float(self.q) <= 1.0:
            raise ValueError(f"Quantile: q must be in [0, 1], got {self.q}")


Threshold = Union[None, float, Quantile]


class WindowKLStats(NamedTuple):
    """Per-token statistics, in the layout of the mask, detached; 0 / False at invalid positions."""

    kl: torch.Tensor            # d_t, float32
    window_score: torch.Tensor  # w_t, float32
    high_loss: torch.Tensor     # bool
    divergent: torch.Tensor     # bool
    weight: torch.Tensor        # c_t, float32


@dataclass(frozen=True)
class LossConfig:
    """The validated keyword configuration of `fused_window_kl` (everything but the tensors)."""

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
    num_items: Optional[float] = None
    vocab_size: Optional[int] = None


def _number(name: str, value, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def _threshold(name: str, value) -> Threshold:
    if value is None or isinstance(value, Quantile):
        return value
    return float(_number(name, value))


def check_config(**kwargs) -> LossConfig:
    """Validate the keyword configuration; raises ValueError / TypeError naming the argument."""
    cfg = LossConfig(**kwargs)
    if cfg.divergence not in DIVERGENCES:
        raise ValueError(f"divergence: unknown divergence {cfg.divergence!r}; expected one of {DIVERGENCES}")
    if cfg.reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown reduction {cfg.reduction!r}; expected one of {REDUCTIONS}")
    if _number("temperature", cfg.temperature) <= 0:
        raise ValueError(f"temperature: must be > 0, got {cfg.temperature}")
    if _number("window", cfg.window, integer=True) < 1:
        raise ValueError(f"window: must be >= 1, got {cfg.window}")
    if not 0.0 <= _number("gamma", cfg.gamma) <= 1.0:
        raise ValueError(f"gamma: must be in [0, 1], got {cfg.gamma}")
    _number("beta", cfg.beta)
    if cfg.divergence == "jsd" and not 0.0 < cfg.beta < 1.0:
        raise ValueError(f"beta: must be in (0, 1) for jsd, got {cfg.beta}")
    if not 0.0 <= _number("suppress_weight", cfg.suppress_weight) <= 1.0:
        raise ValueError(f"suppress_weight: must be in [0, 1], got {cfg.suppress_weight}")
    if _number("guidance_weight", cfg.guidance_weight) < 0:
        raise ValueError(f"guidance_weight: must be >= 0, got {cfg.guidance_weight}")
    if cfg.num_items is not None:
        if cfg.reduction not in ("mean", "batchmean"):
            raise ValueError(f"num_items: only with reduction 'mean' or 'batchmean', not {cfg.reduction!r}")
        if _number("num_items", cfg.num_items) <= 0:
            raise ValueError(f"num_items: must be > 0, got {cfg.num_items}")
    if cfg.vocab_size is not None and _number("vocab_size", cfg.vocab_size, integer=True) < 1:
        raise ValueError(f"vocab_size: must be >= 1, got {cfg.vocab_size}")
    return LossConfig(
        **{
            **cfg.__dict__,
            "loss_threshold": _threshold("loss_threshold", cfg.loss_threshold),
            "div_threshold": _threshold("div_threshold", cfg.div_threshold),
        }
    )


class FlatInputs(NamedTuple):
    """The inputs as rows. `student` (N, Vs) and `teacher` (N, Vt) are views of the callers' tensors."""

    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor       # bool (N,)
    seq_id: torch.Tensor     # int64 (N,): which sequence each row belongs to
    num_seqs: int            # B, the number of packed sequences, or 1
    shape: tuple             # the leading dims: (B, T) or (N,)
    vocab_size: int          # V: the number of leading logit columns used


def _check_logits(name: str, x, dtypes) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype {x.dtype} not supported; expected one of {allowed}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D (N, V) or 3-D (B, T, V) tensor, got shape {tuple(x.shape)}")


def _sequence_ids(cu_seqlens: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sequence index of each row from cu_seqlens = [0, n1, n1+n2, ..., N]."""
    rows = torch.arange(n_rows, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).to(torch.int64)


def _check_cu_seqlens(cu: torch.Tensor, n_rows: int, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an integer torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected a 1-D int32/int64 tensor [0, n1, ..., N] with at least 2 entries, "
            f"got dtype {cu.dtype} and shape {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise ValueError(f"cu_seqlens: on {cu.device}, but the logits are on {device}")
    starts_at_zero, ends_at_n = cu[0] == 0, cu[-1] == n_rows
    non_decreasing = (cu[1:] >= cu[:-1]).all()
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if not starts_at_zero:
            raise ValueError(f"cu_seqlens: must start at 0, starts at {int(cu[0])}")
        if not non_decreasing:
            raise ValueError("cu_seqlens: must be non-decreasing")
        if not ends_at_n:
            raise ValueError(f"cu_seqlens: must end at N={n_rows}, ends at {int(cu[-1])}")
    else:
        # Reading device values would synchronise with the host (and branching on them breaks a
        # compiled graph): assert on the device instead.
        torch._assert_async(starts_at_zero & non_decreasing & ends_at_n,
                            "cu_seqlens: must start at 0, be non-decreasing and end at N")


def flatten_inputs(student, teacher, mask, cu_seqlens, cfg: LossConfig, dtypes=LOGIT_DTYPES) -> FlatInputs:
    """Validate the tensors against each other and `cfg`, and view them as rows."""
    _check_logits("student_logits", student, dtypes)
    _check_logits("teacher_logits", teacher, dtypes)
    if student.device != teacher.device:
        raise ValueError(f"teacher_logits: on {teacher.device}, but student_logits is on {student.device}")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"teacher_logits: leading shape {tuple(teacher.shape[:-1])} does not match student_logits' "
            f"{tuple(student.shape[:-1])}"
        )
    vs, vt = student.shape[-1], teacher.shape[-1]
    if cfg.vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"vocab_size: student_logits has {vs} vocabulary entries and teacher_logits {vt}; "
                f"pass vocab_size to use the first vocab_size of each"
            )
        vocab = vs
    else:
        if cfg.vocab_size > min(vs, vt):
            raise ValueError(f"vocab_size: {cfg.vocab_size} is larger than a vocabulary ({vs} student, {vt} teacher)")
        vocab = cfg.vocab_size
    shape = tuple(student.shape[:-1])
    n_rows = math.prod(shape)
    device = student.device

    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    elif tuple(mask.shape) != shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the logits' leading shape {shape}")
    elif mask.device != device:
        raise ValueError(f"mask: on {mask.device}, but the logits are on {device}")

    if student.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: only with the packed (N, V) layout, not with (B, T, V) logits")
        batch, length = shape
        seq_id = torch.arange(batch, device=device).repeat_interleave(length)
        num_seqs = batch
    elif cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, n_rows, device)
        seq_id = _sequence_ids(cu_seqlens, n_rows)
        num_seqs = cu_seqlens.numel() - 1
    else:
        seq_id = torch.zeros(n_rows, dtype=torch.int64, device=device)
        num_seqs = 1

    return FlatInputs(
        student=student.reshape(n_rows, vs),
        teacher=teacher.reshape(n_rows, vt),
        mask=mask.reshape(n_rows),
        seq_id=seq_id,
        num_seqs=num_seqs,
        shape=shape,
        vocab_size=vocab,
    )
