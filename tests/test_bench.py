"""Benchmark harness checks (CPU, fast). Speed is measured by the benchmarks, never asserted here.

- a pytest-benchmark suite over a few small CPU shapes (torch backend and plain eager), no assertions on time;
- benchmarks/bench_kl.py on its smallest configuration: the JSON has the expected keys and finite numbers,
  unusable methods are listed with a reason, every method computes the same loss, and what runs is what
  topd_kernels.rows.registry says can run;
- the top-k teacher configurations (topk<K>): the PyTorch top-k + tail baseline and the fused TopK path compute
  the same loss (and gradient), within a float32 error bound; the rows, the teacher's bytes and the report;
- the memory trackers of benchmarks/harness/memtrack.py measure known allocations correctly;
- memory_cpu.py, profile_rows.py and profile_cuda_backward.py: their CPU-testable parts.
"""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_kl  # noqa: E402
import memory_cpu  # noqa: E402
import profile_cuda_backward  # noqa: E402
import profile_rows  # noqa: E402
import topd_kernels  # noqa: E402
from harness import baselines, configs, header, memtrack, profiling, timing  # noqa: E402
from topd_kernels import TopK, reference  # noqa: E402
from topd_kernels.rows import registry, torch_rows  # noqa: E402

MB4 = 1 << 22  # 4 MiB


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark: fwd+bwd on small CPU shapes (recorded, not asserted)
# ---------------------------------------------------------------------------------------------------
SHAPES = [(64, 4096, torch.float32), (64, 4096, torch.bfloat16)]
CFGS = configs.loss_configs()
CPU = torch.device("cpu")


def _method(name, cfg_name):
    return bench_kl.build_method(name, CFGS[cfg_name], compile_dynamic=None)


