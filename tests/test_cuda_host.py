"""The CUDA extension's backward, checked on the CPU through its host build.

On CPU tensors `cuda_rows.row_backward` (the op `topd::cuda_row_backward`) runs the extension's host
build: the same `__host__ __device__` code as the CUDA kernel (csrc/row_backward_math.cuh: vector/scalar
paths, tails, padding, masked rows, chunked rows, the two-stride row addressing of the inputs and of the
gradients) over host memory. The backward is mutating (the row contract): it writes into gradients the
caller allocates, here NaN-filled, fresh or strided rows of larger buffers (cuda_helpers.GRAD_LAYOUTS),
and every test checks that every row is written and nothing outside the rows is.
Truth: the float64 autograd gradient of sum_t coef_t d_t (row_cases.truth), and the tolerance
(row_cases.row_atol / assert_close), shared with the Triton row tests. The saved statistics come from
the torch backend's forward in float32 (the contract's layout), as in the real pipeline.

These tests are skipped ONLY when TOPD_CUDA_BUILD=0 is set or nvcc is absent (the extension cannot have
been built). When nvcc is present and the module is missing, they fail.
"""
from __future__ import annotations

import pytest
import torch

from cuda_helpers import (DIVERGENCES, DTYPE_PAIRS, GRAD_LAYOUTS, LAYOUTS, at_row, extension_skip_reason, flat,
                          fresh_backward, grad_in_buffer, laid_out, make_call, nvcc_path, row_stats, run_and_check)
from row_cases import INF, NAN, ULP, rand_logits, truth
from topd_kernels.config import DIVERGENCE_CODES
from topd_kernels.rows import cuda_rows
from topd_kernels.rows.contract import LOGIT_DTYPES, NUM_STATS, RowCall, Stat

pytestmark = pytest.mark.skipif(extension_skip_reason() is not None, reason=str(extension_skip_reason()))


@pytest.fixture(scope="module", autouse=True)
def extension():
    built, why = cuda_rows.extension_status()
    if not built:
        pytest.fail(f"nvcc is present ({nvcc_path()}) but the CUDA extension is not built: {why}")
    return cuda_rows.EXTENSION


def _coef(n, masked_rows=()):
    coef = torch.rand(n) * 1.5 + 0.25
    coef[list(masked_rows)] = 0.0
    return coef


def _poison(x, rows):
    """Non-finite logits on masked rows: the backward must not read them (exact zeros out)."""
    for k, r in enumerate(rows):
        row = at_row(x, r)
        row[::3] = (NAN, INF, -INF)[k % 3]
        row[1::3] = NAN


# ---------------------------------------------------------------------------------------------------
# The codes and the call shared with the C++ side
# ---------------------------------------------------------------------------------------------------
def test_codes_agree_with_python(extension):
    assert extension.divergence_codes == DIVERGENCE_CODES
    assert extension.stat_rows == {s.name: int(s) for s in Stat}
    assert len(extension.stat_rows) == NUM_STATS
    assert {getattr(torch, name) for name in extension.dtype_codes} == set(LOGIT_DTYPES)
    assert sorted(extension.dtype_codes.values()) == list(range(len(LOGIT_DTYPES)))


def _valid_call(extension, divergence="reverse_kl"):
    """A BackwardCall filled by cuda_rows from real tensors (and the tensors, which must stay alive)."""
    s, t = (laid_out(x, torch.float32, batch=2) for x in rand_logits(6, 64))
    coef = _coef(6)
    call = make_call(s, t, 64, 1.0, divergence, 0.5)
    stats = row_stats(s, t, coef, call)
    gs, gt = torch.empty_like(s), torch.empty_like(t)
    fields = cuda_rows._call_fields(s, t, stats, coef, gs, gt, call, 0)
    backward_call = extension.BackwardCall()
    for k, v in fields.items():
        setattr(backward_call, k, v)
    return backward_call, fields, (s, t, stats, coef, gs, gt)


