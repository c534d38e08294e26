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

from .config import LossConfig, value_check
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


def _cu_seqlens_tensor(cu, n_rows: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens as an int64 tensor on `device`, checked (a list or tuple is checked on the host, then moved)."""
    if isinstance(cu, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu):
            raise ValueError("cu_seqlens: a list or tuple must hold ints [0, n1, n1+n2, ..., N]")
        cu = torch.tensor(cu, dtype=torch.int64)
        _check_cu_seqlens(cu, n_rows)
        return cu.to(device)
    _check_cu_seqlens(cu, n_rows, device)
    return cu


def _check_cu_seqlens(cu, n_rows: int, device: Optional[torch.device] = None) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an integer torch.Tensor, list or tuple, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected a 1-D int32/int64 tensor [0, n1, ..., N] with at least 2 entries, "
            f"got dtype {cu.dtype} and shape {tuple(cu.shape)}"
        )
    if device is not None and cu.device != device:
        raise ValueError(f"cu_seqlens: on {cu.device}, but the logits are on {device}")
    value_check((cu[0] == 0) & (cu[1:] >= cu[:-1]).all() & (cu[-1] == n_rows),
                f"cu_seqlens: must start at 0, be non-decreasing and end at N={n_rows}")


def _mask_from_labels(labels, ignore_index: int, shape: tuple, seq_id: torch.Tensor, device) -> torch.Tensor:
    """m_t = labels[t + 1] != ignore_index for t + 1 in t's sequence, else False (SPEC "Inputs"). (N,) bool."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match the logits' leading shape {shape}")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device}, but the logits are on {device}")
    flat = labels.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=device)
    mask[:-1] = (flat[1:] != ignore_index) & (seq_id[1:] == seq_id[:-1])
    return mask


def _mask(mask, shape: tuple, device) -> torch.Tensor:
    """The mask as (N,) bool: bool, or integer 0/1 (nonzero = valid); None = all valid."""
    if mask is None:
        return torch.ones(math.prod(shape), dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask: expected a bool or integer 0/1 tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the logits' leading shape {shape}")
    if mask.device != device:
        raise ValueError(f"mask: on {mask.device}, but the logits are on {device}")
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)


def flatten_inputs(student, teacher, mask, cu_seqlens, cfg: LossConfig, dtypes=LOGIT_DTYPES,
                   vocab_shards: Optional[int] = None, labels=None, ignore_index: int = -100) -> Rows:
    """Validate the tensors against each other and `cfg`, and view them as rows.

    mask: bool or integer 0/1 of the leading shape, or None; or labels (integer, the leading shape) with
    ignore_index instead: row t is valid when labels[t + 1] != ignore_index within its sequence (SPEC "Inputs").
    cu_seqlens: a tensor, list or tuple, with (N, V) or (1, N, V) logits.

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

    if student.dim() == 3 and cu_seqlens is not None and shape[0] != 1:
        raise ValueError("cu_seqlens: only with the packed layout, (N, V) or (1, N, V) logits, not with a batch "
                         f"of {shape[0]} sequences")
    if cu_seqlens is not None:
        cu_seqlens = _cu_seqlens_tensor(cu_seqlens, n_rows, device)
        seq_id = _sequence_ids(cu_seqlens, n_rows)
        num_seqs = cu_seqlens.numel() - 1
    elif student.dim() == 3:
        batch, length = shape
        seq_id = torch.arange(batch, device=device).repeat_interleave(length)
        num_seqs = batch
    else:
        seq_id = torch.zeros(n_rows, dtype=torch.int64, device=device)
        num_seqs = 1

    if labels is not None:
        if mask is not None:
            raise ValueError("labels: give either mask or labels, not both")
        mask = _mask_from_labels(labels, ignore_index, shape, seq_id, device)
    else:
        mask = _mask(mask, shape, device)

    return Rows(
        student=_row_grid(student),
        teacher=(TopK(_row_grid(teacher.token_ids), _row_grid(teacher.logprobs), teacher.tail)
                 if isinstance(teacher, TopK) else _row_grid(teacher)),
        mask=mask,
        seq_id=seq_id,
        num_seqs=num_seqs,
        shape=shape,
        vocab_size=vocab,
    )


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [0, n1, n1+n2, ..., N] (int64, on position_ids' device) of packed sequences whose positions
    restart at 0, as Hugging Face's packing collators give them. position_ids: (N,) or (1, N) integer.

    The number of sequences is data: this reads position_ids on the host (one synchronisation on an
    accelerator), so call it where the batch is built (the collator), not in the loss.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or \
            position_ids.dtype == torch.bool or position_ids.dim() not in (1, 2) or \
            (position_ids.dim() == 2 and position_ids.shape[0] != 1) or position_ids.numel() == 0:
        raise ValueError("position_ids: expected a non-empty integer (N,) or (1, N) tensor, got "
                         f"{getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                         f"{tuple(getattr(position_ids, 'shape', ()))}")
    flat = position_ids.reshape(-1)
    if int(flat[0]) != 0:
        raise ValueError(f"position_ids: the first sequence must start at position 0, got {int(flat[0])}")
    starts = (flat == 0).nonzero().flatten()
    return torch.cat((starts, starts.new_tensor([flat.numel()]))).to(torch.int64)
