"""`fused_window_kl(..., vocab_parallel_group=...)` (SPEC "Vocabulary-parallel") over gloo groups of 2 and 3 CPU
processes on the loopback interface.

Every worker draws the same full logits (a fixed seed per case), holds its rank's columns, and checks that its
loss, statistics and the gradient of its columns (the student's, and the teacher's where it requires grad) match
the single-process call on the full logits with the same backend (test_loss.py checks that call against the
float64 reference). The cases cover every divergence in both layouts with temperatures != 1, TOPD thresholds
and guidance, a padded global vocab_size (ranks without a real column included), -inf entries and whole shards
without mass, every backend and "auto". The two-rank group also counts the bytes each call
all-reduces and raises bad input on every rank. Starting processes costs seconds, so one spawn runs every case: the two-rank
ones on a subgroup of two of three processes, then the three-rank ones. The row op `mix` (jsd's second pass with
the normalisers given) is checked on its own, in this process.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import topd_kernels
from common import BETA, DIVERGENCES, TOPD
from topd_kernels.config import DIVERGENCE_CODES
from topd_kernels.rows import registry
from topd_kernels.rows.contract import Stat, make_row_call
from loss_cases import FP32_RTOL, make_problem, run_loss

SPAWN_TIMEOUT_S = 240  # a whole spawn, and a collective's wait (a rank may wait while a subgroup works)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=SPAWN_TIMEOUT_S)
ATOL = 2e-5  # float32 rounding of d and the loss (logits of size ~10): the combination adds a few ulps
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vocab_parallel.py"


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def _spawn(tmp_path, ranks: int, worker, *args) -> None:
    """worker(*args) in `ranks` fresh processes joined in one gloo group; an exception in any of them fails the
    test (the others are stopped), as does a run longer than SPAWN_TIMEOUT_S."""
    context = mp.start_processes(_in_group, args=(ranks, f"file://{tmp_path / 'rendezvous'}", worker, args),
                                 nprocs=ranks, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} on {ranks} ranks did not finish in {SPAWN_TIMEOUT_S} s")


def _in_group(rank: int, ranks: int, init_method: str, worker, args) -> None:
    """worker(*args) on this rank. An exception propagates (spawn reports it). After success every rank meets at
    a barrier and leaves with os._exit(0), skipping process-group destruction and interpreter teardown, which
    nothing here tests: one CI-like run saw a worker abort with SIGABRT ("terminate called without an active
    exception", a C++ thread left joinable), which points at gloo's teardown; it was not reproduced."""
    os.environ.update(LOOPBACK)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=ranks, timeout=COLLECTIVE_TIMEOUT)
    worker(*args)
    dist.barrier()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------