def test_python_fills_every_field_of_the_call(extension):
    backward_call, fields, keep = _valid_call(extension)
    assert tuple(fields) == extension.call_fields
    assert backward_call.validate() == ""
    extension.row_backward_host(backward_call)
    with pytest.raises(AttributeError):   # a misspelt field cannot pass silently
        backward_call.vocab_sise = 3
    assert "vocab_size=64" in repr(backward_call)


def test_gradient_strides_reach_the_call(extension):
    """The gradients' own strides fill the call (not the logits', not the widths); no teacher gradient:
    address 0 and strides 0."""
    s, t = (laid_out(x, torch.float32, batch=2, stride_t=72) for x in rand_logits(6, 64))
    coef = _coef(6)
    call = make_call(s, t, 64, 1.0, "reverse_kl", 0.5)
    stats = row_stats(s, t, coef, call)
    gs = grad_in_buffer(s.shape, s.dtype, "cpu", "inner").rows
    gt = grad_in_buffer(t.shape, t.dtype, "cpu", "transposed").rows
    fields = cuda_rows._call_fields(s, t, stats, coef, gs, gt, call, 0)
    assert (fields["gs_stride_b"], fields["gs_stride_t"]) == gs.stride()[:2] == (5 * 67, 67)
    assert (fields["gt_stride_b"], fields["gt_stride_t"]) == gt.stride()[:2] == (66, 2 * 66)
    assert fields["grad_student"] == gs.data_ptr() and fields["grad_teacher"] == gt.data_ptr()
    fields = cuda_rows._call_fields(s, t, stats, coef, gs, None, call, 0)
    assert fields["grad_teacher"] == fields["gt_stride_b"] == fields["gt_stride_t"] == 0


def test_stale_call_layout_is_detected(extension):
    """A build whose BackwardCall has other fields (e.g. from before the gradients had strides) is stale:
    cuda_rows reports it unavailable instead of failing at the first call or leaving a field at its default."""
    class Build:
        def __init__(self, fields):
            self.call_fields = fields

    assert not cuda_rows._call_layout_differs(extension)
    fields = extension.call_fields
    old = tuple(f for f in fields if not f.startswith(("gs_", "gt_")))
    assert len(old) == len(fields) - 4
    for other in (old, fields + ("extra",), fields[1:] + fields[:1], ()):
        assert cuda_rows._call_layout_differs(Build(other))


@pytest.mark.parametrize("field, value, reason", [
    ("vocab_size", 0, "vocab_size"), ("vocab_size", 65, "vocab_size"), ("vocab_size", -1, "vocab_size"),
    ("temperature", 0.0, "temperature"), ("temperature", INF, "temperature"), ("temperature", NAN, "temperature"),
    ("divergence", 3, "divergence"), ("divergence", -1, "divergence"),
    ("student_dtype", 3, "student_dtype"), ("teacher_dtype", -1, "teacher_dtype"),
    ("batch", -1, "batch"), ("length", 2**31, "batch \\* length"),
    ("s_stride_t", -64, "strides"), ("t_stride_b", -1, "strides"), ("stats_s1", -1, "strides"),
    ("coef_s0", -1, "strides"), ("chunk_cols", 12, "chunk_cols"), ("chunk_cols", -8, "chunk_cols"),
    ("gs_stride_b", -1, "strides"), ("gs_stride_t", -64, "strides"), ("gt_stride_b", -1, "strides"),
    ("gt_stride_t", -1, "strides"),
    # (B, T, V) = (2, 3, 64): every row of a gradient is written, so its rows must not overlap
    ("gs_stride_t", 0, "grad_student: rows overlap"), ("gs_stride_t", 63, "grad_student: rows overlap"),
    ("gs_stride_b", 3 * 64 - 1, "grad_student: rows overlap"), ("gs_stride_b", 64, "grad_student: rows overlap"),
    ("gt_stride_b", 0, "grad_teacher: rows overlap"), ("gt_stride_t", 1, "grad_teacher: rows overlap"),
    ("student", 0, "null address"), ("coef", 0, "null address"), ("grad_student", 0, "null address"),
])
def test_cpp_validate(extension, field, value, reason):
    """The C++ validate, the guard at the raw-address boundary, on calls that bypass the Python checks."""
    backward_call, _, keep = _valid_call(extension)
    setattr(backward_call, field, value)
    assert backward_call.validate()
    with pytest.raises(ValueError, match=reason):
        extension.row_backward_host(backward_call)


