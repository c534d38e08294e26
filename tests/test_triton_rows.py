"""The Triton row backend (`topd_kernels.triton_rows`) against float64, row by row.

On a machine without CUDA these run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1
before anything imports the kernels); on a GPU they run the compiled kernels.

Truth: the shared float64 row truth of row_cases.py (`reference.token_divergence` for d, differentiated
by autograd for the gradients; float64 logsumexp for lse; KL(p_s || mix) for aux). Precision model
(three-way): the kernel reads the exact inputs and computes in float32, so (1) its error must stay at
float32 level whatever the input dtype (for the gradients: row_cases.row_atol, shared with the CUDA
extension's tests), and (2) it must not exceed a small multiple of the error of plain PyTorch doing the
same computation at the inputs' dtype, plus one unit of the output dtype for the gradient's cast
(the kernels round it to nearest even), plus for the gradient the rounding of the float32 lse_s, lse_t
and d that the row contract hands to the backward (see check_rows).

Every output is NaN-filled before the kernel runs, so an element the kernel fails to write fails.
"""
import pytest
import torch

from row_cases import ULP, assert_close, rand_logits, row_atol, stats_rounding_allowance, truth
from topd_kernels import reference
import topd_kernels.triton_rows as tr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]
BETA = 0.3
FP32_REL = 2e-6   # float32 accumulation over a row, relative to the size of the log-probabilities
PLAIN_FACTOR = 4.0


@pytest.fixture(autouse=True)
def poisoned(nan_poisoned_empty):
    """torch.empty returns NaN-filled tensors (conftest.py): row_forward's stats included."""


def block(monkeypatch, size):
    """Force BLOCK_V = size (many blocks per row, a partial last block)."""
    if size is None:
        monkeypatch.delenv("TOPD_TRITON_BLOCK_V", raising=False)
    else:
        monkeypatch.setenv("TOPD_TRITON_BLOCK_V", str(size))


def run_rows(student, teacher, V, tau, divergence, coef, teacher_grad=True):
    stats = tr.row_forward(student, teacher, V, tau, divergence, BETA)
    grad_s = torch.full_like(student, float("nan"))
    grad_t = torch.full_like(teacher, float("nan")) if teacher_grad else None
    out = tr.row_backward(student, teacher, stats, coef, V, tau, divergence, BETA, grad_s, grad_t)
    assert out is None
    return stats, grad_s, grad_t


def check_rows(student, teacher, V, tau, divergence, coef, teacher_grad=True):
    """Run the kernels and compare with the float64 truth and with plain PyTorch at the input dtype."""
    stats, grad_s, grad_t = run_rows(student, teacher, V, tau, divergence, coef, teacher_grad)
    s64, t64 = student.double(), teacher.double()
    true_stats, true_gs, true_gt = truth(s64, t64, coef, V, tau, divergence, BETA)
    low = f"{student.dtype}/{teacher.dtype}".replace("torch.", "")
    plain_stats, plain_gs, plain_gt = truth(student, teacher, coef, V, tau, divergence, BETA, dtype=None)

    assert stats.dtype == torch.float32 and stats.shape == (4, student.shape[0])
    assert torch.isfinite(stats).all(), "stats: unwritten (NaN) or non-finite entries"
    # Size of the log-probabilities involved: the scale of float32 rounding in lse and d.
    logit_scale = max(s64[:, :V].abs().max().item(), t64[:, :V].abs().max().item()) / tau
    for k, name in enumerate(("lse_s", "lse_t", "d", "aux")):
        err = (stats[k].double() - true_stats[k]).abs().max().item()
        plain_err = (plain_stats[k].double() - true_stats[k]).abs().max().item()
        fp32_bound = FP32_REL * (1.0 + logit_scale + true_stats[k].abs().max().item())
        assert err <= fp32_bound, f"{name}: error {err:.3e} above float32 level {fp32_bound:.3e}"
        # plus two float32 ulps of the value itself (the rounding of the stored result alone is half of one)
        value_ulps = 2.0 ** -22 * true_stats[k].abs().max().item()
        assert err <= PLAIN_FACTOR * plain_err + value_ulps + 2e-7, (
            f"{name}: error {err:.3e} vs plain {low} {plain_err:.3e}")

    pairs = [("grad_student", grad_s, student, true_gs, plain_gs)]
    if teacher_grad:
        pairs.append(("grad_teacher", grad_t, teacher, true_gt, plain_gt))
    atol = row_atol(student, teacher, coef, stats, V, tau)
    for name, grad, inp, true_g, plain_g in pairs:
        assert grad.dtype == inp.dtype and grad.shape == inp.shape
        assert torch.equal(grad[:, V:], torch.zeros_like(grad[:, V:])), f"{name}: padding columns not zero"
        # float32 computation, then one cast to the output dtype (the error model of row_cases.py)
        assert_close(grad, true_g, name, atol)
        g, true_g, plain_g = grad[:, :V].double(), true_g[:, :V], plain_g[:, :V]
        err = (g - true_g).abs()
        plain_err = (plain_g.double() - true_g).abs().max().item()
        # The row contract hands the backward lse_s, lse_t, d (and aux) as float32 numbers, which plain
        # PyTorch (one log_softmax relative to the row max, autograd cancelling d inside one expression)
        # does not pay: allow twice their first-order effect (row_cases.stats_rounding_allowance).
        stats_ulp = stats_rounding_allowance(s64[:, :V], t64[:, :V], true_stats, coef, tau, BETA, true_g)
        allowed = PLAIN_FACTOR * plain_err + ULP[grad.dtype] * true_g.abs() + 2 * stats_ulp
        worst = (err - allowed).max().item()
        assert worst <= 0, f"{name}: error {err.max().item():.3e} vs plain {low} {plain_err:.3e}"
    return stats, grad_s, grad_t


DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_match_float64(seed, monkeypatch, divergence, temperature, dtypes):
    """V = 1271 read out of rows of 1280 / 1399 columns; 3 blocks of 512 (the last one partial)."""
    block(monkeypatch, 512)
    student, teacher = rand_logits(5, 1271, pad=(9, 128))
    student, teacher = student.to(dtypes[0]).to(DEVICE), teacher.to(dtypes[1]).to(DEVICE)
    coef = torch.randn(5, device=DEVICE)
    check_rows(student, teacher, 1271, temperature, divergence, coef)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab,block_v", [(1271, None), (1271, 128), (3000, 1024), (1024, 256)])
def test_block_sizes(seed, monkeypatch, divergence, vocab, block_v):
    """One block per row, many blocks, a vocabulary that is / is not a multiple of the block."""
    block(monkeypatch, block_v)
    student, teacher = (x.to(DEVICE) for x in rand_logits(4, vocab))
    check_rows(student, teacher, vocab, 1.0, divergence, torch.randn(4, device=DEVICE))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_max_in_a_late_block(seed, monkeypatch, divergence):
    """Large logits whose maxima sit in later blocks than the first: the online rescaling of the sums and
    of the cross term (and its shift correction) must be exact enough."""
    block(monkeypatch, 256)
    student, teacher = rand_logits(4, 1100, scale=8.0)
    student[0, 1050], teacher[0, 900] = 60.0, 55.0   # max of both in the last blocks
    student[1, 300], teacher[1, 1099] = 45.0, 70.0   # teacher max in the partial last block
    student[2, :256] -= 40.0                         # a first block far below the rest
    teacher[3, 600:] += 20.0                         # max jumps mid-row
    check_rows(student.to(DEVICE), teacher.to(DEVICE), 1100, 0.7, divergence, torch.randn(4, device=DEVICE))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_gradient_off(seed, divergence):
    student, teacher = (x.to(torch.bfloat16).to(DEVICE) for x in rand_logits(4, 777, pad=(3, 0)))
    coef = torch.randn(4, device=DEVICE)
    _, gs_on, _ = check_rows(student, teacher, 777, 0.7, divergence, coef, teacher_grad=True)
    _, gs_off, _ = check_rows(student, teacher, 777, 0.7, divergence, coef, teacher_grad=False)
    assert torch.equal(gs_on, gs_off)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous_rows(seed, monkeypatch, divergence):
    """Rows that are column slices of wider tensors (row stride != width) give the contiguous result."""
    block(monkeypatch, 256)
    wide_s, wide_t = (x.to(DEVICE) for x in rand_logits(6, 1500, pad=(0, 200)))
    student, teacher = wide_s[:, 100:1300], wide_t.to(torch.bfloat16)[:, 350:1600]
    assert student.stride(0) == 1500 and teacher.stride(0) == 1700 and not student.is_contiguous()
    coef = torch.randn(6, device=DEVICE)
    stats, gs, gt = check_rows(student, teacher, 1100, 1.0, divergence, coef)
    stats_c, gs_c, gt_c = run_rows(student.contiguous(), teacher.contiguous(), 1100, 1.0, divergence, coef)
    assert torch.equal(stats, stats_c) and torch.equal(gs, gs_c) and torch.equal(gt, gt_c)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_infinity_at_common_positions(seed, monkeypatch, divergence, dtype):
    """-inf in both models at the same places (p_s = p_t = 0 there): those terms contribute nothing and
    get exact-zero gradients. Includes a whole first block of -inf and a whole -inf block mid-row."""
    block(monkeypatch, 128)
    V = 1000
    student, teacher = rand_logits(5, V, pad=(24, 0))
    columns = torch.randperm(V)[:150]
    student[:, columns] = teacher[:, columns] = float("-inf")
    student[0, :128] = teacher[0, :128] = float("-inf")     # first block entirely -inf
    student[1, 384:512] = teacher[1, 384:512] = float("-inf")
    student[2, 130:] = teacher[2, 130:] = float("-inf")     # only the first ~130 entries finite
    student, teacher = student.to(dtype).to(DEVICE), teacher.to(dtype).to(DEVICE)
    _, gs, gt = check_rows(student, teacher, V, 0.7, divergence, torch.randn(5, device=DEVICE))
    dead = torch.isinf(student[:, :V])
    assert torch.equal(gs[:, :V][dead], torch.zeros_like(gs[:, :V][dead]))
    assert torch.equal(gt[:, :V][dead], torch.zeros_like(gt[:, :V][dead]))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_rows_with_zero_coef_are_exact_zeros(seed, divergence):
    """Rows whose logits are NaN / +inf / all -inf, with coef 0, give exact zeros (never NaN * 0); finite
    rows with coef 0 too; the other rows are unaffected."""
    V = 600
    student, teacher = rand_logits(7, V, pad=(5, 40))
    student[1], teacher[1] = float("nan"), float("nan")
    student[2, 17], teacher[2, 3] = float("inf"), float("nan")
    student[3], teacher[3] = float("-inf"), float("-inf")
    student[5, :V] = float("nan")
    student, teacher = student.to(torch.bfloat16).to(DEVICE), teacher.to(torch.float16).to(DEVICE)
    coef = torch.randn(7, device=DEVICE)
    coef[[1, 2, 3, 4, 5]] = 0.0
    stats, gs, gt = run_rows(student, teacher, V, 1.0, divergence, coef)
    dead = [1, 2, 3, 4, 5]
    assert torch.equal(gs[dead], torch.zeros_like(gs[dead])) and torch.equal(gt[dead], torch.zeros_like(gt[dead]))
    live = [0, 6]
    check_rows(student[live], teacher[live], V, 1.0, divergence, coef[live])
    _, gs_live, gt_live = run_rows(student[live], teacher[live], V, 1.0, divergence, coef[live])
    assert torch.equal(gs[live], gs_live) and torch.equal(gt[live], gt_live)
    assert torch.isfinite(stats[:, [0, 4, 6]]).all()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_mass_where_the_other_model_has_none_is_infinite(seed, monkeypatch, divergence):
    """reverse KL with p_s > 0 where p_t = 0 (forward KL: the mirror) is +inf, also when the other
    model's first block is entirely -inf; JSD stays finite."""
    block(monkeypatch, 128)
    student, teacher = rand_logits(2, 500)
    zeroed = teacher if divergence == "reverse_kl" else student
    zeroed[0, 40] = float("-inf")
    zeroed[1, :128] = float("-inf")
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    stats = tr.row_forward(student, teacher, 500, 1.0, divergence, BETA)
    assert torch.equal(stats[2], torch.full_like(stats[2], float("inf")))
    assert torch.isfinite(stats[:2]).all()
    jsd = tr.row_forward(student, teacher, 500, 1.0, "jsd", BETA)
    true_d = reference.token_divergence(student.double(), teacher.double(), "jsd", BETA, 1.0)
    assert torch.allclose(jsd[2].double(), true_d, rtol=1e-5, atol=1e-6)


