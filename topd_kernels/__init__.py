"""topd_kernels: fused, memory-lean kernels for the loss of trajectory-aware on-policy distillation.

    loss = topd_kernels.fused_window_kl(student_logits, teacher_logits, mask=mask)

Semantics: docs/SPEC.md, stated as runnable float64 code in `topd_kernels.reference`.
"""
from . import reference
from .api import Quantile, WindowKLStats
from .functional import fused_window_kl
from .module import WindowKLLoss

__all__ = ["fused_window_kl", "Quantile", "WindowKLStats", "WindowKLLoss", "reference"]
__version__ = "0.1.0"
