"""The window step, shared by every backend: from per-token divergences to per-token weights.

    d_t (masked)  ->  w_t (near-future window score)  ->  thresholds  ->  high / divergent flags
                  ->  c_t = m_t (base_t + lambda a_t)  (a_t: guidance spread over the next k tokens)

Vectorised over tokens: windowed discounted sums use binary doubling, O(log k) tensor operations
whatever the window and the number of sequences; sequences (either layout) are given by a sequence id
per row, and windows never cross a sequence boundary. No host synchronisation: quantile thresholds are
read from a sorted copy at a position computed on the device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import LossConfig, Quantile


class WindowStep(NamedTuple):
    """Per-row results of the window step, all (N,) and detached."""

    kl: torch.Tensor          # d_t, 0 at invalid rows
    window_score: torch.Tensor
    high_loss: torch.Tensor   # bool
    divergent: torch.Tensor   # bool
    weight: torch.Tensor      # c_t


def _shift_within_sequence(x: torch.Tensor, seq_id: torch.Tensor, offset: int) -> torch.Tensor:
    """y_t = x_{t+offset} when row t+offset exists and is in t's sequence, else 0. x: (N,)."""
    n = x.numel()
    if offset >= n:
        return torch.zeros_like(x)
    ahead = torch.zeros_like(x)
    ahead[: n - offset] = x[offset:]
    same = torch.zeros_like(seq_id, dtype=torch.bool)
    same[: n - offset] = seq_id[offset:] == seq_id[: n - offset]
    return torch.where(same, ahead, torch.zeros_like(x))


def discounted_window_sum(x: torch.Tensor, seq_id: torch.Tensor, window: int, gamma: float) -> torch.Tensor:
    """y_t = sum_{j=0}^{window-1} gamma^j x_{t+j}, over rows t+j of t's sequence. x, seq_id: (N,).

    Binary doubling: with W_L(t) the sum over offsets [0, L),  W_{L+L'}(t) = W_L(t) + gamma^L W_{L'}(t+L)
    (the second term is 0 when t+L is in another sequence, since then so is every later row).
    """
    window = min(window, x.numel())
    total = torch.zeros_like(x)
    block, block_len, covered = x, 1, 0  # block = W_{block_len}; total = W_{covered}
    while window:
        if window & 1:
            total = total + gamma ** covered * _shift_within_sequence(block, seq_id, covered)
            covered += block_len
        window >>= 1
        if window:
            block = block + gamma ** block_len * _shift_within_sequence(block, seq_id, block_len)
            block_len *= 2
    return total


def masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values[valid], q) with linear interpolation, without reading `valid` on the host.

    Returns a 0-d tensor; +inf when no row is valid (no row then passes a test against it).
    """
    count = valid.sum()
    ordered = torch.sort(torch.where(valid, values, torch.full_like(values, float("inf")))).values
    rank = q * (count - 1).clamp(min=0).to(torch.float64)
    below = rank.floor()
    lo = below.to(torch.int64).reshape(1)
    hi = rank.ceil().to(torch.int64).reshape(1)
    frac = (rank - below).to(values.dtype)
    return torch.lerp(ordered.gather(0, lo), ordered.gather(0, hi), frac).reshape(())


def _passes(values: torch.Tensor, valid: torch.Tensor, threshold) -> torch.Tensor:
    """values > threshold (strict), or all True when threshold is None."""
    if threshold is None:
        return torch.ones_like(valid)
    if isinstance(threshold, Quantile):
        threshold = masked_quantile(values, valid, threshold.q)
    return values > threshold


def window_step(d: torch.Tensor, mask: torch.Tensor, seq_id: torch.Tensor, cfg: LossConfig) -> WindowStep:
    """Weights of every row from the per-row divergences. d: float (N,), mask: bool (N,), seq_id: int64 (N,)."""
    d = torch.where(mask, d, torch.zeros_like(d))
    m = mask.to(d.dtype)
    numerator = discounted_window_sum(d, seq_id, cfg.window, cfg.gamma)
    denominator = discounted_window_sum(m, seq_id, cfg.window, cfg.gamma)
    w = torch.where(mask, numerator / torch.where(mask, denominator, torch.ones_like(m)), torch.zeros_like(d))

    high = mask & _passes(d, mask, cfg.loss_threshold)
    over = _passes(w, mask, cfg.div_threshold)
    divergent = high & over
    base = torch.where(high & ~over, torch.full_like(m, cfg.suppress_weight), m)
    if cfg.guidance_weight:
        spread = discounted_window_sum(divergent.flip(0).to(d.dtype), seq_id.flip(0), cfg.window, cfg.gamma).flip(0)
        base = base + cfg.guidance_weight * spread
    return WindowStep(kl=d, window_score=w, high_loss=high, divergent=divergent, weight=m * base)