@pytest.mark.parametrize("stride_b, stride_t", [(3 * 64, 64), (64, 2 * 64), (1000, 64), (64, 200), (0, 64)])
def test_cpp_validate_accepts_disjoint_gradient_rows(extension, stride_b, stride_t):
    """Disjoint rows in any order (a transposed (T, B) layout: stride_b < stride_t) pass the C++ check;
    stride_b = 0 only where the batch never steps (a (1, T, V) call). Without a teacher gradient (address 0)
    its strides are not looked at."""
    backward_call, _, keep = _valid_call(extension)
    if stride_b == 0:
        backward_call.batch = 1
    backward_call.gs_stride_b, backward_call.gs_stride_t = stride_b, stride_t
    backward_call.grad_student = backward_call.grad_teacher   # room for any of these layouts: not run
    assert backward_call.validate() == ""
    # strides whose span overflows int64: rows (0, 1) and (1, 0) overlap, and the check must say so
    backward_call, _, keep = _valid_call(extension)
    backward_call.gs_stride_b, backward_call.gs_stride_t = 2**62 + 1, 2**62
    assert "grad_student: rows overlap" in backward_call.validate()
    backward_call, _, keep = _valid_call(extension)
    backward_call.grad_teacher, backward_call.gt_stride_b, backward_call.gt_stride_t = 0, 0, 0
    assert backward_call.validate() == ""
    extension.row_backward_host(backward_call)


def test_cpp_validate_jsd_beta(extension):
    for beta in (0.0, 1.0, NAN):
        backward_call, _, keep = _valid_call(extension, "jsd")
        backward_call.beta = beta
        with pytest.raises(ValueError, match="beta"):
            extension.row_backward_host(backward_call)
    with pytest.raises(ValueError, match="emulated_threads"):
        extension.row_backward_host(_valid_call(extension)[0], 0)


# ---------------------------------------------------------------------------------------------------
# The matrix: divergence x dtypes x teacher gradient x memory layout (vector path, scalar path, strides)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("want_teacher", [True, False], ids=["grad_t", "no_grad_t"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_host_matches_float64(divergence, dtypes, want_teacher, layout, seed, nan_poisoned_empty):
    B, T, ws, wt, V, s_layout, t_layout, tau, work_split = LAYOUTS[layout]
    n = B * T
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V))   # garbage past vocab_size must be ignored
    student = laid_out(base_s, dtypes[0], batch=B, **s_layout)
    teacher = laid_out(base_t, dtypes[1], batch=B, **t_layout)
    masked = (1, n - 2)
    _poison(student, masked)
    if t_layout.get("stride_b") != 0:   # a broadcast teacher's rows are shared with live rows
        _poison(teacher, masked)
    coef = _coef(n, masked)
    beta = 0.3 if divergence == "jsd" else 0.5
    run_and_check(student, teacher, coef, V, tau, divergence, beta, want_teacher, **work_split)


