"""The CUDA extension's backward arithmetic, checked on the CPU through its host build.

`topd_kernels._cuda_backward.row_backward_host` runs the same `__host__ __device__` code as the CUDA
kernel (csrc/row_backward_math.cuh: vector/scalar paths, tails, padding, masked rows, chunked rows) over
host memory. Truth: the float64 autograd gradient of sum_t coef_t d_t, with d_t from the lead's float64
reference (`topd_kernels.reference.token_divergence`), and the tolerance: row_cases.py, shared with the
Triton row tests. The saved statistics come from
`torch_rows.row_forward` in float32, as in the real pipeline.

These tests are skipped ONLY when TOPD_CUDA_BUILD=0 is set or nvcc is absent (the extension cannot have
been built). When nvcc is present and the module is missing, they fail.
"""
from __future__ import annotations

import pytest
import torch

from cuda_helpers import extension_skip_reason, laid_out, like, nvcc_path
from row_cases import NAN, INF, assert_close, rand_logits, row_atol, truth
from topd_kernels import cuda_rows, torch_rows

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


pytestmark = pytest.mark.skipif(extension_skip_reason() is not None, reason=str(extension_skip_reason()))


@pytest.fixture(scope="module", autouse=True)
def extension():
    built, why = cuda_rows.extension_status()
    if not built:
        pytest.fail(f"nvcc is present ({nvcc_path()}) but the CUDA extension is not built: {why}")
    return built


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _run_and_check(student, teacher, coef, V, tau, divergence, beta, want_teacher, *, gs=None, gt=None,
                   **host_kw):
    stats = torch_rows.row_forward(student, teacher, V, tau, divergence, beta)
    gs = like(student) if gs is None else gs
    gt = (like(teacher) if gt is None else gt) if want_teacher else None
    s_before, t_before, stats_before = student.clone(), teacher.clone(), stats.clone()
    cuda_rows.row_backward_host(student, teacher, stats, coef, V, tau, divergence, beta, gs, gt, **host_kw)
    # inputs untouched (NaN-aware)
    assert torch.equal(student.isnan(), s_before.isnan()) and torch.equal(student.nan_to_num(), s_before.nan_to_num())
    assert torch.equal(teacher.isnan(), t_before.isnan()) and torch.equal(teacher.nan_to_num(), t_before.nan_to_num())
    assert torch.equal(stats.nan_to_num(), stats_before.nan_to_num())
    _, want_s, want_t = truth(student, teacher, coef, V, tau, divergence, beta, want_teacher=want_teacher)
    atol = row_atol(student, teacher, coef, stats, V, tau)
    assert_close(gs, want_s, "grad_student", atol)
    masked = coef == 0
    assert (gs[masked] == 0).all() and (gs[:, V:] == 0).all()
    if want_teacher:
        assert_close(gt, want_t, "grad_teacher", atol)
        assert (gt[masked] == 0).all() and (gt[:, V:] == 0).all()
    return gs, gt


def _coef(n, masked_rows=()):
    coef = torch.rand(n) * 1.5 + 0.25
    coef[list(masked_rows)] = 0.0
    return coef


def _poison(x, rows):
    """Non-finite logits on masked rows: the backward must not read them (exact zeros out)."""
    for k, r in enumerate(rows):
        x[r, ::3] = (NAN, INF, -INF)[k % 3]
        x[r, 1::3] = NAN


# ---------------------------------------------------------------------------------------------------
# The matrix: divergence x dtypes x teacher gradient x memory layout (vector path, scalar path, strides)
# ---------------------------------------------------------------------------------------------------
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
]

