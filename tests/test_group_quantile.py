"""`Quantile(q, group=...)` (SPEC "Divergence thresholding"): the quantile over the valid positions of every rank of
a process group, over gloo groups of 3 CPU processes holding different numbers of rows (one rank with none valid).

The workers check `window.masked_quantile` with the group against the single-process call on the concatenated valid
values (exactly: the bisection finds the same order statistics) and against torch.quantile, on values with ties, signs, zeros and +inf, and the loss with group
quantile thresholds against the float64 reference with the same group (which gathers the values plainly).
"""
import pytest
import torch
import torch.distributed as dist

import topd_kernels
from common import BACKENDS, TOPD
from loss_cases import check_backend, make_problem
from test_vocab_parallel import _spawn
from topd_kernels import Quantile
from topd_kernels.window import masked_quantile


def _quantile_worker(seed: int) -> None:
    rank = dist.get_rank()
    for case in range(6):
        torch.manual_seed(seed * 100 + case * 10 + rank)
        n = (17, 1, 40)[rank]
        values = torch.randn(n) * 3
        if case % 2:
            values = values.round()  # ties across ranks
        values[:2] = torch.tensor([0.0, float("inf")])[: min(2, n)] if case == 4 else values[:2]
        valid = torch.rand(n) > 0.3
        if rank == 1:
            valid[:] = False  # a rank without a valid row
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, values[valid])
        union = torch.cat(everything)
        for q in (0.0, 0.3, 0.5, 0.77, 1.0):
            ours = masked_quantile(values, valid, q, dist.group.WORLD)
            # Exactly the single-process call on the concatenated values (the same order statistics and lerp) ...
            single = masked_quantile(union, torch.ones_like(union, dtype=torch.bool), q)
            assert torch.equal(ours, single), (rank, case, q, ours, single)
            # ... which is torch.quantile (float32 rounding apart; +inf where the interpolation meets it).
            if union.isfinite().all():
                expected = torch.quantile(union.double(), q).float()
                assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6), (rank, case, q, ours, expected)
            elif q == 1.0:
                assert ours == float("inf")
    nothing = masked_quantile(torch.randn(3), torch.zeros(3, dtype=torch.bool), 0.5, dist.group.WORLD)
    assert nothing == float("inf")


def _loss_worker(seed: int, backends) -> None:
    rank = dist.get_rank()
    torch.manual_seed(seed + rank)
    problem = make_problem("packed", V=97, lengths=((5, 9), (3,), (8, 0, 6))[rank], masked_sequence=False)
    group = dist.group.WORLD
    knobs = dict(TOPD, loss_threshold=Quantile(0.4, group), div_threshold=Quantile(0.6, group))
    for backend in backends:
        check_backend(backend, problem, reduction="none", **knobs)
    local = topd_kernels.fused_window_kl(problem["student"], problem["teacher"], mask=problem["mask"],
                                         cu_seqlens=problem["cu_seqlens"], return_stats=True,
                                         **dict(TOPD, loss_threshold=Quantile(0.4), div_threshold=Quantile(0.6)))
    assert local[1].kl.numel() == problem["mask"].numel()


def test_group_quantile_is_the_quantile_of_every_rank(tmp_path, seed):
    _spawn(tmp_path, 3, _quantile_worker, seed)


def test_loss_with_group_quantiles_matches_the_reference(tmp_path, seed):
    _spawn(tmp_path, 3, _loss_worker, seed, BACKENDS)


def test_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="group"):
        Quantile(0.5, group=object())