# ---------------------------------------------------------------------------------------------------
# Gradients written into strided rows of larger buffers (the caller's: e.g. grad_base[:, :-1])
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_layout", [g for g in GRAD_LAYOUTS if g != "fresh"])
@pytest.mark.parametrize("layout", ["aligned", "strided_aligned", "chunked"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradients_into_strided_rows(divergence, dtypes, layout, grad_layout, seed):
    """Each gradient in turn (the other one fresh and contiguous; the student's alone without the teacher
    gradient) as the rows of a larger NaN-filled buffer (cuda_helpers.GRAD_LAYOUTS): the rows equal, bit for
    bit, those written into fresh contiguous tensors and the float64 truth; nothing outside them is
    touched (still NaN); masked rows (NaN logits) and padding exact zeros. The inputs are 16-byte aligned,
    so with misaligned gradient rows (odd base, batch or time stride) the vector path would be taken unless
    the alignment check covers the gradients' strides, and the host build throws on the misaligned access."""
    B, T, ws, wt, V, s_layout, t_layout, tau, work_split = LAYOUTS[layout]
    n = B * T
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V))
    student = laid_out(base_s, dtypes[0], batch=B, **s_layout)
    teacher = laid_out(base_t, dtypes[1], batch=B, **t_layout)
    masked = (2, n - 1)
    _poison(student, masked)
    _poison(teacher, masked)
    coef = _coef(n, masked)
    beta = 0.3 if divergence == "jsd" else 0.5
    call = make_call(student, teacher, V, tau, divergence, beta)
    stats = row_stats(student, teacher, coef, call)
    want_s, want_t = fresh_backward(student, teacher, stats, coef, call, True,
                                    lambda *a: cuda_rows.run_backward(*a, **work_split))
    for grads, want_teacher in (((grad_layout, "fresh"), True), (("fresh", grad_layout), True),
                                ((grad_layout, grad_layout), False)):
        gs, gt = run_and_check(student, teacher, coef, V, tau, divergence, beta, want_teacher, stats=stats,
                               grads=grads, **work_split)
        assert torch.equal(gs, want_s), f"grad_student rows {grads[0]} differ from the contiguous result"
        if want_teacher:
            assert torch.equal(gt, want_t), f"grad_teacher rows {grads[1]} differ from the contiguous result"


