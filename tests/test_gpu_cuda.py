"""The CUDA-extension backward on a GPU (marked `gpu`: conftest skips these without CUDA).

- realistic shapes (N = 8192, V = 151936 and 128256, bf16, the student read in place from logits[:, :-1],
  its gradient written in place into the rows of the (B, T + 1, V) gradient): extension vs the Triton
  backward on every row, and vs the float64 reference on a few rows;
- every divergence, dtype pair and memory layout of the host tests (cuda_helpers.LAYOUTS), on the device,
  vs float64, outputs allocated NaN-poisoned;
- gradients written into strided rows of larger NaN-filled buffers (cuda_helpers.GRAD_LAYOUTS: aligned ->
  vector path, odd base / strides -> scalar path): the rows as in fresh contiguous gradients, nothing
  outside them touched;
- the host build vs the device on the same inputs (the CPU CI's check is representative);
- masked rows with non-finite logits, a large common offset of the logits;
- a non-default stream (ordering after work queued on it), row chunking (small N, wide rows), N * V > 2**31
  (also in the gradient, written into the rows of a longer tensor's gradient);
- the op through torch.library.opcheck, and fused_window_kl(backend="triton+cuda") end to end.
"""
from __future__ import annotations

import pytest
import torch

from cuda_helpers import (DIVERGENCES, DTYPE_PAIRS, GRAD_LAYOUTS, LAYOUTS, extension_skip_reason, flat,
                          fresh_backward, grad_in_buffer, laid_out, make_call, row_stats, run_and_check)
from row_cases import NAN, ULP, assert_close, rand_logits, row_atol, truth
from topd_kernels.rows import cuda_rows
from topd_kernels.rows.contract import NUM_STATS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def extension():
    why_skip = extension_skip_reason()
    if why_skip:
        pytest.skip(why_skip)
    built, why = cuda_rows.extension_status()
    if not built:
        pytest.fail(f"the CUDA extension is not built: {why}")


def _triton_rows():
    try:
        from topd_kernels.rows import triton_rows
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"topd_kernels.rows.triton_rows does not import on this GPU machine: {exc}")
    return triton_rows