@pytest.mark.parametrize("cfg_name", ["topd", "opd"])
@pytest.mark.parametrize("method", ["topd[torch]", "eager"])
@pytest.mark.parametrize("n,v,dtype", SHAPES, ids=lambda x: str(x).replace("torch.", ""))
def test_bench_fwd_bwd(benchmark, n, v, dtype, method, cfg_name):
    s, t = configs.make_inputs(n, v, dtype, torch.device("cpu"), seed=0)
    s.requires_grad_(True)
    fn = _method(method, cfg_name)

    def setup():
        s.grad = None

    def step():
        fn(s, t).backward()

    benchmark.extra_info.update(N=n, V=v, dtype=str(dtype), method=method, config=cfg_name)
    benchmark.pedantic(step, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


# ---------------------------------------------------------------------------------------------------
# The harness, smallest configuration
# ---------------------------------------------------------------------------------------------------
def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_bench_kl_harness_smallest(tmp_path):
    out = tmp_path / "bench.json"
    # torch.compile is left out: compiling takes minutes on a 2-core CI machine (it runs in --quick); so are
    # topd[triton] and topd[triton+cuda], which run in the Triton interpreter here (see the next test)
    methods = "topd[auto],topd[torch],eager,liger"
    result = bench_kl.main(["--quick", "--device", "cpu", "--N", "32,64", "--V", "1000", "--dtype", "fp32,bf16",
                            "--methods", methods, "--cpu-min-reps", "2", "--cpu-max-reps", "2",
                            "--copy-bytes", str(1 << 22), "--out", str(out), "--plot", str(tmp_path / "b.png")])
    data = json.loads(out.read_text())
    assert (tmp_path / "bench.md").exists()
    for key in ("schema", "env", "settings", "shapes", "configs", "methods", "copy_bandwidth", "results",
                "loss_check"):
        assert key in data, key
    for key in ("device_name", "driver", "torch", "triton", "liger_kernel", "git_commit", "timestamp_utc"):
        assert key in data["env"], key
    assert data["env"]["device_type"] == "cpu" and data["env"]["device_name"].startswith("CPU")
    # --quick runs every configuration, the top-k teacher ones included
    assert list(data["configs"]) == ["topd", "opd", "topk32", "topk128"] == list(configs.CONFIG_NAMES)
    assert data["configs"]["topd"] == {"window": 8, "gamma": 0.9, "loss_threshold": {"quantile": 0.8},
                                       "div_threshold": {"quantile": 0.5}, "suppress_weight": 0.0,
                                       "guidance_weight": 0.5}
    assert data["configs"]["opd"] == data["configs"]["topk32"] == data["configs"]["topk128"] == {"window": 1}
    assert data["teachers"]["topd"] == data["teachers"]["opd"] == {"form": "logits"}
    for k in (32, 128):
        assert data["teachers"][f"topk{k}"] == {"form": "topk", "k": k, "tail": "bucket", "ids": "int32",
                                                "logprobs": "float32"}
    assert data["env"]["backends"] == registry.availability(CPU)

    rows = data["results"]
    assert len(rows) == 2 * 2 * 4 * 4  # N x dtype x config x method: nothing dropped
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
        for key in ("N", "V", "dtype", "config", "method", "status"):
            assert key in r
    # on the CPU: liger is listed with a reason; auto is torch here
    for r in rows:
        if r["method"] == "liger":
            assert r["status"] == "n/a" and r["reason"], r
        if r["method"] == "topd[auto]":
            assert r["status"] == "alias" and "torch" in r["reason"]
    ok = by_status["ok"]
    assert {r["method"] for r in ok} == {"topd[torch]", "eager"}
    assert len(ok) == 2 * 2 * 4 * 2
    # the teacher side's bytes per token: V x 4 / V x 2 for fp32 / bf16 logits, k x (4 + 4) for a top-k teacher
    for r in ok:
        k = configs.topk_k(r["config"])
        elt = 4 if r["dtype"] == "fp32" else 2
        assert r["teacher_bytes_per_token"] == (8 * k if k else r["V"] * elt), r
        assert r["traffic_bytes"]["fwd"] == r["N"] * (r["V"] * elt + r["teacher_bytes_per_token"])
    for r in ok:
        for phase in ("fwd", "bwd", "fwd_bwd"):
            for q in ("median_ms", "p20_ms", "p80_ms"):
                assert math.isfinite(r[phase][q]) and r[phase][q] > 0
            assert r[phase]["p20_ms"] <= r[phase]["median_ms"] <= r[phase]["p80_ms"]
            assert math.isfinite(r["bytes_per_s"][phase]) and r["bytes_per_s"][phase] > 0
            assert math.isfinite(r["pct_of_copy_bw"][phase])
            assert math.isfinite(r["speedup_vs_eager"][phase])
        mem = r["memory"]
        assert mem["peak_step_bytes"] >= r["grad_bytes"]  # the gradient is allocated during the step
        assert mem["kept_after_step_bytes"] >= r["grad_bytes"]
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["loss_abs_diff_vs_eager"] <= 1e-4 * max(1.0, abs(r["loss"]))
    for path, x in _numbers(data):
        assert math.isfinite(x), path
    assert data["loss_check"]["compared"] == 2 * 2 * 4
    assert data["loss_check"]["max_abs_diff"] <= 1e-4
    # memory: the fused torch backend keeps O(N) for backward, eager keeps N x V float32 tensors
    for r in ok:
        if r["method"] == "eager":
            assert r["memory"]["saved_bytes"] >= r["N"] * r["V"] * 4
    assert len(result["results"]) == len(rows)
    # the report: the top-k teacher against the full logits, per shape (opd rows and top-k rows)
    table = (tmp_path / "bench.md").read_text()
    assert "#### Top-k teacher against full logits" in table
    section = table.split("#### Top-k teacher against full logits")[1]
    for n in (32, 64):
        for dtype, elt in (("fp32", 4), ("bf16", 2)):
            assert f"| {n} | 1000 | {dtype} | logits | topd[torch] | {1000 * elt} |" in section
            for k in (32, 128):
                for m in ("topd[torch]", "eager"):
                    assert f"| {n} | 1000 | {dtype} | top-{k} | {m} | {8 * k} |" in section


def test_eager_baseline_matches_topd_reference():
    """The self-contained eager baseline computes the library's loss (the float64 reference) from the same
    LossConfig keywords: each named configuration, and float thresholds."""
    s, t = configs.make_inputs(48, 300, torch.float32, CPU, seed=1)
    _, stats = reference.window_kl_reference(s, t, return_stats=True, **CFGS["topd"])
    # float thresholds half-way between two values (48 of them: the interpolated median), away from ties
    floats = dict(CFGS["topd"], loss_threshold=float(stats.kl.quantile(0.5)),
                  div_threshold=float(stats.window_score.quantile(0.5)))
    for cfg in (*CFGS.values(), floats):
        eager = baselines.eager_window_kl(s.double(), t.double(), **cfg)
        ours = reference.window_kl_reference(s.double(), t.double(), **cfg)
        assert abs(float(eager) - float(ours)) <= 1e-5 * max(1.0, abs(float(ours))), cfg


EPS32 = torch.finfo(torch.float32).eps


def _topk_loss_tolerance(student: torch.Tensor, topk: TopK) -> float:
    """A worst-case bound on |float32 loss - exact loss| of the mean reverse KL over a top-k teacher's k + 1
    categories (tail bucket), for float32 arithmetic on these inputs (an error model, evaluated in float64):

    - a float32 log-probability log p_j = z_j - logsumexp(z) is off by at most about eps (|z|max + log V): the
      rounding of z_j - max (relative to |z|) and the log of a sum of V terms in [0, 1] (log V bounds the
      relative error of torch's cascaded sum in units of eps, with margin);
    - a tail 1 - sum_j p_j (or -expm1(logsumexp)) sums k + 1 terms below 1: absolute error ~(log2(k + 1) + 1) eps
      for a cascaded sum, so its log is off by that over the tail, at most over the smallest tail t_min;
    - category c contributes p_c (log p_c - log q_c): an error e in log p_c or log q_c moves it by
      p_c (1 + |log p_c / q_c|) e at most, and sum_c p_c = 1, so d (and the mean of d) moves by at most
      (2 + L) times the largest log error, L = max_c |log p_c / q_c|.
    """
    z = student.double().flatten(0, -2)
    ids, lq = topk.token_ids.flatten(0, -2), topk.logprobs.double().flatten(0, -2)
    live = lq > float("-inf")
    lp = torch.where(live, z.log_softmax(-1).gather(-1, torch.where(live, ids, 0).long()), -math.inf)
    p_tail = (1 - lp.exp().sum(-1)).clamp(min=1e-7)
    q_tail = (1 - lq.exp().sum(-1)).clamp(min=1e-7)
    ratios = torch.cat((torch.where(live, lp - lq, 0.0), (p_tail.log() - q_tail.log())[:, None]), -1)
    big_l = float(ratios.abs().max())
    t_min = float(torch.minimum(p_tail, q_tail).min())
    e_log_p = EPS32 * (float(z.abs().max()) + math.log(z.shape[-1]))
    e_tail = (math.log2(topk.k + 1) + 1) * EPS32 / t_min
    return (2 + big_l) * (e_log_p + e_tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 4, 32, 128])
