"""topd_kernels: fused, memory-lean kernels for the loss of trajectory-aware on-policy distillation.

    loss = topd_kernels.fused_window_kl(student_logits, teacher_logits, mask=mask)

Semantics: docs/SPEC.md, stated as runnable float64 code in `topd_kernels.reference`.
"""
from . import reference
from .config import LossConfig, Quantile, WindowKLStats
from .forms import TopK
from .functional import WindowKLLoss, fused_window_kl
from .layout import cu_seqlens_from_position_ids

__all__ = ["fused_window_kl", "WindowKLLoss", "TopK", "cu_seqlens_from_position_ids", "LossConfig", "Quantile",
           "WindowKLStats", "reference"]
__version__ = "0.1.0"