def test_full_size_vocabulary(seed):
    """A real vocabulary size (151936, bf16) with the default launch configuration, on two rows."""
    student, teacher = rand_logits(2, 151936, pad=(128, 0))
    student, teacher = student.to(torch.bfloat16).to(DEVICE), teacher.to(torch.bfloat16).to(DEVICE)
    check_rows(student, teacher, 151936, 1.0, "reverse_kl", torch.tensor([0.5, -2.0], device=DEVICE))


def test_empty_batch():
    student = torch.zeros(0, 64, device=DEVICE)
    stats = tr.row_forward(student, student, 64, 1.0, "reverse_kl", BETA)
    assert stats.shape == (4, 0)
    grad = torch.zeros_like(student)
    tr.row_backward(student, student, stats, torch.zeros(0, device=DEVICE), 64, 1.0, "reverse_kl", BETA,
                    grad, None)


def test_bad_arguments():
    x = torch.randn(3, 50, device=DEVICE)
    with pytest.raises(ValueError, match="vocab_size"):
        tr.row_forward(x, x, 51, 1.0, "reverse_kl", BETA)
    with pytest.raises(ValueError, match="divergence"):
        tr.row_forward(x, x, 50, 1.0, "kl", BETA)
    with pytest.raises(ValueError, match="beta"):
        tr.row_forward(x, x, 50, 1.0, "jsd", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        tr.row_forward(x, x, 50, 0.0, "reverse_kl", BETA)
    with pytest.raises(TypeError, match="student"):
        tr.row_forward(x.long(), x, 50, 1.0, "reverse_kl", BETA)
    with pytest.raises(ValueError, match="teacher"):
        tr.row_forward(x, x[:2], 50, 1.0, "reverse_kl", BETA)
    stats = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="grad_student"):
        tr.row_backward(x, x, stats, torch.ones(3, device=DEVICE), 50, 1.0, "reverse_kl", BETA,
                        torch.empty_like(x, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="coef"):
        tr.row_backward(x, x, stats, torch.ones(2, device=DEVICE), 50, 1.0, "reverse_kl", BETA,
                        torch.empty_like(x), None)


def test_launch_config(monkeypatch):
    monkeypatch.delenv("TOPD_TRITON_BLOCK_V", raising=False)
    assert tr._launch_config(151936, interpreted=False, backward=False) == (4096, 8)
    assert tr._launch_config(151936, interpreted=True, backward=True)[0] == 32768
    assert tr._launch_config(1271, interpreted=True, backward=False)[0] == 2048
    assert tr._launch_config(100, interpreted=False, backward=False) == (128, 2)
    monkeypatch.setenv("TOPD_TRITON_BLOCK_V", "1024")
    assert tr._launch_config(151936, interpreted=False, backward=True) == (1024, 4)
    monkeypatch.setenv("TOPD_TRITON_BLOCK_V", "1000")
    with pytest.raises(ValueError, match="TOPD_TRITON_BLOCK_V"):
        tr._launch_config(151936, interpreted=False, backward=True)
    monkeypatch.setenv("TOPD_TRITON_AUTOTUNE", "1")
    assert not tr._autotune_requested(interpreted=True)
    assert tr._autotune_requested(interpreted=False)


def test_bf16_output_rounding_matches_torch():
    """The kernels' fp32 -> bf16 output cast rounds to nearest even, bit for bit as torch does (under the
    interpreter by hand, since the interpreter's own cast truncates): ties, carries into the exponent,
    overflow to inf, subnormals, signed zeros, inf and NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(p_x, p_y, n, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < n
        b_x = tl.load(p_x + o, mask=m, other=0.0)
        tl.store(p_y + o, tr._to_output(b_x, p_y.dtype.element_ty, SOFT_BF16), mask=m)

    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                         0x00018000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001],
                        dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,))])
    x = x.to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    cast_kernel[(1,)](x, y, x.numel(), SOFT_BF16=True, BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (torch.isnan(y) & torch.isnan(expected))
    assert bool(same.all()), (x[~same][:5], y[~same][:5], expected[~same][:5])