# ---------------------------------------------------------------------------------------------------
# -inf entries (p == 0 -> the term is 0, never 0 * inf = NaN)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_neg_inf_entries(divergence, dtype, layout, seed):
    width = 1024 if layout == "aligned" else 1001
    n, V = 6, width - 3
    s, t = rand_logits(n, V, pad=(width - V, width - V))
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
    s, t = laid_out(s, dtype, batch=2), laid_out(t, dtype, batch=2)
    coef = _coef(n, masked_rows=(2,))
    gs, gt = run_and_check(s, t, coef, V, 1.0, divergence, 0.4, True)
    gs, gt, s, t = flat(gs)[:, :V], flat(gt)[:, :V], flat(s)[:, :V], flat(t)[:, :V]
    # the side whose p is 0 gets exactly 0 there
    if divergence == "reverse_kl":
        assert (gs[s == -INF] == 0).all()
    if divergence == "forward_kl":
        assert (gt[t == -INF] == 0).all()
    if divergence == "jsd":
        assert (gs[s == -INF] == 0).all() and (gt[t == -INF] == 0).all()
    assert (gs[both] == 0).all() and (gt[both] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Precision: a large common offset of the logits
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_common_offset(divergence, tau, seed):
    """logits = 1e4 + 3 randn in float32: log p = (z - max z) / tau - logsum keeps the gradient within a small
    multiple of plain float32 PyTorch's error (log_softmax of the float32 logits, autograd). The former
    z / tau - lse cancelled: log p off by about ulp(1e4) ~ 1e-3, the gradient by ~1e-3 relative."""
    n, V = 8, 2048
    base = torch.randn(n, V, dtype=torch.float64) * 3.0
    s64 = 1e4 + base
    t64 = 1e4 + 0.8 * base + 0.6 * 3.0 * torch.randn(n, V, dtype=torch.float64)
    s, t = laid_out(s64, torch.float32, batch=2), laid_out(t64, torch.float32, batch=2)
    coef = _coef(n, masked_rows=(5,))
    gs, gt = run_and_check(s, t, coef, V, tau, divergence, 0.3, True)
    _, want_s, want_t = truth(flat(s), flat(t), coef, V, tau, divergence, 0.3)
    _, f32_s, f32_t = truth(flat(s), flat(t), coef, V, tau, divergence, 0.3, dtype=None)
    for name, got, want, plain in (("grad_student", gs, want_s, f32_s), ("grad_teacher", gt, want_t, f32_t)):
        err = float((flat(got).double() - want).abs().max())
        plain_err = float((plain.double() - want).abs().max())
        scale = float(want.abs().max())
        bound = 4.0 * plain_err + 2 * ULP[torch.float32] * scale   # plus one float32 rounding of the largest
        assert err <= bound, f"{name}: error {err:.3g}, plain float32 PyTorch's {plain_err:.3g}"
        if tau == 1.0:   # the check can tell: the cancelling formula would be ~1e-3 * scale off (plain float32
            # PyTorch's own error varies with the draw, up to ~4e-6 * scale seen: 1e-4 keeps a factor 10 of margin)
            assert bound < 1e-4 * scale, f"{name}: plain float32 PyTorch's own error {plain_err:.3g} is too large"


# ---------------------------------------------------------------------------------------------------
# Masked rows, edge shapes, temperature, strided statistics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_masked_with_nonfinite_logits(divergence):
    B, T, width = 2, 3, 1024
    s = torch.full((B, T, width), NAN, dtype=torch.bfloat16)
    t = torch.full((B, T, width), INF, dtype=torch.float32)
    stats = torch.full((NUM_STATS, B * T), NAN)
    call = make_call(s, t, 1000, 1.0, divergence, 0.5)
    for layout in ("fresh", "inner", "aligned_gaps"):
        into_s, into_t = (grad_in_buffer(x.shape, x.dtype, "cpu", layout) for x in (s, t))
        assert cuda_rows.row_backward(s, t, stats, torch.zeros(B * T), call, into_s.rows, into_t.rows) is None
        gs, gt = into_s.rows, into_t.rows
        assert (gs == 0).all() and (gt == 0).all()
        assert not torch.signbit(gs.float()).any() and not torch.signbit(gt).any(), "masked rows must be +0.0"
        assert into_s.untouched_outside() and into_t.untouched_outside(), layout


@pytest.mark.parametrize("tau", [0.25, 0.7, 1.0, 3.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature(divergence, tau, seed):
    n, width = 4, 512
    s, t = (laid_out(x, torch.float32, batch=2) for x in rand_logits(n, width))
    run_and_check(s, t, _coef(n), width, tau, divergence, 0.7, True)


@pytest.mark.parametrize("B, T, width, V", [(1, 1, 8, 8), (3, 1, 1, 1), (1, 2, 7, 5), (2, 1, 16, 9),
                                            (0, 4, 32, 32), (4, 0, 32, 32)])
def test_small_and_empty_shapes(B, T, width, V, seed):
    n = B * T
    s, t = rand_logits(n, V, pad=(width - V, width + 2 - V), correlation=0.0)
    s = laid_out(s.reshape(B, T, width), torch.bfloat16)
    t = laid_out(t.reshape(B, T, width + 2), torch.float32)
    for divergence in DIVERGENCES:
        for want_teacher in (True, False):
            for grads in zip(GRAD_LAYOUTS, GRAD_LAYOUTS[1:] + GRAD_LAYOUTS[:1]):
                run_and_check(s, t, _coef(n), V, 1.0, divergence, 0.5, want_teacher, grads=grads)


def test_beta_extremes_jsd(seed):
    n, width = 4, 256
    s, t = (laid_out(x, torch.float32, batch=2) for x in rand_logits(n, width, correlation=0.0))
    for beta in (0.01, 0.5, 0.99):
        run_and_check(s, t, _coef(n), width, 1.0, "jsd", beta, True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_stats_and_coef_strides(divergence, seed):
    """stats as (NUM_STATS, N) views with non-unit strides (every other column; a transposed (N, NUM_STATS)),
    coef as a strided view; the gaps hold NaN."""
    n, width = 6, 264
    s, t = (laid_out(x, torch.float16, batch=3) for x in rand_logits(n, width, correlation=0.0))
    coef_buf = torch.full((3 * n,), NAN)
    coef_buf[::3] = _coef(n, (0,))
    coef = coef_buf[::3]
    call = make_call(s, t, width, 1.0, divergence, 0.4)
    stats = row_stats(s, t, coef, call)
    wide = torch.full((NUM_STATS, 2 * n), NAN)
    wide[:, ::2] = stats
    transposed = stats.t().contiguous().t()
    for strided in (wide[:, ::2], transposed):
        assert strided.stride() != stats.stride()
        run_and_check(s, t, coef, width, 1.0, divergence, 0.4, True, stats=strided)


# ---------------------------------------------------------------------------------------------------
# The op: argument checks, torch.library.opcheck, fullgraph compile
# ---------------------------------------------------------------------------------------------------
def test_argument_checks():
    B, T, width = 2, 3, 64
    s, t = torch.randn(B, T, width), torch.randn(B, T, width)
    n = B * T
    stats, coef = torch.zeros(NUM_STATS, n), torch.ones(n)
    call = make_call(s, t, width, 1.0, "reverse_kl")
    gs, gt = torch.empty_like(s), torch.empty_like(t)

    def backward(*args, grads=(gs, gt)):
        return cuda_rows.row_backward(*args, *grads)

    with pytest.raises(ValueError, match="student"):
        backward(s.double(), t, stats, coef, call, grads=(gs.double(), gt))
    with pytest.raises(ValueError, match="student"):
        backward(s[0], t, stats, coef, call)
    with pytest.raises(ValueError, match="teacher"):
        backward(s, torch.randn(width, T, B).permute(2, 1, 0), stats, coef, call)   # last stride != 1
    with pytest.raises(ValueError, match="teacher"):
        backward(s, t[:1], stats, coef, call)
    with pytest.raises(ValueError, match="vocab_size"):
        backward(s, t, stats, coef, call._replace(vocab_size=width + 1))
    with pytest.raises(ValueError, match="vocab_size"):
        backward(s, t, stats, coef, call._replace(vocab_size=0))
    with pytest.raises(ValueError, match="temperature"):
        backward(s, t, stats, coef, call._replace(temperature=0.0))
    with pytest.raises(ValueError, match="beta"):
        backward(s, t, stats, coef, call._replace(divergence=DIVERGENCE_CODES["jsd"], beta=1.0))
    with pytest.raises(ValueError, match="divergence"):
        backward(s, t, stats, coef, call._replace(divergence=3))
    with pytest.raises(ValueError, match="stats"):
        backward(s, t, stats[:4], coef, call)   # the former 4-row layout
    with pytest.raises(ValueError, match="stats"):
        backward(s, t, stats.double(), coef, call)
    with pytest.raises(ValueError, match="coef"):
        backward(s, t, stats, coef[:-1], call)
    with pytest.raises(ValueError, match="coef"):
        backward(s, t, stats, coef.half(), call)
    with pytest.raises(ValueError, match="chunk_cols"):
        cuda_rows.run_backward(s, t, stats, coef, call, gs, gt, chunk_cols=12)
    with pytest.raises(ValueError, match="emulated_threads"):
        cuda_rows.run_backward(s, t, stats, coef, call, gs, gt, emulated_threads=0)
    meta = s.to("meta"), t.to("meta"), stats.to("meta"), coef.to("meta")
    with pytest.raises(ValueError, match="meta"):
        cuda_rows.row_backward(*meta, call, gs.to("meta"), gt.to("meta"))


def _bad_gradients(x):
    """Gradients of (B, T, V) logits `x` the extension must refuse: it writes through their address, the
    logits' sizes and their own strides."""
    B, T, V = x.shape
    wide = torch.empty(B, T, 2 * V, dtype=x.dtype)
    return {
        "shape": torch.empty(B, T, V + 1, dtype=x.dtype),
        "rows": torch.empty(B, T + 1, V, dtype=x.dtype),
        "dtype": torch.empty(B, T, V, dtype=torch.float16),
        "device": torch.empty(B, T, V, dtype=x.dtype, device="meta"),
        "last stride": wide[..., ::2],
        "expanded batch": torch.empty(1, T, V, dtype=x.dtype).expand(B, T, V),
        "expanded time": torch.empty(B, 1, V, dtype=x.dtype).expand(B, T, V),
        "rows closer than a row": torch.empty(B * T * V, dtype=x.dtype).as_strided((B, T, V), (T * (V // 2), V // 2, 1)),
        "batch inside a row": torch.empty(B * T * V, dtype=x.dtype).as_strided((B, T, V), (1, V + B, 1)),
        "not a tensor": None,
    }


@pytest.mark.parametrize("which", ["grad_student", "grad_teacher"])
def test_bad_gradients_are_refused(which):
    """A wrong shape, dtype or device, a non-unit last stride, or rows that overlap are refused before any
    write, for either gradient; the good gradient is left as it was (no partial write)."""
    B, T, width = 2, 3, 64
    s, t = torch.randn(B, T, width), torch.randn(B, T, width, dtype=torch.bfloat16)
    n = B * T
    call = make_call(s, t, width, 1.0, "reverse_kl")
    stats = row_stats(s, t, torch.ones(n), call)
    for reason, bad in _bad_gradients(s if which == "grad_student" else t).items():
        if which == "grad_teacher" and bad is None:
            continue   # None: no teacher gradient, a valid call
        gs = torch.full(s.shape, NAN) if which == "grad_teacher" else bad
        gt = torch.full(t.shape, NAN, dtype=t.dtype) if which == "grad_student" else bad
        with pytest.raises(ValueError, match=which):
            cuda_rows.row_backward(s, t, stats, torch.ones(n), call, gs, gt)
        good = gt if which == "grad_student" else gs
        assert good.isnan().all(), f"{reason}: written before the check"
    # the transposed (T, B) layout and rows of a longer tensor are fine
    for layout in ("transposed", "causal"):
        into = grad_in_buffer(t.shape, t.dtype, "cpu", layout)
        cuda_rows.row_backward(s, t, stats, torch.ones(n), call, torch.empty_like(s), into.rows)
        assert into.untouched_outside() and not into.rows.isnan().any()


def _op_args(divergence, want_teacher, dtypes=(torch.bfloat16, torch.float32), grads=("fresh", "fresh")):
    B, T, V = 2, 5, 67
    base_s, base_t = rand_logits(B * T, V, pad=(5, 13))
    s = laid_out(base_s, dtypes[0], batch=B, stride_b=7 * 72, stride_t=72)   # (B, T) of a longer sequence
    t = laid_out(base_t, dtypes[1], batch=B, offset=3)
    coef = _coef(B * T, (4,))
    call = make_call(s, t, V, 0.9, divergence, 0.3)
    gs = grad_in_buffer(s.shape, s.dtype, "cpu", grads[0]).rows
    gt = grad_in_buffer(t.shape, t.dtype, "cpu", grads[1]).rows if want_teacher else None
    return (s, t, row_stats(s, t, coef, call), coef, *call, gs, gt)


@pytest.mark.parametrize("grads", [("fresh", "fresh"), ("causal", "inner")], ids=["fresh", "strided"])
@pytest.mark.parametrize("want_teacher", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opcheck(divergence, want_teacher, grads, seed):
    """The mutating op (mutates_args grad_student, grad_teacher) under torch.library.opcheck: schema (what it
    writes is declared), fake tensor, autograd registration, AOT dispatch."""
    args = _op_args(divergence, want_teacher, grads=grads)
    torch.library.opcheck(torch.ops.topd.cuda_row_backward, args)
    args = _op_args(divergence, want_teacher, grads=grads)
    want = fresh_backward(*args[:4], RowCall(*args[4:8]), want_teacher)
    assert torch.ops.topd.cuda_row_backward(*args) is None
    assert torch.equal(args[-2], want[0]) and (not want_teacher or torch.equal(args[-1], want[1]))


def test_op_is_the_registered_backward():
    assert cuda_rows.OPS.name == "cuda" and cuda_rows.OPS.forward_op is None
    assert cuda_rows.OPS.backward_op._qualname == "topd::cuda_row_backward"
    schema = torch.ops.topd.cuda_row_backward.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"grad_student", "grad_teacher"} and not schema.returns


def test_row_ops_convenience_backward(seed):
    """RowOps.backward (fresh contiguous gradients, through the op) and backward_into give the direct call's."""
    args = _op_args("reverse_kl", True)
    tensors, call = args[:4], RowCall(*args[4:8])
    want_s, want_t = fresh_backward(*tensors, call, True)
    gs, gt = cuda_rows.OPS.backward(*tensors, call, True)
    assert gs.is_contiguous() and gt.is_contiguous()
    assert torch.equal(gs, want_s) and torch.equal(gt, want_t)
    gs, gt = cuda_rows.OPS.backward(*tensors, call, False)
    assert gt is None and torch.equal(gs, want_s)
    into = grad_in_buffer(tensors[0].shape, tensors[0].dtype, "cpu", "causal")
    cuda_rows.OPS.backward_into(*tensors, call, into.rows, None)
    assert torch.equal(into.rows, want_s) and into.untouched_outside()


def test_fullgraph_compile_goes_through_the_op(seed):
    """The mutating op in a fullgraph compile (aot_eager: functionalised), three ways: into gradients
    allocated in the graph, into the rows of a longer gradient allocated in the graph (grad_base[:, :-1], as
    functional.py does), and into gradients that are inputs of the graph (strided views of buffers)."""
    args = _op_args("jsd", True)
    tensors, scalars = args[:8], args[4:8]
    s, t = tensors[:2]

    def fresh(*a):
        grad_s, grad_t = torch.empty_like(s, memory_format=torch.contiguous_format), torch.empty_like(t)
        torch.ops.topd.cuda_row_backward(*a, grad_s, grad_t)
        return grad_s * 2, grad_t + 1

    def rows_of_longer(*a):
        base = torch.zeros(s.shape[0], s.shape[1] + 1, s.shape[2], dtype=s.dtype)
        torch.ops.topd.cuda_row_backward(*a, base[:, :-1], None)
        return base * 2

    def into_inputs(*a):
        *a, grad_s, grad_t = a
        torch.ops.topd.cuda_row_backward(*a, grad_s, grad_t)
        return grad_s * 2

    want_s, want_t = fresh_backward(*tensors[:4], RowCall(*scalars), True)
    for fn in (fresh, rows_of_longer):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got, eager = compiled(*tensors), fn(*tensors)
        for g, e in zip(got if isinstance(got, tuple) else (got,), eager if isinstance(eager, tuple) else (eager,)):
            assert torch.equal(g, e)
    assert torch.equal(fresh(*tensors)[0], want_s * 2)
    base = rows_of_longer(*tensors)
    assert torch.equal(base[:, :-1], want_s * 2) and (base[:, -1] == 0).all()
    torch._dynamo.reset()
    compiled = torch.compile(into_inputs, fullgraph=True, backend="aot_eager")
    into_s = grad_in_buffer(s.shape, s.dtype, "cpu", "inner")
    into_t = grad_in_buffer(t.shape, t.dtype, "cpu", "aligned_gaps")
    doubled = compiled(*tensors, into_s.rows, into_t.rows)
    assert torch.equal(into_s.rows, want_s) and torch.equal(into_t.rows, want_t)
    assert into_s.untouched_outside() and into_t.untouched_outside()
    assert torch.equal(doubled, want_s * 2)


def test_extension_status_names_architectures():
    built, reason = cuda_rows.extension_status()
    assert built and "sm_" in reason and "nvcc" in reason
    assert cuda_rows.UNAVAILABLE is None