def test_topk_baseline_is_the_fused_topk_loss(k, dtype):
    """The PyTorch top-k + tail baseline (baselines.topk_tail_kl) and the fused path fused_window_kl(student,
    TopK(..., tail="bucket")) with default knobs compute the same loss: each within the float32 error bound
    of `_topk_loss_tolerance` of the float64 reference (so within twice that of each other), and the same
    gradient; on bench_kl's inputs (configs.make_topk) in the (N, k) layout, and in (B, T, k) with a mask and
    padding slots (-inf log-probabilities)."""
    s, t = configs.make_inputs(64, 1000, dtype, CPU, seed=4)
    cases = [(s, configs.make_topk(t, k), None)]
    # (B, T, k): 4 sequences of 16; a few padding slots (not the first), a mask with invalid positions
    topk = configs.make_topk(t, k)
    logprobs = topk.logprobs.clone()
    if k > 1:
        logprobs[::3, -1] = float("-inf")
        logprobs[::5, 1::2] = float("-inf")
    mask = torch.rand(64, generator=torch.Generator().manual_seed(5)) > 0.25
    cases.append((s.view(4, 16, -1), TopK(topk.token_ids.view(4, 16, k), logprobs.view(4, 16, k)), mask.view(4, 16)))
    for student, teacher, m in cases:
        tol = _topk_loss_tolerance(student, teacher)
        exact = float(reference.window_kl_reference(student, teacher, mask=m))
        s_fused = student.detach().clone().requires_grad_(True)
        s_base = student.detach().clone().requires_grad_(True)
        fused = topd_kernels.fused_window_kl(s_fused, teacher, mask=m, backend="torch")
        base = baselines.topk_tail_kl(s_base, teacher.token_ids, teacher.logprobs, mask=m)
        fused.backward()
        base.backward()
        assert abs(float(fused.detach()) - exact) <= tol, (float(fused.detach()), exact, tol)
        assert abs(float(base.detach()) - exact) <= tol, (float(base.detach()), exact, tol)
        # the gradient of the mean: each token's share is 1 / (valid tokens) of a d bounded as above; a bf16
        # gradient is also rounded once to bf16 on each side (one ulp: 2^-8 relative)
        n_valid = int(m.sum()) if m is not None else student.shape[0]
        rtol = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(s_fused.grad.float(), s_base.grad.float(), rtol=rtol, atol=2 * tol / n_valid)


