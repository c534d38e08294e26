"""The tensors of a call, checked against each other and viewed as a grid of rows (no copies).

`flatten_inputs` validates the logits, mask and cu_seqlens (SPEC "Bad input") and returns `Rows`:
the logits as (B, T, V*) views, (1, N, V*) for the packed layout, so that a slice such as
`logits[:, :-1]` keeps its strides and is never copied; the mask (N,), and a sequence id per row.
Nothing here reads tensor values on an accelerator (no host synchronisation).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .config import LossConfig
from .forms import TopK, check_topk_values
from .rows.contract import LOGIT_DTYPES


class Rows(NamedTuple):
    """The inputs as rows. `student` (B, T, Vs) and `teacher` (B, T, Vt) are views of the callers' tensors
    (B = 1, T = N for the packed layout); row i of the flat order is (b, t) = divmod(i, T)."""

    student: torch.Tensor
    teacher: "torch.Tensor | TopK"  # logits (B, T, Vt), or a TopK whose tensors are (B, T, k) views
    mask: torch.Tensor       # bool (N,)
    seq_id: torch.Tensor     # int64 (N,): which sequence each row belongs to
    num_seqs: int            # B, the number of packed sequences, or 1
    shape: tuple             # the leading dims: (B, T) or (N,)
    vocab_size: int          # V: the number of leading logit columns used (global ones with vocab_shards)


def _row_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, T, V) view of 3-D or 2-D logits; a copy only when the last dim is not contiguous."""
    x = x if x.dim() == 3 else x.unsqueeze(0)
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


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


def flatten_inputs(student, teacher, mask, cu_seqlens, cfg: LossConfig, dtypes=LOGIT_DTYPES,
                   vocab_shards: Optional[int] = None) -> Rows:
    """Validate the tensors against each other and `cfg`, and view them as rows.

    vocab_shards: the number of ranks of a vocabulary-parallel group, whose logits are one rank's columns
    (SPEC "Vocabulary-parallel"); None without one. Their widths are then checked across the group by
    rows/vocab_parallel.py, not here, and vocab_size counts global columns (default: all of every rank).
    """
    if isinstance(student, TopK):
        raise TypeError("student_logits: a TopK can only be the teacher")
    _check_logits("student_logits", student, dtypes)
    if isinstance(teacher, TopK):
        if vocab_shards is not None:
            raise ValueError("vocab_parallel_group: a TopK teacher is not supported with a vocabulary-parallel "
                             "group yet")
        teacher_shape, teacher_device = tuple(teacher.token_ids.shape), teacher.token_ids.device
    else:
        _check_logits("teacher_logits", teacher, dtypes)
        teacher_shape, teacher_device = tuple(teacher.shape), teacher.device
    if student.device != teacher_device:
        raise ValueError(f"teacher_logits: on {teacher_device}, but student_logits is on {student.device}")
    if tuple(student.shape[:-1]) != teacher_shape[:-1]:
        raise ValueError(
            f"teacher_logits: leading shape {teacher_shape[:-1]} does not match student_logits' "
            f"{tuple(student.shape[:-1])}"
        )
    vs, vt = student.shape[-1], (student.shape[-1] if isinstance(teacher, TopK) else teacher.shape[-1])
    if vocab_shards is not None:
        vocab = vocab_shards * vs if cfg.vocab_size is None else cfg.vocab_size
    elif cfg.vocab_size is None:
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
    if isinstance(teacher, TopK):
        if teacher.k > vocab:
            raise ValueError(f"teacher_logits: TopK has k = {teacher.k} slots, more than the vocabulary ({vocab})")
        check_topk_values(teacher, vocab)
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

    return Rows(
        student=_row_grid(student),
        teacher=(TopK(_row_grid(teacher.token_ids), _row_grid(teacher.logprobs), teacher.tail)
                 if isinstance(teacher, TopK) else _row_grid(teacher)),
        mask=mask.reshape(n_rows),
        seq_id=seq_id,
        num_seqs=num_seqs,
        shape=shape,
        vocab_size=vocab,
    )