# name: (student width, teacher width, vocab_size, student (offset, row stride), teacher (offset, row stride),
#        outputs (offset, student-grad row stride, teacher-grad row stride), temperature, host kwargs)
LAYOUTS = {
    # 16-byte aligned rows: vector path, a scalar tail (997 = 124 * 8 + 5), then padding zeros
    "aligned": (1024, 1040, 997, (0, None), (0, None), (0, None, None), 1.0, {}),
    # odd widths, contiguous: every row misaligned -> scalar path; widths differ, V < both
    "unaligned": (1003, 1001, 999, (0, None), (0, None), (0, None, None), 0.7, {}),
    # row-strided views, aligned (offset 8 elements, strides multiples of 8), strided outputs too
    "strided_aligned": (1040, 1024, 1000, (8, 1088), (16, 1104), (8, 1096, 1032), 2.0, {}),
    # row-strided views with a misaligned base -> scalar path
    "strided_unaligned": (1010, 1030, 1010, (3, 1100), (5, 1031), (1, 1013, 1037), 1.0, {}),
    # the kernel's work split: rows cut in 64-column chunks, 3 cooperating "threads" per chunk
    "chunked": (1024, 1056, 1001, (0, None), (8, 1064), (0, None, None), 1.5, {"chunk_cols": 64, "emulated_threads": 3}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("want_teacher", [True, False], ids=["grad_t", "no_grad_t"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_host_matches_float64(divergence, dtypes, want_teacher, layout, seed):
    ws, wt, V, (so, ss), (to, ts), (oo, gss, gts), tau, host_kw = LAYOUTS[layout]
    n = 7
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V))   # garbage past vocab_size must be ignored
    student = laid_out(base_s, dtypes[0], offset=so, row_stride=ss)
    teacher = laid_out(base_t, dtypes[1], offset=to, row_stride=ts)
    masked = (1, 4)
    _poison(student, masked)
    _poison(teacher, masked)
    coef = _coef(n, masked)
    gs = like(student, offset=oo, row_stride=gss)
    gt = like(teacher, offset=oo, row_stride=gts) if want_teacher else None
    beta = 0.3 if divergence == "jsd" else 0.5
    _run_and_check(student, teacher, coef, V, tau, divergence, beta, want_teacher, gs=gs, gt=gt, **host_kw)


# ---------------------------------------------------------------------------------------------------
# -inf entries (p == 0 -> the term is 0, never 0 * inf = NaN)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_neg_inf_entries(divergence, dtype, layout, seed):
    width = 1024 if layout == "aligned" else 1001
    n, V = 6, width - 3
    s, t = (laid_out(x, dtype) for x in rand_logits(n, V, pad=(width - V, width - V)))
    both = torch.rand(n, V) < 0.2            # banned tokens: -inf for both models
    both[:, 0] = False                       # column 0 stays finite: every row normalisable
    s[:, :V][both] = -INF
    t[:, :V][both] = -INF
    # one-sided -inf only where the divergence stays finite:
    # reverse KL tolerates p_s = 0 where p_t > 0; forward KL the opposite; JSD either.
    only = (torch.rand(n, V) < 0.1) & ~both
    only[:, 0] = False
    half = torch.rand(n, V) < 0.5
    if divergence == "reverse_kl":
        s[:, :V][only] = -INF
    elif divergence == "forward_kl":
        t[:, :V][only] = -INF
    else:
        s[:, :V][only & half] = -INF
        t[:, :V][only & ~half] = -INF
    coef = _coef(n, masked_rows=(2,))
    gs, gt = _run_and_check(s, t, coef, V, 1.0, divergence, 0.4, True)
    # the side whose p is 0 gets exactly 0 there
    if divergence == "reverse_kl":
        assert (gs[:, :V][s[:, :V] == -INF] == 0).all()
    if divergence == "forward_kl":
        assert (gt[:, :V][t[:, :V] == -INF] == 0).all()
    if divergence == "jsd":
        assert (gs[:, :V][s[:, :V] == -INF] == 0).all() and (gt[:, :V][t[:, :V] == -INF] == 0).all()
    assert (gs[:, :V][both] == 0).all() and (gt[:, :V][both] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Masked rows, edge shapes, temperature, argument checks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_masked_with_nonfinitelogits(divergence):
    n, width = 5, 1024
    s = torch.full((n, width), NAN, dtype=torch.bfloat16)
    t = torch.full((n, width), INF, dtype=torch.float32)
    stats = torch.full((4, n), NAN)
    gs, gt = like(s), like(t)
    cuda_rows.row_backward_host(s, t, stats, torch.zeros(n), 1000, 1.0, divergence, 0.5, gs, gt)
    assert (gs == 0).all() and (gt == 0).all()
    assert not torch.signbit(gs.float()).any(), "masked rows must be +0.0"


@pytest.mark.parametrize("tau", [0.25, 0.7, 1.0, 3.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature(divergence, tau, seed):
    n, width = 4, 512
    s, t = rand_logits(n, width, dtype=torch.float32)
    _run_and_check(s, t, _coef(n), width, tau, divergence, 0.7, True)


def test_small_and_degenerate_shapes(seed):
    for n, width, V in [(1, 8, 8), (3, 1, 1), (2, 7, 5), (2, 16, 9), (0, 32, 32), (3, 24, 0)]:
        s, t = rand_logits(n, V, pad=(width - V, width + 2 - V), correlation=0.0)
        s, t = s.to(torch.bfloat16), t.to(torch.float32)
        coef = _coef(n)
        if V == 0:   # nothing to differentiate: everything is padding
            gs, gt = like(s), like(t)
            stats = torch.zeros(4, n)
            cuda_rows.row_backward_host(s, t, stats, coef, 0, 1.0, "reverse_kl", 0.5, gs, gt)
            assert (gs == 0).all() and (gt == 0).all()
            continue
        for divergence in DIVERGENCES:
            _run_and_check(s, t, coef, V, 1.0, divergence, 0.5, True)


def test_beta_extremes_jsd(seed):
    n, width = 4, 256
    s, t = rand_logits(n, width, correlation=0.0, dtype=torch.float32)
    for beta in (0.01, 0.5, 0.99):
        _run_and_check(s, t, _coef(n), width, 1.0, "jsd", beta, True)


def test_stats_and_coef_strides(seed):
    """stats as a (4, N) view with a non-unit row stride, coef as a strided view."""
    n, width = 6, 264
    s, t = rand_logits(n, width, correlation=0.0, dtype=torch.float16)
    stats = torch_rows.row_forward(s, t, width, 1.0, "reverse_kl", 0.5)
    wide = torch.full((4, 2 * n), NAN)
    wide[:, ::2] = stats
    coef_buf = torch.full((3 * n,), NAN)
    coef_buf[::3] = _coef(n, (0,))
    gs, gt = like(s), like(t)
    cuda_rows.row_backward_host(s, t, wide[:, ::2], coef_buf[::3], width, 1.0, "reverse_kl", 0.5, gs, gt)
    _, want_s, want_t = truth(s, t, coef_buf[::3], width, 1.0, "reverse_kl", 0.5)
    atol = row_atol(s, t, coef_buf[::3], stats, width, 1.0)
    assert_close(gs, want_s, "grad_student", atol)
    assert_close(gt, want_t, "grad_teacher", atol)


def test_argument_checks():
    n, width = 3, 64
    s, t = torch.randn(n, width), torch.randn(n, width)
    stats, coef = torch.zeros(4, n), torch.ones(n)
    gs, gt = torch.empty_like(s), torch.empty_like(t)
    call = cuda_rows.row_backward_host
    with pytest.raises(TypeError, match="student"):
        call(s.double(), t, stats, coef, width, 1.0, "reverse_kl", 0.5, gs.double(), gt)
    with pytest.raises(ValueError, match="last dim"):
        call(torch.randn(width, n).t(), t, stats, coef, width, 1.0, "reverse_kl", 0.5, gs, gt)
    with pytest.raises(ValueError, match="grad_student"):
        call(s, t, stats, coef, width, 1.0, "reverse_kl", 0.5, gs.half(), gt)
    with pytest.raises(ValueError, match="vocab_size"):
        call(s, t, stats, coef, width + 1, 1.0, "reverse_kl", 0.5, gs, gt)
    with pytest.raises(ValueError, match="divergence"):
        call(s, t, stats, coef, width, 1.0, "kl", 0.5, gs, gt)
    with pytest.raises(ValueError, match="beta"):
        call(s, t, stats, coef, width, 1.0, "jsd", 1.0, gs, gt)
    with pytest.raises(ValueError, match="temperature"):
        call(s, t, stats, coef, width, 0.0, "reverse_kl", 0.5, gs, gt)
    with pytest.raises(ValueError, match="stats"):
        call(s, t, stats[:3], coef, width, 1.0, "reverse_kl", 0.5, gs, gt)
    with pytest.raises(ValueError, match="chunk_cols"):
        call(s, t, stats, coef, width, 1.0, "reverse_kl", 0.5, gs, gt, chunk_cols=12)
    with pytest.raises(ValueError, match="cuda"):
        cuda_rows.row_backward(s, t, stats, coef, width, 1.0, "reverse_kl", 0.5, gs, gt)


def test_extension_status_names_architectures():
    built, reason = cuda_rows.extension_status()
    assert built and "sm_" in reason and "nvcc" in reason