def test_topk_configurations_rows_and_report(tmp_path):
    """A topk<K> configuration of any K runs the fused TopK path and the PyTorch top-k baseline (eager) and
    nothing else; K > V is a row "n/a" with the reason; a top-k loss is below the full-logits one (the k + 1
    categories partition the vocabulary, so the KL can only shrink: data processing); an unknown
    configuration is refused."""
    out = tmp_path / "topk.json"
    # (torch.compile left out: it would compile the opd rows, minutes on 2 cores; its top-k rows are "n/a")
    methods = "topd[auto],topd[torch],eager,liger"
    bench_kl.main(["--device", "cpu", "--N", "16", "--V", "300", "--dtype", "fp32",
                   "--configs", "opd,topk8,topk400", "--methods", methods,
                   "--cpu-min-reps", "1", "--cpu-max-reps", "1", "--copy-bytes", str(1 << 20), "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["config"], r["method"]): r for r in data["results"]}
    assert data["teachers"]["topk8"]["k"] == 8 and data["teachers"]["topk400"]["k"] == 400
    assert {m for (c, m), r in rows.items() if c == "topk8" and r["status"] == "ok"} == {"topd[torch]", "eager"}
    assert rows[("topk8", "liger")]["status"] == "n/a"
    assert "top-k" in bench_kl.applies("liger", "topk8") and bench_kl.applies("liger", "opd") is None
    assert bench_kl.applies("torch.compile", "topk8") and bench_kl.applies("torch.compile", "opd") is None
    assert rows[("topk8", "eager")]["teacher_bytes_per_token"] == 64
    assert rows[("topk8", "topd[torch]")]["loss_reference"] == "eager"
    assert rows[("topk8", "topd[torch]")]["loss_abs_diff_vs_eager"] <= 1e-5
    assert rows[("topk8", "eager")]["loss"] < rows[("opd", "eager")]["loss"]
    for m in methods.split(","):
        assert rows[("topk400", m)]["status"] == "n/a" and "k <= V" in rows[("topk400", m)]["reason"]
    table = (tmp_path / "topk.md").read_text()
    assert re.search(r"\| 16 \| 300 \| fp32 \| top-8 \| topd\[torch\] \| 64 \|", table)
    with pytest.raises(SystemExit, match="unknown configuration 'topk0'"):
        bench_kl.main(["--device", "cpu", "--configs", "opd,topk0"])


def test_topd_method_availability_is_the_registry_s():
    """What bench_kl runs of topd_kernels is what topd_kernels.rows.registry says can run on the device."""
    avail = bench_kl.method_availability(CPU)
    backends = registry.availability(CPU)
    assert set(bench_kl.TOPD_METHODS) == {m for m in avail if m.startswith("topd[")}
    assert set(bench_kl.TOPD_METHODS) == {"topd[auto]"} | {f"topd[{name}]" for name in backends}
    for name, why in backends.items():
        assert avail[f"topd[{name}]"] == {"available": why is None, "reason": why or "ok",
                                          "backend": None if why else name}
    assert avail["topd[auto]"]["available"] and avail["topd[auto]"]["backend"] == registry.auto_backend(CPU)


def test_sweep_runs_what_the_registry_allows(tmp_path, monkeypatch):
    """Every topd method runs where the registry says it can (here the Triton ones run in the interpreter)
    and computes eager's loss, with the teacher's logits (opd) and its top-k (topk8: the backend's top-k ops);
    one it says cannot run is listed with the registry's reason."""
    real = registry.availability
    monkeypatch.setattr(registry, "availability", lambda device: dict(real(device), triton="simulated: no GPU"))
    out = tmp_path / "sweep.json"
    bench_kl.main(["--device", "cpu", "--N", "8", "--V", "64", "--dtype", "fp32", "--configs", "opd,topk8",
                   "--methods", ",".join(bench_kl.TOPD_METHODS + ("eager",)), "--cpu-min-reps", "1",
                   "--cpu-max-reps", "1", "--copy-bytes", str(1 << 20), "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    expected = registry.availability(CPU)
    assert expected["triton"] == "simulated: no GPU"
    for config in ("opd", "topk8"):
        rows = {r["method"]: r for r in results if r["config"] == config}
        for name, why in expected.items():
            row = rows[f"topd[{name}]"]
            if why:
                assert row["status"] == "n/a" and row["reason"] == why, row
            else:
                assert row["status"] == "ok" and row["backend"] == name, row
                assert row["loss_abs_diff_vs_eager"] <= 1e-5, row
        assert rows["topd[auto]"]["status"] == "alias" and registry.auto_backend(CPU) in rows["topd[auto]"]["reason"]


def test_knob_flags_map_to_lossconfig_fields():
    """bench_kl's short flags set the LossConfig field they name; a bad value gets LossConfig's message."""
    args = bench_kl.parse_args(["--loss-q", "none", "--div-q", "0.3", "--window", "4", "--guidance-weight", "1"])
    assert (args.loss_threshold, args.div_threshold, args.window, args.guidance_weight) == (
        None, topd_kernels.Quantile(0.3), 4, 1.0)
    with pytest.raises(SystemExit):
        bench_kl.parse_args(["--div-q", "1.5"])
    with pytest.raises(SystemExit, match="window: must be >= 1"):
        bench_kl.main(["--device", "cpu", "--window", "0"])


# ---------------------------------------------------------------------------------------------------
# The memory trackers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tracker", ["dispatch", "profiler"])
def test_tracker_known_allocations(tracker):
    kept = []
    base = torch.randn(1 << 20)  # 4 MiB allocated before the region: never counted

    def fn():
        kept.append(torch.empty(1 << 20))           # 4 MiB, kept
        tmp = torch.ones(1 << 20)                   # 4 MiB, freed at return
        view = tmp.view(1024, 1024)                 # a view: no new memory
        base.add_(1.0)                              # in place on a pre-existing tensor: no new memory
        return (view.sum(), base[:10])              # a scalar and a view of the input

    m = memtrack.measure_peak(fn, torch.device("cpu"), tracker)
    assert m["peak_bytes"] >= 2 * MB4
    assert m["peak_bytes"] <= 2 * MB4 + 64 * 1024
    assert MB4 <= m["live_bytes"] <= MB4 + 1024
    kept.clear()


def test_storage_tracker_counts_autograd_and_frees():
    """The backward's allocations are seen (CPU autograd runs on the calling thread) and frees are
    subtracted: peak of a 4 MiB-per-tensor eager chain, and only the gradient left alive."""
    x = torch.randn(1 << 20, requires_grad=True)
    with memtrack.StorageTracker() as tr:
        y = (x * 2).exp()        # two 4 MiB tensors (exp keeps its result for backward)
        y.sum().backward()
        del y
    assert tr.peak_bytes >= 2 * MB4
    assert MB4 <= tr.live_bytes <= MB4 + 1024  # x.grad
    assert x.grad is not None


@torch.library.custom_op("topd_bench_test::scratch_sum", mutates_args=())
def _scratch_sum(x: torch.Tensor) -> torch.Tensor:
    """A custom op with a 4 MiB temporary inside (freed before it returns) and a small output."""
    return torch.ones(1 << 20).add_(x.sum()).sum().reshape(1)


@_scratch_sum.register_fake
def _(x):
    return x.new_empty(1)


@pytest.mark.parametrize("tracker", ["dispatch", "profiler"])
def test_tracker_sees_inside_custom_ops(tracker):
    """The row backends are torch.library custom ops: the temporaries of their bodies count."""
    x = torch.randn(16)
    m = memtrack.measure_peak(lambda: _scratch_sum(x), CPU, tracker)
    assert MB4 <= m["peak_bytes"] <= MB4 + 1024
    assert m["live_bytes"] == 0


def test_liger_method_computes_the_opd_loss():
    """bench_kl's Liger method (LigerJSD, beta=1, on fp32 log_softmax) is the opd loss of eager, value and
    gradient. On the CPU it runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
    pytest.importorskip("liger_kernel")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, t = configs.make_inputs(8, 1000, torch.float32, device, seed=2)
    s.requires_grad_(True)
    try:
        liger = baselines.liger_loss_fn()(s, t)
    except Exception as exc:  # a Liger release whose kernels do not run in the interpreter
        if device.type == "cpu":
            pytest.skip(f"Liger does not run under the Triton interpreter here: {type(exc).__name__}: {exc}")
        raise
    liger.backward()
    g_liger, s.grad = s.grad.clone(), None
    eager = baselines.eager_window_kl(s, t, **CFGS["opd"])
    eager.backward()
    assert abs(float(liger.detach()) - float(eager.detach())) <= 1e-5
    torch.testing.assert_close(g_liger, s.grad, rtol=1e-4, atol=1e-7)


def test_cuda_timing_path_replays_graphs(monkeypatch):
    """The CUDA branch of the timer (do_bench over rotated copies; backward alone by replaying kept graphs
    with retain_graph) run on the CPU with do_bench replaced by a plain loop: every figure is produced,
    each call sees the gradients cleared, and no gradient is left behind."""
    from types import SimpleNamespace

    calls = []

    def fake_cuda(self, fn, grad_to_none):
        for _ in range(3):
            for x in grad_to_none or []:
                x.grad = None
            fn()
        calls.append(len(grad_to_none or []))
        return {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "reps": None}

    monkeypatch.setattr(timing.Timer, "_cuda", fake_cuda)
    timer = timing.Timer(SimpleNamespace(type="cuda"), bench_kl.parse_args([]))
    copies = []
    for i in range(3):
        s, t = configs.make_inputs(16, 200, torch.float32, torch.device("cpu"), seed=i)
        copies.append((s.requires_grad_(True), t))
    for name in ("topd[torch]", "eager"):
        fn = _method(name, "topd")
        res = timer.time_all(fn, copies)
        assert set(res) == {"fwd", "bwd", "fwd_bwd"}
        assert res["bwd"]["method"].startswith("do_bench")
        assert all(s.grad is None for s, _ in copies)
    assert calls == [0, 3, 3, 0, 3, 3]


def test_oom_is_reported_not_dropped(tmp_path, monkeypatch):
    """A method that runs out of memory gets an "OOM" row (table and JSON) and the others go on; the loss
    check then compares with the first method that ran."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (simulated)")

    monkeypatch.setattr(baselines, "eager_window_kl", oom)
    out = tmp_path / "oom.json"
    result = bench_kl.main(["--device", "cpu", "--N", "32", "--V", "500", "--dtype", "fp32",
                            "--methods", "topd[torch],eager", "--configs", "opd", "--cpu-min-reps", "1",
                            "--cpu-max-reps", "1", "--copy-bytes", str(1 << 20), "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["eager"]["status"] == "OOM" and "out of memory" in rows["eager"]["reason"]
    assert rows["topd[torch]"]["status"] == "ok"
    assert rows["topd[torch]"]["loss_reference"] == "topd[torch]"
    assert rows["topd[torch]"]["speedup_vs_eager"] is None
    assert "| eager | OOM |" in (tmp_path / "oom.md").read_text()
    assert len(result["results"]) == 2


def test_gpu_timing_reports_quantiles_and_copy_bandwidth(monkeypatch):
    """The shared timing (bench_kl, profile_rows, profile_cuda_backward): do_bench stood in for on the CPU,
    its quantiles passed through in order; the copy yardstick counts read + write of the buffer."""
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None):
        fn()
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert timing.bench_gpu(lambda: None, warmup_ms=7, rep_ms=11) == {
        "median_ms": 2.0, "p20_ms": 1.5, "p80_ms": 3.0}
    assert seen == {"warmup": 7, "rep": 11, "quantiles": [0.5, 0.2, 0.8]}
    copy = timing.copy_bandwidth(CPU, 4 << 20)
    assert copy["bytes"] == 4 << 20
    assert copy["bytes_per_s"] == 2 * (4 << 20) / (copy["median_ms"] * 1e-3)
    assert 0 < copy["p20_ms"] <= copy["median_ms"] <= copy["p80_ms"]


# ---------------------------------------------------------------------------------------------------
# memory_cpu.py
# ---------------------------------------------------------------------------------------------------
def test_memory_cpu_sliced_view_is_not_copied(tmp_path, monkeypatch):
    """memory_cpu's cases on a small shape: every row measured by both trackers, which agree; the causal
    shift logits[:, :-1] costs its forward nothing over the contiguous (B, T, V) case (no copy: same peak,
    same saved bytes), and its backward writes the view's rows straight into the (B, T+1, V) gradient (no
    second gradient of the view: its extra is the contiguous case's); the fused loss needs far less than eager."""
    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 1 << 12)  # temporaries small against N x V, as at full size
    n, v, batch = 64, 2048, 4
    result = memory_cpu.main(["--N", str(n), "--V", str(v), "--batch", str(batch), "--out", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == result["rows"]
    rows = {r["case"]: r for r in result["rows"]}
    assert len(rows) == 6
    for r in rows.values():
        d, p = r["dispatch"], r["profiler"]
        for key in ("peak_bytes", "kept_bytes", "fwd_peak_bytes", "saved_bytes"):
            assert abs(d[key] - p[key]) <= 1024, (r["case"], key, d[key], p[key])
        assert d["kept_bytes"] == d["grad_bytes"]
    contiguous = rows["topd[torch] default args, (B, T, V) contiguous"]["dispatch"]
    sliced = rows["topd[torch] default args, student = logits[:, :-1] of (B, T+1, V)"]["dispatch"]
    nv = n * v * 4
    assert sliced["loss"] == contiguous["loss"] == rows["topd[torch] default args"]["dispatch"]["loss"]
    assert sliced["fwd_peak_bytes"] == contiguous["fwd_peak_bytes"] < nv / 4
    assert sliced["saved_bytes"] == contiguous["saved_bytes"] < nv / 10
    assert sliced["grad_bytes"] == (n + batch) * v * 4
    # fwd+bwd: beyond its (B, T+1, V) gradient what the contiguous case needs (a gradient of the view: N V more)
    assert sliced["extra_bytes"] <= contiguous["extra_bytes"] + 1024 < nv / 4
    assert rows["topd[torch] default args, student = logits[:, :-1] of (B, T+1, V)"]["meets_target"]
    eager = rows["eager, window 8 + Quantile thresholds + guidance"]["dispatch"]
    topd = rows["topd[torch] window 8 + Quantile thresholds + guidance"]["dispatch"]
    assert topd["extra_bytes"] < eager["extra_bytes"]
    assert eager["extra_bytes"] >= 2 * nv


# ---------------------------------------------------------------------------------------------------
# The GPU profilers: what runs on the CPU
# ---------------------------------------------------------------------------------------------------
def _fake_bench(fn):
    fn()
    return {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
@pytest.mark.parametrize("script", [profile_rows, profile_cuda_backward])
def test_profilers_refuse_without_a_gpu(script, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main([])
    assert stop.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_profile_rows_times_every_row_op():
    """profile_rows.profile on CPU rows, for every backend the registry lets run here (do_bench stood in for):
    a forward and a backward per backend and divergence, with the bandwidth of the minimal traffic."""
    names = [name for name, why in registry.availability(CPU).items() if why is None]
    ops = {name: registry.resolve(name, CPU) for name in names}
    rows = profiling.row_inputs(4, 64, torch.float32, CPU)
    assert [x.shape for x in rows] == [(1, 4, 64), (1, 4, 64), (4,), (4,)]
    args = profile_rows.parse_args(["--teacher-grad"])
    results = profile_rows.profile(ops, rows, ("reverse_kl", "jsd"), args, _fake_bench, copy_bytes_per_s=1e9)
    traffic = profiling.row_traffic(4, 64, 4, teacher_grad=True)
    assert [r["divergence"] for r in results] == ["reverse_kl", "jsd"]
    for entry in results:
        assert set(entry) == {"divergence"} | {f"{n}_{d}" for n in names for d in ("forward", "backward")}
        for name in names:
            for direction in ("forward", "backward"):
                r = entry[f"{name}_{direction}"]
                assert r["min_bytes"] == traffic[direction]
                assert r["achieved_GBps"] == traffic[direction] / 2e-3 / 1e9
                assert r["fraction_of_copy_bw"] == traffic[direction] / 2e-3 / 1e9


def test_profile_cuda_backward_compares_two_backwards():
    """profile_cuda_backward.compare on CPU rows: the torch backward against itself (difference 0, speedup 1),
    and, where the registry has them here (the extension's host build, the Triton interpreter), the pair it
    is written for."""
    rows = profiling.row_inputs(4, 64, torch.float32, CPU)
    pairs = [("torch", "torch")]
    if registry.unavailable("triton+cuda", CPU) is None:
        pairs.append(("triton+cuda", "triton"))
    for ext, ref in pairs:
        entry = profile_cuda_backward.compare(registry.resolve(ext, CPU), registry.resolve(ref, CPU), rows, "jsd",
                                              True, _fake_bench, lambda nbytes: timing.copy_bandwidth(CPU, nbytes))
        assert entry["bytes"] == profiling.row_traffic(4, 64, 4, teacher_grad=True)["backward"]
        assert entry["copy"]["bytes"] == entry["bytes"] // 2 // 4 * 4
        assert entry["cuda_speedup_vs_triton"] == 1.0
        assert entry["max_abs_diff_vs_triton"] <= (0.0 if ext == ref else 1e-6)
        assert entry["cuda_extension"]["min_bytes"] == entry["bytes"]


def test_result_path_names_the_device_and_time():
    env = {"device_name": "NVIDIA H100 80GB HBM3", "timestamp_utc": "2026-11-22T06:36:29+00:00"}
    name = "profile_rows_nvidia-h100-80gb-hbm3_20261122T063629Z.json"
    assert header.result_path("profile_rows", env) == header.RESULTS / name
