"""The distillation methods as configurations of `fused_window_kl`.

    opd         reverse KL on every response token (window 1, no thresholds): plain token-level OPD.
    opd-filter  TOPD's suppression only: high-loss tokens (d above the `loss_threshold` quantile) whose
                near-future window score is not above the `div_threshold` quantile get `suppress_weight`;
                no guidance.
    topd        suppression plus `guidance_weight` spread from each divergent token over the next
                `window` tokens (decay `gamma`).
    trd         the teacher rewrites the student's rollout from its first divergent position (found
                with the same window/threshold test as topd, see `detection_kwargs`); the student
                distils on the refined rollout with forward KL, window 1, no thresholds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from topd_kernels import LossConfig, Quantile, WindowKLStats

METHODS = ("opd", "opd-filter", "topd", "trd")


@dataclass(frozen=True)
class MethodSettings:
    """The TOPD knobs shared by the methods that use them."""

    window: int = 4
    gamma: float = 0.9
    loss_threshold: Quantile = Quantile(0.8)  # the loss's knobs of the same names
    div_threshold: Quantile = Quantile(0.5)
    suppress_weight: float = 0.0
    guidance_weight: float = 0.5

    def __post_init__(self):
        LossConfig(**loss_kwargs("topd", self))  # the loss's own checks, in the loss's words

    def to_dict(self) -> dict:
        return asdict(self)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def detection_kwargs(settings: MethodSettings) -> dict:
    """`fused_window_kl` keywords of TOPD's divergence test (reverse KL, window score, quantile thresholds)."""
    return dict(
        divergence="reverse_kl",
        window=settings.window,
        gamma=settings.gamma,
        loss_threshold=settings.loss_threshold,
        div_threshold=settings.div_threshold,
    )


def loss_kwargs(method: str, settings: MethodSettings) -> dict:
    """`fused_window_kl` keywords of `method`'s training loss."""
    check_method(method)
    if method == "opd":
        return dict(divergence="reverse_kl", window=1)
    if method == "trd":
        return dict(divergence="forward_kl", window=1)
    return dict(
        detection_kwargs(settings),
        suppress_weight=settings.suppress_weight,
        guidance_weight=settings.guidance_weight if method == "topd" else 0.0,
    )


def rewrites_rollouts(method: str) -> bool:
    """Whether the teacher refines the rollout before the loss (TRD)."""
    return check_method(method) == "trd"


def nondivergent_share(stats: WindowKLStats) -> float:
    """Share of high-loss tokens that are not divergent (surface-form mismatches); 0 with none."""
    high = int(stats.high_loss.sum())
    return float((stats.high_loss & ~stats.divergent).sum()) / high if high else 0.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].float().mean()) if bool(mask.any()) else 0.0
