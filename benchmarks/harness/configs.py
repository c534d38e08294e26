"""The shapes, the named loss configurations, the teacher's form in each, and the inputs of the benchmarks.

A configuration is a dict of `topd_kernels.LossConfig` keywords (the loss's own knob names): what
`fused_window_kl(**cfg)` and the baselines (`baselines.eager_window_kl(**cfg)`) are called with.

    topd     window 8, gamma 0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
             suppress_weight 0, guidance_weight 0.5 (TOPD)
    opd      window 1, no thresholds, no guidance: mean reverse KL (plain OPD; what Liger computes)
    topk<K>  opd's loss against a top-K teacher (`teacher_form`): the teacher's log-softmax at its K most
             likely ids, int32 ids and float32 log-probabilities, tail "bucket" (`make_topk`), as an
             inference server returns them; K = 32 and 128 by default (TOPK_KS)

The teacher side of a row is the teacher logits tensor (topd, opd) or a `topd_kernels.TopK` made from
it (`teacher_for`); `teacher_bytes_per_token` is what it costs per position.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from topd_kernels import LossConfig, Quantile, TopK

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
FULL_N = (1024, 4096, 8192, 16384)
FULL_V = (32000, 128256, 151936)
QUICK_N = (256, 1024)
QUICK_V = (32000,)

TOPD = dict(window=8, gamma=0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
            suppress_weight=0.0, guidance_weight=0.5)
OPD = dict(window=1)
TOPK_KS = (32, 128)
TOPK_TAIL = "bucket"
CONFIG_NAMES = ("topd", "opd") + tuple(f"topk{k}" for k in TOPK_KS)  # bench_kl's default set


def topk_k(name: str) -> Optional[int]:
    """K of a configuration named "topk<K>" (K >= 1), else None."""
    match = re.fullmatch(r"topk([1-9][0-9]*)", name)
    return int(match.group(1)) if match else None


def loss_configs(names=CONFIG_NAMES, **topd_changes) -> dict:
    """{name: keywords} for the configurations `names` (topd, opd, topk<K>), TOPD's knobs changed by
    `topd_changes`; each is checked by LossConfig (a ValueError / TypeError naming the knob). An unknown
    name is a ValueError."""
    configs = {}
    for name in names:
        if name == "topd":
            configs[name] = {**TOPD, **topd_changes}
        elif name == "opd" or topk_k(name):
            configs[name] = dict(OPD)
        else:
            raise ValueError(f"configs: unknown configuration {name!r}; expected topd, opd or topk<K> (K >= 1)")
    for cfg in configs.values():
        LossConfig(**cfg)
    return configs


def teacher_form(name: str) -> dict:
    """The teacher's form in configuration `name`, as JSON: {"form": "logits"}, or {"form": "topk", "k",
    "tail", "ids", "logprobs"} (the dtypes `make_topk` passes)."""
    k = topk_k(name)
    if k is None:
        return {"form": "logits"}
    return {"form": "topk", "k": k, "tail": TOPK_TAIL, "ids": "int32", "logprobs": "float32"}


def make_topk(teacher_logits: torch.Tensor, k: int, tail: str = TOPK_TAIL) -> TopK:
    """The teacher as an inference server returns it: its log-softmax (float32) at its k most likely ids,
    ids int32. teacher_logits (..., V) -> TopK of (..., k) tensors."""
    logprobs, ids = torch.log_softmax(teacher_logits.float(), dim=-1).topk(k, dim=-1)
    return TopK(ids.to(torch.int32), logprobs, tail=tail)


def teacher_for(name: str, teacher_logits: torch.Tensor):
    """The teacher side of configuration `name`: the logits themselves, or their TopK (`make_topk`)."""
    k = topk_k(name)
    return teacher_logits if k is None else make_topk(teacher_logits, k)


def teacher_bytes_per_token(teacher) -> int:
    """Bytes the teacher side holds per position, as passed: V x element size for logits, k x (id + logprob
    element sizes) for a TopK."""
    if isinstance(teacher, TopK):
        return teacher.k * (teacher.token_ids.element_size() + teacher.logprobs.element_size())
    return teacher.shape[-1] * teacher.element_size()


def config_json(cfg: dict) -> dict:
    """A configuration as JSON: a Quantile(q) threshold becomes {"quantile": q}."""
    return {k: {"quantile": v.q} if isinstance(v, Quantile) else v for k, v in cfg.items()}


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    """(student, teacher) logits (n, v) of `dtype`: student ~ 2 N(0, 1), teacher = student + N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = (2.0 * torch.randn(n, v, device=device, generator=g)).to(dtype)
    teacher = (student.float() + torch.randn(n, v, device=device, generator=g)).to(dtype)
    return student, teacher
