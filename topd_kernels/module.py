"""`WindowKLLoss`: `fused_window_kl` as an nn.Module holding its keyword configuration."""
from __future__ import annotations

import torch

from .api import check_config
from .functional import fused_window_kl


class WindowKLLoss(torch.nn.Module):
    """nn.Module form of `fused_window_kl`; takes the same keyword arguments (validated here, once).

    forward(student_logits (B, T, Vs) | (N, Vs), teacher_logits, mask=None, cu_seqlens=None)
    returns what `fused_window_kl` returns with this configuration.
    """

    def __init__(self, *, return_stats: bool = False, backend: str = "auto", **config):
        super().__init__()
        check_config(**config)
        self.config = dict(config, return_stats=return_stats, backend=backend)

    def forward(self, student_logits, teacher_logits, mask=None, cu_seqlens=None):
        return fused_window_kl(student_logits, teacher_logits, mask=mask, cu_seqlens=cu_seqlens, **self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
