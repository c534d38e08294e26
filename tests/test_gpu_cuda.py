"""The CUDA-extension backward on a GPU (marked `gpu`: conftest skips these without CUDA).

- realistic shapes (N = 8192, V = 151936 and 128256, bf16): extension vs the Triton backward on every
  row, and vs the float64 reference on a few rows;
- every divergence, dtype pair and memory layout of the host tests, on the device, vs float64;
- the host build vs the device on the same inputs (the CPU CI's check is representative);
- outputs NaN-poisoned before every call; masked rows with non-finite logits;
- a non-default stream (ordering after work queued on it), row chunking (small N, wide rows), N * V > 2**31.
"""
from __future__ import annotations

import pytest
import torch

from cuda_helpers import extension_skip_reason, laid_out, like
from row_cases import NAN, ULP, assert_close, rand_logits, row_atol, truth
from topd_kernels import cuda_rows, torch_rows

pytestmark = pytest.mark.gpu

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


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
        from topd_kernels import triton_rows
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"topd_kernels.triton_rows does not import on this GPU machine: {exc}")
    return triton_rows


def _problem(n, width_s, width_t, V, dtype_s, dtype_t, masked=(), device="cuda"):
    gen = torch.float64 if n * max(width_s, width_t) < 10**8 else torch.bfloat16   # big problems: no wide copies
    base_s, base_t = rand_logits(n, V, pad=(width_s - V, width_t - V), dtype=gen, device=device, draw=gen)
    s, t = laid_out(base_s, dtype_s), laid_out(base_t, dtype_t)
    coef = torch.rand(n, device=device) * 1.5 + 0.25
    for k, r in enumerate(masked):
        coef[r] = 0.0
        s[r, ::2] = NAN
        t[r, 1::2] = (float("inf"), -float("inf"))[k % 2]
    return s, t, coef


@pytest.mark.parametrize("V", [151936, 128256])
def test_realistic_vs_triton_and_reference(V):
    torch.manual_seed(V)
    n = 8192
    s, t, coef = _problem(n, V, V + 128, V, torch.bfloat16, torch.bfloat16, masked=(3, 4000, 8191))  # padded teacher
    triton_rows = _triton_rows()
    stats = triton_rows.row_forward(s, t, V, 1.0, "reverse_kl", 0.5)
    gs, gt = torch.full_like(s, NAN), torch.full_like(t, NAN)
    cuda_rows.row_backward(s, t, stats, coef, V, 1.0, "reverse_kl", 0.5, gs, gt)
    ts, tt = torch.full_like(s, NAN), torch.full_like(t, NAN)
    triton_rows.row_backward(s, t, stats, coef, V, 1.0, "reverse_kl", 0.5, ts, tt)
    torch.cuda.synchronize()
    assert not gs.isnan().any() and not gt.isnan().any()
    masked = coef == 0
    assert (gs[masked] == 0).all() and (gt[masked] == 0).all() and (gt[:, V:] == 0).all()
    # extension vs Triton: both float32 math rounded to bf16 -> within one bf16 ulp plus float32 noise
    atol = row_atol(s, t, coef, stats, V, 1.0).float()
    for name, a, b in (("grad_student", gs, ts), ("grad_teacher", gt, tt)):
        worst = 0.0
        for r in range(0, n, 1024):   # row chunks: no full-size float32 temporaries
            a32, b32 = a[r:r + 1024].float(), b[r:r + 1024].float()
            tol = ULP[torch.bfloat16] * torch.maximum(a32.abs(), b32.abs()) + atol[r:r + 1024] + 1e-30
            worst = max(worst, float(((a32 - b32).abs() / tol).max()))
        assert worst <= 1.0, f"{name}: extension vs triton off by {worst:.3g} x tol"
    # vs float64 on a few rows
    rows = torch.tensor([0, 3, 1234, 8191], device="cuda")
    _, want_s, want_t = truth(s[rows], t[rows], coef[rows], V, 1.0, "reverse_kl", 0.5)
    atol_rows = row_atol(s[rows], t[rows], coef[rows], stats[:, rows], V, 1.0)
    assert_close(gs[rows], want_s, "grad_student", atol_rows)
    assert_close(gt[rows], want_t, "grad_teacher", atol_rows)