# One case: a rank's call against the single-process call
# ---------------------------------------------------------------------------------------------------
def _check_case(group, case: dict) -> None:
    """case: backend, layout, width (columns per rank), seed; optional vocab_size (global), teacher_grad, neg_inf,
    without_mass ((model, shard): that model's columns of that shard all -inf); the rest are the loss's knobs."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    case = dict(case)
    backend, layout, width, seed = (case.pop(key) for key in ("backend", "layout", "width", "seed"))
    vocab_size, teacher_grad = case.pop("vocab_size", None), case.pop("teacher_grad", False)
    neg_inf, without_mass = case.pop("neg_inf", False), case.pop("without_mass", None)
    torch.manual_seed(seed)
    total = ranks * width
    real = vocab_size or total
    problem = make_problem(layout, B=2, T=7, V=real, pad=(total - real,) * 2, neg_inf=neg_inf, lengths=(5, 0, 1, 6, 2))
    if without_mass:
        model, shard = without_mass
        problem[model][..., shard * width:(shard + 1) * width] = float("-inf")
    upstream = torch.randn(problem["mask"].shape) if case.get("reduction") == "none" else None
    columns = slice(rank * width, (rank + 1) * width)
    shard = dict(problem, student=problem["student"][..., columns], teacher=problem["teacher"][..., columns])

    single = run_loss(lambda *a, **k: topd_kernels.fused_window_kl(*a, backend=backend, **k), problem, case,
                      teacher_grad, upstream)
    parallel = run_loss(
        lambda *a, **k: topd_kernels.fused_window_kl(*a, backend=backend, vocab_parallel_group=group, **k),
        shard, case, teacher_grad, upstream)
    where = f"rank {rank}/{ranks}, {backend} {layout} width {width} vocab_size {vocab_size} {case}"
    _assert_matches(parallel, single, columns, where, gradients=without_mass is None)


def _assert_matches(parallel, single, columns: slice, where: str, gradients: bool) -> None:
    (loss, stats, grads), (loss_1, stats_1, grads_1) = parallel, single
    torch.testing.assert_close(loss, loss_1, rtol=FP32_RTOL, atol=ATOL, msg=lambda m: f"loss, {where}: {m}")
    for name, value, value_1 in zip(stats._fields, stats, stats_1):
        if value.dtype == torch.bool:
            assert torch.equal(value, value_1), f"{name} differs, {where}"
        else:
            torch.testing.assert_close(value, value_1, rtol=FP32_RTOL, atol=ATOL, msg=lambda m: f"{name}, {where}: {m}")
    if gradients:
        for name, grad, grad_1 in zip(("student", "teacher"), grads, grads_1):
            torch.testing.assert_close(grad, grad_1[..., columns], rtol=FP32_RTOL, atol=1e-5 * grad_1.abs().max().item(),
                                       msg=lambda m: f"{name} gradient, {where}: {m}")


def _matrix(backends, width: int, vocab_sizes, layouts=("batched", "packed")) -> list:
    """A case per backend, divergence and layout, each with the next vocab_size and the next mix of extras."""
    vocab_sizes = itertools.cycle(vocab_sizes)
    extras = itertools.cycle([
        dict(teacher_grad=True, temperature=1.7, **TOPD),
        dict(reduction="none", neg_inf=True, temperature=0.6),
        dict(TOPD, teacher_grad=True, loss_threshold=topd_kernels.Quantile(0.2), guidance_weight=2.0),
    ])
    return [dict(backend=backend, layout=layout, divergence=divergence, beta=BETA, width=width, seed=seed,
                 vocab_size=next(vocab_sizes), **next(extras))
            for seed, (backend, divergence, layout) in enumerate(itertools.product(backends, DIVERGENCES, layouts))]


def _without_mass(backends, shards) -> list:
    """Shards where one model has no mass: +inf where the other has some (reverse_kl: a teacher shard, forward_kl:
    a student shard), finite otherwise, as in the single-process call."""
    return [dict(backend=backend, layout="packed", divergence=divergence, beta=BETA, width=24, seed=100 + seed,
                 reduction="none", without_mass=shard)
            for seed, (backend, divergence, shard) in enumerate(itertools.product(backends, DIVERGENCES, shards))]


# ---------------------------------------------------------------------------------------------------
# Communication and bad input
# ---------------------------------------------------------------------------------------------------
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
                "gather", "scatter", "send", "recv", "isend", "irecv", "barrier")


@contextlib.contextmanager
def _counting_collectives():
    """Within: each all_reduce appends the bytes of its tensor to the yielded list; any other collective fails."""
    sent, real = [], {name: getattr(dist, name) for name in _COLLECTIVES}

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real["all_reduce"](tensor, *args, **kwargs)

    def other(*args, **kwargs):
        raise AssertionError("the loss used a collective other than all_reduce")

    for name in _COLLECTIVES:
        setattr(dist, name, all_reduce if name == "all_reduce" else other)
    try:
        yield sent
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _bytes_per_call(group, divergence: str, rows: int, width: int) -> int:
    """Bytes all-reduced by one forward and backward on (rows, width) shards."""
    student = torch.randn(rows, width, requires_grad=True)
    with _counting_collectives() as sent:
        loss = topd_kernels.fused_window_kl(student, torch.randn(rows, width), divergence=divergence, beta=BETA,
                                            vocab_parallel_group=group, **TOPD)
        loss.backward()
    return sum(sent)


def _communication_and_bad_input(group) -> None:
    # The widths are compared once per (group, widths): four integers on the first call (widths 20 and 80: no
    # case used them on this group).
    assert _bytes_per_call(group, "reverse_kl", 12, 20) - _bytes_per_call(group, "reverse_kl", 12, 20) == 4 * 8
    _bytes_per_call(group, "reverse_kl", 12, 80)
    for divergence in DIVERGENCES:
        sent = {(rows, width): _bytes_per_call(group, divergence, rows, width) for rows in (12, 24) for width in (20, 80)}
        assert sent[12, 20] == sent[12, 80] and sent[24, 20] == sent[24, 80] == 2 * sent[12, 20], (divergence, sent)
        assert sent[12, 20] <= 7 * 4 * 12, (divergence, sent)  # at most seven float32 per row

    rank = dist.get_rank(group)
    with pytest.raises(ValueError, match="vocab_parallel_group: every rank must hold the same number of columns"):
        topd_kernels.fused_window_kl(torch.randn(6, 8 + rank), torch.randn(6, 8 + rank), vocab_parallel_group=group)
    with pytest.raises(ValueError, match="vocab_parallel_group: every rank must hold the same number of columns"):
        topd_kernels.fused_window_kl(torch.randn(6, 8), torch.randn(6, 9), vocab_size=8, vocab_parallel_group=group)
    with pytest.raises(ValueError, match="vocab_size: 17 is larger than the vocabulary of the group"):
        topd_kernels.fused_window_kl(torch.randn(6, 8), torch.randn(6, 8), vocab_size=17, vocab_parallel_group=group)
    with pytest.raises(TypeError, match="vocab_parallel_group: expected a torch.distributed process group"):
        topd_kernels.fused_window_kl(torch.randn(6, 8), torch.randn(6, 8), vocab_parallel_group="world")

    # The group is still in step after the errors, and the module form takes the group too.
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mine = (student[..., rank * 8:(rank + 1) * 8], teacher[..., rank * 8:(rank + 1) * 8])
    module = topd_kernels.WindowKLLoss(vocab_parallel_group=group, vocab_size=13, **TOPD)
    torch.testing.assert_close(module(*mine), topd_kernels.fused_window_kl(student, teacher, vocab_size=13, **TOPD),
                               rtol=FP32_RTOL, atol=ATOL)


def _pair_then_trio(pair_cases: list, trio_cases: list) -> None:
    """On the pair of global ranks 1 and 2 (group ranks 0 and 1, as in a tensor-parallel subgroup): pair_cases,
    the bytes sent and bad input; then trio_cases on all three ranks."""
    pair = dist.new_group([1, 2])
    if dist.get_rank() in (1, 2):
        for case in pair_cases:
            _check_case(pair, case)
        _communication_and_bad_input(pair)
    for case in trio_cases:
        _check_case(dist.group.WORLD, case)


def test_two_and_three_ranks_match_the_single_process_call(tmp_path):
    """Two ranks: every divergence and layout (padded vocab_size on every other case), "auto", shards without
    mass, the bytes sent, bad input. Three ranks with width 16: vocab_size 27 leaves rank 2 no real column,
    vocab_size 9 leaves ranks 1 and 2 none; "triton+cuda" too (the CUDA backward's host build)."""
    pair_cases = (_matrix(("torch",), width=40, vocab_sizes=(None, 61))
                  + _matrix(("triton",), width=40, vocab_sizes=(61,), layouts=("packed",))
                  + _matrix(("auto",), width=40, vocab_sizes=(None,), layouts=("batched",))[:1]
                  + _without_mass(("torch",), shards=(("teacher", 1), ("student", 0)))
                  + _without_mass(("triton",), shards=(("teacher", 1),)))
    trio_cases = (_matrix(("torch", "triton"), width=16, vocab_sizes=(27, 9))
                  + _matrix(("triton+cuda",), width=16, vocab_sizes=(9,), layouts=("packed",)))
    _spawn(tmp_path, 3, _pair_then_trio, pair_cases, trio_cases)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mix_op_with_the_rows_own_normalisers_is_the_forwards_mix(backend):
    """The row op `mix` (jsd's K_s, K_t with the normalisers given) reproduces the forward's MIX_S and MIX_T when
    given the rows' own statistics; masked rows (NaN logits) are exact zeros."""
    torch.manual_seed(0)
    problem = make_problem("batched", B=2, T=5, V=50, neg_inf=True, dtype=torch.bfloat16, teacher_dtype=torch.float32)
    student, teacher, mask = problem["student"], problem["teacher"], problem["mask"].reshape(-1)
    ops = registry.resolve(backend, student.device)
    call = make_row_call(student, teacher, 50, 1.3, DIVERGENCE_CODES["jsd"], BETA)
    stats = ops.forward(student, teacher, mask, call)
    mixes = ops.mix(student, teacher, mask, stats, call)
    torch.testing.assert_close(mixes, stats[[Stat.MIX_S, Stat.MIX_T]], rtol=FP32_RTOL, atol=1e-6)
    assert (mixes[:, ~mask] == 0).all() and (mixes[:, mask] > 0).all()
    if backend == "torch":
        torch.library.opcheck(ops.mix_op, (student, teacher, mask, stats, *call))


def test_group_without_initialised_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="vocab_parallel_group: torch.distributed is not initialised"):
        topd_kernels.fused_window_kl(torch.randn(4, 8), torch.randn(4, 8), vocab_parallel_group=object())


def test_example_under_torchrun():
    """examples/vocab_parallel.py, as the README runs it: every rank's loss is the single-process loss."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE)],
        capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, env={**os.environ, **LOOPBACK})
    assert result.returncode == 0, result.stdout + result.stderr
    number = r"([-+0-9.e]+)"
    found = re.findall(rf"rank (\d)/2: .*? vocab-parallel loss {number}, single-process loss {number}, "
                       rf"largest gradient difference on its columns {number}", result.stdout)
    assert sorted(rank for rank, *_ in found) == ["0", "1"], result.stdout
    for _, loss, single, gap in found:
        assert abs(float(loss) - float(single)) <= 1e-5 and float(gap) <= 1e-6, result.stdout
