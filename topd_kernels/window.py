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


def masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float, group=None) -> torch.Tensor:
    """torch.quantile(values[valid], q) with linear interpolation, without reading `valid` on the host; with a
    process group, of the valid values of every rank of the group (`_group_order_statistics`).

    Returns a 0-d tensor; +inf when no row is valid (no row then passes a test against it).
    """
    count = valid.sum()
    if group is not None:
        torch.distributed.all_reduce(count, group=group)
    rank = q * (count - 1).clamp(min=0).to(torch.float64)
    below = rank.floor()
    order = torch.stack((below, rank.ceil())).to(torch.int64)
    if group is None:
        ordered = torch.sort(torch.where(valid, values, torch.full_like(values, float("inf")))).values
        lo, hi = ordered.gather(0, order)
    else:
        lo, hi = _group_order_statistics(values, valid, order, group)
    frac = (rank - below).to(values.dtype)
    value = torch.where(lo == hi, lo, torch.lerp(lo, hi, frac))  # lerp(inf, inf) would be NaN
    return torch.where(count > 0, value, float("inf")).reshape(())


# The order statistics of a group without gathering the values: the ranks hold different numbers of rows, and an
# all-gather of unequal sizes needs them on the host (a synchronisation). Instead, a bisection over the float32
# values' order-preserving integer keys: after 32 halvings of the key range [-2^31, 2^31), each with an all-reduce
# of two counts (how many valid values of the group are <= the midpoint), the smallest key with more than k values
# at or below it is the key of the k-th smallest value. Exact (the same values torch.sort would give), 32
# all-reduces of 16 bytes, no host synchronisation.
_SIGN = 1 << 31


def _float_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float32 values (negative floats, sign-magnitude, flipped below zero)."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits + _SIGN) - 1, bits)


def _key_floats(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys < 0, -(keys + 1) - _SIGN, keys)
    return bits.to(torch.int32).view(torch.float32)


def _group_order_statistics(values: torch.Tensor, valid: torch.Tensor, order: torch.Tensor, group) -> torch.Tensor:
    """The order[i]-th smallest (0-based) valid value of the whole group, for each i. order: (R,) int64."""
    keys = _float_keys(values)
    lo = torch.full_like(order, -_SIGN)
    hi = torch.full_like(order, _SIGN - 1)
    for _ in range(32):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        at_or_below = ((keys[None, :] <= mid[:, None]) & valid[None, :]).sum(-1)
        torch.distributed.all_reduce(at_or_below, group=group)
        enough = at_or_below > order
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid + 1)
    return _key_floats(lo).to(values.dtype)


def _passes(values: torch.Tensor, valid: torch.Tensor, threshold) -> torch.Tensor:
    """values > threshold (strict), or all True when threshold is None."""
    if threshold is None:
        return torch.ones_like(valid)
    if isinstance(threshold, Quantile):
        threshold = masked_quantile(values, valid, threshold.q, threshold.group)
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