LAYOUTS = {   # as in test_cuda_host.py
    "aligned": (1024, 1040, 997, (0, None), (0, None), (0, None, None), 1.0),
    "unaligned": (1003, 1001, 999, (0, None), (0, None), (0, None, None), 0.7),
    "strided_aligned": (1040, 1024, 1000, (8, 1088), (16, 1104), (8, 1096, 1032), 2.0),
    "strided_unaligned": (1010, 1030, 1010, (3, 1100), (5, 1031), (1, 1013, 1037), 1.0),
}
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_device_matches_float64_and_host(divergence, dtypes, layout, seed):
    ws, wt, V, (so, ss), (to, ts), (oo, gss, gts), tau = LAYOUTS[layout]
    n = 37
    base_s, base_t = rand_logits(n, V, pad=(ws - V, wt - V), device="cuda")
    s = laid_out(base_s, dtypes[0], offset=so, row_stride=ss)
    t = laid_out(base_t, dtypes[1], offset=to, row_stride=ts)
    coef = torch.rand(n, device="cuda") + 0.5
    coef[[2, 30]] = 0
    s[2] = NAN
    t[30] = float("inf")
    beta = 0.3
    stats = torch_rows.row_forward(s, t, V, tau, divergence, beta)
    gs = like(s, offset=oo, row_stride=gss)
    gt = like(t, offset=oo, row_stride=gts)
    cuda_rows.row_backward(s, t, stats, coef, V, tau, divergence, beta, gs, gt)
    torch.cuda.synchronize()
    _, want_s, want_t = truth(s, t, coef, V, tau, divergence, beta)
    atol = row_atol(s, t, coef, stats, V, tau)
    assert_close(gs, want_s, "grad_student", atol)
    assert_close(gt, want_t, "grad_teacher", atol)
    assert (gs[:, V:] == 0).all() and (gt[:, V:] == 0).all() and (gs[[2, 30]] == 0).all()

    # the host build on the same inputs: the same code, so within one output ulp (expf / FMA differences)
    hs, ht = torch.full_like(gs.cpu(), NAN), torch.full_like(gt.cpu(), NAN)
    cuda_rows.row_backward_host(s.cpu(), t.cpu(), stats.cpu(), coef.cpu(), V, tau, divergence, beta, hs, ht)
    for name, dev, host in (("grad_student", gs, hs), ("grad_teacher", gt, ht)):
        d64, h64 = dev.cpu().double(), host.double()
        tol = ULP[dev.dtype] * torch.maximum(d64.abs(), h64.abs()) + atol.cpu() + 1e-30
        worst = float(((d64 - h64).abs() / tol).max())
        assert worst <= 1.0, f"{name}: device vs host build off by {worst:.3g} x tol"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_rows(divergence, seed):
    """Few wide rows: the launcher splits each row over many blocks."""
    n, V = 3, 151936
    s, t, coef = _problem(n, V + 64, V, V, torch.bfloat16, torch.float32, masked=(1,))
    stats = torch_rows.row_forward(s, t, V, 1.0, divergence, 0.5)
    for chunk_cols in (0, 2048, 4104):
        gs, gt = torch.full_like(s, NAN), torch.full_like(t, NAN)
        cuda_rows.row_backward(s, t, stats, coef, V, 1.0, divergence, 0.5, gs, gt, chunk_cols=chunk_cols)
        torch.cuda.synchronize()
        _, want_s, want_t = truth(s, t, coef, V, 1.0, divergence, 0.5)
        atol = row_atol(s, t, coef, stats, V, 1.0)
        assert_close(gs, want_s, "grad_student", atol)
        assert_close(gt, want_t, "grad_teacher", atol)


