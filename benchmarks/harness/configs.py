"""The shapes, the named loss configurations and the inputs of the benchmarks.

A configuration is a dict of `topd_kernels.LossConfig` keywords (the loss's own knob names): what
`fused_window_kl(**cfg)` and the baselines (`baselines.eager_window_kl(**cfg)`) are called with.

    topd   window 8, gamma 0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
           suppress_weight 0, guidance_weight 0.5 (TOPD)
    opd    window 1, no thresholds, no guidance: mean reverse KL (plain OPD; what Liger computes)
"""
from __future__ import annotations

import torch

from topd_kernels import LossConfig, Quantile

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
FULL_N = (1024, 4096, 8192, 16384)
FULL_V = (32000, 128256, 151936)
QUICK_N = (256, 1024)
QUICK_V = (32000,)

TOPD = dict(window=8, gamma=0.9, loss_threshold=Quantile(0.8), div_threshold=Quantile(0.5),
            suppress_weight=0.0, guidance_weight=0.5)
OPD = dict(window=1)


def loss_configs(**topd_changes) -> dict:
    """{"topd": keywords, "opd": keywords}, TOPD's knobs changed by `topd_changes`; each is checked by
    LossConfig (a ValueError / TypeError naming the knob)."""
    configs = {"topd": {**TOPD, **topd_changes}, "opd": dict(OPD)}
    for cfg in configs.values():
        LossConfig(**cfg)
    return configs


def config_json(cfg: dict) -> dict:
    """A configuration as JSON: a Quantile(q) threshold becomes {"quantile": q}."""
    return {k: {"quantile": v.q} if isinstance(v, Quantile) else v for k, v in cfg.items()}


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    """(student, teacher) logits (n, v) of `dtype`: student ~ 2 N(0, 1), teacher = student + N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = (2.0 * torch.randn(n, v, device=device, generator=g)).to(dtype)
    teacher = (student.float() + torch.randn(n, v, device=device, generator=g)).to(dtype)
    return student, teacher