def _problem(B, T, width_s, width_t, V, dtype_s, dtype_t, masked=(), *, sliced=False):
    """(B, T, V*) logits on the GPU (with sliced: the [:, :-1] view of (B, T + 1, V*) tensors), coef with
    the rows `masked` zero and their logits non-finite."""
    n_all = B * (T + int(sliced))
    gen = torch.float64 if n_all * max(width_s, width_t) < 10**8 else torch.bfloat16   # big: no wide copies
    base_s, base_t = rand_logits(n_all, V, pad=(width_s - V, width_t - V), dtype=gen, device="cuda", draw=gen)
    s, t = laid_out(base_s, dtype_s, batch=B), laid_out(base_t, dtype_t, batch=B)
    del base_s, base_t
    if sliced:
        s, t = s[:, :-1], t[:, :-1]
    coef = torch.rand(B * T, device="cuda") * 1.5 + 0.25
    for k, r in enumerate(masked):
        coef[r] = 0.0
        s[r // T, r % T, ::2] = NAN
        t[r // T, r % T, 1::2] = (float("inf"), -float("inf"))[k % 2]
    return s, t, coef


def _rows(x, rows):
    """Rows `rows` (flat indices) of a (B, T, V) view, gathered (no copy of the whole tensor)."""
    return x[rows // x.shape[1], rows % x.shape[1]]


@pytest.mark.parametrize("V", [151936, 128256])
def test_realistic_vs_triton_and_reference(V):
    torch.manual_seed(V)
    B, T = 4, 2048
    s, t, coef = _problem(B, T, V, V + 128, V, torch.bfloat16, torch.bfloat16, masked=(3, 4000, 8191),
                          sliced=True)   # padded teacher; both read in place from [:, :-1]
    n = B * T
    triton_rows = _triton_rows()
    call = make_call(s, t, V, 1.0, "reverse_kl")
    stats = triton_rows.row_forward(s, t, coef != 0, call)
    # the extension writes into the rows of the (B, T + 1, V*) gradients, as for logits[:, :-1] in the loss
    into_s = grad_in_buffer(s.shape, s.dtype, "cuda", "causal")
    into_t = grad_in_buffer(t.shape, t.dtype, "cuda", "causal")
    assert cuda_rows.row_backward(s, t, stats, coef, call, into_s.rows, into_t.rows) is None
    ts, tt = fresh_backward(s, t, stats, coef, call, True, triton_rows.row_backward)
    torch.cuda.synchronize()
    assert into_s.untouched_outside() and into_t.untouched_outside(), "written outside the gradient rows"
    gs, gt, ts, tt = (flat(x) for x in (into_s.rows, into_t.rows, ts, tt))
    del into_s, into_t
    assert not gs.isnan().any() and not gt.isnan().any()
    masked = coef == 0
    assert (gs[masked] == 0).all() and (gt[masked] == 0).all() and (gt[:, V:] == 0).all()
    # extension vs Triton: both float32 math rounded to bf16 -> within one bf16 ulp plus float32 noise
    atol = row_atol(flat(s), flat(t), coef, stats, V, 1.0).float()
    for name, a, b in (("grad_student", gs, ts), ("grad_teacher", gt, tt)):
        worst = 0.0
        for r in range(0, n, 1024):   # row chunks: no full-size float32 temporaries
            a32, b32 = a[r:r + 1024].float(), b[r:r + 1024].float()
            tol = ULP[torch.bfloat16] * torch.maximum(a32.abs(), b32.abs()) + atol[r:r + 1024] + 1e-30
            worst = max(worst, float(((a32 - b32).abs() / tol).max()))
        assert worst <= 1.0, f"{name}: extension vs triton off by {worst:.3g} x tol"
    # vs float64 on a few rows
    rows = torch.tensor([0, 3, 1234, 8191], device="cuda")
    rs, rt = _rows(s, rows), _rows(t, rows)
    _, want_s, want_t = truth(rs, rt, coef[rows], V, 1.0, "reverse_kl", 0.5)
    atol_rows = row_atol(rs, rt, coef[rows], stats[:, rows], V, 1.0)
    assert_close(gs[rows], want_s, "grad_student", atol_rows)
    assert_close(gt[rows], want_t, "grad_teacher", atol_rows)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_device_matches_float64_and_host(divergence, dtypes, layout, seed, nan_poisoned_empty):
    B, T, ws, wt, V, s_layout, t_layout, tau, work_split = LAYOUTS[layout]
    n = B * T
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V), device="cuda")
    s = laid_out(base_s, dtypes[0], batch=B, **s_layout)
    t = laid_out(base_t, dtypes[1], batch=B, **t_layout)
    coef = torch.rand(n, device="cuda") + 0.5
    masked = [1, n - 2]
    coef[masked] = 0
    s[1 // T, 1 % T] = NAN
    if t_layout.get("stride_b") != 0:   # a broadcast teacher's rows are shared with live rows
        t[(n - 2) // T, (n - 2) % T] = float("inf")
    beta = 0.3
    chunk_cols = work_split.get("chunk_cols", 0)   # emulated threads: the host build's only
    gs, gt = run_and_check(s, t, coef, V, tau, divergence, beta, True, chunk_cols=chunk_cols)

    # the host build on the same inputs: the same code, so within one output ulp (expf / FMA differences)
    call = make_call(s, t, V, tau, divergence, beta)
    stats = row_stats(s, t, coef, call)
    hs, ht = fresh_backward(s.cpu(), t.cpu(), stats.cpu(), coef.cpu(), call, True)
    atol = row_atol(flat(s), flat(t), coef, stats, V, tau).cpu()
    for name, dev, host in (("grad_student", gs, hs), ("grad_teacher", gt, ht)):
        d64, h64 = flat(dev).cpu().double(), flat(host).double()
        tol = ULP[dev.dtype] * torch.maximum(d64.abs(), h64.abs()) + atol + 1e-30
        worst = float(((d64 - h64).abs() / tol).max())
        assert worst <= 1.0, f"{name}: device vs host build off by {worst:.3g} x tol"


def _rows_aligned16(x):
    """Whether every row start of a (B, T, V) tensor is 16-byte aligned (the kernel's vector path)."""
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(x.shape[d] <= 1 or x.stride(d) * size % 16 == 0 for d in (0, 1))


@pytest.mark.parametrize("grad_layout", [g for g in GRAD_LAYOUTS if g != "fresh"])
@pytest.mark.parametrize("layout", ["aligned", "strided_aligned", "chunked"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_device_gradients_into_strided_rows(divergence, dtypes, layout, grad_layout, seed):
    """The host test's strided gradients on the device: each gradient in turn (the other fresh; the student's
    alone without the teacher gradient) as the rows of a larger NaN-filled buffer, vs float64, nothing outside
    the rows touched, and equal to the fresh contiguous result: bit for bit where both take the same path
    (aligned gradient rows), else within one output ulp (vector vs scalar code; inputs aligned, so misaligned
    gradient rows must send the kernel to the scalar path, or it faults on the misaligned access)."""
    B, T, ws, wt, V, s_layout, t_layout, tau, work_split = LAYOUTS[layout]
    n = B * T
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V), device="cuda")
    s = laid_out(base_s, dtypes[0], batch=B, **s_layout)
    t = laid_out(base_t, dtypes[1], batch=B, **t_layout)
    assert _rows_aligned16(s) and _rows_aligned16(t)
    coef = torch.rand(n, device="cuda") + 0.5
    coef[[2, n - 1]] = 0
    s[2 // T, 2 % T] = NAN
    t[(n - 1) // T, (n - 1) % T] = float("inf")
    beta = 0.3
    chunk_cols = work_split.get("chunk_cols", 0)
    call = make_call(s, t, V, tau, divergence, beta)
    stats = row_stats(s, t, coef, call)
    want_s, want_t = fresh_backward(s, t, stats, coef, call, True,
                                    lambda *a: cuda_rows.run_backward(*a, chunk_cols=chunk_cols))
    atol = row_atol(flat(s), flat(t), coef, stats, V, tau)
    for grads, want_teacher in (((grad_layout, "fresh"), True), (("fresh", grad_layout), True),
                                ((grad_layout, grad_layout), False)):
        gs, gt = run_and_check(s, t, coef, V, tau, divergence, beta, want_teacher, stats=stats, grads=grads,
                               chunk_cols=chunk_cols)
        pairs = [("grad_student", gs, want_s)] + ([("grad_teacher", gt, want_t)] if want_teacher else [])
        for name, got, want in pairs:
            if _rows_aligned16(got):   # the vector path, as for the fresh gradient
                assert torch.equal(got, want), f"{name} rows {grads} differ from the contiguous result"
            else:
                g64, w64 = flat(got).double(), flat(want).double()
                tol = ULP[got.dtype] * torch.maximum(g64.abs(), w64.abs()) + atol + 1e-30
                worst = float(((g64 - w64).abs() / tol).max())
                assert worst <= 1.0, f"{name} rows {grads}: off the contiguous result by {worst:.3g} x tol"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_common_offset(divergence, seed):
    """logits = 1e4 + 3 randn (float32): within a small multiple of plain float32 PyTorch's error."""
    n, V = 64, 32000
    base = torch.randn(n, V, dtype=torch.float64, device="cuda") * 3.0
    s = laid_out(1e4 + base, torch.float32, batch=4)
    t = laid_out(1e4 + 0.8 * base + 1.8 * torch.randn_like(base), torch.float32, batch=4)
    coef = torch.rand(n, device="cuda") + 0.5
    gs, gt = run_and_check(s, t, coef, V, 1.0, divergence, 0.3, True)
    _, want_s, want_t = truth(flat(s), flat(t), coef, V, 1.0, divergence, 0.3)
    _, f32_s, f32_t = truth(flat(s), flat(t), coef, V, 1.0, divergence, 0.3, dtype=None)
    for name, got, want, plain in (("grad_student", gs, want_s, f32_s), ("grad_teacher", gt, want_t, f32_t)):
        err = float((flat(got).double() - want).abs().max())
        plain_err = float((plain.double() - want).abs().max())
        bound = 4.0 * plain_err + 2 * ULP[torch.float32] * float(want.abs().max())
        assert err <= bound, f"{name}: error {err:.3g}, plain float32 PyTorch's {plain_err:.3g}"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_rows(divergence, seed):
    """Few wide rows: the launcher splits each row over many blocks."""
    V = 151936
    s, t, coef = _problem(1, 3, V + 64, V, V, torch.bfloat16, torch.float32, masked=(1,))
    for chunk_cols, grads in zip((0, 2048, 4104), (("fresh", "fresh"), ("causal", "inner"), ("odd_time_stride",
                                                                                           "aligned_gaps"))):
        run_and_check(s, t, coef, V, 1.0, divergence, 0.5, True, chunk_cols=chunk_cols, grads=grads)


def test_no_teacher_gradient_and_empty(seed):
    s, t, coef = _problem(2, 8, 4096, 4096, 4000, torch.float16, torch.float16)
    run_and_check(s, t, coef, 4000, 1.0, "jsd", 0.5, False)
    for shape in ((0, 5, 64), (3, 0, 64)):
        e = torch.empty(shape, device="cuda")
        gs, gt = fresh_backward(e, e, torch.empty(NUM_STATS, 0, device="cuda"), torch.empty(0, device="cuda"),
                                make_call(e, e, 64, 1.0, "reverse_kl"), True)
        assert gs.shape == shape and gt.shape == shape


def test_non_default_stream(seed):
    """The kernel runs on the current stream: it must see logits written by earlier work on that stream."""
    V = 32768
    s, t, coef = _problem(4, 16, V, V, V, torch.bfloat16, torch.bfloat16)
    call = make_call(s, t, V, 1.0, "reverse_kl")
    stats = row_stats(s, t, coef, call)
    _, want_s, want_t = truth(flat(s), flat(t), coef, V, 1.0, "reverse_kl", 0.5)
    s_src = s.clone()
    s.fill_(NAN)   # the real logits arrive later, on the side stream
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)   # ~tens of ms of GPU time queued before the copy
        s.copy_(s_src)
        gs, gt = fresh_backward(s, t, stats, coef, call, True)   # NaN-filled on the side stream, then written
    side.synchronize()
    atol = row_atol(flat(s), flat(t), coef, stats, V, 1.0)
    assert_close(flat(gs), want_s, "grad_student", atol)
    assert_close(flat(gt), want_t, "grad_teacher", atol)


def test_errors_are_clean():
    s = torch.randn(1, 4, 64, device="cuda")
    stats, coef = torch.zeros(NUM_STATS, 4, device="cuda"), torch.ones(4, device="cuda")
    call = make_call(s, s, 64, 1.0, "reverse_kl")
    g = torch.empty_like(s)
    with pytest.raises(ValueError, match="cpu|device"):
        cuda_rows.row_backward(s, s.cpu(), stats, coef, call, g, None)
    with pytest.raises(ValueError, match="stats"):
        cuda_rows.row_backward(s, s, stats.cpu(), coef, call, g, None)
    with pytest.raises(ValueError, match="grad_student"):
        cuda_rows.row_backward(s, s, stats, coef, call, g.cpu(), None)
    with pytest.raises(ValueError, match="grad_teacher"):
        cuda_rows.row_backward(s, s, stats, coef, call, g, g.cpu())
    with pytest.raises(ValueError, match="emulated_threads"):
        cuda_rows.run_backward(s, s, stats, coef, call, g, None, emulated_threads=2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opcheck(divergence, seed):
    B, T, V = 2, 5, 1000
    s, t, coef = _problem(B, T, V + 24, V, V, torch.bfloat16, torch.float32, masked=(3,), sliced=True)
    call = make_call(s, t, V, 0.9, divergence, 0.3)
    stats = row_stats(s, t, coef, call)
    for grads in (("fresh", "fresh"), ("causal", "inner")):   # the mutating op: fresh and strided gradients
        gs = grad_in_buffer(s.shape, s.dtype, "cuda", grads[0]).rows
        for gt in (grad_in_buffer(t.shape, t.dtype, "cuda", grads[1]).rows, None):
            torch.library.opcheck(torch.ops.topd.cuda_row_backward, (s, t, stats, coef, *call, gs, gt))


def test_more_than_2_31_elements(seed):
    """N * V > 2**31 (element offsets beyond int32): the last rows must be right, nothing left unwritten."""
    V = 151936
    T = (2**31 // V + 96) // 2
    n = 2 * T
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 25 GiB of GPU memory")
    s, t, coef = _problem(2, T, V, V, V, torch.bfloat16, torch.bfloat16, masked=(n - 2,))
    call = make_call(s, t, V, 1.0, "reverse_kl")
    stats = row_stats(s, t, coef, call)
    # written into the rows of a (2, T + 1, V) gradient: the rows of b = 1 start past 2**31 elements
    into = grad_in_buffer(s.shape, s.dtype, "cuda", "causal")
    assert into.rows.stride(0) * (2 - 1) + into.rows.stride(1) * (T - 1) > 2**31
    cuda_rows.row_backward(s, t, stats, coef, call, into.rows, None)
    torch.cuda.synchronize()
    assert into.untouched_outside()
    gs = flat(into.rows)
    del into
    assert not gs.isnan().any()
    assert (gs[n - 2] == 0).all()
    rows = torch.tensor([0, n // 2, n - 3, n - 1], device="cuda")
    rs, rt = _rows(s, rows), _rows(t, rows)
    _, want_s, _ = truth(rs, rt, coef[rows], V, 1.0, "reverse_kl", 0.5, want_teacher=False)
    assert_close(gs[rows], want_s, "grad_student", row_atol(rs, rt, coef[rows], stats[:, rows], V, 1.0))


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp32-bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_window_kl_triton_cuda_end_to_end(divergence, dtypes, layout, seed):
    """fused_window_kl(backend="triton+cuda") vs the float64 reference (the lead's check_backend)."""
    import topd_kernels
    from loss_cases import check_backend, make_problem
    from topd_kernels.rows.registry import resolve

    assert resolve("auto", torch.device("cuda")).name == "triton+cuda"
    problem = make_problem(layout, dtype=dtypes[0], teacher_dtype=dtypes[1], pad=(3, 17), neg_inf=True)
    problem = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
    check_backend("triton+cuda", problem, teacher_grad=True, divergence=divergence, beta=0.3, temperature=1.0,
                  window=4, gamma=0.8, suppress_weight=0.2, guidance_weight=0.5,
                  loss_threshold=topd_kernels.Quantile(0.4), div_threshold=topd_kernels.Quantile(0.5))