def test_no_teacher_gradient_and_empty(seed):
    s, t, coef = _problem(16, 4096, 4096, 4000, torch.float16, torch.float16)
    stats = torch_rows.row_forward(s, t, 4000, 1.0, "jsd", 0.5)
    gs = torch.full_like(s, NAN)
    cuda_rows.row_backward(s, t, stats, coef, 4000, 1.0, "jsd", 0.5, gs, None)
    _, want_s, _ = truth(s, t, coef, 4000, 1.0, "jsd", 0.5, want_teacher=False)
    assert_close(gs, want_s, "grad_student", row_atol(s, t, coef, stats, 4000, 1.0))
    e = torch.empty(0, 64, device="cuda")
    cuda_rows.row_backward(e, e, torch.empty(4, 0, device="cuda"), torch.empty(0, device="cuda"), 64, 1.0,
                           "reverse_kl", 0.5, torch.empty_like(e), None)


def test_non_default_stream(seed):
    """The kernel runs on the current stream: it must see logits written by earlier work on that stream."""
    n, V = 64, 32768
    s, t, coef = _problem(n, V, V, V, torch.bfloat16, torch.bfloat16)
    stats = torch_rows.row_forward(s, t, V, 1.0, "reverse_kl", 0.5)
    _, want_s, want_t = truth(s, t, coef, V, 1.0, "reverse_kl", 0.5)
    s_src = s.clone()
    s.fill_(NAN)   # the real logits arrive later, on the side stream
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)   # ~tens of ms of GPU time queued before the copy
        s.copy_(s_src)
        gs, gt = torch.full_like(s, NAN), torch.full_like(t, NAN)
        cuda_rows.row_backward(s, t, stats, coef, V, 1.0, "reverse_kl", 0.5, gs, gt)
    side.synchronize()
    atol = row_atol(s, t, coef, stats, V, 1.0)
    assert_close(gs, want_s, "grad_student", atol)
    assert_close(gt, want_t, "grad_teacher", atol)


def test_errors_are_clean():
    s = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="cpu|device"):
        cuda_rows.row_backward(s, s.cpu(), torch.zeros(4, 4, device="cuda"), torch.ones(4, device="cuda"), 64,
                               1.0, "reverse_kl", 0.5, torch.empty_like(s), None)


def test_more_than_2_31_elements(seed):
    """N * V > 2**31 (element offsets beyond int32): the last rows must be right, nothing left unwritten."""
    V = 151936
    n = 2**31 // V + 96
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 25 GiB of GPU memory")
    s, t, coef = _problem(n, V, V, V, torch.bfloat16, torch.bfloat16, masked=(n - 2,))
    stats = torch_rows.row_forward(s, t, V, 1.0, "reverse_kl", 0.5)
    gs = torch.full_like(s, NAN)
    cuda_rows.row_backward(s, t, stats, coef, V, 1.0, "reverse_kl", 0.5, gs, None)
    torch.cuda.synchronize()
    assert not gs.isnan().any()
    assert (gs[n - 2] == 0).all()
    rows = torch.tensor([0, n // 2, n - 3, n - 1], device="cuda")
    _, want_s, _ = truth(s[rows], t[rows], coef[rows], V, 1.0, "reverse_kl", 0.5, want_teacher=False)
    assert_close(gs[rows], want_s, "grad_student", row_atol(s[rows], t[rows], coef[rows], stats[:, rows], V, 1.0))


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp32-bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_window_kl_triton_cuda_end_to_end(divergence, dtypes, layout, seed):
    """fused_window_kl(backend="triton+cuda") vs the float64 reference (the lead's check_backend)."""
    import topd_kernels
    from loss_cases import check_backend, make_problem
    from topd_kernels.backends import resolve

    assert resolve("auto", torch.device("cuda")).name == "triton+cuda"
    problem = make_problem(layout, dtype=dtypes[0], teacher_dtype=dtypes[1], pad=(3, 17), neg_inf=True)
    problem = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
    check_backend("triton+cuda", problem, teacher_grad=True, divergence=divergence, beta=0.3, temperature=1.0,
                  window=4, gamma=0.8, suppress_weight=0.2, guidance_weight=0.5,
                  loss_threshold=topd_kernels.Quantile(0.4), div_threshold=topd_kernels.Quantile(0.5))
